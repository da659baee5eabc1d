"""Public fused ops: argument checks, layout normalisation and backend dispatch.

All tensors are batches ``(B, ...)``; per-sample quantities reduce over every element of a
sample. Values are in pixel space — the space the model receives — with the valid box ``clip``
(default ``(0.0, 1.0)``). Checks run before any kernel and raise ``ValueError``/``TypeError``
naming the argument. The two that read tensor values on the host — x_nat finite, boxes inside the
image — are skipped inside ``fastsat._checks.no_host_checks()``, under torch.compile and during
CUDA-graph capture; shape, dtype and device checks always run.

Memory layout: contiguous and channels_last inputs are used as they are (each sample is one
dense block either way); any other strided input is copied to contiguous memory first. Outputs
take the layout of ``x``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from fastsat import _checks
from fastsat._checks import choice, clip_box, describe, number
from fastsat.ops import _backends
from fastsat.ops.reference import accumulation_dtype

__all__ = [
    "NORMS",
    "AlignmentStats",
    "StepStats",
    "alignment_stats",
    "differentiable_alignment",
    "pgd_step",
    "random_start",
    "sat_perturb",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: The norms of the fused ops and of every attack: L∞ and L2 (per sample, over all of its elements).
NORMS = ("linf", "l2")


@dataclass(frozen=True)
class AlignmentStats:
    """Per-sample statistics of an input ``x`` and its gradient ``g``, each of shape (B,).

    ``dot`` = ⟨x, g⟩, ``grad_norm`` = ‖g‖₂, ``x_norm`` = ‖x‖₂, in float32 (float64 for float64
    inputs), computed in the input space the op was given (pixel space for fastsat's models).
    """

    dot: Tensor
    grad_norm: Tensor
    x_norm: Tensor

    @property
    def alignment(self) -> Tensor:
        """Etmann's alignment |⟨x, g⟩| / ‖g‖ (pixel units); 0 where g = 0."""
        return _safe_divide(self.dot.abs(), self.grad_norm)

    @property
    def cosine(self) -> Tensor:
        """|⟨x, g⟩| / (‖x‖·‖g‖) in [0, 1]; 0 where x = 0 or g = 0."""
        return _safe_divide(self.dot.abs(), self.x_norm * self.grad_norm)


@dataclass(frozen=True)
class StepStats(AlignmentStats):
    """Statistics a fused PGD step returns: the :class:`AlignmentStats` of the clean input
    ``x_nat`` and the gradient ``g`` that was passed in (``x_norm`` is ‖x_nat‖₂), plus
    ``delta_norm`` = ‖x_new − x_nat‖ in the step's norm (∞ or 2), of the stored result."""

    delta_norm: Tensor


def _safe_divide(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


# --- argument checks ---------------------------------------------------------------------------
# Numbers, choices, seeds and the clip box go through fastsat._checks; the tensor checks below are
# specific to the ops and use the same message style, "<name>: expected <what>, got <what>".

def _check_tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {describe(t)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16, bfloat16, float32 or float64 tensor, got {t.dtype}")
    if t.dim() < 1 or t.shape[0] < 1 or t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty batch (B, ...), got shape {tuple(t.shape)}")
    return t


def _check_like(t: object, name: str, x: Tensor, *, gradient: bool = False) -> Tensor:
    """``t`` has the shape, dtype and device of ``x``; a ``gradient`` may also be in x's
    accumulation dtype, since rounding it to float16 would flush small entries (and their sign) to 0."""
    _check_tensor(t, name)
    if t.shape != x.shape:
        raise ValueError(f"{name}: expected the shape of x {tuple(x.shape)}, got {tuple(t.shape)}")
    dtypes = _grad_dtypes(x.dtype) if gradient else (x.dtype,)
    if t.dtype not in dtypes:
        expected = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {expected} (x is {x.dtype}), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected a tensor on the device of x ({x.device}), got one on {t.device}")
    return t


def _grad_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes a gradient of an input of ``dtype`` may have: that dtype or its accumulation dtype."""
    return tuple(dict.fromkeys((dtype, accumulation_dtype(dtype))))


def _host_checks(t: Tensor) -> bool:
    """Whether to run the checks that read tensor values on the host: not inside
    ``fastsat._checks.no_host_checks()`` or while torch.compile traces (``host_checks_enabled``),
    and not while a CUDA graph is being captured (a sync would break the capture)."""
    if not _checks.host_checks_enabled():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


# The finiteness check costs a host sync, and an attack passes the same x_nat to every step: the
# last tensor found finite is remembered with its version counter (which in-place ops, also on a
# view, bump; writes through ``.data`` or numpy do not). Inference tensors have none: always checked.
_last_finite: tuple[weakref.ref, int] | None = None


def _check_finite(t: Tensor, name: str) -> None:
    global _last_finite
    if not _host_checks(t):
        return
    cacheable = not t.is_inference()
    if cacheable and _last_finite is not None and _last_finite[0]() is t and _last_finite[1] == t._version:
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values everywhere, got NaN or inf")
    _last_finite = (weakref.ref(t), t._version) if cacheable else None


def _check_out(out: object, x: Tensor, inputs: dict[str, Tensor]) -> Tensor:
    """``out`` has the shape, dtype, device and strides of ``x`` and is either one of the inputs
    exactly (an in-place update: every kernel reads an element before writing it) or shares no
    memory with any of them (a shifted view would let one sample's write corrupt another's read)."""
    _check_like(out, "out", x)
    if out.stride() != x.stride():
        raise ValueError(f"out: expected the memory layout of x (strides {x.stride()}), got strides {out.stride()}")
    if torch.compiler.is_compiling():
        return out  # fake tensors have no addresses: a compiled graph skips this check
    out_begin = out.data_ptr()
    out_end = out_begin + out.numel() * out.element_size()
    for name, t in inputs.items():
        if t.data_ptr() == out_begin or t.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
            continue
        t_begin = t.data_ptr()
        if t_begin < out_end and out_begin < t_begin + t.numel() * t.element_size():
            raise ValueError(f"out: expected {name} itself or memory disjoint from {name}, got a partial overlap")
    return out


def _check_boxes_inside(boxes: Tensor, height: int, width: int) -> None:
    x0, y0, x1, y1 = boxes.unbind(1)
    out_of_range = (x0 < 0) | (y0 < 0) | (x1 > width) | (y1 > height) | (x1 < x0) | (y1 < y0)
    if bool(out_of_range.any()):
        first = int(out_of_range.nonzero()[0, 0])
        raise ValueError(f"boxes: expected 0 <= x0 <= x1 <= W={width} and 0 <= y0 <= y1 <= H={height}, "
                         f"got {boxes[first].tolist()} for sample {first}")


def _check_image_batch(x: Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected an x of shape (B, C, H, W) to index, got x of shape {tuple(x.shape)}")


# --- layout ------------------------------------------------------------------------------------

def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dense(t: Tensor, fmt: torch.memory_format) -> Tensor:
    return t.contiguous(memory_format=fmt)


# --- ops ---------------------------------------------------------------------------------------

def pgd_step(
    x: Tensor,
    grad: Tensor,
    x_nat: Tensor,
    *,
    step_size: float,
    eps: float,
    norm: str = "linf",
    clip: tuple[float, float] = (0.0, 1.0),
    return_stats: bool = False,
    out: Tensor | None = None,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, StepStats]:
    """One projected gradient step (METHODS.md §4), fused into one pass (L∞) or one or two (L2).

    Args:
        x: (B, ...) current iterate, pixel space.
        grad: (B, ...) loss gradient at ``x`` (ascent direction), in the dtype of ``x`` or, for
            float16/bfloat16 ``x``, in float32 (the usual dtype of an input gradient): the step
            reads it without rounding, so entries too small for float16 keep their sign.
        x_nat: (B, ...) clean input; the projection is around it, never around ``x``.
        step_size: step α in pixel units (L∞: per element; L2: per sample).
        eps: radius ε of the ball around ``x_nat`` in pixel units.
        norm: ``"linf"``: x + α·sign(g), projected onto the L∞ ball, clipped.
            ``"l2"``: x + α·g/‖g‖ (a zero gradient takes no step), δ = x − x_nat rescaled by
            min(1, ε/‖δ‖), clipped.
        clip: valid input box (lo, hi), default (0, 1).
        return_stats: also return :class:`StepStats` (⟨x_nat, g⟩, ‖g‖, ‖x_nat‖, ‖δ‖), computed in
            the same pass at no extra memory traffic.
        out: tensor to write the result into (may be ``x`` for an in-place update); it must have
            the shape, dtype, device and memory layout of ``x``.
        backend: ``"auto" | "triton" | "cuda" | "cpp" | "torch"``; default ``$FASTSAT_BACKEND``
            or ``"auto"``.

    Passes over memory: one for L∞; for L2 one per sample that fits a GPU tile (Triton ≤ 4096,
    CUDA ≤ 8192 elements), else two (see :mod:`fastsat.ops._triton`).

    Returns:
        ``x_new`` (B, ...) in the dtype and layout of ``x``, or ``(x_new, stats)``.
    """
    _check_tensor(x, "x")
    _check_like(grad, "grad", x, gradient=True)
    _check_like(x_nat, "x_nat", x)
    step_size = number(step_size, "step_size", minimum=0)
    eps = number(eps, "eps", minimum=0)
    l2 = choice(norm, "norm", NORMS) == "l2"
    lo, hi = clip_box(clip)
    _check_finite(x_nat, "x_nat")
    fmt = _memory_format(x)
    x, grad, x_nat = _dense(x, fmt), _dense(grad, fmt), _dense(x_nat, fmt)
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_out(out, x, {"x": x, "grad": grad, "x_nat": x_nat})
    impl = _backends.resolve(backend, x.device, "pgd_step")
    stats = impl.pgd_step(x, grad, x_nat, out, step_size, eps, l2, lo, hi, return_stats)
    if not return_stats:
        return out
    return out, StepStats(dot=stats[:, 0], grad_norm=stats[:, 1], x_norm=stats[:, 2], delta_norm=stats[:, 3])


def random_start(
    x_nat: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    clip: tuple[float, float] = (0.0, 1.0),
    seed: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """A random point of the ε-ball around ``x_nat``, clipped to ``clip``.

    L∞: δ uniform in [−ε, ε] per element. L2: δ uniform in the L2 ball of the sample's dimension
    (uniform direction, radius ε·U^(1/d)). Numbers come from a counter-based generator (Philox
    in the kernels): the same ``seed`` gives the same output on the same backend and device;
    backends do not share streams. ``seed=None`` draws fresh numbers from torch's generator of
    ``x_nat``'s device without a host sync (reproducible under ``torch.manual_seed``; fresh on every
    replay of a captured CUDA graph).

    Args:
        x_nat: (B, ...) clean input, pixel space.
        eps: radius in pixel units. norm: ``"linf"`` or ``"l2"``. clip: valid box (lo, hi).

    Returns:
        (B, ...) tensor with the dtype and layout of ``x_nat``.
    """
    _check_tensor(x_nat, "x_nat")
    eps = number(eps, "eps", minimum=0)
    l2 = choice(norm, "norm", NORMS) == "l2"
    lo, hi = clip_box(clip)
    seed = _checks.seed(seed, allow_none=True)  # None: drawn on the device (reference.seed_tensor)
    _check_finite(x_nat, "x_nat")
    x_nat = _dense(x_nat, _memory_format(x_nat))
    return _backends.resolve(backend, x_nat.device, "random_start").random_start(x_nat, eps, l2, lo, hi, seed)


def alignment_stats(x: Tensor, g: Tensor, *, backend: str | None = None) -> AlignmentStats:
    """Per-sample ⟨x, g⟩, ‖g‖₂ and ‖x‖₂ in one pass over ``x`` and ``g``.

    Args:
        x: (B, ...) input in the space the alignment is to be measured in (pixel space for
            fastsat's models, which normalise internally). g: (B, ...) its gradient, in the dtype
            of ``x`` or, for float16/bfloat16 ``x``, in float32.

    Returns:
        :class:`AlignmentStats` whose ``.alignment`` and ``.cosine`` give Etmann's α and its
        normalised form (zero gradient → 0, not NaN).
    """
    _check_tensor(x, "x")
    _check_like(g, "g", x, gradient=True)
    fmt = _memory_format(x)
    x, g = _dense(x, fmt), _dense(g, fmt)
    stats = _backends.resolve(backend, x.device, "alignment_stats").alignment_stats(x, g)
    return AlignmentStats(dot=stats[:, 0], grad_norm=stats[:, 1], x_norm=stats[:, 2])


class _Alignment(torch.autograd.Function):
    """Per-sample |⟨x, g⟩|/‖g‖ (or the cosine) with an analytic backward.

    The backward is written in differentiable torch ops of the saved inputs, so a loss using it
    can be differentiated twice (double backprop through a saliency map g = ∇ₓL)."""

    @staticmethod
    def forward(ctx, x: Tensor, g: Tensor, normalize: bool, backend: str | None) -> Tensor:
        stats = alignment_stats(x.detach(), g.detach(), backend=backend)
        ctx.save_for_backward(x, g)
        ctx.normalize = normalize
        return (stats.cosine if normalize else stats.alignment).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, g = ctx.saved_tensors
        return (*_alignment_backward(x, g, grad_out, ctx.normalize), None, None)


def _alignment_backward(x: Tensor, g: Tensor, grad_out: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    # Per-sample sums in the accumulation dtype, as in the forward: in float16 ‖x‖² of an image
    # overflows (3×224×224 pixels near 1 sum past 65504) and the gradient would silently be 0.
    acc = accumulation_dtype(x.dtype)
    x_dtype, g_dtype = x.dtype, g.dtype
    x, g, grad_out = x.to(acc), g.to(acc), grad_out.to(acc)
    flat_x, flat_g = x.reshape(x.shape[0], -1), g.reshape(g.shape[0], -1)
    dot = (flat_x * flat_g).sum(1)
    g_sq = (flat_g * flat_g).sum(1)
    sign = torch.sign(dot)
    g_ok = g_sq > 0
    inv_g = torch.where(g_ok, torch.where(g_ok, g_sq, 1.0).rsqrt(), 0.0)
    if normalize:
        x_sq = (flat_x * flat_x).sum(1)
        x_ok = x_sq > 0
        inv_x = torch.where(x_ok, torch.where(x_ok, x_sq, 1.0).rsqrt(), 0.0)
        cos = dot.abs() * inv_x * inv_g
        # d cos/dx = sign·g/(‖x‖‖g‖) − cos·x/‖x‖²; symmetric in g.
        coef_x_g, coef_x_x = sign * inv_x * inv_g, -cos * inv_x * inv_x
        coef_g_x, coef_g_g = coef_x_g, -cos * inv_g * inv_g
    else:
        # dα/dx = sign·g/‖g‖; dα/dg = sign·x/‖g‖ − |⟨x,g⟩|·g/‖g‖³.
        coef_x_g, coef_x_x = sign * inv_g, torch.zeros_like(dot)
        coef_g_x, coef_g_g = sign * inv_g, -dot.abs() * inv_g ** 3
    w = grad_out.reshape(-1, *([1] * (x.dim() - 1)))
    shape = (-1,) + (1,) * (x.dim() - 1)
    grad_x = w * (coef_x_g.reshape(shape) * g + coef_x_x.reshape(shape) * x)
    grad_g = w * (coef_g_x.reshape(shape) * x + coef_g_g.reshape(shape) * g)
    return grad_x.to(x_dtype), grad_g.to(g_dtype)


def differentiable_alignment(x: Tensor, g: Tensor, normalize: bool = False, *, backend: str | None = None) -> Tensor:
    """Differentiable per-sample alignment |⟨x, g⟩|/‖g‖ (pixel units), or with
    ``normalize=True`` the cosine |⟨x, g⟩|/(‖x‖‖g‖). Shape (B,), dtype of ``x``; 0 where a norm
    is 0. ``g`` has the dtype of ``x`` or, for float16/bfloat16 ``x``, float32. Gradients flow to
    both ``x`` and ``g``, each in its own dtype (analytic backward, twice differentiable)."""
    _check_tensor(x, "x")
    _check_like(g, "g", x, gradient=True)
    return _Alignment.apply(x, g, bool(normalize), backend)


def sat_perturb(
    x: Tensor,
    *,
    eps: float,
    p: float,
    seed: int | None = None,
    saliency: Tensor | None = None,
    boxes: Tensor | None = None,
    masks: Tensor | None = None,
    clip: tuple[float, float] = (0.0, 1.0),
    backend: str | None = None,
) -> Tensor:
    """The SAT training input (Mangla et al. 2020, METHODS.md §2): x' = clip(x − ε·s).

    Per element, n is a uniform random sign and w ~ Bernoulli(p); s = (1 − w)·n + w·S, where the
    saliency map S comes from exactly one of:

    - ``saliency``: dense map, shape of ``x`` or (B, 1, H, W) broadcast over channels (a teacher's
      map, typically in [−1, 1] or [0, 1]);
    - ``boxes``: (B, 4) integer pixel coordinates ``x0, y0, x1, y1``, half-open (columns
      x0 ≤ c < x1, rows y0 ≤ r < y1); S = +1 inside, −1 outside, on every channel — evaluated
      in the kernel without materialising S;
    - ``masks``: (B, 1, H, W) bool/uint8; S = +1 on the object, −1 on the background.

    Args:
        x: (B, C, H, W) clean batch in pixel space (any (B, ...) shape with a full-shape
            ``saliency``). eps: ε in pixel units (the paper uses 8/255).
        p: probability of taking S instead of noise — the curriculum p_e = 1 − 0.6^(e/10).
        seed: counter-based RNG seed; same seed → same output on the same backend; None draws
            fresh numbers from torch's generator of x's device, without a host sync.
        clip: valid box (lo, hi).

    Returns:
        (B, ...) perturbed batch with the dtype and layout of ``x``.
    """
    _check_tensor(x, "x")
    eps = number(eps, "eps", minimum=0)
    p = number(p, "p", minimum=0, maximum=1)
    lo, hi = clip_box(clip)
    given = [name for name, v in (("saliency", saliency), ("boxes", boxes), ("masks", masks)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"saliency, boxes, masks: expected exactly one of them, got {', '.join(given) or 'none'}")
    fmt = _memory_format(x)
    x = _dense(x, fmt)
    batch = x.shape[0]
    if saliency is not None:
        if not isinstance(saliency, Tensor) or not saliency.is_floating_point():
            raise TypeError(f"saliency: expected a floating-point tensor, got {describe(saliency)}")
        if saliency.device != x.device:
            raise ValueError(f"saliency: expected a tensor on the device of x ({x.device}), got one on {saliency.device}")
        if saliency.shape == x.shape:
            saliency = _dense(saliency.to(x.dtype), fmt)
        elif x.dim() == 4 and saliency.shape == (batch, 1, *x.shape[2:]):
            saliency = saliency.to(x.dtype).contiguous()
        else:
            raise ValueError(
                f"saliency: expected the shape of x {tuple(x.shape)} or (B, 1, H, W), got {tuple(saliency.shape)}"
            )
    if boxes is not None:
        _check_image_batch(x, "boxes")
        if not isinstance(boxes, Tensor) or boxes.dtype.is_floating_point or boxes.dtype == torch.bool:
            raise TypeError(f"boxes: expected an integer tensor of pixel coordinates (x0, y0, x1, y1), "
                            f"got {describe(boxes)}")
        if boxes.shape != (batch, 4):
            raise ValueError(f"boxes: expected shape (B, 4) = ({batch}, 4), got {tuple(boxes.shape)}")
        if boxes.device != x.device:
            raise ValueError(f"boxes: expected a tensor on the device of x ({x.device}), got one on {boxes.device}")
        # A data-dependent check needs a host sync; skipped where _host_checks says so (as for x_nat).
        if _host_checks(x):
            _check_boxes_inside(boxes, x.shape[2], x.shape[3])
        boxes = boxes.to(torch.int64).contiguous()
    if masks is not None:
        _check_image_batch(x, "masks")
        if not isinstance(masks, Tensor) or masks.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"masks: expected a bool or uint8 tensor, got {describe(masks)}")
        if masks.shape != (batch, 1, *x.shape[2:]):
            raise ValueError(f"masks: expected shape (B, 1, H, W) = {(batch, 1, *x.shape[2:])}, got {tuple(masks.shape)}")
        if masks.device != x.device:
            raise ValueError(f"masks: expected a tensor on the device of x ({x.device}), got one on {masks.device}")
        masks = masks.to(torch.uint8).contiguous()
    seed = _checks.seed(seed, allow_none=True)  # None: drawn on the device (reference.seed_tensor)
    impl = _backends.resolve(backend, x.device, "sat_perturb")
    return impl.sat_perturb(x, eps, p, seed, lo, hi, saliency, boxes, masks)
