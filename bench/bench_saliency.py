"""Peak memory of SmoothGrad and Integrated Gradients with and without ``chunk_size`` (CPU).

    python -m bench.bench_saliency [--batch 4] [--size 224] [--samples 50] [--steps 256] [--chunk 8]

How it is measured: torch's CPU allocator does not go through Python's allocator, so tracemalloc
does not see tensors. Each configuration therefore runs in a fresh subprocess, which builds the
model and the batch, runs the method once at a tiny size (to load kernels and libraries), reads
its peak resident set size (``ru_maxrss``), runs the measured call, and reads the peak again; the
table reports the difference — the extra peak memory that call needed (MiB) — and its wall time.
For reference it also prints the size of the batch x itself and of all the noisy / path inputs
that an unchunked call stacks at once (n · |x|).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch
from torch import nn

from fastsat import saliency


def small_cnn() -> nn.Module:
    """A small ImageNet-shaped CNN (3×H×W → 10 logits): memory is dominated by activations."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _run(method: str, chunk: int | None, args: argparse.Namespace) -> dict[str, float]:
    """One measurement (runs inside the child process)."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = small_cnn()
    x = torch.rand(args.batch, 3, args.size, args.size)
    if method == "smoothgrad":
        def call(inp: torch.Tensor, n: int) -> torch.Tensor:
            return saliency.smoothgrad(model, inp, n_samples=n, seed=0, chunk_size=chunk)
        n = args.samples
    else:
        def call(inp: torch.Tensor, n: int) -> torch.Tensor:
            return saliency.integrated_gradients(model, inp, steps=n, chunk_size=chunk)
        n = args.steps
    call(x[:1, :, :16, :16], 2)  # warm-up at a negligible size
    before = _peak_mib()
    start = time.perf_counter()
    call(x, n)
    seconds = time.perf_counter() - start
    return {"extra_peak_mib": _peak_mib() - before, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=50, help="SmoothGrad noise samples")
    parser.add_argument("--steps", type=int, default=256, help="IG path points")
    parser.add_argument("--chunk", type=int, default=8, help="chunk_size of the chunked runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, chunk = args.child
        print(json.dumps(_run(method, None if chunk == "none" else int(chunk), args)))
        return

    x_mib = args.batch * 3 * args.size * args.size * 4 / 2**20
    print(f"# fastsat saliency peak memory, CPU ({platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, {args.threads} threads")
    print(f"# batch {args.batch}×3×{args.size}×{args.size} float32 = {x_mib:.1f} MiB; "
          f"SmoothGrad n_samples={args.samples}, IG steps={args.steps}")
    print("# extra peak RSS of one call over the process's peak before it (fresh process per row)")
    print(f"{'method':<22}{'chunk_size':>11}{'inputs stacked MiB':>20}{'extra peak MiB':>16}{'seconds':>9}")
    for method, n in (("smoothgrad", args.samples), ("integrated_gradients", args.steps)):
        for chunk in (None, args.chunk):
            cmd = [sys.executable, "-m", "bench.bench_saliency", "--child", method, str(chunk).lower(),
                   "--batch", str(args.batch), "--size", str(args.size), "--samples", str(args.samples),
                   "--steps", str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            stacked = min(n, chunk or n) * x_mib
            print(f"{method:<22}{chunk!s:>11}{stacked:>20.1f}{result['extra_peak_mib']:>16.1f}"
                  f"{result['seconds']:>9.2f}")


if __name__ == "__main__":
    main()
