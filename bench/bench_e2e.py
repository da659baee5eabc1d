"""End-to-end training speed: fastsat against the loops users write today and against the floor.

One run, everything side by side on one device, interleaved (A, B, C, A, B, C, ...) so that load on
the machine hits every implementation alike; the median over repeats is reported.

    python bench/bench_e2e.py                  # CPU mode: small CNN, 32×32, batch 128 (this machine)
    python bench/bench_e2e.py --quick          # CPU smoke run without the compiled rows, under 2 minutes
    python bench/bench_e2e.py --device cuda    # GPU mode: PreActResNet-18, 32×32, batch 512 (< 6 min, H100/H200)

Work (ε = 8/255 in pixels): PGD-10 AT (step 2/255, random start), Fast-AT (FGSM step 1.25ε from a
uniform start), SAT with boxes, standard training.

Implementations of each step:
- ``rice``: the Rice et al. (2020) style loop: a DataLoader over CPU tensors (copied to the device
  per batch), fp32, the attack differentiating with ``loss.backward()`` (weight gradients computed
  and thrown away), eager elementwise ops, model in train mode throughout.
- ``plain``: the best plain-PyTorch loop a careful user writes: data on the device, bf16 autocast
  and channels_last on CUDA (fp32 on the CPU), ``torch.autograd.grad`` for the input only, model in
  eval mode for the attack, fused optimizer where available.
- ``plain-compiled``: the same loop with the model under ``torch.compile``.
- ``torchattacks``: torchattacks' PGD inside the plain loop (only where it is installed).
- ``fastsat``: :class:`fastsat.train.Trainer`'s own training step (:meth:`~fastsat.train.Trainer.train_step`)
  with the device's defaults (CUDA: bf16, channels_last, fused SGD, compiled and captured as CUDA
  graphs; CPU: fp32, eager, fused SGD), as it runs after the first batch of an epoch: inside
  ``no_host_checks()``.
- ``fastsat-compiled`` (CPU only, where the default is eager): the same with ``compile=True``.
- ``floor``: the network's own passes timed alone, in fastsat's precision and layout — PGD-10:
  11 forward + 10 input-only backward + 1 full backward + the optimizer step; Fast-AT: 2 + 1 + 1;
  SAT and standard: 1 forward + 1 full backward. An attack's overhead is its time over this.

Also the cost of each work relative to standard training, per implementation (targets on a GPU:
SAT ≤ 1.05×, Fast-AT ≤ 2.2×).

Writes ``bench/results/<device>-e2e-<date>.csv`` and ``.md`` (device, versions, date, settings).
``--model``/``--batch`` run another network or batch size in either mode (e.g. the GPU mode's
``preactresnet18`` on the CPU, to check its code paths).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

import fastsat
from fastsat import models
from fastsat.data import shapes

EPS, STEP = 8 / 255, 2 / 255
EPOCH_IMAGES = 50_000
SAT_EPOCH = 3  # SAT curriculum epoch: p = 1 - 0.6^0.3 ≈ 0.14 of the elements take the box map
WORKS = ("pgd", "fast", "sat", "standard")
IMPLEMENTATIONS = ("rice", "plain", "plain-compiled", "torchattacks", "fastsat", "fastsat-compiled", "floor")


@dataclass
class Settings:
    device: torch.device
    model: str
    width: int | None
    batch: int
    size: int
    steps: int      # timed optimizer steps per repeat
    repeats: int
    warmup: int
    compile: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype | None:
        """Autocast dtype of the careful loops (bf16 on CUDA, none on the CPU)."""
        return torch.bfloat16 if self.cuda else None


def autocast(settings: Settings):
    if settings.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(settings.device.type, dtype=settings.dtype)


def make_model(settings: Settings, channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {} if settings.width is None else {"width": settings.width}
    model = models.create(settings.model, num_classes=10, **kwargs).to(settings.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_optimizer(model: torch.nn.Module, settings: Settings) -> torch.optim.Optimizer:
    fused = {"fused": True} if settings.cuda else {}
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, **fused)


# --- the loops users write today -------------------------------------------------------------------

def rice_step(work: str, model, opt, x, y, box) -> None:
    """Rice et al.'s train_pgd/train_fgsm: delta with .grad, loss.backward() in the attack."""
    model.train()
    if work in ("pgd", "fast"):
        steps, alpha = (10, STEP) if work == "pgd" else (1, 1.25 * EPS)
        delta = torch.zeros_like(x).uniform_(-EPS, EPS)
        delta.data = torch.clamp(x + delta, 0, 1) - x
        delta.requires_grad_(True)
        for _ in range(steps):
            loss = F.cross_entropy(model(x + delta), y)
            loss.backward()
            grad = delta.grad.detach()
            d = torch.clamp(delta + alpha * torch.sign(grad), -EPS, EPS)
            d = torch.clamp(x + d, 0, 1) - x
            delta.data = d
            delta.grad.zero_()
        x_train = torch.clamp(x + delta.detach(), 0, 1)
    elif work == "sat":
        x_train = sat_input(x, box)
    else:
        x_train = x
    loss = F.cross_entropy(model(x_train), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def sat_input(x, box):
    """The SAT input clip(x − ε·s) with box maps, in eager torch ops (as a user would write it)."""
    p = 1.0 - 0.6 ** (SAT_EPOCH / 10)
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
    inside = ((cols >= box[:, 0].view(-1, 1, 1, 1)) & (cols < box[:, 2].view(-1, 1, 1, 1))
              & (rows >= box[:, 1].view(-1, 1, 1, 1)) & (rows < box[:, 3].view(-1, 1, 1, 1)))
    saliency = torch.where(inside, 1.0, -1.0)
    noise = torch.where(torch.rand_like(x) < 0.5, -1.0, 1.0)
    s = torch.where(torch.rand_like(x) < p, saliency, noise)
    return (x - EPS * s).clamp(0, 1)


def plain_attack(model, x, y, steps: int, alpha: float, settings: Settings):
    """L∞ PGD from a uniform start, input gradients only, model in eval mode."""
    model.eval()
    x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with autocast(settings):
            loss = F.cross_entropy(model(x_adv).float(), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    model.train()
    return x_adv.detach()


def plain_step(work: str, model, opt, x, y, box, settings: Settings, attack=None) -> None:
    if work == "pgd":
        x_train = attack(x, y) if attack is not None else plain_attack(model, x, y, 10, STEP, settings)
    elif work == "fast":
        x_train = plain_attack(model, x, y, 1, 1.25 * EPS, settings)
    elif work == "sat":
        x_train = sat_input(x, box)
    else:
        x_train = x
    update(model, opt, x_train, y, settings)


def update(model, opt, x, y, settings: Settings) -> None:
    """The weight update every careful loop ends with: train mode, one forward and full backward, a step."""
    model.train()
    with autocast(settings):
        loss = F.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def floor_step(work: str, model, opt, x, y, settings: Settings) -> None:
    """Only the network's passes: forward, input-only backward, full backward, optimizer step."""
    attack_passes = {"pgd": 10, "fast": 1}.get(work, 0)
    if attack_passes:
        model.eval()
        x_in = x.detach().requires_grad_(True)
        for _ in range(attack_passes):
            with autocast(settings):
                loss = F.cross_entropy(model(x_in).float(), y)
            torch.autograd.grad(loss, x_in)
    update(model, opt, x, y, settings)


# --- fastsat ---------------------------------------------------------------------------------------

FASTSAT_RECIPES = {"pgd": ("pgd", {"steps": 10}), "fast": ("fast", {}), "sat": ("sat", {"maps": "boxes"}),
                   "standard": ("standard", {})}


def fastsat_runner(work: str, settings: Settings, batches: list[dict], compile: bool | None = None) -> Callable[[], None]:
    """A closure running one training step per batch through :meth:`fastsat.train.Trainer.train_step`
    (the trainer's own step: recipe, LR schedule; the device's defaults unless ``compile`` is given),
    inside ``no_host_checks()`` as the trainer runs every batch of an epoch but the first."""
    from fastsat._checks import no_host_checks
    from fastsat.data import as_batch
    from fastsat.train import TrainConfig, Trainer

    name, options = FASTSAT_RECIPES[work]
    config = TrainConfig(recipe=name, recipe_options=options, epochs=SAT_EPOCH + 1, batch_size=settings.batch,
                         lr=0.01, weight_decay=5e-4, compile=compile, early_stop_drop=None, progress=False)
    model = make_model(settings, channels_last=False)
    trainer = Trainer(model, batches, config)
    on_device = [as_batch(b, settings.device) for b in batches]

    def run():
        with no_host_checks():
            for batch in on_device:
                trainer.train_step(dict(batch), SAT_EPOCH)
    return run


# --- harness ---------------------------------------------------------------------------------------

def make_batches(settings: Settings) -> list[dict]:
    data = shapes(settings.batch * settings.steps, size=settings.size, num_classes=10, seed=0)
    batches = []
    for i in range(settings.steps):
        part = slice(i * settings.batch, (i + 1) * settings.batch)
        batches.append({"image": data.images[part].float().div(255), "label": data.labels[part].long(),
                        "box": data.boxes[part].long()})
    return batches


def runners(work: str, settings: Settings, cpu_batches: list[dict]) -> dict[str, Callable[[], None]]:
    """One closure per implementation, each running ``settings.steps`` optimizer steps."""
    device = settings.device
    on_device = [{k: v.to(device) for k, v in b.items()} for b in cpu_batches]
    layout = torch.channels_last if settings.cuda else torch.contiguous_format
    fast_batches = [{**b, "image": b["image"].contiguous(memory_format=layout)} for b in on_device]
    result: dict[str, Callable[[], None]] = {}

    rice_model = make_model(settings, channels_last=False)
    rice_opt = torch.optim.SGD(rice_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images = torch.cat([b["image"] for b in cpu_batches])
    labels = torch.cat([b["label"] for b in cpu_batches])
    boxes = torch.cat([b["box"] for b in cpu_batches])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels, boxes),
                                         batch_size=settings.batch, shuffle=True, pin_memory=settings.cuda)

    def rice():
        for x, y, box in loader:
            rice_step(work, rice_model, rice_opt, x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                      box.to(device, non_blocking=True))
    result["rice"] = rice

    def careful(compiled: bool, attack_factory=None):
        model = make_model(settings, channels_last=settings.cuda)
        opt = make_optimizer(model, settings)
        net = torch.compile(model) if compiled else model
        attack = attack_factory(net) if attack_factory is not None else None

        def run():
            for b in fast_batches:
                plain_step(work, net, opt, b["image"], b["label"], b["box"], settings, attack)
        return run

    result["plain"] = careful(False)
    if settings.compile:
        result["plain-compiled"] = careful(True)
    if work == "pgd":
        try:
            import torchattacks
        except ImportError:
            print("torchattacks is not installed: its row is skipped", flush=True)
        else:
            result["torchattacks"] = careful(False, lambda net: torchattacks.PGD(net, eps=EPS, alpha=STEP, steps=10,
                                                                                 random_start=True))
    result["fastsat"] = fastsat_runner(work, settings, cpu_batches)
    if settings.compile and not settings.cuda:  # on CUDA the default already compiles
        result["fastsat-compiled"] = fastsat_runner(work, settings, cpu_batches, compile=True)

    floor_model = make_model(settings, channels_last=settings.cuda)
    floor_opt = make_optimizer(floor_model, settings)

    def floor():
        for b in fast_batches:
            floor_step(work, floor_model, floor_opt, b["image"], b["label"], settings)
    result["floor"] = floor
    return result


def measure(work: str, settings: Settings, batches: list[dict]) -> dict[str, float]:
    """Median seconds per optimizer step of each implementation, interleaved repeats."""
    runs = runners(work, settings, batches)
    sync = torch.cuda.synchronize if settings.cuda else (lambda: None)
    for name, fn in runs.items():
        started = time.perf_counter()
        for _ in range(settings.warmup):
            fn()
        sync()
        print(f"  {work:8s} {name:15s} warm-up {time.perf_counter() - started:6.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(settings.repeats):
        for name, fn in runs.items():
            sync()
            started = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - started) / settings.steps)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats; on the CPU also no compiled "
                        "rows (compiling alone takes minutes there): under 2 minutes")
    parser.add_argument("--works", default=",".join(WORKS), help=f"comma-separated subset of {WORKS}")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (plain-compiled row, fastsat eager)")
    parser.add_argument("--out-dir", default="bench/results", help="where the CSV and markdown go")
    parser.add_argument("--model", help="fastsat.models name instead of the mode's (CUDA: preactresnet18, CPU: "
                        "madrycnn width 16)")
    parser.add_argument("--batch", type=int, help="batch size instead of the mode's (CUDA 512, CPU 128, CPU --quick 32)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = args.model or ("preactresnet18" if cuda else "madrycnn")
    settings = Settings(
        device=device,
        model=model,
        width=16 if model == "madrycnn" else None,
        batch=args.batch or (512 if cuda else (32 if args.quick else 128)),
        size=32,
        steps=(4 if args.quick else 10) if cuda else (1 if args.quick else 4),
        repeats=(3 if cuda else 2) if args.quick else 5,
        warmup=2 if cuda else 1,
        compile=not args.no_compile and (cuda or not args.quick),
    )
    works = [w.strip() for w in args.works.split(",")]
    unknown = sorted(set(works) - set(WORKS))
    if unknown:
        parser.error(f"--works: unknown {unknown}; expected a subset of {WORKS}")
    if not cuda:
        # The same few batches are replayed many times, which drives values into subnormal floats
        # that x86 CPUs compute at a fraction of the speed (without this, every row of the CPU run
        # was 4-10x slower, standard training the most). Flushing them to zero keeps the
        # comparison about the work.
        torch.set_flush_denormal(True)
    batches = make_batches(settings)
    stamp = datetime.now(timezone.utc)
    name = f"{'gpu' if cuda else 'cpu'}-e2e-{stamp:%Y-%m-%d}{'-quick' if args.quick else ''}"
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for work in works:
        seconds = measure(work, settings, batches)
        for impl in IMPLEMENTATIONS:
            if impl not in seconds:
                continue
            step = seconds[impl]
            row = {"work": work, "implementation": impl, "ms_per_step": step * 1e3,
                   "images_per_s": settings.batch / step, "epoch_s_50k": EPOCH_IMAGES / settings.batch * step}
            for base in ("rice", "plain", "plain-compiled", "floor"):
                row[f"speedup_vs_{base}"] = seconds[base] / step if base in seconds else None
            rows.append(row)
            print(f"{work:8s} {impl:16s} {row['images_per_s']:9.1f} img/s  epoch(50k) {row['epoch_s_50k']:7.1f} s  "
                  f"× rice {row['speedup_vs_rice']:.2f}  × floor {row['speedup_vs_floor']:.2f}", flush=True)
        # Written after each work so that a crash or time-out in a later one keeps these.
        write_results(out_dir / name, rows, settings, stamp)
    return 0


def write_results(stem: Path, rows: list[dict], settings: Settings, stamp: datetime) -> None:
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    device_name = torch.cuda.get_device_name(settings.device) if settings.cuda else (platform.processor() or platform.machine())
    threads = "" if settings.cuda else f", {torch.get_num_threads()} threads"
    lines = [
        f"# End-to-end training speed ({stamp:%Y-%m-%d %H:%M UTC})",
        "",
        f"`python bench/bench_e2e.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        (f"Device {settings.device} ({device_name}{threads}); torch {torch.__version__}, "
        f"fastsat {fastsat.__version__}, backends {fastsat.ops.available_backends()}; model {settings.model}"
        f"{'' if settings.width is None else f' (width {settings.width})'}, {settings.size}×{settings.size}, "
        f"batch {settings.batch}; median over {settings.repeats} interleaved repeats of {settings.steps} steps; "
        f"compile {'on' if settings.compile else 'off'}. Epoch time extrapolated to {EPOCH_IMAGES:,} images."),
        "",
        "| work | implementation | img/s | epoch (50k) s | × rice | × plain | × plain-compiled | time / floor |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ratio(value):
        return "–" if value is None else f"{value:.2f}"

    for r in rows:
        floor = r["speedup_vs_floor"]
        lines.append(f"| {r['work']} | {r['implementation']} | {r['images_per_s']:.1f} | {r['epoch_s_50k']:.1f} | "
                     f"{ratio(r['speedup_vs_rice'])} | {ratio(r['speedup_vs_plain'])} | "
                     f"{ratio(r['speedup_vs_plain-compiled'])} | {ratio(None if floor is None else 1 / floor)} |")
    # Each work's epoch time over standard training's, per implementation (SAT ≤ 1.05×, Fast ≤ 2.2× on a GPU).
    epoch = {(r["work"], r["implementation"]): r["epoch_s_50k"] for r in rows}
    others = [w for w in WORKS if w != "standard" and any(key[0] == w for key in epoch)]
    if any(key[0] == "standard" for key in epoch) and others:
        lines += ["", "Epoch time relative to standard training:", "",
                  "| implementation | " + " | ".join(f"{w} / standard" for w in others) + " |",
                  "|---|" + "---|" * len(others)]
        for impl in IMPLEMENTATIONS:
            if ("standard", impl) in epoch:
                cells = [ratio(epoch[(w, impl)] / epoch[("standard", impl)]) if (w, impl) in epoch else "–"
                         for w in others]
                lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
