"""What tests/test_ops.py does not cover for the Triton backend (fastsat/ops/_triton.py), and the
pure-Python parts of the GPU benchmark (bench/gpu.py, bench/gpu_paths.py).

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so shapes are small;
``MAX_BLOCK`` is lowered to 64 to push short rows through several chunks (and partial last
chunks), which is what long rows (3×224×224 = 37 chunks of 4096) do on a GPU.

Tolerances: L∞ steps, SAT with ±1 maps and every op's random streams are exact, so they compare
with atol = 0. Per-sample sums are taken in another order than the reference's: for N ≤ 300
terms the fp32 error is below N·2^-24·Σ|terms| < 2e-5·Σ|terms|; RED_RTOL = 1e-5 on norms (whose
terms are all positive) still catches any wrong or missing term (errors of O(1/N) relative).
"""

from __future__ import annotations

import ast
import csv
import io
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import gpu as bench_gpu
from fastsat import ops
from fastsat.ops import NORMS, reference

HAS_TRITON = ops.available_backends()["triton"]
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton backend not available")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RED_RTOL = 1e-5


@pytest.fixture
def triton_module():
    from fastsat.ops import _triton

    return _triton


@pytest.fixture
def small_blocks(monkeypatch, triton_module):
    """Blocks of 64 elements: a 3×9×11 sample (297 elements) spans 5 chunks, the last partial."""
    monkeypatch.setattr(triton_module, "MAX_BLOCK", 64)


def _assert_close(actual, expected, *, atol, rtol=0.0, what=""):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} differ, max error {float(err.max()):.3g}; "
                             f"first at {idx}: got {float(actual[idx])!r}, expected {float(expected[idx])!r}")


def _long_rows(seed=0):
    """x_nat, x, g of shape (3, 3, 9, 11); |x − x_nat| peaks at a different chunk per sample."""
    gen = torch.Generator().manual_seed(seed)
    shape = (3, 3, 9, 11)
    x_nat = torch.rand(shape, generator=gen) * 0.8 + 0.1
    x = x_nat + (torch.rand(shape, generator=gen) * 2 - 1) * 0.02
    for sample, flat_index in enumerate((296, 130, 3)):  # last chunk (partial for blocks of 64), middle, first
        x[sample].view(-1)[flat_index] = x_nat[sample].view(-1)[flat_index] + 0.05
    g = torch.randn(shape, generator=gen)
    return [t.to(DEVICE) for t in (x_nat, x, g)]


# --- many chunks per row -----------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("norm,block", [("linf", 64), ("l2", 64), ("linf", 4)])
def test_rows_spanning_many_chunks_match_reference(monkeypatch, triton_module, norm, block):
    """Per-chunk partials and their second-stage reduction: the step (L2 needs the per-sample
    norms of all chunks before writing) and every statistic, including the L∞ max of |δ| that
    sits in a different chunk in each sample. ε = 1 keeps the peak |δ| unprojected. Blocks of 4
    give 75 chunks per sample: more than one tile of the second stage (64 chunks)."""
    monkeypatch.setattr(triton_module, "MAX_BLOCK", block)
    x_nat, x, g = _long_rows()
    kw = {"step_size": 0.01 if norm == "linf" else 0.2, "eps": 1.0 if norm == "linf" else 0.5, "norm": norm,
              "clip": (-1.0, 2.0), "return_stats": True}
    got, stats = ops.pgd_step(x, g, x_nat, backend="triton", **kw)
    want, want_stats = ops.pgd_step(x, g, x_nat, backend="torch", **kw)
    if norm == "linf":
        _assert_close(got, want, atol=0.0, what="linf step")
        _assert_close(stats.delta_norm, want_stats.delta_norm, atol=0.0, what="linf max |δ| across chunks")
        # The planted |δ| = 0.05 ± α is the maximum; every other element has |δ| ≤ 0.02 + α.
        assert bool((stats.delta_norm > 0.035).all()), f"the planted peak must be the maximum: {stats.delta_norm}"
    else:
        # The factor comes from fp32 sums: relative error ≤ RED_RTOL on δ (|δ| ≤ 0.5), plus 1 ulp.
        _assert_close(got, want, atol=RED_RTOL * 0.5 + 2.0**-23, what="l2 step")
        _assert_close(stats.delta_norm, want_stats.delta_norm, atol=0.0, rtol=RED_RTOL, what="l2 ‖δ‖")
    for name in ("grad_norm", "x_norm"):
        _assert_close(getattr(stats, name), getattr(want_stats, name), atol=0.0, rtol=RED_RTOL, what=name)
    dot_scale = (x_nat * g).reshape(3, -1).abs().sum(1)
    _assert_close(stats.dot, want_stats.dot, atol=float(RED_RTOL * dot_scale.max()), what="dot")

    aligned = ops.alignment_stats(x, g, backend="triton")
    want_aligned = ops.alignment_stats(x, g, backend="torch")
    _assert_close(aligned.grad_norm, want_aligned.grad_norm, atol=0.0, rtol=RED_RTOL, what="alignment ‖g‖")
    _assert_close(aligned.x_norm, want_aligned.x_norm, atol=0.0, rtol=RED_RTOL, what="alignment ‖x‖")


@needs_triton
def test_short_rows_share_a_program(triton_module):
    """Rows of 5 elements: 8 samples to a tile, 13 samples → two tiles, the second mostly masked.
    Masked rows must neither be written nor leak into their neighbours' sums."""
    gen = torch.Generator().manual_seed(1)
    x_nat = torch.rand(13, 5, generator=gen).to(DEVICE)
    x = torch.rand(13, 5, generator=gen).to(DEVICE)
    g = torch.randn(13, 5, generator=gen).to(DEVICE)
    tiles = triton_module._tiles(x)
    assert tiles.rows > 1 and tiles.grid[0] == math.ceil(13 / tiles.rows)
    for norm in NORMS:
        got, stats = ops.pgd_step(x, g, x_nat, step_size=0.1, eps=0.3, norm=norm, return_stats=True, backend="triton")
        want, want_stats = ops.pgd_step(x, g, x_nat, step_size=0.1, eps=0.3, norm=norm, return_stats=True,
                                        backend="torch")
        _assert_close(got, want, atol=0.0 if norm == "linf" else 1e-6, what=f"{norm} step")
        _assert_close(stats.grad_norm, want_stats.grad_norm, atol=0.0, rtol=RED_RTOL, what=f"{norm} ‖g‖")
        _assert_close(stats.delta_norm, want_stats.delta_norm, atol=1e-7, rtol=RED_RTOL, what=f"{norm} ‖δ‖")


# --- random streams and image index math -------------------------------------------------------

def _image(seed, shape=(2, 3, 5, 9)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@needs_triton
def test_random_streams_follow_logical_order_not_memory_layout(small_blocks):
    """The Philox counter is the element's NCHW index, so a channels_last batch gets the same
    numbers as its contiguous copy — checked with chunks that cut across channel planes
    (135 elements per sample in blocks of 64)."""
    x = _image(2)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    start = ops.random_start(x, eps=0.1, seed=7, backend="triton")
    start_cl = ops.random_start(x_cl, eps=0.1, seed=7, backend="triton")
    assert start_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(start, start_cl.contiguous())
    l2, l2_cl = (ops.random_start(t, eps=0.5, norm="l2", seed=7, backend="triton") for t in (x, x_cl))
    # Same draws; only the order of the fp32 sum of z² (hence ‖z‖) differs.
    _assert_close(l2_cl, l2, atol=1e-6, what="l2 random start, channels_last vs contiguous")
    sat = ops.sat_perturb(x, eps=0.05, p=0.4, seed=3, saliency=_image(4), backend="triton")
    sat_cl = ops.sat_perturb(x_cl, eps=0.05, p=0.4, seed=3,
                             saliency=_image(4).contiguous(memory_format=torch.channels_last), backend="triton")
    assert torch.equal(sat, sat_cl.contiguous())


@needs_triton
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_boxes_and_planes_index_math(small_blocks, layout):
    """Boxes evaluated in the kernel from (h, w) of the flat index, and (B, 1, H, W) maps and masks
    indexed per plane, equal the materialised full map, for H ≠ W and boxes touching the edges."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = _image(5).contiguous(memory_format=fmt)
    boxes = torch.tensor([[0, 1, 9, 5], [6, 0, 9, 2]], device=DEVICE)  # x0, y0, x1, y1 (W = 9, H = 5)
    plane = reference.saliency_from_boxes(boxes, 5, 9)  # (B, 1, H, W), ±1
    full = plane.expand_as(x).contiguous(memory_format=fmt)
    kw = {"eps": 0.05, "p": 0.7, "seed": 11, "backend": "triton"}
    want = ops.sat_perturb(x, saliency=full, **kw)
    assert torch.equal(ops.sat_perturb(x, boxes=boxes, **kw), want)
    assert torch.equal(ops.sat_perturb(x, masks=plane > 0, **kw), want)
    assert torch.equal(ops.sat_perturb(x, saliency=plane.contiguous(), **kw), want)
    # And p = 1 is the reference exactly (no randomness left).
    exact = ops.sat_perturb(x, eps=0.05, p=1.0, seed=0, boxes=boxes, backend="triton")
    assert torch.equal(exact, ops.sat_perturb(x, eps=0.05, p=1.0, seed=0, boxes=boxes, backend="torch"))


# --- rounding to bfloat16 ----------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("step", [2.0**-8, 2.0**-9, 3 * 2.0**-11, 5 * 2.0**-12])
def test_bfloat16_rounding_is_nearest_even(step):
    """Every bf16 value in [1/16, 4) stepped by ±α: exact ties (α = 2^-8 at [1, 2)), carries of
    the mantissa into the exponent (odd and even exponents) — bitwise equal to torch's rounding.
    The interpreter's own fp32 → bf16 cast truncates, so this also guards the kernel's rounding."""
    exponents = torch.arange(-4, 2, dtype=torch.float64)
    mantissas = torch.arange(128, dtype=torch.float64) / 128
    values = ((1 + mantissas[None, :]) * 2.0 ** exponents[:, None]).reshape(2, -1).to(torch.bfloat16).to(DEVICE)
    g = torch.ones_like(values)
    g[1] = -1.0
    kw = {"step_size": step, "eps": 8.0, "clip": (-8.0, 8.0)}
    got = ops.pgd_step(values, g, values, backend="triton", **kw)
    want = ops.pgd_step(values, g, values, backend="torch", **kw)
    _assert_close(got, want, atol=0.0, what=f"bf16 rounding at step {step}")


# --- torch.library registration ----------------------------------------------------------------

@needs_triton
def test_opcheck_every_triton_op(triton_module):
    """Schemas, fake implementations, declared mutation (only ``out``) and dispatch of the four
    ``fastsat::*_triton`` ops."""
    gen = torch.Generator().manual_seed(3)
    x, g, x_nat = (torch.rand(2, 3, 4, 5, generator=gen).to(DEVICE) for _ in range(3))
    boxes = torch.tensor([[0, 1, 3, 4], [1, 0, 5, 2]], device=DEVICE)
    masks = (torch.rand(2, 1, 4, 5, generator=gen) > 0.5).to(torch.uint8).to(DEVICE)
    lib = torch.ops.fastsat
    cases = [
        (lib.pgd_step_triton, (x, g, x_nat, torch.empty_like(x), 0.1, 0.2, l2, 0.0, 1.0, stats))
        for l2 in (False, True) for stats in (False, True)
    ] + [
        (lib.random_start_triton, (x_nat, 0.2, l2, 0.0, 1.0, torch.tensor([5], device=DEVICE))) for l2 in (False, True)
    ] + [
        (lib.alignment_stats_triton, (x, g)),
        (lib.sat_perturb_triton, (x, 0.1, 0.5, torch.tensor([9], device=DEVICE), 0.0, 1.0, torch.rand_like(x), None, None)),
        (lib.sat_perturb_triton, (x, 0.1, 0.5, torch.tensor([9], device=DEVICE), 0.0, 1.0, None, boxes, None)),
        (lib.sat_perturb_triton, (x, 0.1, 0.5, torch.tensor([9], device=DEVICE), 0.0, 1.0, None, None, masks)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# --- bench/gpu.py ------------------------------------------------------------------------------

def _row(impl, ms, op="pgd_step", variant="linf", shape="2×3", dtype="float32", graph_ms=None):
    return bench_gpu.Row(op, variant, shape, dtype, impl, bench_gpu.Timing(ms, graph_ms), nbytes=4_000_000,
                         copy=bench_gpu.Timing(0.001, 0.0008), torch_eager=bench_gpu.Timing(0.01, 0.005))


def test_bench_byte_counts():
    """Least traffic per op: pgd_step reads x, g, x_nat and writes one tensor; SAT from a dense map
    reads x and the map; from boxes it reads x and 4 int64 per sample."""
    t = bench_gpu.make_inputs((2, 3, 4, 6), torch.bfloat16, torch.device("cpu"))
    size = 2 * 3 * 4 * 6 * 2
    counts = {(c.op, c.variant): c.nbytes(t) for c in bench_gpu.CASES}
    assert counts[("pgd_step", "linf")] == 4 * size
    assert counts[("pgd_step", "l2+stats")] == 4 * size + 2 * 4 * 4
    assert counts[("random_start", "l2")] == 2 * size
    assert counts[("alignment_stats", "")] == 2 * size + 2 * 3 * 4
    assert counts[("sat_perturb", "saliency")] == 3 * size
    assert counts[("sat_perturb", "boxes")] == 2 * size + 2 * 4 * 8
    assert counts[("sat_perturb", "masks")] == 2 * size + 2 * 4 * 6


def test_bench_rates_and_csv():
    row = _row("triton", ms=0.004, graph_ms=0.002)
    assert row.gbps == pytest.approx(4e6 / 4e-6 / 1e9)  # 1000 GB/s
    assert row.pct_of_copy == pytest.approx(25.0)
    assert row.speedup_vs_eager == pytest.approx(2.5)
    assert row.graph_pct_of_copy == pytest.approx(40.0)
    assert _row("cuda", ms=1.0).graph_pct_of_copy is None
    parsed = list(csv.DictReader(io.StringIO(bench_gpu.to_csv([row], "H100", "2026-01-01"))))
    assert parsed == [{"gpu": "H100", "date": "2026-01-01", "op": "pgd_step", "variant": "linf", "shape": "2×3",
                       "dtype": "float32", "impl": "triton", "median_ms": "0.004000", "bytes": "4000000",
                       "GB_per_s": "1000.0", "pct_of_copy": "25.0", "speedup_vs_eager": "2.50",
                       "graph_median_ms": "0.002000", "graph_pct_of_copy": "40.0",
                       **dict.fromkeys(bench_gpu.gpu_paths.CSV_FIELDS, "")}]


def test_bench_preference_and_markdown():
    """triton is 2× faster at one shape and 1.25× slower at the other: geometric mean 1.6/1.25…
    → triton by √(2/1.25); sat only has triton, so no preference is claimed for it."""
    rows = [_row("triton", 1.0), _row("cuda", 2.0), _row("triton", 1.25, shape="b"), _row("cuda", 1.0, shape="b"),
            _row("triton", 1.0, op="sat_perturb", variant="boxes"), _row("torch eager", 3.0)]
    prefs = bench_gpu.preferences(rows)
    assert set(prefs) == {"pgd_step linf"}
    winner, ratio = prefs["pgd_step linf"]
    assert winner == "triton" and ratio == pytest.approx(math.sqrt(2.0 / 1.25))
    env = {"gpu": "Test GPU", "date": "2026-01-01 00:00 UTC", "torch": "x", "triton": "y", "cuda": "z", "backends": ""}
    md = bench_gpu.to_markdown(rows, env)
    assert md.startswith("# fastsat GPU benchmark — Test GPU")
    assert "| pgd_step linf | triton | 1.0000 | 4 | 0 | 0.01 | n/a | n/a |" in md
    assert "| pgd_step linf | triton | 1.26× |" in md
    assert "**triton**" in md


def test_bench_prints_autos_table_in_the_form_of_backends():
    """The per-op winner comes out as the AUTO_CUDA table of fastsat/ops/_backends.py, in the
    same form (it evaluates to a dict with every op, both backends per row): pgd_step is timed
    for both (triton wins by √(2/1.25)); the others keep their current row, marked not measured."""
    from fastsat.ops import _backends

    rows = [_row("triton", 1.0), _row("cuda", 2.0), _row("triton", 1.25, shape="b"), _row("cuda", 1.0, shape="b"),
            _row("triton", 1.0, op="sat_perturb", variant="boxes")]
    text = bench_gpu.auto_table(rows)
    assert text.startswith("AUTO_CUDA: dict[str, tuple[str, ...]] = {\n") and text.endswith("\n}")
    table = ast.literal_eval(text.split(" = ", 1)[1])
    assert list(table) == list(_backends.OPS) == list(_backends.AUTO_CUDA)
    assert table["pgd_step"] == ("triton", "cuda")
    assert f"triton {math.sqrt(2.0 / 1.25):.2f}x faster" in text
    assert {op: table[op] for op in _backends.OPS[1:]} == {op: _backends.AUTO_CUDA[op] for op in _backends.OPS[1:]}
    assert text.count("# not measured") == 3
    # Same form as the file: its header line, one row per op in the same pattern, the closing brace.
    source = Path(_backends.__file__).read_text().splitlines()
    start = source.index(text.splitlines()[0])
    row = re.compile(r'    "(\w+)": \("(\w+)", "(\w+)"\),')
    assert [row.fullmatch(line)[1] for line in source[start + 1:start + 1 + len(_backends.OPS)]] == list(_backends.OPS)
    assert source[start + 1 + len(_backends.OPS)] == "}"
    assert all(row.fullmatch(line.split("  #")[0]) for line in text.splitlines()[1:-1])


def test_auto_follows_the_per_op_table(monkeypatch):
    """`auto` on a CUDA tensor takes the first available backend of the op's row."""
    from fastsat.ops import _backends

    modules = {"cuda": SimpleNamespace(name="cuda"), "triton": SimpleNamespace(name="triton")}
    monkeypatch.setattr(_backends, "_load", lambda name: modules.get(name, name))
    monkeypatch.setattr(_backends, "_unavailable_reason", lambda name, device: None)
    monkeypatch.setitem(_backends.AUTO_CUDA, "alignment_stats", ("triton", "cuda"))
    cuda = torch.device("cuda")
    assert _backends.resolve("auto", cuda, "alignment_stats").name == "triton"
    assert _backends.resolve("auto", cuda, "pgd_step").name == _backends.AUTO_CUDA["pgd_step"][0]
    monkeypatch.setattr(_backends, "_unavailable_reason", lambda name, device: "missing" if name == "triton" else None)
    assert _backends.resolve("auto", cuda, "alignment_stats").name == "cuda"


def test_bench_times_every_case_for_every_implementation(monkeypatch):
    """Each case's call matches the backend interface (run here once, on the CPU, through the
    reference and, if present, the Triton backend); one row per case and implementation."""
    monkeypatch.setattr(bench_gpu, "measure", lambda fn, quick: (fn(), bench_gpu.Timing(2.0, None))[1])
    monkeypatch.setattr(bench_gpu, "measure_copy", lambda nbytes, quick: bench_gpu.Timing(1.0, None))
    impls = [bench_gpu.Impl("torch eager", reference, "torch")]
    if HAS_TRITON:
        from fastsat.ops import _triton

        impls.append(bench_gpu.Impl("triton", _triton, "triton"))
    t = bench_gpu.make_inputs((2, 3, 4, 6), torch.float32, torch.device(DEVICE))
    rows = bench_gpu.time_cases(bench_gpu.CASES, impls, t, quick=True)
    assert [(r.label, r.impl) for r in rows] == [(f"{c.op} {c.variant}".strip(), i.name)
                                                 for c in bench_gpu.CASES for i in impls]
    assert all(r.pct_of_copy == 50.0 and r.speedup_vs_eager == 1.0 for r in rows)


def test_bench_path_rows_in_csv_and_markdown():
    """Attack / saliency / training rows share the CSV (op-only columns empty) and get their own
    tables; an unchunked call that ran out of memory is kept as an OOM entry, not dropped."""
    paths = bench_gpu.gpu_paths
    oom = torch.OutOfMemoryError("CUDA out of memory")

    def unchunked_oom():
        raise oom

    ms, peak, note = paths._time_and_peak(unchunked_oom, torch.device("cpu"), 1, may_fail=True)
    assert (ms, peak, note) == (None, None, "OOM")
    with pytest.raises(torch.OutOfMemoryError):
        paths._time_and_peak(unchunked_oom, torch.device("cpu"), 1, may_fail=False)
    rows = [paths.PathRow("IG", "steps=256", "8×3×224×224", "float32", "chunk_size=None", None, 8, note=note),
            paths.PathRow("IG", "steps=256", "8×3×224×224", "float32", "chunk_size=8", 400.0, 8, 1536.0),
            paths.PathRow("train_step", "sat-boxes", "512×3×32×32", "bf16 autocast", "fastsat", 250.0, 10240,
                          time_vs_baseline=1.04, baseline="standard", note="20 steps")]
    assert rows[2].images_per_s == pytest.approx(10240 / 0.25)
    parsed = list(csv.DictReader(io.StringIO(bench_gpu.to_csv([_row("triton", 1.0)], "H100", "d", rows))))
    assert [p["op"] for p in parsed] == ["pgd_step", "IG", "IG", "train_step"]
    assert parsed[1]["median_ms"] == "" and parsed[1]["note"] == "OOM" and parsed[1]["GB_per_s"] == ""
    assert parsed[2]["peak_MiB"] == "1536.0" and parsed[2]["images_per_s"] == "20.0"
    assert parsed[3]["time_vs_baseline"] == "1.040" and parsed[3]["images_per_s"] == "40960.0"
    env = {"gpu": "Test GPU", "date": "d", "torch": "x", "triton": "y", "cuda": "z", "backends": ""}
    md = bench_gpu.to_markdown([_row("triton", 1.0)], env, rows)
    assert "| IG steps=256 | 8×3×224×224 | chunk_size=None | OOM | n/a |  |" in md
    assert "| IG steps=256 | 8×3×224×224 | chunk_size=8 | 400.0 | 1536 |  |" in md
    assert "| sat-boxes | 40960 | 1.040 |" in md


@needs_triton
def test_bench_reference_check_accepts_triton_and_catches_an_error(triton_module):
    """The check run before timing passes the real backend and flags a one-ulp L∞ error."""
    t = bench_gpu.make_inputs((2, 3, 6, 8), torch.float32, torch.device(DEVICE))
    assert bench_gpu.check_against_reference(bench_gpu.Impl("triton", triton_module, "triton"), t) == []

    def off_by_one_ulp(x, grad, x_nat, out, *args):
        stats = reference.pgd_step(x, grad, x_nat, out, *args)
        out.copy_(torch.nextafter(out, torch.full_like(out, 2.0)))
        return stats

    broken = SimpleNamespace(pgd_step=off_by_one_ulp, random_start=reference.random_start,
                             alignment_stats=reference.alignment_stats, sat_perturb=reference.sat_perturb)
    problems = bench_gpu.check_against_reference(bench_gpu.Impl("broken", broken, None), t)
    assert any("pgd_step linf" in p for p in problems), problems


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bench_without_cuda_exits_with_a_message(capsys):
    assert bench_gpu.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
