"""Training throughput (images/s) per recipe: fastsat's ``Recipe.train_step`` against a plain
PyTorch loop of the same math, measured in one run, interleaved (A, B, A, B, ...) so that load on
the machine hits both alike. Also SAT's cost relative to standard training (target ≤ 1.05×).

    python bench/bench_train.py                      # CPU: small CNN, 32×32, batch 128
    python bench/bench_train.py --device cuda --model preactresnet18 --batch 512 --precision bf16
    python bench/bench_train.py --out bench/results/train_cpu.md

The reference loop is what a user would write by hand: the same model, optimizer, ε and steps,
with the perturbations built from plain torch ops (uniform noise, sign, clamp, autograd.grad).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

import fastsat
from fastsat import models
from fastsat.data import shapes
from fastsat.train import make_recipe, sat_probability

EPS, STEP = 8 / 255, 2 / 255
EPOCH = 3  # SAT curriculum epoch used for the SAT recipes


# --- the plain-PyTorch reference of each recipe's batch ------------------------------------------

def _input_grad(model, x, y):
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return grad


def _pgd(model, x, y, steps, step, start):
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1) if start else x.clone()
    for _ in range(steps):
        grad = _input_grad(model, x_adv, y)
        x_adv = torch.min(torch.max(x_adv + step * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train(was_training)
    return x_adv.detach()


def _sat_input(x, batch, key, start=None):
    p = sat_probability(EPOCH)
    if key == "box":
        h, w = x.shape[-2:]
        box = batch["box"]
        rows, cols = torch.arange(h, device=x.device).view(1, 1, h, 1), torch.arange(w, device=x.device).view(1, 1, 1, w)
        inside = (cols >= box[:, 0].view(-1, 1, 1, 1)) & (cols < box[:, 2].view(-1, 1, 1, 1)) \
            & (rows >= box[:, 1].view(-1, 1, 1, 1)) & (rows < box[:, 3].view(-1, 1, 1, 1))
    else:
        inside = batch["mask"]
    saliency = torch.where(inside, 1.0, -1.0)
    noise = torch.where(torch.rand_like(x) < 0.5, -1.0, 1.0)
    s = torch.where(torch.rand_like(x) < p, saliency, noise)
    return ((x if start is None else start) - EPS * s).clamp(0, 1)


def _kl_attack(model, x, steps, step):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        clean = F.softmax(model(x), 1)
    x_adv = x + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.kl_div(F.log_softmax(model(x_adv), 1), clean, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv + step * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    return x_adv.detach()


def _trades(model, x, y, x_adv, beta):
    logits = model(x)
    kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
    return F.cross_entropy(logits, y) + beta * kl


def reference_step(name, model, batch, opt, state):
    x, y = batch["image"], batch["label"]
    if name == "free":
        delta = state.get("delta", torch.zeros_like(x))
        for _ in range(4):
            x_adv = (x + delta).clamp(0, 1).requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            delta = (torch.min(torch.max(x_adv.detach() + EPS * x_adv.grad.sign(), x - EPS), x + EPS).clamp(0, 1) - x)
        state["delta"] = delta
        return
    if name == "standard":
        loss = F.cross_entropy(model(x), y)
    elif name in ("sat-boxes", "sat-masks"):
        loss = F.cross_entropy(model(_sat_input(x, batch, "box" if name == "sat-boxes" else "mask")), y)
    elif name == "pgd":
        loss = F.cross_entropy(model(_pgd(model, x, y, 10, STEP, True)), y)
    elif name == "fast":
        loss = F.cross_entropy(model(_pgd(model, x, y, 1, 1.25 * EPS, True)), y)
    elif name == "sat+pgd":
        if torch.rand(()) < 0.5:
            start = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
            x_train = _sat_input(x, batch, "box", start)
        else:
            x_train = _pgd(model, x, y, 5, STEP, True)
        loss = F.cross_entropy(model(x_train), y)
    elif name == "trades":
        loss = _trades(model, x, y, _kl_attack(model, x, 10, 0.007), 6.0)
    elif name == "gradnorm":
        xg = x.detach().requires_grad_(True)
        ce = F.cross_entropy(model(xg), y, reduction="none")
        (g,) = torch.autograd.grad(ce.sum(), xg, create_graph=True)
        loss = (ce + 0.1 * g.pow(2).flatten(1).sum(1)).mean()
    else:
        raise ValueError(name)
    opt.zero_grad()
    loss.backward()
    opt.step()


RECIPES = {
    "standard": ("standard", {}),
    "sat-boxes": ("sat", {"maps": "boxes"}),
    "sat-masks": ("sat", {"maps": "masks"}),
    "gradnorm": ("gradnorm", {"lam": 0.1}),
    "fast": ("fast", {}),
    "free": ("free", {"replays": 4}),
    "sat+pgd": ("sat+pgd", {"maps": "boxes"}),
    "pgd": ("pgd", {"steps": 10}),
    "trades": ("trades", {"steps": 10}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--model", default="madrycnn", help="fastsat.models name (default: madrycnn)")
    parser.add_argument("--width", type=int, default=16, help="model width (default: 16)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default: 32)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default: 128)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per repeat (default: 4)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the median is reported (default: 5)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="autocast (default: fp32)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset")
    parser.add_argument("--out", default=None, help="also write the Markdown table here")
    args = parser.parse_args()
    device = torch.device(args.device)
    data = shapes(args.batch * args.steps, size=args.size, num_classes=10, seed=0)
    batches = []
    for i in range(args.steps):
        part = slice(i * args.batch, (i + 1) * args.batch)
        batches.append({"image": data.images[part].float().div(255).to(device), "label": data.labels[part].to(device),
                        "box": data.boxes[part].to(device), "mask": data.masks[part].to(device)})
    kwargs = {"width": args.width} if args.model == "madrycnn" else {}
    model = models.create(args.model, num_classes=10, **kwargs).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" else contextlib.nullcontext

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Each step starts from the same RNG state in both implementations, so that sat+pgd's coin
    # (the first draw of a step in both) picks the same branches and the two do the same work.
    def run_fastsat(recipe):
        for i, batch in enumerate(batches):
            torch.manual_seed(i)
            recipe.train_step(model, batch, opt, epoch=EPOCH, precision=args.precision)

    def run_reference(name, state):
        for i, batch in enumerate(batches):
            torch.manual_seed(i)
            with amp():
                reference_step(name, model, batch, opt, state)

    rows = []
    names = [n.strip() for n in args.recipes.split(",")]
    standard = make_recipe("standard")
    for name in names:
        recipe = make_recipe(RECIPES[name][0], **RECIPES[name][1])
        state: dict = {}
        # Standard training is timed in the same interleaved loop, so each recipe's cost relative to
        # it sees the same machine load.
        runs = {
            "fastsat": lambda r=recipe: run_fastsat(r),
            "reference": lambda n=name, st=state: run_reference(n, st),
            "standard": lambda: run_fastsat(standard),
        }
        for fn in runs.values():  # warm-up
            fn()
        times = {which: [] for which in runs}
        for _ in range(args.repeats):
            for which, fn in runs.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[which].append(time.perf_counter() - start)
        images = args.batch * args.steps
        fast, ref, std = (statistics.median(times[k]) for k in ("fastsat", "reference", "standard"))
        rows.append({"recipe": name, "fastsat": images / fast, "reference": images / ref, "ratio": fast / ref, "cost": fast / std})
        print(f"{name:10s} fastsat {images / fast:8.1f} img/s   reference {images / ref:8.1f} img/s   "
              f"time ratio {fast / ref:.3f}   cost vs standard {fast / std:.3f}", flush=True)
    lines = [
        f"# Training throughput ({datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC})",
        "",
        (f"device {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
         f"torch {torch.__version__}, fastsat {fastsat.__version__}, backends {fastsat.ops.available_backends()}; "
         f"model {args.model}, {args.size}×{args.size}, batch {args.batch}, {args.precision}; median of {args.repeats} "
         f"interleaved repeats of {args.steps} steps. pgd 10 steps, sat+pgd 5, trades 10, free m=4; ε = 8/255."),
        "",
        "| recipe | fastsat img/s | reference img/s | fastsat/reference time | cost vs standard (fastsat) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['fastsat']:.1f} | {r['reference']:.1f} | {r['ratio']:.3f} | {r['cost']:.3f} |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
