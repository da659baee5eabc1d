"""GPU benchmark of the fused ops (the triton and cuda backends against torch eager and
torch.compile), then of the attack, saliency and training paths built on them.

    python -m bench.gpu [--quick] [--no-compile] [--out bench/results]

Needs a CUDA device; builds nothing (the cuda backend is timed when ``fastsat._C`` was built with
CUDA, triton when it is installed). For every shape and dtype it first checks each kernel backend
against the reference (``fastsat.ops.reference``) and aborts on a mismatch, then times every op
variant with ``triton.testing.do_bench`` (median of repeated runs, L2 cache flushed between runs),
and again replayed from a CUDA graph (``do_bench_cudagraph``, median), which removes the host's
launch overhead: at 512×3×32×32 one op moves ~25 MB, a few microseconds on an H100, less than
the Python + launch cost of an eager call. Graph timings replay back to back without flushing
the L2 cache (50 MB on an H100), so small shapes may be partly cache-resident there; the copy
baseline is measured the same way in each column.

Throughput is reported from explicit byte counts: the bytes an op must move at least — each input
read once and the output written once (``Case.nbytes``) — over the median time, and as a
percentage of the bandwidth of a device-to-device copy that moves the same number of bytes
(half read, half written), measured on the same GPU. An implementation that reads its inputs
twice (the L2 step on samples too long for one tile or block, the L2 random start) or
materialises intermediates (eager) cannot reach 100% of that. Every row also gives the speed-up over torch eager (the reference) on the
same inputs.

The functions timed are the backend interface (``fastsat.ops._backends.Backend``; arguments already
checked and laid out), so the numbers are those of the kernels, without the argument checks of
the public API. Results go to ``<out>/gpu-<date>-<gpu>.csv`` and ``.md`` together with the GPU
name, torch / triton / CUDA versions and the date; the markdown ends with which of triton and
cuda is faster per op variant and, per op, the ``AUTO_CUDA`` table of ``fastsat/ops/_backends.py``
with the order these timings give, in that file's exact form (also printed): the next session
pastes it over the provisional one.

The attack (PGD-10), saliency (SmoothGrad / IG, chunked or not) and training-throughput (per
recipe) benchmarks follow in the same run and the same CSV and markdown; they are described in
``bench/gpu_paths.py``. Their rows fill the CSV's last columns and leave the op-only ones empty.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from torch import Tensor

from bench import gpu_paths
from fastsat.ops import _backends, reference

SHAPES = [(512, 3, 32, 32), (64, 3, 224, 224)]
QUICK_SHAPES = [(512, 3, 32, 32)]
DTYPES = [torch.float32, torch.bfloat16]
EPS, STEP, L2_EPS, L2_STEP, SAT_P, SEED = 8 / 255, 2 / 255, 0.5, 0.1, 0.5, 1234
KERNEL_BACKENDS = ("triton", "cuda")


# --- inputs and implementations ----------------------------------------------------------------

@dataclass
class Inputs:
    """One batch of benchmark tensors on the GPU: iterate, gradient, clean input, output buffer
    and the three SAT map sources (dense map, boxes, masks)."""

    x: Tensor
    g: Tensor
    x_nat: Tensor
    out: Tensor
    saliency: Tensor
    boxes: Tensor
    masks: Tensor

    @property
    def numel(self) -> int:
        return self.x.numel()

    @property
    def element_size(self) -> int:
        return self.x.element_size()

    @property
    def batch(self) -> int:
        return self.x.shape[0]


def make_inputs(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(0)
    batch, _, height, width = shape
    x_nat = torch.rand(shape, generator=gen, device=device)
    x = (x_nat + (2 * torch.rand(shape, generator=gen, device=device) - 1) * EPS).clamp(0, 1)
    g = torch.randn(shape, generator=gen, device=device)
    saliency = torch.rand(shape, generator=gen, device=device) * 2 - 1
    corner = torch.stack([torch.randint(0, width // 2, (batch,), generator=gen, device=device),
                          torch.randint(0, height // 2, (batch,), generator=gen, device=device)], dim=1)
    boxes = torch.cat([corner, corner + torch.tensor([width // 2, height // 2], device=device)], dim=1)
    masks = reference.saliency_from_boxes(boxes, height, width) > 0
    return Inputs(x=x.to(dtype), g=g.to(dtype), x_nat=x_nat.to(dtype), out=torch.empty_like(x, dtype=dtype),
                  saliency=saliency.to(dtype), boxes=boxes, masks=masks.to(torch.uint8))


@dataclass(frozen=True)
class Impl:
    """An implementation of the backend interface: ``ops`` has the four functions of
    fastsat.ops.reference; ``backend`` is the fastsat backend name (None for torch.compile)."""

    name: str
    ops: ModuleType | SimpleNamespace
    backend: str | None


def implementations(with_compile: bool) -> list[Impl]:
    """torch eager, torch.compile of the reference, and the kernel backends present here."""
    impls = [Impl("torch eager", reference, "torch")]
    if with_compile:
        compiled = SimpleNamespace(**{name: torch.compile(getattr(reference, name)) for name in
                                      ("pgd_step", "random_start", "alignment_stats", "sat_perturb")})
        impls.append(Impl("torch.compile", compiled, None))
    device = torch.device("cuda")
    for name in KERNEL_BACKENDS:
        try:
            # An explicitly named backend is the same module for every op.
            impls.append(Impl(name, _backends.resolve(name, device, _backends.OPS[0]), name))
        except RuntimeError as err:
            print(f"skipping {name}: {err}")
    return impls


# --- the benchmark cases -----------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One op variant: ``run(impl, inputs)`` calls it once; ``nbytes(inputs)`` is the least
    memory traffic the op needs (each input read once, the output written once)."""

    op: str
    variant: str
    run: Callable[[Impl, Inputs], object]
    nbytes: Callable[[Inputs], int]


def _stats_bytes(columns: int) -> Callable[[Inputs], int]:
    return lambda t: t.batch * columns * 4


def _tensors(count: int, extra: Callable[[Inputs], int] = lambda t: 0) -> Callable[[Inputs], int]:
    """``count`` tensors of the batch's size, plus ``extra`` bytes."""
    return lambda t: count * t.numel * t.element_size + extra(t)


def _pgd(l2: bool, with_stats: bool) -> Callable[[Impl, Inputs], object]:
    eps, step = (L2_EPS, L2_STEP) if l2 else (EPS, STEP)
    return lambda impl, t: impl.ops.pgd_step(t.x, t.g, t.x_nat, t.out, step, eps, l2, 0.0, 1.0, with_stats)


def _sat(source: str) -> Callable[[Impl, Inputs], object]:
    def run(impl: Impl, t: Inputs) -> object:
        maps = {"saliency": None, "boxes": None, "masks": None, source: getattr(t, source)}
        return impl.ops.sat_perturb(t.x, EPS, SAT_P, SEED, 0.0, 1.0, maps["saliency"], maps["boxes"], maps["masks"])
    return run


CASES = [
    Case("pgd_step", "linf", _pgd(False, False), _tensors(4)),
    Case("pgd_step", "linf+stats", _pgd(False, True), _tensors(4, _stats_bytes(4))),
    Case("pgd_step", "l2", _pgd(True, False), _tensors(4)),
    Case("pgd_step", "l2+stats", _pgd(True, True), _tensors(4, _stats_bytes(4))),
    Case("random_start", "linf", lambda impl, t: impl.ops.random_start(t.x_nat, EPS, False, 0.0, 1.0, SEED),
         _tensors(2)),
    Case("random_start", "l2", lambda impl, t: impl.ops.random_start(t.x_nat, L2_EPS, True, 0.0, 1.0, SEED),
         _tensors(2)),
    Case("alignment_stats", "", lambda impl, t: impl.ops.alignment_stats(t.x, t.g), _tensors(2, _stats_bytes(3))),
    Case("sat_perturb", "saliency", _sat("saliency"), _tensors(3)),
    Case("sat_perturb", "boxes", _sat("boxes"), _tensors(2, lambda t: t.boxes.numel() * 8)),
    Case("sat_perturb", "masks", _sat("masks"), _tensors(2, lambda t: t.masks.numel())),
]


# --- correctness check before timing -----------------------------------------------------------

def _max_error(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def check_against_reference(impl: Impl, t: Inputs) -> list[str]:
    """Mismatches of a kernel backend against the reference on these inputs (empty: all agree).
    Tolerances as in tests/test_ops.py: L∞ steps and p = 1 SAT with ±1 maps are exact; reductions
    within 1e-4 relative (fp32 sums of up to 150k terms in another order); L2 steps within that
    relative error of ε plus one unit in the last place of the dtype."""
    ulp = torch.finfo(t.x.dtype).eps
    problems = []

    def expect(what: str, error: float, bound: float) -> None:
        if not error <= bound:
            problems.append(f"{impl.name} {what}: max error {error:.3g} > {bound:.3g}")

    for l2 in (False, True):
        eps, step = (L2_EPS, L2_STEP) if l2 else (EPS, STEP)
        got_out, want_out = torch.empty_like(t.x), torch.empty_like(t.x)
        got = impl.ops.pgd_step(t.x, t.g, t.x_nat, got_out, step, eps, l2, 0.0, 1.0, True)
        want = reference.pgd_step(t.x, t.g, t.x_nat, want_out, step, eps, l2, 0.0, 1.0, True)
        name = "pgd_step " + ("l2" if l2 else "linf")
        expect(name, _max_error(got_out, want_out), 1e-4 * eps + ulp if l2 else 0.0)
        dot_scale = (t.x_nat.double() * t.g.double()).reshape(t.batch, -1).abs().sum(1)
        relative = ((got.double() - want.double()).abs() / want.double().abs().clamp_min(1e-30)).amax(0)
        expect(f"{name} dot", float(((got[:, 0].double() - want[:, 0].double()).abs() / dot_scale).max()), 1e-4)
        expect(f"{name} grad_norm, x_norm", float(relative[1:3].max()), 1e-4)
        expect(f"{name} delta_norm", float(relative[3]), 1e-4 if l2 else 0.0)
    got, want = impl.ops.alignment_stats(t.x, t.g).double(), reference.alignment_stats(t.x, t.g).double()
    dot_scale = (t.x.double() * t.g.double()).reshape(t.batch, -1).abs().sum(1)
    expect("alignment_stats dot", float(((got[:, 0] - want[:, 0]).abs() / dot_scale).max()), 1e-4)
    expect("alignment_stats norms", float(((got[:, 1:] - want[:, 1:]).abs() / want[:, 1:]).max()), 1e-4)
    for source, bound in (("saliency", 2 * ulp), ("boxes", 0.0), ("masks", 0.0)):
        maps = {"saliency": None, "boxes": None, "masks": None, source: getattr(t, source)}
        got = impl.ops.sat_perturb(t.x, EPS, 1.0, SEED, 0.0, 1.0, maps["saliency"], maps["boxes"], maps["masks"])
        want = reference.sat_perturb(t.x, EPS, 1.0, SEED, 0.0, 1.0, maps["saliency"], maps["boxes"], maps["masks"])
        expect(f"sat_perturb p=1 {source}", _max_error(got, want), bound)
    for l2, eps in ((False, EPS), (True, L2_EPS)):
        first = impl.ops.random_start(t.x_nat, eps, l2, 0.0, 1.0, SEED)
        again = impl.ops.random_start(t.x_nat, eps, l2, 0.0, 1.0, SEED)
        delta = (first.double() - t.x_nat.double()).reshape(t.batch, -1)
        size = delta.norm(dim=1) if l2 else delta.abs().amax(1)
        # Rounding to the dtype moves each element by up to half an ulp: √N of them in L2.
        slack = ulp * (math.sqrt(delta.shape[1]) if l2 else 1.0)
        expect(f"random_start {'l2' if l2 else 'linf'} radius", float(size.max()) - eps, eps * 1e-6 + slack)
        expect(f"random_start {'l2' if l2 else 'linf'} repeat", _max_error(first, again), 0.0)
    return problems


# --- timing ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """Median milliseconds launched from Python (``eager``) and replayed from a CUDA graph
    (``graph``; None where the function cannot be captured)."""

    eager: float
    graph: float | None


def measure(fn: Callable[[], object], quick: bool) -> Timing:
    import triton.testing

    fn()  # compile / autotune / allocate outside the measurement
    torch.cuda.synchronize()
    warmup, rep = (5, 20) if quick else (25, 100)
    eager = float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    try:
        graph = float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    except RuntimeError as err:  # e.g. an op that syncs with the host or creates a generator
        print(f"  not capturable in a CUDA graph ({str(err).splitlines()[0]}); graph time n/a")
        graph = None
    return Timing(eager, graph)


def measure_copy(nbytes: int, quick: bool) -> Timing:
    """A device-to-device copy moving ``nbytes`` in all (half read, half written)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return measure(lambda: dst.copy_(src), quick)


@dataclass(frozen=True)
class Row:
    op: str
    variant: str
    shape: str
    dtype: str
    impl: str
    time: Timing
    nbytes: int
    copy: Timing
    torch_eager: Timing

    @property
    def ms(self) -> float:
        return self.time.eager

    @property
    def gbps(self) -> float:
        return self.nbytes / (self.ms * 1e-3) / 1e9

    @property
    def pct_of_copy(self) -> float:
        return 100.0 * self.copy.eager / self.ms

    @property
    def speedup_vs_eager(self) -> float:
        return self.torch_eager.eager / self.ms

    @property
    def graph_pct_of_copy(self) -> float | None:
        if self.time.graph is None or self.copy.graph is None:
            return None
        return 100.0 * self.copy.graph / self.time.graph

    @property
    def label(self) -> str:
        return f"{self.op} {self.variant}".strip()


def time_cases(cases: Sequence[Case], impls: Sequence[Impl], t: Inputs, quick: bool) -> list[Row]:
    shape, dtype = "×".join(map(str, t.x.shape)), str(t.x.dtype).removeprefix("torch.")
    rows, copies = [], {}
    for case in cases:
        nbytes = case.nbytes(t)
        if nbytes not in copies:
            copies[nbytes] = measure_copy(nbytes, quick)
        times = {impl.name: measure(lambda impl=impl, case=case: case.run(impl, t), quick) for impl in impls}
        rows += [Row(case.op, case.variant, shape, dtype, name, timing, nbytes, copies[nbytes], times["torch eager"])
                 for name, timing in times.items()]
    return rows


# --- reports -----------------------------------------------------------------------------------

CSV_FIELDS = ["gpu", "date", "op", "variant", "shape", "dtype", "impl", "median_ms", "bytes", "GB_per_s",
              "pct_of_copy", "speedup_vs_eager", "graph_median_ms", "graph_pct_of_copy", *gpu_paths.CSV_FIELDS]


def _optional(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def to_csv(rows: Sequence[Row], gpu: str, date: str, paths: Sequence[gpu_paths.PathRow] = ()) -> str:
    """The op rows, then the attack / saliency / training rows; a column a row has no value for is empty."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_FIELDS, restval="", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(dict(zip(CSV_FIELDS, [
            gpu, date, r.op, r.variant, r.shape, r.dtype, r.impl, f"{r.ms:.6f}", r.nbytes, f"{r.gbps:.1f}",
            f"{r.pct_of_copy:.1f}", f"{r.speedup_vs_eager:.2f}", _optional(r.time.graph, ".6f"),
            _optional(r.graph_pct_of_copy, ".1f")])))
    for p in paths:
        writer.writerow({"gpu": gpu, "date": date, **gpu_paths.csv_record(p)})
    return buffer.getvalue()


def preferences(rows: Sequence[Row]) -> dict[str, tuple[str, float]]:
    """Per op variant, the faster of triton and cuda and by how much (geometric mean over shapes
    and dtypes of the slower/faster time ratio). Empty unless both were timed."""
    times: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if r.impl in KERNEL_BACKENDS:
            times.setdefault(r.label, {}).setdefault(r.impl, []).append(r.ms)
    result = {}
    for label, per_impl in times.items():
        if set(per_impl) != set(KERNEL_BACKENDS) or len(per_impl["triton"]) != len(per_impl["cuda"]):
            continue
        log_ratio = sum(math.log(c / t) for t, c in zip(per_impl["triton"], per_impl["cuda"])) / len(per_impl["cuda"])
        result[label] = ("triton", math.exp(log_ratio)) if log_ratio > 0 else ("cuda", math.exp(-log_ratio))
    return result


def auto_table(rows: Sequence[Row]) -> str:
    """``_backends.AUTO_CUDA`` as these timings order it, in that file's exact form. Per op the
    faster of triton and cuda by the geometric mean, over variants, shapes and dtypes, of the
    cuda/triton time ratio; both stay listed (the slower one is the fallback). An op without both
    timed keeps its current row, marked as not measured."""
    times: dict[str, dict[tuple[str, str, str], dict[str, float]]] = {}
    for r in rows:
        if r.impl in KERNEL_BACKENDS:
            times.setdefault(r.op, {}).setdefault((r.variant, r.shape, r.dtype), {})[r.impl] = r.ms
    lines = ["AUTO_CUDA: dict[str, tuple[str, ...]] = {"]
    for op in _backends.OPS:
        pairs = [(t["triton"], t["cuda"]) for t in times.get(op, {}).values() if set(t) == set(KERNEL_BACKENDS)]
        if not pairs:
            lines.append(f"    {op!r}: {_backends.AUTO_CUDA[op]!r},  # not measured".replace("'", '"'))
            continue
        log_ratio = sum(math.log(cuda / triton) for triton, cuda in pairs) / len(pairs)
        order = ("triton", "cuda") if log_ratio > 0 else ("cuda", "triton")
        lines.append(f'    "{op}": ("{order[0]}", "{order[1]}"),  # {order[0]} {math.exp(abs(log_ratio)):.2f}x faster')
    lines.append("}")
    return "\n".join(lines)


def to_markdown(rows: Sequence[Row], env: dict[str, str], paths: Sequence[gpu_paths.PathRow] = ()) -> str:
    lines = [f"# fastsat GPU benchmark — {env['gpu']}", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += [
        "",
        ("Median of `triton.testing.do_bench`. GB/s = least bytes the op must move (inputs read once, "
         "output written once) / time; % copy = that rate over a device-to-device copy of the same "
         "bytes; × eager = speed-up over the PyTorch reference. The graph columns replay the call from a "
         "CUDA graph (no launch overhead; L2 not flushed between replays)."),
        "",
    ]
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.shape, r.dtype), []).append(r)
    for (shape, dtype), group in groups.items():
        lines += [f"## {shape}, {dtype}", "",
                  "| op | impl | ms | GB/s | % copy | × eager | graph ms | graph % copy |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r.label} | {r.impl} | {r.ms:.4f} | {r.gbps:.0f} | {r.pct_of_copy:.0f} | {r.speedup_vs_eager:.2f} "
                  f"| {_optional(r.time.graph, '.4f')} | {_optional(r.graph_pct_of_copy, '.0f')} |" for r in group]
        lines.append("")
    prefs = preferences(rows)
    lines += ["## triton or cuda (the `auto` preference)", ""]
    if prefs:
        lines += ["| op | faster | by |", "|---|---|---:|"]
        lines += [f"| {label} | {winner} | {ratio:.2f}× |" for label, (winner, ratio) in prefs.items()]
        wins = sum(1 for winner, _ in prefs.values() if winner == "triton")
        overall = "triton" if wins > len(prefs) / 2 else "cuda"
        lines += ["", f"Faster on {max(wins, len(prefs) - wins)} of {len(prefs)} op variants: **{overall}**."]
    else:
        lines.append("Only one of triton / cuda was available; no preference measured.")
    lines += ["", "Per op, for `AUTO_CUDA` in `fastsat/ops/_backends.py` (paste as it is):", "", "```python",
              auto_table(rows), "```"]
    lines += ["", *gpu_paths.markdown_sections(paths)]
    return "\n".join(lines).rstrip("\n") + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def environment() -> dict[str, str]:
    import triton

    return {
        "gpu": torch.cuda.get_device_name(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "backends": ", ".join(name for name, ok in _backends.available_backends().items() if ok),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="ops: one shape, fp32, fewer repetitions; attack / saliency / training: smaller sizes")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="directory for the CSV and markdown")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out torch.compile of the reference (its compilations dominate a full run)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu needs a CUDA GPU and a CUDA build of torch; none is visible here. "
              "CPU benchmarks: see bench/ (pytest-benchmark).", file=sys.stderr)
        return 2
    # torch.compile specialises the reference per op variant, shape and dtype.
    torch._dynamo.config.recompile_limit = 256
    env = environment()
    impls = implementations(with_compile=not args.no_compile)
    kernels = [impl for impl in impls if impl.backend in KERNEL_BACKENDS]
    if not kernels:
        print("neither the triton nor the cuda backend is available; nothing to compare", file=sys.stderr)
        return 2
    shapes, dtypes = (QUICK_SHAPES, [torch.float32]) if args.quick else (SHAPES, DTYPES)
    rows: list[Row] = []
    for shape in shapes:
        for dtype in dtypes:
            inputs = make_inputs(shape, dtype, torch.device("cuda"))
            problems = [p for impl in kernels for p in check_against_reference(impl, inputs)]
            if problems:
                print(f"mismatch against the reference at {shape} {dtype}; not timing:", *problems,
                      sep="\n  ", file=sys.stderr)
                return 1
            print(f"timing {shape} {dtype} ...", flush=True)
            rows += time_cases(CASES, impls, inputs, args.quick)
    paths = gpu_paths.run(torch.device("cuda"), gpu_paths.QUICK if args.quick else gpu_paths.FULL)
    markdown = to_markdown(rows, env, paths)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-{dt.datetime.now(dt.timezone.utc):%Y%m%d}-{_slug(env['gpu'])}"
    write_atomically(args.out / f"{stem}.csv", to_csv(rows, env["gpu"], env["date"], paths))
    write_atomically(args.out / f"{stem}.md", markdown)
    print(markdown)
    print("auto's table for fastsat/ops/_backends.py:", auto_table(rows), sep="\n")
    print(f"wrote {args.out / stem}.csv and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
