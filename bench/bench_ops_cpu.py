"""CPU benchmark of the fused ops (pytest-benchmark): the ``cpp`` kernels against the PyTorch
reference in eager mode and under ``torch.compile``, float32, at 512×3×32×32 (a CIFAR batch) and
64×3×224×224 (an ImageNet batch).

    python -m bench.bench_ops_cpu            # all cases; writes bench/results/cpu-ops-<date>.{json,md}
    python -m bench.bench_ops_cpu --threads 1   # ... with one thread: cpu-ops-<date>-threads1.{json,md}
    python -m pytest bench/bench_ops_cpu.py  # the pytest-benchmark table only

Every case goes through the public API (``fastsat.ops``, ``backend="cpp"`` or ``"torch"``; the
compiled case is ``torch.compile`` of the same call with ``backend="torch"``), outputs allocated
per call (``out=None``) as a user's loop would. Cases are checked against the reference before
they are timed (bitwise for L∞ steps, 1e-5 relative for sums, random ops by shape only). The
markdown table gives the best of the rounds (on a shared 2-core machine other processes only add
time, and a descheduled OpenMP thread stalls a whole parallel region, so the minimum is the stable
statistic; medians are in the JSON) and the ratios eager / cpp and compile / cpp (> 1: the kernel
is faster).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import pytest
import torch

from fastsat import ops

SHAPES = {"512x3x32x32": (512, 3, 32, 32), "64x3x224x224": (64, 3, 224, 224)}
IMPLS = ("cpp", "eager", "compile")
EPS, STEP = 8 / 255, 2 / 255
RESULTS = Path(__file__).resolve().parent / "results"


def _pgd_linf(x, g, x_nat, boxes, backend):
    return ops.pgd_step(x, g, x_nat, step_size=STEP, eps=EPS, backend=backend)


def _pgd_linf_stats(x, g, x_nat, boxes, backend):
    x_new, stats = ops.pgd_step(x, g, x_nat, step_size=STEP, eps=EPS, return_stats=True, backend=backend)
    return x_new, stats.dot, stats.grad_norm, stats.x_norm, stats.delta_norm


def _pgd_l2(x, g, x_nat, boxes, backend):
    return ops.pgd_step(x, g, x_nat, step_size=0.1, eps=0.5, norm="l2", backend=backend)


def _random_start_linf(x, g, x_nat, boxes, backend):
    return ops.random_start(x_nat, eps=EPS, seed=0, backend=backend)


def _random_start_l2(x, g, x_nat, boxes, backend):
    return ops.random_start(x_nat, eps=0.5, norm="l2", seed=0, backend=backend)


def _alignment_stats(x, g, x_nat, boxes, backend):
    stats = ops.alignment_stats(x, g, backend=backend)
    return stats.dot, stats.grad_norm, stats.x_norm


def _sat_boxes(x, g, x_nat, boxes, backend):
    return ops.sat_perturb(x, eps=EPS, p=0.5, seed=0, boxes=boxes, backend=backend)


OPS = {
    "pgd_step linf": _pgd_linf,
    "pgd_step linf +stats": _pgd_linf_stats,
    "pgd_step l2": _pgd_l2,
    "random_start linf": _random_start_linf,
    "random_start l2": _random_start_l2,
    "alignment_stats": _alignment_stats,
    "sat_perturb boxes": _sat_boxes,
}
# The L∞ step is bitwise equal to the reference; sums agree to 1e-5 of their scale; random ops are
# compared by shape only (their streams differ by design).
EXACT_FIRST = {"pgd_step linf", "pgd_step linf +stats"}
RANDOM = {"random_start linf", "random_start l2", "sat_perturb boxes"}


def _inputs(shape):
    gen = torch.Generator().manual_seed(0)
    x_nat = torch.rand(shape, generator=gen)
    x = (x_nat + (2 * torch.rand(shape, generator=gen) - 1) * EPS).clamp(0, 1)
    g = torch.randn(shape, generator=gen)
    h, w = shape[2], shape[3]
    boxes = torch.tensor([[w // 4, h // 4, 3 * w // 4, 3 * h // 4]] * shape[0])
    return x, g, x_nat, boxes


_COMPILED = {}


def _callable(op_name, impl):
    fn = OPS[op_name]
    if impl == "cpp":
        return lambda *a: fn(*a, "cpp")
    if impl == "eager":
        return lambda *a: fn(*a, "torch")
    if op_name not in _COMPILED:
        _COMPILED[op_name] = torch.compile(lambda *a: fn(*a, "torch"))
    return _COMPILED[op_name]


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _check(op_name, got, want):
    for i, (a, b) in enumerate(zip(_as_tuple(got), _as_tuple(want))):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{op_name}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        if op_name in RANDOM:
            continue
        err = float((a.double() - b.double()).abs().max())
        bound = 0.0 if (i == 0 and op_name in EXACT_FIRST) else 1e-5 * float(b.double().abs().max())
        assert err <= bound, f"{op_name}: differs from the reference by {err:.3g} (allowed {bound:.3g})"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("op_name", list(OPS))
def test_op(benchmark, op_name, shape_name, impl):
    if not ops.available_backends()["cpp"]:
        pytest.skip("fastsat._C is not built")
    args = _inputs(SHAPES[shape_name])
    fn = _callable(op_name, impl)
    got = fn(*args)  # also the torch.compile warm-up
    fn(*args)
    _check(op_name, got, _callable(op_name, "eager")(*args))
    benchmark.group = f"{op_name} {shape_name}"
    benchmark.extra_info.update(op=op_name, shape=shape_name, impl=impl, torch=torch.__version__,
                                threads=torch.get_num_threads())
    benchmark.pedantic(fn, args=args, rounds=10 if shape_name == "64x3x224x224" else 30, warmup_rounds=1)


# --- report ------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_markdown(json_path: Path, md_path: Path, load_before: float) -> str:
    data = json.loads(json_path.read_text())
    best = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        best[(info["op"], info["shape"], info["impl"])] = bench["stats"]["min"]
    lines = [
        f"# CPU op benchmark, {data['datetime'][:10]}",
        "",
        (f"- CPU: {_cpu_model()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
         f"python {platform.python_version()}; float32; outputs allocated per call."),
        ("- `python -m bench.bench_ops_cpu` (pytest-benchmark): best of 30 rounds at 512×3×32×32, of 10 at "
         "64×3×224×224 (medians in the JSON); times are minima."),
        (f"- 1-minute load average just before the run: {load_before:.2f} on {os.cpu_count()} cores "
         "(other processes; the run itself then adds up to its thread count)."),
        "",
        "| op | shape | cpp (ms) | eager (ms) | compile (ms) | eager / cpp | compile / cpp |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for op_name in OPS:
        for shape_name in SHAPES:
            t = {impl: best.get((op_name, shape_name, impl)) for impl in IMPLS}
            if t["cpp"] is None:
                continue
            cells = [f"{t[i] * 1e3:.3f}" if t[i] is not None else "n/a" for i in IMPLS]
            ratios = [f"{t[i] / t['cpp']:.1f}×" if t[i] is not None else "n/a" for i in ("eager", "compile")]
            lines.append(f"| {op_name} | {shape_name} | " + " | ".join(cells + ratios) + " |")
    text = "\n".join(lines) + "\n"
    md_path.write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    args, pytest_args = parser.parse_known_args()
    name = f"cpu-ops-{datetime.date.today().isoformat()}"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        name += f"-threads{args.threads}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    tmp = json_path.with_suffix(".json.tmp")
    load_before = os.getloadavg()[0]
    code = pytest.main([__file__, "-q", "-p", "no:cacheprovider", f"--benchmark-json={tmp}",
                        "--benchmark-columns=min,median,rounds", "--benchmark-sort=name", *pytest_args])
    if code != 0:
        return int(code)
    tmp.replace(json_path)
    print(write_markdown(json_path, md_path, load_before))
    return 0


if __name__ == "__main__":
    sys.exit(main())
