"""Triton kernels of the fused ops (the ``triton`` backend).

The four functions at the bottom implement :class:`fastsat.ops._backends.Backend`, with the
arguments already checked and laid out by :mod:`fastsat.ops.functional`: every tensor is contiguous or channels_last, so each sample is one
dense block of ``N`` elements starting at ``b * N`` and all same-shaped tensors share one element
order. Each op reads top to bottom: ``@triton.jit`` kernels → a launcher that flattens to
(B, N) rows and picks the block → a ``torch.library.triton_op`` (``fastsat::<op>_triton``)
whose kernels are launched through ``wrap_triton`` so ``torch.compile`` sees into them.

Grid and tiles: each program handles a tile of ``ROWS`` samples × ``BLOCK`` elements of one
chunk of the row; the tiles form a 1-D grid of ``cdiv(B, ROWS) * cdiv(N, BLOCK)`` programs, so
long rows (3×224×224 = 37 chunks of 4096) and small batches both fill the GPU, and the grid never
meets CUDA's 65535 limit on its other axes. ``BLOCK = min(4096, next_pow2(N))``; rows shorter
than that share a program (``ROWS = 4096 / BLOCK``, at most next_pow2(B)), so a tile holds ~4096
elements, run by ``ROWS·BLOCK / 512`` warps (1 to 8): 16 fp32 elements per thread, four 16-byte
loads per input. At 512×3×32×32: 512 programs of one 4096-block (3072 used); at 64×3×224×224:
64 × 37 = 2368 programs. Sample starts ``b * N`` are int64; the in-sample index is int32, so a
sample may hold up to 2**30 elements.

Arithmetic is float32 whatever the storage dtype (float16, bfloat16, float32) and the result is
rounded once, to nearest even, when stored. Every load is converted to float32, so the gradient
of a float16/bfloat16 x may itself be float32 (the kernels are specialised on each pointer's
dtype) and is then used unrounded. Per-sample reductions are deterministic two-stage
sums: every program writes its per-row partial sums to a (B, chunks, K) float32 buffer, and
``_finalize_kernel`` adds each sample's chunks in an order fixed by its tile shape, so results
repeat bit for bit from run to run (no atomics). The second stage is one extra launch
reading B·chunks·K floats (47 kB at 64×3×224×224, against 116 MB read by the main pass).

Passes over memory (reads of the inputs / writes of the output):

- ``pgd_step`` L∞: one pass (x, g, x_nat read once, result written once); with stats the
  same pass also writes per-chunk partials of ⟨x_nat, g⟩, ‖g‖², ‖x_nat‖² and max|δ|.
- ``pgd_step`` L2, a sample in one tile (N ≤ 4096, CIFAR-size): one pass — the tile is loaded
  once, reduced, stepped, projected and written by the same program, statistics included (one
  launch instead of reduce + finalise + apply).
- ``pgd_step`` L2, longer samples: two passes. Pass 1 reduces ‖g‖², ‖d‖², ⟨d, g⟩ (d = x − x_nat) and, for the
  statistics, ⟨x_nat, g⟩, ‖x_nat‖²; then ‖δ‖² = ‖d‖² + 2c⟨d, g⟩ + (c‖g‖)² with c = α/‖g‖
  (0 for g = 0) gives the projection factor min(1, ε/‖δ‖) without a third pass. Pass 2 writes
  the result and reduces ‖x_new − x_nat‖² of the stored values.
- ``alignment_stats``: one pass over x and g.
- ``random_start`` L∞: one pass. L2: two — pass 1 sums the squares of the Gaussian draws, pass 2
  regenerates the same draws (same counters) and writes x_nat + z·r/‖z‖ with r = ε·U^(1/N).
- ``sat_perturb``: one pass; box maps are evaluated from the element's (h, w).

Random numbers are Philox4x32-10 (``tl.philox``) keyed by the seed — read from a (1,) int64
tensor on the device (``reference.seed_tensor``), so no host sync and fresh numbers in every
CUDA-graph replay — with the counter (call, sample, stream) of csrc/common/math.h: call q of a
sample serves its elements 4q .. 4q+3 in logical (C, H, W) order, one output each, so every
output of a call is used and a channels_last batch gets the same numbers as its contiguous copy.
A contiguous tile draws one call per quad of elements and interleaves the four outputs; a
channels_last tile, whose memory neighbours are not logical neighbours, draws each element's call
and keeps its output. SAT takes the random sign from the top bit of the element's word and the
Bernoulli draw from its low 24 bits; the L2 start makes two Box–Muller pairs of each call and
takes sample b's radius from call 0 of its own stream.

float64 inputs (used for verification only) run the reference implementation: Triton passes
Python float arguments to kernels as float32, so a float64 kernel could not use ε and α exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import custom_op, triton_op, wrap_triton
from triton.runtime.interpreter import InterpretedFunction

from fastsat.ops import reference

__all__ = ["alignment_stats", "pgd_step", "random_start", "sat_perturb"]

# Largest block of one program; tests lower it to run long rows through many chunks.
MAX_BLOCK = 4096
# The in-sample index is int32 and may run one block past N.
_MAX_SAMPLE_NUMEL = 2**30

# Column order of the partial sums of the L2 reduction pass, and of the (B, 5) per-sample totals
# after finalisation (columns 1 and 2 square-rooted): the first three are already the first three
# columns of the step's statistics [⟨x_nat, g⟩, ‖g‖, ‖x_nat‖, ‖δ‖].
_L2_COLUMNS = 5

# Where ``sat_perturb`` takes S from.
_SOURCE_FULL, _SOURCE_PLANE, _SOURCE_BOXES, _SOURCE_MASKS = 0, 1, 2, 3


# --- shared kernel pieces ----------------------------------------------------------------------

@triton.jit
def _tile(batch, n, chunks, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """A program's tile: ``ROWS`` samples × ``BLOCK`` elements of one chunk. Returns the (ROWS,)
    sample ids and their mask, the (ROWS, 1) int64 sample starts ``b * n``, the (1, BLOCK) int32
    in-sample indices and the (ROWS, BLOCK) mask."""
    pid = tl.program_id(0)
    rows = (pid // chunks) * ROWS + tl.arange(0, ROWS)
    index = ((pid % chunks) * BLOCK + tl.arange(0, BLOCK))[None, :]
    row_ok = rows < batch
    return rows, row_ok, (rows.to(tl.int64) * n)[:, None], index, row_ok[:, None] & (index < n)


@triton.jit
def _partial_slots(rows, chunks, K: tl.constexpr):
    """Offsets of this program's (ROWS,) entries, column 0, in the (B, chunks, K) partials buffer."""
    return (rows.to(tl.int64) * chunks + tl.program_id(0) % chunks) * K


@triton.jit
def _plane_index(index, channels, hw, CHANNELS_LAST: tl.constexpr):
    """Position h·W + w in the H×W plane of an in-sample index of a (C, H, W) sample."""
    if CHANNELS_LAST:
        return index // channels
    else:
        return index % hw


@triton.jit
def _philox(seed, rows, calls, STREAM: tl.constexpr):
    """The four uint32 outputs of Philox4x32-10 calls ``calls`` (1 or ROWS, W) of the samples
    ``rows`` (ROWS,): key = the seed, counter = (call, sample low, sample high, stream), as in
    csrc/common/math.h."""
    sample = rows.to(tl.int64)[:, None] + (calls * 0).to(tl.int64)
    c0 = (calls + (sample * 0).to(calls.dtype)).to(tl.uint32)
    c1 = sample.to(tl.uint32)
    c2 = (sample >> 32).to(tl.uint32)
    c3 = tl.full(c0.shape, STREAM, tl.uint32)
    return tl.philox(seed, c0, c1, c2, c3)


@triton.jit
def _calls(seed, rows, chunks, index, channels, hw, STREAM: tl.constexpr, QUADS: tl.constexpr,
           CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """Call q of a sample serves its elements 4q .. 4q+3 in logical (C, H, W) order, one output
    each. ``QUADS`` (a contiguous tile, BLOCK ≥ 4): one call per quad of the tile, shape
    (ROWS, BLOCK // 4), all four outputs used. Otherwise (channels_last, whose memory neighbours
    are not logical neighbours): one call per element, shape (ROWS, BLOCK), and ``lane`` says
    which output is the element's. Returns (r0, r1, r2, r3, lane)."""
    if QUADS:
        q = ((tl.program_id(0) % chunks) * (BLOCK // 4) + tl.arange(0, BLOCK // 4))[None, :]
        lane = q
    else:
        if CHANNELS_LAST:
            plane = index // channels
            logical = (index - plane * channels) * hw + plane
        else:
            logical = index
        q = logical // 4
        lane = logical % 4
    r0, r1, r2, r3 = _philox(seed, rows, q, STREAM)
    return r0, r1, r2, r3, lane


@triton.jit
def _per_element(v0, v1, v2, v3, lane, QUADS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The (ROWS, BLOCK) values of the tile's elements from what :func:`_calls` drew: the quads'
    four values interleaved (QUADS), or each element's own output."""
    if QUADS:
        # join stacks along a new last axis: join(join(v0, v2), join(v1, v3))[..., k, m] is v(2k + m),
        # read row-major as v0, v1, v2, v3.
        return tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), (ROWS, BLOCK))
    else:
        return tl.where(lane == 0, v0, tl.where(lane == 1, v1, tl.where(lane == 2, v2, v3)))


@triton.jit
def _uniform_co(word):
    """The top 24 bits of a word as a float in [0, 1) (as uniform_co in csrc/common/math.h)."""
    return (word >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _box_muller(w0, w1):
    """Two standard Gaussians from two words: radius from u1 in (0, 1], angle 2π·u2."""
    u1 = ((w0 >> 8) + 1).to(tl.float32) * (1.0 / 16777216.0)
    radius = tl.sqrt(-2.0 * tl.log(u1))
    angle = 6.283185307179586 * _uniform_co(w1)
    return radius * tl.cos(angle), radius * tl.sin(angle)


@triton.jit
def _gaussians(seed, rows, chunks, index, channels, hw, QUADS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
               ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """(ROWS, BLOCK) standard Gaussians: two Box–Muller pairs per call."""
    r0, r1, r2, r3, lane = _calls(seed, rows, chunks, index, channels, hw, 1, QUADS, CHANNELS_LAST, BLOCK)
    z0, z1 = _box_muller(r0, r1)
    z2, z3 = _box_muller(r2, r3)
    return _per_element(z0, z1, z2, z3, lane, QUADS, ROWS, BLOCK)


@triton.jit
def _clip(v, lo, hi):
    # NaN propagates, as in torch.clamp.
    v = tl.maximum(v, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(v, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    """float32 → storage dtype, rounding to nearest even. For bfloat16 this is done on the bits:
    the same result as the GPU's conversion, and also under TRITON_INTERPRET=1, whose fp32 →
    bf16 cast truncates."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = bits + (((bits >> 16) & 1) + 0x7FFF).to(tl.uint32)
        rounded = tl.where(v != v, bits | 0x400000, rounded)  # noqa: PLR0124 (NaN test); NaN stays a quiet NaN
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _finalize_kernel(
    partials_ptr, out_ptr, batch, chunks, out_stride, out_col,
    K: tl.constexpr, SQRT_COLS: tl.constexpr, MAX_COLS: tl.constexpr, SAMPLES: tl.constexpr, CHUNKS: tl.constexpr,
):
    """Second stage of the reductions, a tile of ``SAMPLES`` samples × ``CHUNKS`` chunks per
    step: out[b, out_col + k] = sum (or max, for the bits of MAX_COLS) over chunks of
    partials[b, :, k], square-rooted for the bits of SQRT_COLS. The order of the additions is
    fixed by the tile shape, so the result is deterministic."""
    rows = tl.program_id(0) * SAMPLES + tl.arange(0, SAMPLES)
    row_ok = rows < batch
    first = rows.to(tl.int64) * chunks
    for k in tl.static_range(K):
        acc = tl.zeros((SAMPLES, CHUNKS), dtype=tl.float32)
        for start in range(0, chunks, CHUNKS):
            chunk = start + tl.arange(0, CHUNKS)
            ok = row_ok[:, None] & (chunk < chunks)[None, :]
            v = tl.load(partials_ptr + (first[:, None] + chunk[None, :]) * K + k, mask=ok, other=0.0)
            if (MAX_COLS >> k) & 1:
                acc = tl.maximum(acc, v)  # of |δ| ≥ 0, so the zeros of masked lanes are neutral
            else:
                acc += v
        if (MAX_COLS >> k) & 1:
            result = tl.max(acc, axis=1)
        else:
            result = tl.sum(acc, axis=1)
        if (SQRT_COLS >> k) & 1:
            result = tl.sqrt_rn(result)
        tl.store(out_ptr + rows.to(tl.int64) * out_stride + out_col + k, result, mask=row_ok)


# --- pgd_step ----------------------------------------------------------------------------------

@triton.jit
def _linf_step_kernel(
    x_ptr, g_ptr, nat_ptr, out_ptr, partials_ptr, batch, n, chunks, step, eps, lo, hi,
    WITH_STATS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows, row_ok, start, index, mask = _tile(batch, n, chunks, ROWS, BLOCK)
    offs = start + index
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nat = tl.load(nat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # sign(g) with sign(±0) = 0 and sign(NaN) = NaN, as torch.sign.
    sign = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, g * 0.0))
    # The reference's order of operations, so fp32 results are bitwise equal.
    stepped = x + step * sign
    projected = tl.minimum(tl.maximum(stepped, nat - eps, propagate_nan=tl.PropagateNan.ALL), nat + eps,
                           propagate_nan=tl.PropagateNan.ALL)
    new = _round_to(_clip(projected, lo, hi), out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, new, mask=mask)
    if WITH_STATS:
        slots = _partial_slots(rows, chunks, 4)
        tl.store(partials_ptr + slots + 0, tl.sum(nat * g, axis=1), mask=row_ok)
        tl.store(partials_ptr + slots + 1, tl.sum(g * g, axis=1), mask=row_ok)
        tl.store(partials_ptr + slots + 2, tl.sum(nat * nat, axis=1), mask=row_ok)
        delta = tl.where(mask, tl.abs(new.to(tl.float32) - nat), 0.0)
        tl.store(partials_ptr + slots + 3, tl.max(delta, axis=1), mask=row_ok)


@triton.jit
def _l2_reduce_kernel(x_ptr, g_ptr, nat_ptr, partials_ptr, batch, n, chunks, ROWS: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Pass 1 of the L2 step: partials [⟨x_nat, g⟩, ‖g‖², ‖x_nat‖², ‖d‖², ⟨d, g⟩], d = x − x_nat.
    The two statistics-only sums ride along: the pass is memory-bound, the FMAs are free."""
    rows, row_ok, start, index, mask = _tile(batch, n, chunks, ROWS, BLOCK)
    offs = start + index
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nat = tl.load(nat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = x - nat
    slots = _partial_slots(rows, chunks, 5)
    tl.store(partials_ptr + slots + 0, tl.sum(nat * g, axis=1), mask=row_ok)
    tl.store(partials_ptr + slots + 1, tl.sum(g * g, axis=1), mask=row_ok)
    tl.store(partials_ptr + slots + 2, tl.sum(nat * nat, axis=1), mask=row_ok)
    tl.store(partials_ptr + slots + 3, tl.sum(d * d, axis=1), mask=row_ok)
    tl.store(partials_ptr + slots + 4, tl.sum(d * g, axis=1), mask=row_ok)


@triton.jit
def _l2_step_kernel(
    x_ptr, g_ptr, nat_ptr, out_ptr, totals_ptr, partials_ptr, batch, n, chunks, step, eps, lo, hi,
    WITH_STATS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass 2 of the L2 step: x_nat + f·(x + c·g − x_nat), clipped, with c = α/‖g‖ and
    f = min(1, ε/‖δ‖) from the per-sample totals of pass 1."""
    rows, row_ok, start, index, mask = _tile(batch, n, chunks, ROWS, BLOCK)
    totals = totals_ptr + rows.to(tl.int64) * 5
    grad_norm = tl.load(totals + 1, mask=row_ok, other=0.0)
    dd = tl.load(totals + 3, mask=row_ok, other=0.0)
    dg = tl.load(totals + 4, mask=row_ok, other=0.0)
    c = tl.where(grad_norm > 0, tl.div_rn(tl.zeros_like(grad_norm) + step, tl.where(grad_norm > 0, grad_norm, 1.0)), 0.0)
    # ‖d + c·g‖² expanded; c·‖g‖ = α for g ≠ 0. Rounding can push it a hair below 0.
    step_len = c * grad_norm
    delta_norm = tl.sqrt_rn(tl.maximum(dd + 2.0 * c * dg + step_len * step_len, 0.0))
    safe_norm = tl.where(delta_norm > 0, delta_norm, 1.0)
    shrink = tl.where(delta_norm > eps, tl.div_rn(tl.zeros_like(safe_norm) + eps, safe_norm), 1.0)
    offs = start + index
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nat = tl.load(nat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    delta = (x + c[:, None] * g) - nat
    new = _round_to(_clip(nat + shrink[:, None] * delta, lo, hi), out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, new, mask=mask)
    if WITH_STATS:
        final = tl.where(mask, new.to(tl.float32) - nat, 0.0)
        tl.store(partials_ptr + _partial_slots(rows, chunks, 1), tl.sum(final * final, axis=1), mask=row_ok)


@triton.jit
def _l2_one_tile_kernel(
    x_ptr, g_ptr, nat_ptr, out_ptr, stats_ptr, batch, n, step, eps, lo, hi,
    WITH_STATS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """The whole L2 step of samples that fit in one tile (N ≤ BLOCK): x, g, x_nat loaded once,
    ‖g‖, δ = x + c·g − x_nat and ‖δ‖ computed from the registers, the projected result written,
    and with WITH_STATS the (B, 4) statistics [⟨x_nat, g⟩, ‖g‖, ‖x_nat‖, ‖x_new − x_nat‖]."""
    rows, row_ok, start, index, mask = _tile(batch, n, 1, ROWS, BLOCK)
    offs = start + index
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nat = tl.load(nat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    grad_norm = tl.sqrt_rn(tl.sum(g * g, axis=1))
    c = tl.where(grad_norm > 0, tl.div_rn(tl.zeros_like(grad_norm) + step, tl.where(grad_norm > 0, grad_norm, 1.0)), 0.0)
    delta = (x + c[:, None] * g) - nat  # 0 on masked lanes
    delta_norm = tl.sqrt_rn(tl.sum(delta * delta, axis=1))
    safe_norm = tl.where(delta_norm > 0, delta_norm, 1.0)
    shrink = tl.where(delta_norm > eps, tl.div_rn(tl.zeros_like(safe_norm) + eps, safe_norm), 1.0)
    new = _round_to(_clip(nat + shrink[:, None] * delta, lo, hi), out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, new, mask=mask)
    if WITH_STATS:
        final = tl.where(mask, new.to(tl.float32) - nat, 0.0)
        stats = stats_ptr + rows.to(tl.int64) * 4
        tl.store(stats + 0, tl.sum(nat * g, axis=1), mask=row_ok)
        tl.store(stats + 1, grad_norm, mask=row_ok)
        tl.store(stats + 2, tl.sqrt_rn(tl.sum(nat * nat, axis=1)), mask=row_ok)
        tl.store(stats + 3, tl.sqrt_rn(tl.sum(final * final, axis=1)), mask=row_ok)


# --- alignment_stats ---------------------------------------------------------------------------

@triton.jit
def _alignment_kernel(x_ptr, g_ptr, partials_ptr, batch, n, chunks, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows, row_ok, start, index, mask = _tile(batch, n, chunks, ROWS, BLOCK)
    offs = start + index
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    slots = _partial_slots(rows, chunks, 3)
    tl.store(partials_ptr + slots + 0, tl.sum(x * g, axis=1), mask=row_ok)
    tl.store(partials_ptr + slots + 1, tl.sum(g * g, axis=1), mask=row_ok)
    tl.store(partials_ptr + slots + 2, tl.sum(x * x, axis=1), mask=row_ok)


# --- random_start ------------------------------------------------------------------------------

@triton.jit
def _linf_start_kernel(
    nat_ptr, out_ptr, seed_ptr, batch, n, chunks, eps, lo, hi, channels, hw,
    QUADS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows, _, start, index, mask = _tile(batch, n, chunks, ROWS, BLOCK)
    r0, r1, r2, r3, lane = _calls(tl.load(seed_ptr), rows, chunks, index, channels, hw, 0, QUADS, CHANNELS_LAST, BLOCK)
    uniform = _per_element(_uniform_co(r0), _uniform_co(r1), _uniform_co(r2), _uniform_co(r3), lane, QUADS, ROWS,
                           BLOCK)
    offs = start + index
    nat = tl.load(nat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    new = _clip(nat + (2.0 * uniform - 1.0) * eps, lo, hi)
    tl.store(out_ptr + offs, _round_to(new, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gaussian_norm_kernel(
    partials_ptr, seed_ptr, batch, n, chunks, channels, hw,
    QUADS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass 1 of the L2 random start: partial sums of z² of the samples' Gaussian draws."""
    rows, row_ok, _, index, mask = _tile(batch, n, chunks, ROWS, BLOCK)
    z = _gaussians(tl.load(seed_ptr), rows, chunks, index, channels, hw, QUADS, CHANNELS_LAST, ROWS, BLOCK)
    z = tl.where(mask, z, 0.0)
    tl.store(partials_ptr + _partial_slots(rows, chunks, 1), tl.sum(z * z, axis=1), mask=row_ok)


@triton.jit
def _l2_start_kernel(
    nat_ptr, out_ptr, norms_ptr, seed_ptr, batch, n, chunks, eps, inv_dim, lo, hi, channels, hw,
    QUADS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pass 2 of the L2 random start: the same draws z, scaled to the radius ε·U^(1/N), U from
    call 0 of the sample's radius stream."""
    rows, row_ok, start, index, mask = _tile(batch, n, chunks, ROWS, BLOCK)
    seed = tl.load(seed_ptr)
    radius_bits, _, _, _ = _philox(seed, rows, tl.zeros((1, 1), dtype=tl.int32), 2)
    u = ((radius_bits >> 8) + 1).to(tl.float32) * (1.0 / 16777216.0)
    radius = eps * tl.exp(tl.log(u) * inv_dim)
    norm = tl.load(norms_ptr + rows, mask=row_ok, other=1.0)[:, None]
    z = _gaussians(seed, rows, chunks, index, channels, hw, QUADS, CHANNELS_LAST, ROWS, BLOCK)
    offs = start + index
    nat = tl.load(nat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    new = _clip(nat + z * (radius / norm), lo, hi)
    tl.store(out_ptr + offs, _round_to(new, out_ptr.dtype.element_ty), mask=mask)


# --- sat_perturb -------------------------------------------------------------------------------

@triton.jit
def _sat_kernel(
    x_ptr, source_ptr, out_ptr, seed_ptr, batch, n, chunks, eps, p, lo, hi, channels, height, width,
    SOURCE: tl.constexpr, QUADS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """clip(x − ε·s), s = S where a Bernoulli(p) draw hits, a random sign elsewhere. S comes from
    ``source_ptr``: a map shaped like x (SOURCE 0), a (B, 1, H, W) map (1), (B, 4) int64 boxes
    x0, y0, x1, y1 (2) or (B, 1, H, W) uint8 masks (3). One word per element: the sign from its
    top bit, the Bernoulli draw from its low 24 bits (as sat_value in csrc/common/math.h)."""
    rows, row_ok, start, index, mask = _tile(batch, n, chunks, ROWS, BLOCK)
    offs = start + index
    hw = height * width
    if SOURCE == 0:
        target = tl.load(source_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    elif SOURCE == 1:
        plane = rows.to(tl.int64)[:, None] * hw + _plane_index(index, channels, hw, CHANNELS_LAST)
        target = tl.load(source_ptr + plane, mask=mask, other=0.0).to(tl.float32)
    elif SOURCE == 2:
        plane = _plane_index(index, channels, hw, CHANNELS_LAST)
        row = plane // width
        col = plane - row * width
        box = source_ptr + rows.to(tl.int64) * 4
        x0 = tl.load(box + 0, mask=row_ok, other=0)[:, None]
        y0 = tl.load(box + 1, mask=row_ok, other=0)[:, None]
        x1 = tl.load(box + 2, mask=row_ok, other=0)[:, None]
        y1 = tl.load(box + 3, mask=row_ok, other=0)[:, None]
        target = tl.where((col >= x0) & (col < x1) & (row >= y0) & (row < y1), 1.0, -1.0)
    else:
        plane = rows.to(tl.int64)[:, None] * hw + _plane_index(index, channels, hw, CHANNELS_LAST)
        target = tl.where(tl.load(source_ptr + plane, mask=mask, other=0) != 0, 1.0, -1.0)
    r0, r1, r2, r3, lane = _calls(tl.load(seed_ptr), rows, chunks, index, channels, hw, 3, QUADS, CHANNELS_LAST,
                                  BLOCK)
    word = _per_element(r0, r1, r2, r3, lane, QUADS, ROWS, BLOCK)
    noise = tl.where((word >> 31) != 0, 1.0, -1.0)
    s = tl.where((word & 0xFFFFFF).to(tl.float32) * (1.0 / 16777216.0) < p, target, noise)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    new = _clip(x - eps * s, lo, hi)
    tl.store(out_ptr + offs, _round_to(new, out_ptr.dtype.element_ty), mask=mask)


# --- launchers ---------------------------------------------------------------------------------

# Under TRITON_INTERPRET=1, wrap_triton hands back the interpreted kernel, which cannot run on
# the fake tensors torch.compile and opcheck trace with. There the ops are registered as opaque
# custom ops whose fake implementation is the same function with the launches skipped; on a GPU
# they are triton_ops whose kernels torch.compile traces.
_INTERPRETED = isinstance(_finalize_kernel, InterpretedFunction)


def _register(name: str, mutates_args):
    def register(fn):
        if _INTERPRETED:
            op = custom_op(name, fn, mutates_args=mutates_args)
            op.register_fake(fn)
            return op
        return triton_op(name, fn, mutates_args=mutates_args)

    return register


def _launch(kernel, grid: tuple[int], *args, **meta) -> None:
    if _INTERPRETED and any(is_fake(a) for a in args if isinstance(a, Tensor)):
        return  # tracing with fake tensors: only the outputs' metadata matters
    wrap_triton(kernel)[grid](*args, **meta)


class _Tiles(NamedTuple):
    """How a (B, N) batch of rows is cut into program tiles of ``rows`` samples × ``block``
    elements: one tile per (group of samples, chunk of the row)."""

    batch: int
    numel: int
    rows: int
    block: int
    chunks: int

    @property
    def grid(self) -> tuple[int]:
        return (triton.cdiv(self.batch, self.rows) * self.chunks,)

    @property
    def meta(self) -> dict[str, int]:
        """Compile-time tile shape and launch width: 16 fp32 elements per thread at full size."""
        return {"ROWS": self.rows, "BLOCK": self.block, "num_warps": max(1, min(8, self.rows * self.block // 512))}


def _tiles(x: Tensor) -> _Tiles:
    batch = x.shape[0]
    numel = x.numel() // batch
    if numel > _MAX_SAMPLE_NUMEL:
        raise ValueError(f"x has {numel} elements per sample; the triton backend takes at most {_MAX_SAMPLE_NUMEL}")
    block = min(MAX_BLOCK, triton.next_power_of_2(numel))
    # Short rows share a program, so a tile stays near MAX_BLOCK elements.
    rows = min(triton.next_power_of_2(batch), max(1, MAX_BLOCK // block))
    return _Tiles(batch, numel, rows, block, triton.cdiv(numel, block))


def _partials(tiles: _Tiles, columns: int, like: Tensor) -> Tensor:
    return torch.empty(tiles.batch, tiles.chunks, columns, dtype=torch.float32, device=like.device)


def _finalize(partials: Tensor, out: Tensor, out_col: int = 0, sqrt_cols: tuple[int, ...] = (),
              max_cols: tuple[int, ...] = ()) -> None:
    """out[:, out_col:out_col + K] = per-sample reduction of (B, chunks, K) partials."""
    batch, chunks, columns = partials.shape
    chunk_tile = min(64, max(2, triton.next_power_of_2(chunks)))
    samples = min(triton.next_power_of_2(batch), max(1, 256 // chunk_tile))
    _launch(
        _finalize_kernel, (triton.cdiv(batch, samples),), partials, out, batch, chunks, out.stride(0), out_col,
        K=columns, SQRT_COLS=sum(1 << c for c in sqrt_cols), MAX_COLS=sum(1 << c for c in max_cols),
        SAMPLES=samples, CHUNKS=chunk_tile, num_warps=max(1, samples * chunk_tile // 256),
    )


def _quads(tiles: _Tiles, channels_last: bool) -> bool:
    """Whether a tile's random numbers are drawn one Philox call per four elements (a contiguous
    tile of at least 4 columns) rather than one call per element (see ``_calls``)."""
    return not channels_last and tiles.block >= 4


def _image_layout(x: Tensor) -> tuple[int, int, int, bool]:
    """(C, H, W, channels_last) of an image batch; (1, 1, N, False) for other shapes."""
    if x.dim() != 4:
        return 1, 1, x[0].numel(), False
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return x.shape[1], x.shape[2], x.shape[3], channels_last


@_register("fastsat::pgd_step_triton", mutates_args={"out"})
def _pgd_step_op(
    x: Tensor, grad: Tensor, x_nat: Tensor, out: Tensor, step_size: float, eps: float, l2: bool,
    lo: float, hi: float, with_stats: bool,
) -> Tensor:
    tiles = _tiles(x)
    rows = (tiles.batch, tiles.numel, tiles.chunks)
    no_stats = torch.empty(0, dtype=torch.float32, device=x.device)
    if l2 and tiles.chunks == 1:
        stats = torch.empty(tiles.batch, 4, dtype=torch.float32, device=x.device) if with_stats else no_stats
        _launch(_l2_one_tile_kernel, tiles.grid, x, grad, x_nat, out, stats, tiles.batch, tiles.numel, step_size, eps,
                lo, hi, WITH_STATS=with_stats, **tiles.meta)
        return stats
    # Without statistics the kernels store no partials; a one-element buffer stands in.
    stats_partials = _partials(tiles, 1 if l2 else 4, x) if with_stats else torch.empty(1, device=x.device)
    if not l2:
        _launch(_linf_step_kernel, tiles.grid, x, grad, x_nat, out, stats_partials, *rows, step_size, eps, lo, hi,
                WITH_STATS=with_stats, **tiles.meta)
        if not with_stats:
            return no_stats
        stats = torch.empty(tiles.batch, 4, dtype=torch.float32, device=x.device)
        _finalize(stats_partials, stats, sqrt_cols=(1, 2), max_cols=(3,))
        return stats
    sums = _partials(tiles, _L2_COLUMNS, x)
    _launch(_l2_reduce_kernel, tiles.grid, x, grad, x_nat, sums, *rows, **tiles.meta)
    totals = torch.empty(tiles.batch, _L2_COLUMNS, dtype=torch.float32, device=x.device)
    _finalize(sums, totals, sqrt_cols=(1, 2))
    _launch(_l2_step_kernel, tiles.grid, x, grad, x_nat, out, totals, stats_partials, *rows, step_size, eps, lo, hi,
            WITH_STATS=with_stats, **tiles.meta)
    if not with_stats:
        return no_stats
    # ‖δ‖ of the stored result replaces ‖d‖² (consumed by pass 2) in column 3.
    _finalize(stats_partials, totals, out_col=3, sqrt_cols=(0,))
    return totals[:, :4]


@_register("fastsat::random_start_triton", mutates_args=())
def _random_start_op(x_nat: Tensor, eps: float, l2: bool, lo: float, hi: float, seed: Tensor) -> Tensor:
    tiles = _tiles(x_nat)
    rows = (tiles.batch, tiles.numel, tiles.chunks)
    channels, height, width, channels_last = _image_layout(x_nat)
    out = torch.empty_like(x_nat)
    layout = {"QUADS": _quads(tiles, channels_last), "CHANNELS_LAST": channels_last, **tiles.meta}
    if not l2:
        _launch(_linf_start_kernel, tiles.grid, x_nat, out, seed, *rows, eps, lo, hi, channels, height * width, **layout)
        return out
    squares = _partials(tiles, 1, x_nat)
    _launch(_gaussian_norm_kernel, tiles.grid, squares, seed, *rows, channels, height * width, **layout)
    norms = torch.empty(tiles.batch, 1, dtype=torch.float32, device=x_nat.device)
    _finalize(squares, norms, sqrt_cols=(0,))
    _launch(_l2_start_kernel, tiles.grid, x_nat, out, norms, seed, *rows, eps, 1.0 / tiles.numel, lo, hi, channels,
            height * width, **layout)
    return out


@_register("fastsat::alignment_stats_triton", mutates_args=())
def _alignment_stats_op(x: Tensor, g: Tensor) -> Tensor:
    tiles = _tiles(x)
    partials = _partials(tiles, 3, x)
    _launch(_alignment_kernel, tiles.grid, x, g, partials, tiles.batch, tiles.numel, tiles.chunks, **tiles.meta)
    stats = torch.empty(tiles.batch, 3, dtype=torch.float32, device=x.device)
    _finalize(partials, stats, sqrt_cols=(1, 2))
    return stats


@_register("fastsat::sat_perturb_triton", mutates_args=())
def _sat_perturb_op(
    x: Tensor, eps: float, p: float, seed: Tensor, lo: float, hi: float,
    saliency: Tensor | None, boxes: Tensor | None, masks: Tensor | None,
) -> Tensor:
    tiles = _tiles(x)
    channels, height, width, channels_last = _image_layout(x)
    if saliency is not None:
        source, kind = saliency, _SOURCE_FULL if saliency.shape == x.shape else _SOURCE_PLANE
    elif boxes is not None:
        source, kind = boxes, _SOURCE_BOXES
    else:
        source, kind = masks, _SOURCE_MASKS
    out = torch.empty_like(x)
    _launch(_sat_kernel, tiles.grid, x, source, out, seed, tiles.batch, tiles.numel, tiles.chunks, eps, p, lo, hi,
            channels, height, width, SOURCE=kind, QUADS=_quads(tiles, channels_last), CHANNELS_LAST=channels_last,
            **tiles.meta)
    return out


# --- the Backend interface (fastsat.ops._backends) ---------------------------------------------

def pgd_step(
    x: Tensor, grad: Tensor, x_nat: Tensor, out: Tensor, step_size: float, eps: float, l2: bool,
    lo: float, hi: float, with_stats: bool,
) -> Tensor:
    impl = reference.pgd_step if x.dtype == torch.float64 else _pgd_step_op
    return impl(x, grad, x_nat, out, step_size, eps, l2, lo, hi, with_stats)


def random_start(x_nat: Tensor, eps: float, l2: bool, lo: float, hi: float, seed: int | None) -> Tensor:
    if x_nat.dtype == torch.float64:
        return reference.random_start(x_nat, eps, l2, lo, hi, seed)
    return _random_start_op(x_nat, eps, l2, lo, hi, reference.seed_tensor(seed, x_nat.device))


def alignment_stats(x: Tensor, g: Tensor) -> Tensor:
    impl = reference.alignment_stats if x.dtype == torch.float64 else _alignment_stats_op
    return impl(x, g)


def sat_perturb(
    x: Tensor, eps: float, p: float, seed: int | None, lo: float, hi: float,
    saliency: Tensor | None, boxes: Tensor | None, masks: Tensor | None,
) -> Tensor:
    if x.dtype == torch.float64:
        return reference.sat_perturb(x, eps, p, seed, lo, hi, saliency, boxes, masks)
    return _sat_perturb_op(x, eps, p, reference.seed_tensor(seed, x.device), lo, hi, saliency, boxes, masks)
