"""Every available backend of every fused op against the PyTorch reference (fastsat.ops.reference).

Backends that are not built or cannot run here are skipped with the reason
(``fastsat.ops.available_backends``). Without a GPU, Triton runs under ``TRITON_INTERPRET=1``
(tests/conftest.py), so shapes stay small.

Tolerances, per dtype, and why:
- L∞ step, projection and clip are exact ops on fp32 (fp64) values followed by one rounding to the
  storage dtype, so every backend must match the reference bitwise in every dtype.
- Per-sample reductions accumulate in fp32 (fp64 for fp64 inputs) in a different order than the
  reference: the error of a blocked sum of N terms is below ~(N/block + log2 block)·u·Σ|terms|,
  u = 2^-24. With N ≤ 4551 here that is < 1e-6 relative to Σ|terms|; we allow RED_RTOL = 1e-5
  (fp64: 1e-12), which still catches any wrong term (errors of a formula are O(1) relative).
- L2 steps rescale by a factor derived from those reductions, so the result differs from the
  reference by at most ~RED_RTOL·|δ| before rounding, plus one unit in the last place of the
  storage dtype after it.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsat import ops
from fastsat.ops import NORMS, reference

KERNEL_BACKENDS = ("cpp", "triton", "cuda")
AVAILABLE = ops.available_backends()


def _device(backend: str) -> str:
    if backend in ("cuda",) or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def _backend_param(name):
    return pytest.param(name, marks=pytest.mark.skipif(not AVAILABLE[name], reason=f"backend {name} not available"))


KERNELS = [_backend_param(b) for b in KERNEL_BACKENDS]
ALL = KERNELS + [pytest.param("torch")]

RED_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# One unit in the last place at 1.0 (all values live in [0, 1]).
ULP = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

SHAPES = [(2, 3, 37, 41), (1, 3, 37, 41), (3, 10), (4, 1, 5, 5)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (dtype of x, dtype of the gradient): the same, or a float32 gradient for a 16-bit x.
DTYPE_PAIRS = [(d, d) for d in DTYPES] + [(torch.float16, torch.float32), (torch.bfloat16, torch.float32)]


def _pair_id(pair):
    x_dtype, grad_dtype = pair
    return str(x_dtype) if x_dtype == grad_dtype else f"{x_dtype}-grad-{grad_dtype}"


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        # A non-contiguous view: every other sample of a batch twice as large.
        big = torch.cat([t, t + 0.25], dim=0)
        return big[0::2] if t.shape[0] > 0 else big
    return t


def _case_seed(*parts: object) -> int:
    """Seed of a test case from its parameters: the CRC-32 of their text, the same in every process
    (``hash`` of a str changes with PYTHONHASHSEED, so a failing case could not be replayed)."""
    return zlib.crc32("|".join(map(str, parts)).encode())


def _inputs(shape, dtype, device, layout, eps, grad_dtype=None):
    """x, g, x_nat of ``shape`` in ``dtype`` (g in ``grad_dtype``, default ``dtype``), laid out as
    ``layout``. The gradient's entries span ten orders of magnitude (down to ~1e-9, which float16
    flushes to zero) and every seventh is exactly 0 (sign 0: no L∞ step)."""
    grad_dtype = dtype if grad_dtype is None else grad_dtype
    gen = torch.Generator().manual_seed(_case_seed(shape, dtype, grad_dtype, layout))
    x_nat = torch.rand(shape, generator=gen, dtype=torch.float64)
    x = (x_nat + (2 * torch.rand(shape, generator=gen, dtype=torch.float64) - 1) * 1.5 * eps).clamp(0, 1)
    magnitude = 10.0 ** -torch.randint(0, 10, shape, generator=gen, dtype=torch.float64)
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * magnitude
    g.view(-1)[::7] = 0.0
    return [_layout(t.to(d).to(device), layout) for t, d in ((x, dtype), (g, grad_dtype), (x_nat, dtype))]


def test_case_seed_is_the_same_in_every_process():
    """The seed of a case does not depend on PYTHONHASHSEED: a failing case replays."""
    code = f"import zlib\n{inspect.getsource(_case_seed)}\nprint(_case_seed((2, 3, 37, 41), 'torch.float16', 'x'))"
    seeds = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": hash_seed},
                       capture_output=True, text=True, check=True).stdout.strip()
        for hash_seed in ("1", "2")
    }
    assert seeds == {str(_case_seed((2, 3, 37, 41), torch.float16, "x"))}


def _layouts_for(shape):
    return ["contiguous", "strided"] + (["channels_last"] if len(shape) == 4 else [])


CASES = [(s, lay) for s in SHAPES for lay in _layouts_for(s)]


def _assert_close(actual, expected, *, atol, rtol=0.0, what=""):
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = err > bound
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ; max error {float(err.max()):.3g}; "
            f"first at {idx}: got {float(actual[idx])!r}, expected {float(expected[idx])!r} (atol={atol}, rtol={rtol})"
        )


def _reference_step(x, g, x_nat, **kw):
    """The reference on the same (already strided) inputs."""
    return ops.pgd_step(x, g, x_nat, return_stats=True, backend="torch", **kw)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=_pair_id)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_pgd_step_matches_reference(backend, dtypes, shape, layout, norm):
    dtype, grad_dtype = dtypes
    eps, step = (0.03, 0.01) if norm == "linf" else (0.5, 0.3)
    x, g, x_nat = _inputs(shape, dtype, _device(backend), layout, eps, grad_dtype)
    kw = {"step_size": step, "eps": eps, "norm": norm, "clip": (0.0, 1.0)}
    got, stats = ops.pgd_step(x, g, x_nat, return_stats=True, backend=backend, **kw)
    want, want_stats = _reference_step(x, g, x_nat, **kw)
    plain = ops.pgd_step(x, g, x_nat, backend=backend, **kw)
    assert got.dtype == dtype and got.shape == x.shape
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    n = x[0].numel()
    if norm == "linf":
        _assert_close(got, want, atol=0.0, what="linf step")
        _assert_close(stats.delta_norm, want_stats.delta_norm, atol=0.0, what="linf delta_norm")
    else:
        atol = RED_RTOL[dtype] * eps + ULP[dtype]
        _assert_close(got, want, atol=atol, what="l2 step")
        _assert_close(stats.delta_norm, want_stats.delta_norm, atol=math.sqrt(n) * ULP[dtype],
                      rtol=RED_RTOL[dtype], what="l2 delta_norm")
    _assert_close(plain, got, atol=0.0, what="with vs without stats")
    rtol = RED_RTOL[dtype]
    xf, gf = x_nat.double().reshape(len(x), -1), g.double().reshape(len(x), -1)
    dot_scale = (xf * gf).abs().sum(1)
    assert bool(((stats.dot.double() - want_stats.dot.double()).abs() <= rtol * dot_scale + 1e-30).all()), \
        f"dot: got {stats.dot}, expected {want_stats.dot}"
    _assert_close(stats.grad_norm, want_stats.grad_norm, atol=0.0, rtol=rtol, what="grad_norm")
    _assert_close(stats.x_norm, want_stats.x_norm, atol=0.0, rtol=rtol, what="x_norm")


def _float16_x_and_float32_gradient(device):
    """float16 x, x_nat and a float32 gradient that float16 cannot hold: sample 0 spans 1e-9..1
    (with 1e-8 and -3e-9, which round to 0 in float16), sample 1 lies entirely below float16's
    smallest subnormal 6e-8 (all of it rounds to 0), sample 2 lies among float16's subnormals
    (1e-7..1e-6, spaced 6e-8 apart: one to four significant bits)."""
    gen = torch.Generator().manual_seed(_case_seed("float16 x, float32 gradient"))
    shape = (3, 2, 5, 7)
    x_nat = torch.rand(shape, generator=gen).half()
    x = (x_nat.float() + 0.02 * (2 * torch.rand(shape, generator=gen) - 1)).clamp(0, 1).half()
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    exponent = torch.rand(shape, generator=gen)
    g = torch.stack([sign[0] * 10.0 ** (-9 * exponent[0]),
                     sign[1] * 10.0 ** (-9 + exponent[1]),
                     sign[2] * 10.0 ** (-7 + exponent[2])])
    g[0, 0, 0, :2] = torch.tensor([1e-8, -3e-9])
    assert bool((g.half()[1] == 0).all()) and bool((g.half()[0] == 0).any()), "the case must flush entries to 0"
    return x.to(device), g.to(device), x_nat.to(device)


@pytest.mark.parametrize("backend", ALL)
def test_pgd_step_linf_reads_a_float32_gradient_of_a_float16_input(backend):
    """The L∞ step takes the sign of the float32 gradient, not of its float16 rounding (which is 0
    for the tiny entries): bitwise the float32 computation clip(Π(x + α·sign(g))) rounded once
    to float16. The statistics see the float32 gradient too (‖g‖ within RED_RTOL of float64)."""
    x, g, x_nat = _float16_x_and_float32_gradient(_device(backend))
    step, eps = 0.01, 0.03
    got, stats = ops.pgd_step(x, g, x_nat, step_size=step, eps=eps, return_stats=True, backend=backend)
    xf, nf = x.float(), x_nat.float()
    want = torch.minimum(torch.maximum(xf + step * torch.sign(g), nf - eps), nf + eps).clamp(0.0, 1.0).half()
    assert got.dtype == torch.float16
    _assert_close(got, want, atol=0.0, what="linf step from a float32 gradient")
    g64 = g.double().reshape(len(g), -1)
    _assert_close(stats.grad_norm, g64.norm(dim=1), atol=0.0, rtol=RED_RTOL[torch.float32], what="grad_norm")
    aligned = ops.alignment_stats(x, g, backend=backend)
    _assert_close(aligned.grad_norm, g64.norm(dim=1), atol=0.0, rtol=RED_RTOL[torch.float32], what="alignment grad_norm")
    _assert_close(aligned.dot, (x.double().reshape(len(x), -1) * g64).sum(1), atol=0.0,
                  rtol=RED_RTOL[torch.float32], what="alignment dot")


@pytest.mark.parametrize("backend", ALL)
def test_pgd_step_l2_follows_the_float32_gradient_of_a_float16_input(backend):
    """The L2 step moves along g/‖g‖ of the float32 gradient: compared with the float64
    computation from that gradient. Tolerance: half a float16 ulp at 1.0 (2^-11) for the one final
    rounding, plus RED_RTOL·ε for the float32 arithmetic and sums. The float16 rounding of the
    gradient would take no step on sample 1 and bend the direction of sample 2."""
    x, g, x_nat = _float16_x_and_float32_gradient(_device(backend))
    step, eps = 0.3, 0.5
    got = ops.pgd_step(x, g, x_nat, step_size=step, eps=eps, norm="l2", backend=backend)
    x64, g64, n64 = (t.double().reshape(len(t), -1) for t in (x, g, x_nat))
    delta = x64 + step * g64 / g64.norm(dim=1, keepdim=True) - n64
    delta = delta * (eps / delta.norm(dim=1, keepdim=True)).clamp(max=1.0)
    want = (n64 + delta).clamp(0.0, 1.0).reshape(x.shape)
    assert got.dtype == torch.float16
    _assert_close(got, want, atol=ULP[torch.float16] / 2 + RED_RTOL[torch.float32] * eps,
                  what="l2 step from a float32 gradient")


def test_differentiable_alignment_of_a_float16_input_and_float32_gradient():
    """A float32 g with a float16 x: the value is taken from the float32 g (in x's dtype) and each
    input gets its gradient in its own dtype, matching the float64 autograd gradient."""
    x, g, _ = _float16_x_and_float32_gradient("cpu")
    x, g = x.requires_grad_(), g.requires_grad_()
    value = ops.differentiable_alignment(x, g, normalize=True)
    value.sum().backward()
    x64, g64 = x.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    want = (x64 * g64).flatten(1).sum(1).abs() / (x64.flatten(1).norm(dim=1) * g64.flatten(1).norm(dim=1))
    want.sum().backward()
    assert value.dtype == torch.float16 and x.grad.dtype == torch.float16 and g.grad.dtype == torch.float32
    _assert_close(value, want, atol=0.0, rtol=2.0**-10, what="cosine")
    _assert_close(x.grad, x64.grad, atol=1e-3 * float(x64.grad.abs().max()), rtol=2.0**-10, what="d/dx")
    _assert_close(g.grad, g64.grad, atol=0.0, rtol=1e-4, what="d/dg")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("norm", NORMS)
def test_pgd_step_in_place_equals_out_of_place(backend, norm):
    x, g, x_nat = _inputs((2, 3, 6, 5), torch.float32, _device(backend), "contiguous", 0.1)
    kw = {"step_size": 0.05, "eps": 0.1, "norm": norm}
    want = ops.pgd_step(x, g, x_nat, backend=backend, **kw)
    x_copy = x.clone()
    got = ops.pgd_step(x_copy, g, x_nat, out=x_copy, backend=backend, **kw)
    assert got.data_ptr() == x_copy.data_ptr()
    _assert_close(x_copy, want, atol=0.0, what="in place")


def test_pgd_step_linf_analytic():
    """A hand-computed case: steps of ±α are cut at x_nat ± ε, then at the box."""
    x_nat = torch.tensor([[0.50, 0.50, 0.98, 0.02, 0.50]])
    x = torch.tensor([[0.52, 0.49, 0.99, 0.01, 0.50]])
    g = torch.tensor([[1.0, -2.0, 3.0, -1.0, 0.0]])
    want = torch.tensor([[0.53, 0.47, 1.00, 0.00, 0.50]])
    for backend in [b for b in ("torch", "cpp", "triton") if AVAILABLE[b] and _device(b) == "cpu"]:
        got = ops.pgd_step(x, g, x_nat, step_size=0.02, eps=0.03, backend=backend)
        _assert_close(got, want, atol=1e-7, what=f"{backend} analytic linf")


def test_pgd_step_l2_analytic():
    """‖g‖ = 5: the step moves 1.0 along g/5 from x = x_nat, then the projection to ε = 0.5 halves it."""
    x_nat = torch.full((1, 2), 0.5, dtype=torch.float64)
    g = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    for backend in [b for b in ("torch", "cpp", "triton") if AVAILABLE[b] and _device(b) == "cpu"]:
        got, stats = ops.pgd_step(x_nat.clone(), g, x_nat, step_size=1.0, eps=0.5, norm="l2",
                                  clip=(-10.0, 10.0), return_stats=True, backend=backend)
        _assert_close(got, torch.tensor([[0.8, 0.9]], dtype=torch.float64), atol=1e-12, what=f"{backend} l2")
        _assert_close(stats.delta_norm, torch.tensor([0.5], dtype=torch.float64), atol=1e-12, what="delta_norm")
        _assert_close(stats.grad_norm, torch.tensor([5.0], dtype=torch.float64), atol=1e-12, what="grad_norm")
        _assert_close(stats.dot, torch.tensor([3.5], dtype=torch.float64), atol=1e-12, what="dot")


@pytest.mark.parametrize("backend", ALL)
def test_pgd_step_l2_zero_gradient_takes_no_step(backend):
    x, _, x_nat = _inputs((2, 3, 4, 4), torch.float32, _device(backend), "contiguous", 0.1)
    g = torch.randn_like(x)
    g[1] = 0.0
    got, stats = ops.pgd_step(x, g, x_nat, step_size=0.1, eps=10.0, norm="l2", return_stats=True, backend=backend)
    # x_nat + (x − x_nat) may round once: no step means equal up to one ulp.
    _assert_close(got[1], x[1], atol=ULP[torch.float32], what="zero-gradient sample")
    assert float(stats.alignment[1]) == 0.0 and float(stats.cosine[1]) == 0.0


@pytest.mark.parametrize("backend", ALL)
@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 3),
    dims=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    eps=st.floats(0.0, 0.5),
    step=st.floats(0.0, 2.0),
    norm=st.sampled_from(NORMS),
    seed=st.integers(0, 2**31 - 1),
)
def test_pgd_step_invariants(backend, batch, dims, eps, step, norm, seed):
    """Whatever the shape, radius and step: inside the ε-ball, inside the box, finite. The iterate
    starts anywhere in the box, also outside the ball.

    The ball's edge x_nat ± ε is itself a float32 number: rounding it costs up to half an ulp at
    1.0 (2^-24) per element, which for tiny ε is far more than a relative 1e-6. The bound is
    therefore ε·(1 + 1e-6) plus that rounding: 2^-24 for L∞, √N·2^-24 for L2."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *dims)
    device = _device(backend)
    x_nat = torch.rand(shape, generator=gen).to(device)
    x = torch.rand(shape, generator=gen).to(device)
    g = torch.randn(shape, generator=gen).to(device)
    got, stats = ops.pgd_step(x, g, x_nat, step_size=step, eps=eps, norm=norm, return_stats=True, backend=backend)
    delta = (got.double() - x_nat.double()).reshape(batch, -1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    rounding = 2.0**-24 * (1.0 if norm == "linf" else math.sqrt(delta.shape[1]))
    assert bool((size <= eps * (1 + 1e-6) + rounding).all()), f"left the ball: {size} > {eps}"
    assert bool(((got >= 0) & (got <= 1)).all()), "left the box"
    assert bool(torch.isfinite(got).all())
    _assert_close(stats.delta_norm, size, atol=1e-6, what="delta_norm stat")


# --- random_start ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("norm", NORMS)
def test_random_start_reproducible_and_inside(backend, norm):
    device = _device(backend)
    x_nat = torch.rand(3, 3, 7, 5).to(device)
    eps = 0.1 if norm == "linf" else 1.0
    a = ops.random_start(x_nat, eps=eps, norm=norm, seed=123, backend=backend)
    b = ops.random_start(x_nat, eps=eps, norm=norm, seed=123, backend=backend)
    c = ops.random_start(x_nat, eps=eps, norm=norm, seed=124, backend=backend)
    assert torch.equal(a, b), "same seed, different output"
    assert (a != c).float().mean() > 0.5, "different seeds, (mostly) same output"
    delta = (a.double() - x_nat.double()).reshape(3, -1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert bool((size <= eps * (1 + 1e-6)).all())
    assert bool(((a >= 0) & (a <= 1)).all())


@pytest.mark.parametrize("backend", ALL)
def test_random_start_linf_is_uniform(backend):
    """δ/ε ~ U(-1, 1) per element: mean 0, variance 1/3, and a flat histogram. With n = 12,000
    draws the standard error of the mean is 0.0053 and of the variance 0.0027; bounds are 5 σ."""
    x_nat = torch.full((40, 3, 10, 10), 0.5).to(_device(backend))
    u = (ops.random_start(x_nat, eps=0.25, seed=7, backend=backend).double() - 0.5) / 0.25
    u = u.flatten().cpu()
    assert abs(float(u.mean())) < 5 * 0.0053
    assert abs(float(u.var()) - 1 / 3) < 5 * 0.0027
    counts = torch.histc(u, bins=10, min=-1, max=1)
    assert float((counts - 1200).abs().max()) < 5 * math.sqrt(1200 * 0.9)


@pytest.mark.parametrize("backend", ALL)
def test_random_start_l2_is_uniform_in_ball(backend):
    """Uniform in the d-ball: (r/ε)^d ~ U(0, 1) and the direction is isotropic. A radius drawn
    uniformly (r = ε·U) would put (r/ε)^d near 0 and fail the Kolmogorov–Smirnov bound."""
    batch, shape = 400, (3, 2, 2)
    d = math.prod(shape)
    x_nat = torch.full((batch, *shape), 0.5).to(_device(backend))
    delta = (ops.random_start(x_nat, eps=0.3, norm="l2", seed=11, backend=backend).double() - 0.5).reshape(batch, -1).cpu()
    u = (delta.norm(dim=1) / 0.3) ** d
    ks = (u.sort().values - (torch.arange(batch, dtype=torch.float64) + 0.5) / batch).abs().max()
    assert float(ks) < 1.63 / math.sqrt(batch) + 0.5 / batch, f"radius distribution off (KS {float(ks):.3f})"
    direction = delta / delta.norm(dim=1, keepdim=True)
    # Each coordinate of a uniform direction has mean 0 and variance 1/d.
    assert float(direction.mean(0).abs().max()) < 5 * math.sqrt(1 / d / batch)
    assert float((direction.pow(2).mean(0) - 1 / d).abs().max()) < 0.05


# --- alignment_stats and alignment -------------------------------------------------------------

@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=_pair_id)
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_alignment_stats_matches_reference(backend, dtypes, shape, layout):
    dtype, grad_dtype = dtypes
    x, g, _ = _inputs(shape, dtype, _device(backend), layout, 0.1, grad_dtype)
    got = ops.alignment_stats(x, g, backend=backend)
    want = ops.alignment_stats(x, g, backend="torch")
    rtol = RED_RTOL[dtype]
    xf, gf = x.double().reshape(len(x), -1), g.double().reshape(len(x), -1)
    assert bool(((got.dot.double() - want.dot.double()).abs() <= rtol * (xf * gf).abs().sum(1)).all())
    _assert_close(got.grad_norm, want.grad_norm, atol=0.0, rtol=rtol, what="grad_norm")
    _assert_close(got.x_norm, want.x_norm, atol=0.0, rtol=rtol, what="x_norm")


@pytest.mark.parametrize("backend", ALL)
def test_alignment_stats_definitions(backend):
    """α and the cosine from their definitions, in float64; zero gradient → 0, not NaN."""
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64).to(_device(backend))
    g = torch.randn_like(x)
    g[2] = 0.0
    stats = ops.alignment_stats(x, g, backend=backend)
    xf, gf = x.reshape(3, -1).cpu(), g.reshape(3, -1).cpu()
    dot = (xf * gf).sum(1)
    want_alignment = dot.abs() / gf.norm(dim=1)
    want_cos = want_alignment / xf.norm(dim=1)
    _assert_close(stats.alignment[:2].cpu(), want_alignment[:2], atol=0, rtol=1e-12, what="alignment")
    _assert_close(stats.cosine[:2].cpu(), want_cos[:2], atol=0, rtol=1e-12, what="cosine")
    assert float(stats.alignment[2]) == 0.0 and float(stats.cosine[2]) == 0.0


@pytest.mark.parametrize("normalize", [False, True])
def test_alignment_gradcheck(normalize):
    x = torch.rand(2, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: ops.differentiable_alignment(a, b, normalize)
    assert torch.autograd.gradcheck(fn, (x, g))
    assert torch.autograd.gradgradcheck(fn, (x, g))


def test_alignment_double_backward_through_network():
    """A loss on the alignment of a saliency map g = ∇ₓf (create_graph) backpropagates to the
    weights exactly as the same loss written with plain autograd ops."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()
    x = torch.rand(4, 6, dtype=torch.float64, requires_grad=True)

    def weight_grads(align_fn):
        (g,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
        loss = align_fn(x, g).sum()
        return torch.autograd.grad(loss, list(net.parameters()), allow_unused=True, materialize_grads=True)

    fused = weight_grads(lambda a, b: ops.differentiable_alignment(a, b, normalize=True))
    plain = weight_grads(lambda a, b: (a * b).sum(1).abs() / (a.norm(dim=1) * b.norm(dim=1)))
    for got, want in zip(fused, plain):
        _assert_close(got, want, atol=1e-12, rtol=1e-10, what="double backward")


# --- sat_perturb -------------------------------------------------------------------------------

def _box_and_mask(batch, height, width, device):
    boxes = torch.tensor([[1, 2, 4, 5], [0, 0, width, height], [3, 1, 3, 4]][:batch], device=device)
    cols = torch.arange(width, device=device)
    rows = torch.arange(height, device=device)
    inside = ((cols >= boxes[:, 0, None]) & (cols < boxes[:, 2, None]))[:, None, :] & \
             ((rows >= boxes[:, 1, None]) & (rows < boxes[:, 3, None]))[:, :, None]
    return boxes, inside[:, None]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sat_perturb_p1_matches_reference(backend, dtype, layout):
    """p = 1 takes the map everywhere: no randomness, so every backend equals the reference —
    exactly for ±1 maps (boxes, masks); within one rounding of ε·S for dense maps."""
    device = _device(backend)
    x = _layout(torch.rand(3, 3, 6, 7).to(dtype).to(device), layout)
    boxes, masks = _box_and_mask(3, 6, 7, device)
    dense = _layout((torch.rand(3, 3, 6, 7) * 2 - 1).to(dtype).to(device), layout)
    dense1 = (torch.rand(3, 1, 6, 7) * 2 - 1).to(dtype).to(device)
    for name, source, atol in [
        ("boxes", {"boxes": boxes}, 0.0),
        ("masks", {"masks": masks}, 0.0),
        ("dense", {"saliency": dense}, 2 * ULP[dtype]),
        ("dense B×1×H×W", {"saliency": dense1}, 2 * ULP[dtype]),
    ]:
        got = ops.sat_perturb(x, eps=0.1, p=1.0, seed=5, backend=backend, **source)
        want = ops.sat_perturb(x, eps=0.1, p=1.0, seed=5, backend="torch", **source)
        assert got.dtype == dtype
        _assert_close(got, want, atol=atol, what=f"sat p=1 {name}")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sat_perturb_sources_agree(backend, layout):
    """Boxes evaluated in the kernel, the equivalent mask and the materialised ±1 map give the
    same output for the same seed: same random streams, same S — for any p."""
    device = _device(backend)
    x = _layout(torch.rand(3, 2, 6, 7).to(device), layout)
    boxes, masks = _box_and_mask(3, 6, 7, device)
    dense = torch.where(masks, 1.0, -1.0).expand(3, 2, 6, 7)
    kw = {"eps": 0.05, "p": 0.6, "seed": 99, "backend": backend}
    from_boxes = ops.sat_perturb(x, boxes=boxes, **kw)
    assert torch.equal(from_boxes, ops.sat_perturb(x, masks=masks, **kw))
    assert torch.equal(from_boxes, ops.sat_perturb(x, masks=masks.to(torch.uint8), **kw))
    assert torch.equal(from_boxes, ops.sat_perturb(x, saliency=_layout(dense.contiguous(), layout), **kw))
    assert torch.equal(from_boxes, ops.sat_perturb(x, saliency=torch.where(masks, 1.0, -1.0), **kw))


@pytest.mark.parametrize("backend", ALL)
def test_sat_perturb_statistics(backend):
    """With a constant map S = 0.5 the element took S iff w = 1: its rate estimates p. Elsewhere the
    shift is ±ε with a fair sign. n = 24,000 elements: standard errors ≤ 0.0032; bounds are 5 σ."""
    device = _device(backend)
    x = torch.full((20, 3, 20, 20), 0.5).to(device)
    saliency = torch.full_like(x, 0.5)
    p, eps = 0.3, 0.1
    out = ops.sat_perturb(x, eps=eps, p=p, seed=3, saliency=saliency, backend=backend).double().cpu()
    shift = (0.5 - out) / eps  # = s
    took_map = (shift - 0.5).abs() < 1e-6
    noise = shift[~took_map]
    assert bool(((noise.abs() - 1).abs() < 1e-6).all()), "noise elements must move by exactly ±ε"
    rate = float(took_map.double().mean())
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / x.numel())
    assert abs(float(noise.mean())) < 5 / math.sqrt(noise.numel())
    again = ops.sat_perturb(x, eps=eps, p=p, seed=3, saliency=saliency, backend=backend)
    other = ops.sat_perturb(x, eps=eps, p=p, seed=4, saliency=saliency, backend=backend)
    assert torch.equal(again.double().cpu(), out)
    assert not torch.equal(other.double().cpu(), out)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_sat_perturb_curriculum_ends(backend, p):
    """p = 0 is pure random-sign noise (no trace of the map); p = 1 is exactly clip(x − ε·S)."""
    device = _device(backend)
    x = torch.rand(2, 3, 8, 8).to(device)
    boxes = torch.tensor([[2, 2, 6, 6], [0, 1, 8, 3]], device=device)
    out = ops.sat_perturb(x, eps=0.05, p=p, seed=1, boxes=boxes, backend=backend)
    s_map = reference.saliency_from_boxes(boxes, 8, 8).expand_as(x)
    expected_if_map = (x - 0.05 * s_map).clamp(0, 1)
    agrees = torch.isclose(out, expected_if_map, atol=1e-6)
    if p == 1.0:
        assert bool(agrees.all())
    else:
        assert abs(float(agrees.float().mean()) - 0.5) < 0.1  # a fair sign agrees half the time


# --- bad input ---------------------------------------------------------------------------------

def _bad_calls():
    x = torch.rand(2, 3, 4, 4)
    g = torch.randn_like(x)
    step = {"step_size": 0.1, "eps": 0.1}
    nan_nat = x.clone()
    nan_nat[0, 0, 0, 0] = float("nan")
    return [
        ("grad", lambda: ops.pgd_step(x, g[:1], x, **step), ValueError),
        ("x_nat", lambda: ops.pgd_step(x, g, x.double(), **step), TypeError),
        ("eps", lambda: ops.pgd_step(x, g, x, step_size=0.1, eps=-1.0), ValueError),
        ("step_size", lambda: ops.pgd_step(x, g, x, step_size=-0.1, eps=0.1), ValueError),
        ("norm", lambda: ops.pgd_step(x, g, x, norm="l1", **step), ValueError),
        ("clip", lambda: ops.pgd_step(x, g, x, clip=(1.0, 0.0), **step), ValueError),
        ("x_nat", lambda: ops.pgd_step(x, g, nan_nat, **step), ValueError),
        ("out", lambda: ops.pgd_step(x, g, x, out=torch.empty(2, 3, 4, 5), **step), ValueError),
        ("x", lambda: ops.pgd_step(x.long(), g, x, **step), TypeError),
        ("backend", lambda: ops.pgd_step(x, g, x, backend="fortran", **step), ValueError),
        ("seed", lambda: ops.random_start(x, eps=0.1, seed=-1), ValueError),
        ("p", lambda: ops.sat_perturb(x, eps=0.1, p=1.5, boxes=torch.zeros(2, 4, dtype=torch.long)), ValueError),
        ("exactly one", lambda: ops.sat_perturb(x, eps=0.1, p=0.5), ValueError),
        ("boxes", lambda: ops.sat_perturb(x, eps=0.1, p=0.5, boxes=torch.tensor([[0, 0, 5, 2], [0, 0, 1, 1]])), ValueError),
        ("boxes", lambda: ops.sat_perturb(x, eps=0.1, p=0.5, boxes=torch.tensor([[3, 0, 2, 2], [0, 0, 1, 1]])), ValueError),
        ("boxes", lambda: ops.sat_perturb(x, eps=0.1, p=0.5, boxes=torch.zeros(2, 4)), TypeError),
        ("masks", lambda: ops.sat_perturb(x, eps=0.1, p=0.5, masks=torch.ones(2, 1, 4, 5, dtype=torch.bool)), ValueError),
        ("saliency", lambda: ops.sat_perturb(x, eps=0.1, p=0.5, saliency=torch.ones(2, 2, 4, 4)), ValueError),
        ("g", lambda: ops.alignment_stats(x, g[..., :2]), ValueError),
    ]


@pytest.mark.parametrize("name,call,error", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_names_the_argument(name, call, error):
    with pytest.raises(error, match=name):
        call()


def test_missing_backend_says_how_to_get_it():
    missing = [b for b in KERNEL_BACKENDS if not AVAILABLE[b]]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(RuntimeError, match=rf"backend '{missing[0]}' is not available: .+\. .+"):
        ops.alignment_stats(torch.rand(1, 3), torch.rand(1, 3), backend=missing[0])


def _parameter_names(fn) -> list[str]:
    """A function's parameter names, or a torch.ops op's from its schema."""
    if isinstance(fn, torch._ops.OpOverloadPacket):
        return [arg.name for arg in fn.default._schema.arguments]
    return [name for name in inspect.signature(fn).parameters if name != "self"]


@pytest.mark.parametrize("backend", ALL)
def test_every_backend_implements_the_interface(backend):
    """The written interface lists the ops of OPS, and every backend has each of them with the
    interface's parameters in its order."""
    from fastsat.ops import _backends

    interface = [name for name, member in vars(_backends.Backend).items()
                 if inspect.isfunction(member) and not name.startswith("_")]
    assert interface == list(_backends.OPS) == list(_backends.AUTO_CUDA)
    module = _backends.resolve(backend, torch.device(_device(backend)), "pgd_step")
    for op in _backends.OPS:
        assert _parameter_names(getattr(module, op)) == _parameter_names(getattr(_backends.Backend, op)), op


def test_backends_are_the_rows_of_the_table():
    from fastsat.ops import _backends

    assert ops.BACKENDS == ("auto", *_backends.BACKEND_TABLE) == ("auto", "triton", "cuda", "cpp", "torch")
    assert list(ops.available_backends()) == list(_backends.BACKEND_TABLE)
    assert ops.available_backends()["torch"]


def test_import_touches_no_gpu_and_needs_no_triton():
    """`import fastsat` loads neither triton nor the extension; with both missing, `auto` falls
    back to the reference."""
    code = (
        "import sys\n"
        "import torch, fastsat, fastsat.ops as ops\n"
        "assert 'triton' not in sys.modules and 'fastsat._C' not in sys.modules\n"
        "sys.modules['triton'] = None; sys.modules['fastsat._C'] = None\n"
        "x = torch.rand(2, 3); ops.pgd_step(x, x, x, step_size=0.1, eps=0.1)\n"
        "assert not ops.available_backends()['triton'] and not ops.available_backends()['cpp']\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})


# --- torch.compile -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [_backend_param("cpp"), _backend_param("triton"), "torch"])
def test_compiles_fullgraph_and_matches_eager(backend):
    """A PGD-like function of the ops compiles without graph breaks on the CPU (custom ops with
    fake implementations; the reference is plain torch) and gives the eager result. The
    reference's random ops seed a torch.Generator, which dynamo cannot create inside a graph, so
    sat_perturb is compiled through the kernel backend only."""

    def step(x, g, x_nat, boxes):
        # In place (out=x): the aliasing check of out reads addresses, which fake tensors lack.
        x_new = x.clone()
        _, stats = ops.pgd_step(x_new, g, x_nat, step_size=0.01, eps=0.03, return_stats=True, out=x_new,
                                backend=backend)
        aligned = ops.alignment_stats(x_new, g, backend=backend).alignment
        if backend == "torch":
            return x_new, stats.cosine, aligned
        return ops.sat_perturb(x_new, eps=0.03, p=0.5, seed=0, boxes=boxes, backend=backend), stats.cosine, aligned

    x, g, x_nat = _inputs((2, 3, 8, 8), torch.float32, _device(backend), "contiguous", 0.03)
    boxes = torch.tensor([[1, 1, 5, 6], [0, 2, 8, 8]], device=x.device)
    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(compiled(x, g, x_nat, boxes), step(x, g, x_nat, boxes)):
        _assert_close(got, want, atol=1e-6, what="compiled vs eager")


# --- review fixes: finiteness cache, out aliasing, low-precision backward -------------------

def test_finite_check_runs_on_inference_tensors():
    """Inference tensors have no version counter: the check must still run (every time)."""
    with torch.inference_mode():
        x_nat = torch.rand(2, 3, 4, 4)
        assert ops.random_start(x_nat, eps=0.1, seed=0).shape == x_nat.shape
        x_nat[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="x_nat"):
            ops.random_start(x_nat, eps=0.1, seed=0)


def test_finite_check_sees_in_place_change_of_base():
    """x_nat found finite, then its base written in place: the shared version counter forces a
    new check."""
    base = torch.rand(4, 3, 4, 4)
    x_nat = base[:2]
    ops.random_start(x_nat, eps=0.1, seed=0)
    base[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="x_nat"):
        ops.random_start(x_nat, eps=0.1, seed=0)


def test_out_partially_overlapping_an_input_is_refused():
    buffer = torch.rand(3, 3, 4, 4)
    x = buffer[:2]
    g = torch.randn_like(x)
    with pytest.raises(ValueError, match="out: expected x itself or memory disjoint from x"):
        ops.pgd_step(x, g, x.clone(), step_size=0.1, eps=0.1, out=buffer[1:])
    # A disjoint part of the same storage stays allowed.
    disjoint = torch.rand(4, 3, 4, 4)
    want = ops.pgd_step(disjoint[:2], g, disjoint[:2].clone(), step_size=0.1, eps=0.1, backend="torch")
    ops.pgd_step(disjoint[:2], g, disjoint[:2].clone(), step_size=0.1, eps=0.1, out=disjoint[2:])
    _assert_close(disjoint[2:], want, atol=0, what="out in a disjoint part of the storage")


@pytest.mark.parametrize("normalize", [False, True])
def test_alignment_backward_float16_large_image(normalize):
    """The backward sums ‖x‖², ‖g‖², ⟨x, g⟩ in float32 like the forward: for a 3×224×224 image
    near 1, ‖x‖² ≈ 1.2e5 overflows float16 (max 65504). Compared with the float64 gradient of the
    same float16 inputs; tolerance: a float16 rounding of the result (2^-10 relative) plus 1e-3 of
    the largest entry for the float32 sums."""
    torch.manual_seed(3)
    x = (0.8 + 0.2 * torch.rand(1, 3, 224, 224)).half().requires_grad_()
    g = (torch.randn(1, 3, 224, 224) * 1e-2).half().requires_grad_()
    ops.differentiable_alignment(x, g, normalize).sum().backward()
    x64, g64 = x.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    dot = (x64 * g64).sum().abs()
    value = dot / (x64.norm() * g64.norm()) if normalize else dot / g64.norm()
    value.backward()
    for got, want, name in [(x.grad, x64.grad, "d/dx"), (g.grad, g64.grad, "d/dg")]:
        assert bool(torch.isfinite(got).all()), name
        _assert_close(got.double(), want, atol=1e-3 * float(want.abs().max()), rtol=2.0**-10, what=name)


@pytest.mark.parametrize("kind", ["numpy", "0-d tensor"])
def test_numbers_may_be_numpy_scalars_or_0d_tensors(kind):
    """Where a number is meant (ε, α, p, clip, seed), numpy scalars and 0-d CPU tensors give the
    same result as Python numbers, on the default backend. The values are exact in float32."""
    np = pytest.importorskip("numpy")

    def wrap(value):
        if kind == "numpy":
            return np.int64(value) if isinstance(value, int) else np.float32(value)
        return torch.tensor(value)

    x, g, x_nat = _inputs((2, 3, 4, 4), torch.float32, "cpu", "contiguous", 0.125)
    for norm in NORMS:
        got = ops.pgd_step(x, g, x_nat, step_size=wrap(0.0625), eps=wrap(0.125), norm=norm, clip=(wrap(0.0), wrap(1.0)))
        want = ops.pgd_step(x, g, x_nat, step_size=0.0625, eps=0.125, norm=norm, clip=(0.0, 1.0))
        _assert_close(got, want, atol=0, what=f"pgd_step {norm}")
        got = ops.random_start(x, eps=wrap(0.125), norm=norm, seed=wrap(5))
        _assert_close(got, ops.random_start(x, eps=0.125, norm=norm, seed=5), atol=0, what=f"random_start {norm}")
    boxes = torch.tensor([[0, 0, 2, 2], [1, 1, 4, 4]])
    got = ops.sat_perturb(x, eps=wrap(0.125), p=wrap(0.5), seed=wrap(1), boxes=boxes, clip=(wrap(0.0), wrap(1.0)))
    _assert_close(got, ops.sat_perturb(x, eps=0.125, p=0.5, seed=1, boxes=boxes), atol=0, what="sat_perturb")
    with pytest.raises(ValueError, match="eps"):
        ops.random_start(x, eps=wrap(-0.125))


def test_numbers_of_the_wrong_kind_name_the_argument():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(TypeError, match="clip"):
        ops.random_start(x, eps=0.1, clip=("a", 1.0))
    with pytest.raises(TypeError, match="p: expected a finite number"):
        ops.sat_perturb(x, eps=0.1, p="0.5", boxes=torch.tensor([[0, 0, 2, 2], [1, 1, 4, 4]]))
    with pytest.raises(TypeError, match="eps: expected a finite number"):
        ops.pgd_step(x, x, x, step_size=0.1, eps=True)
    with pytest.raises(ValueError, match="norm: expected one of 'linf', 'l2', got 'l3'"):
        ops.pgd_step(x, x, x, step_size=0.1, eps=0.1, norm="l3")
    with pytest.raises(ValueError, match="backend: expected one of .* got 'tritno' \\(did you mean 'triton'\\?\\)"):
        ops.alignment_stats(x, x, backend="tritno")
