"""Time to generate the built-in shapes data (no cache), the figure issue 4 asks for: 50,000
images at 32×32 "in seconds".

    python -m bench.bench_data [--n 50000] [--size 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from fastsat.data import generate_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="images (default: 50000)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default: 3)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    times = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        generate_shapes(args.n, size=args.size, seed=repeat)
        times.append(time.perf_counter() - start)
    print(f"# shapes generation, {platform.machine()}, torch {torch.__version__}, load average {load:.2f} before the run")
    print(f"{args.n} images at {args.size}×{args.size}: median {statistics.median(times):.2f} s "
          f"(min {min(times):.2f}, max {max(times):.2f}) over {args.repeats} runs")


if __name__ == "__main__":
    main()
