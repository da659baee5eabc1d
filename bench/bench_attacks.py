"""PGD-10 on a small CNN on the CPU: fastsat.attacks.PGD against a plain PyTorch loop of the same math.

    python -m bench.bench_attacks [--batch 64] [--size 32] [--repeats 7] [--threads N]

Both sides start from the same random start (fastsat.ops.random_start, same seed and backend), take
10 L∞ steps of 2/255 at ε = 8/255 with the CE loss in eval mode, and must end at the same batch
(checked before timing). The plain loop is what users write by hand (torchattacks style):
``torch.autograd.grad`` of the summed CE, ``x + α·sign(g)``, ``min/max`` projection, ``clamp``.
The fastsat side additionally returns per-sample alignment statistics and success flags, checks
its labels and audits its output. Each side runs ``repeats`` times after one warm-up; the table
gives the median wall time and the ratio plain / fastsat (> 1: fastsat is faster), measured in
the same process, interleaved. A second table times one projection step alone (x and g given),
where the model does not dominate: ``fastsat.ops.pgd_step`` per backend vs the plain expression.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastsat import ops
from fastsat.attacks import PGD

EPS, STEP, STEPS = 8 / 255, 2 / 255, 10


def small_cnn() -> nn.Module:
    """A CIFAR-shaped CNN (3×32×32 → 10 logits)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    ).eval()


def plain_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
    x_adv = x_start.clone()
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = x_adv + STEP * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0.0, 1.0)
    return x_adv.detach()


def _interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall time (ms) of each function, the functions taking turns so drift hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = small_cnn()
    if args.size != 32:
        model[-1] = nn.Linear(64 * (args.size // 4) ** 2, 10)
    x = torch.rand(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))

    backends = [name for name, ok in ops.available_backends().items() if ok and name in ("cpp", "torch", "triton")]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"python {platform.python_version()}, torch {torch.__version__}, ops backends available: {backends}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"PGD-{STEPS} L∞ ε=8/255 α=2/255 CE, batch {args.batch}×3×{args.size}×{args.size}, "
          f"median of {args.repeats}, interleaved\n")

    runs = {}
    for backend in [b for b in backends if b != "triton"]:  # triton runs on the CPU only interpreted
        attack = PGD(model, eps=EPS, step_size=STEP, steps=STEPS, backend=backend)

        def run_fastsat(attack=attack, backend=backend):
            torch.manual_seed(1)
            return attack(x, y).x_adv

        runs[f"fastsat PGD (ops backend {backend})"] = run_fastsat

    def run_plain(backend="torch"):
        torch.manual_seed(1)
        start = ops.random_start(x, eps=EPS, backend=backend)
        return plain_pgd(model, x, y, start)

    for name, fn in runs.items():
        # Backends draw different random streams: compare against the plain loop started from
        # the same backend's start. Same arithmetic otherwise; float32 sign flips of near-zero
        # gradient entries may move a few elements, so require agreement on 99% of them.
        backend = name.split("backend ")[1].rstrip(")")
        agree = ((fn() - run_plain(backend)).abs() <= 1e-6).float().mean().item()
        if agree < 0.99:
            raise SystemExit(f"{name} disagrees with the plain loop on {1 - agree:.2%} of the elements")
    runs["plain PyTorch loop"] = run_plain

    timings = _interleaved(runs, args.repeats)
    plain = timings["plain PyTorch loop"]
    print(f"{'PGD-10 end to end':<40} {'ms':>9} {'plain/this':>11}")
    for name, ms in timings.items():
        print(f"{name:<40} {ms:9.2f} {plain / ms:11.2f}")

    g = torch.randn_like(x)
    x_adv = ops.random_start(x, eps=EPS, backend="torch")
    steps = {
        f"ops.pgd_step ({b})": (lambda b=b: ops.pgd_step(x_adv, g, x, step_size=STEP, eps=EPS, backend=b))
        for b in backends if b != "triton"
    }
    steps["plain expression"] = lambda: torch.min(torch.max(x_adv + STEP * g.sign(), x - EPS), x + EPS).clamp(0, 1)
    step_timings = _interleaved(steps, max(args.repeats, 25))
    plain_step = step_timings["plain expression"]
    print(f"\n{'one L∞ projection step':<40} {'ms':>9} {'plain/this':>11}")
    for name, ms in step_timings.items():
        print(f"{name:<40} {ms:9.3f} {plain_step / ms:11.2f}")


if __name__ == "__main__":
    main()
