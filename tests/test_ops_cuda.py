"""The GPU kernels' own paths against the reference (CUDA only; scripts/gpu_check.sh runs these
with ``-k cuda``; skipped without a GPU).

tests/test_ops.py runs every backend on its shapes; these add what only a GPU shows:
- the cuda backend's L2 step in one kernel (a sample of ≤ 8192 elements) and in two (longer
  samples), the triton backend's one-tile (≤ 4096) and multi-tile paths;
- 16-byte vector loads with a scalar head and tail: per-sample sizes that are not a multiple of
  the vector width (so sample starts are misaligned), and an offset view (a misaligned base
  pointer, which must fall back to scalar loads);
- contiguous and channels_last, float32 / float16 / bfloat16 with their own or a float32
  gradient, in-place updates.
"""

from __future__ import annotations

import pytest
import torch

from fastsat import ops
from fastsat.ops import NORMS, reference

AVAILABLE = ops.available_backends()
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not AVAILABLE[b], reason=f"backend {b} not available"))
            for b in ("cuda", "triton")]
# (B, C, H, W): one kernel / one tile (3·32·32), cuda two kernels and triton many tiles (3·64·64),
# an odd per-sample size (misaligned sample starts: vector head and tail), a tiny one.
SHAPES = [(6, 3, 32, 32), (3, 3, 64, 64), (5, 3, 7, 5), (4, 1, 1, 3)]
DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
          (torch.float16, torch.float32), (torch.bfloat16, torch.float32)]
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _inputs(shape, dtype, grad_dtype, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_nat = torch.rand(shape, generator=gen)
    x = (x_nat + 0.03 * (2 * torch.rand(shape, generator=gen) - 1)).clamp(0, 1)
    g = torch.randn(shape, generator=gen)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return [t.to("cuda", d).contiguous(memory_format=fmt) for t, d in ((x, dtype), (g, grad_dtype), (x_nat, dtype))]


def _close(got, want, dtype, what):
    # L∞ is exact; L2 and the sums carry float32 reduction-order error, then one rounding to dtype.
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=2 * ULP[dtype], msg=what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_kernels_match_reference(backend, shape, dtypes, layout):
    dtype, grad_dtype = dtypes
    x, g, x_nat = _inputs(shape, dtype, grad_dtype, layout)
    for norm in NORMS:
        step, eps = (0.01, 0.03) if norm == "linf" else (0.2, 0.5)
        kw = {"step_size": step, "eps": eps, "norm": norm, "return_stats": True}
        got, stats = ops.pgd_step(x, g, x_nat, backend=backend, **kw)
        want, want_stats = ops.pgd_step(x, g, x_nat, backend="torch", **kw)
        assert got.stride() == x.stride()
        _close(got, want, dtype, f"pgd_step {norm}")
        for name in ("dot", "grad_norm", "x_norm", "delta_norm"):
            torch.testing.assert_close(getattr(stats, name), getattr(want_stats, name), rtol=1e-5, atol=1e-5,
                                       msg=f"pgd_step {norm} {name}")
        in_place = x.clone()
        ops.pgd_step(in_place, g, x_nat, out=in_place, backend=backend, **{**kw, "return_stats": False})
        assert torch.equal(in_place, got), f"pgd_step {norm}: in place differs"
    aligned = ops.alignment_stats(x, g, backend=backend)
    expected = ops.alignment_stats(x, g, backend="torch")
    for name in ("dot", "grad_norm", "x_norm"):
        torch.testing.assert_close(getattr(aligned, name), getattr(expected, name), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_random_ops_stay_in_the_ball_and_match_sat_at_p1(backend, shape, layout):
    x, _, _ = _inputs(shape, torch.float32, torch.float32, layout)
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        start = ops.random_start(x, eps=eps, norm=norm, seed=3, backend=backend)
        assert start.stride() == x.stride()
        delta = (start - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert bool((size <= eps * (1 + 1e-5)).all()), norm
        assert torch.equal(start, ops.random_start(x, eps=eps, norm=norm, seed=3, backend=backend))
    boxes = torch.tensor([[0, 0, 2, 1]] * shape[0], device="cuda")  # inside the smallest image, 1×3
    exact = ops.sat_perturb(x, eps=0.05, p=1.0, seed=1, boxes=boxes, backend=backend)
    assert torch.equal(exact, reference.sat_perturb(x, 0.05, 1.0, 1, 0.0, 1.0, None, boxes, None))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_misaligned_base_pointer_falls_back_to_scalar_loads(backend):
    """A view starting one element into its storage is not 16-byte aligned: the kernels must take
    the scalar path and still match the reference."""
    storage = torch.rand(1 + 4 * 3 * 8 * 8, device="cuda")
    x_nat = storage[1:].view(4, 3, 8, 8)
    x = (x_nat + 0.01).clamp(0, 1)
    g = torch.randn_like(x_nat)
    assert x_nat.data_ptr() % 16 != 0
    for norm in NORMS:
        got = ops.pgd_step(x, g, x_nat, step_size=0.1, eps=0.3, norm=norm, backend=backend)
        want = ops.pgd_step(x, g, x_nat, step_size=0.1, eps=0.3, norm=norm, backend="torch")
        _close(got, want, torch.float32, norm)
    start = ops.random_start(x_nat, eps=0.1, seed=0, backend=backend)
    assert float((start - x_nat).abs().max()) <= 0.1 + 1e-6
