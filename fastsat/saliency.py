"""Saliency maps of a classifier, batched and with bounded memory.

Every map explains one logit per sample: ``target`` is a (B,) int64 tensor of class indices, a
single int for the whole batch, or None for the class the model predicts at the clean input x
(for SmoothGrad and Integrated Gradients too: the class is fixed at x, not re-predicted at every
noisy / interpolated point). Inputs are in the space the model receives — pixel space for fastsat
models, which normalise inside ``forward`` — so maps are in pixel space as well.

All maps are float32 (running sums over noise samples / path points are kept in float64 for
float64 inputs and cast once at the end). They are shaped like x, except Grad-CAM++ which returns
one map per image, (B, 1, H, W), that broadcasts over the channels (``fastsat.ops.sat_perturb``
takes either shape).

``mode`` (default "eval") is the train/eval mode the model runs in for the call — "eval" keeps
batch-norm statistics fixed so a sample's map does not depend on the rest of the batch or on the
chunking; "train" or None (as found) are allowed. The model's modes and parameter
``requires_grad`` flags are restored afterwards and no parameter ``.grad`` is written
(see :func:`fastsat.grad.frozen`). A map of a NaN or inf pixel would be a made-up number: every
method refuses such an x with a ValueError naming it (one host read per call).

SmoothGrad and Integrated Gradients evaluate many inputs per sample. ``chunk_size`` is the number
of noise samples / path points evaluated per forward+backward pass; one pass feeds
``chunk_size · B`` inputs to the model, and only running sums of the size of x are kept between
passes, so memory stays bounded by the chunk and not by ``n_samples`` or ``steps``
(None: everything in one pass). Results do not depend on ``chunk_size``: the per-point gradients
are accumulated one point at a time in a fixed order, and SmoothGrad draws its noise one sample at
a time in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fastsat import _checks
from fastsat._checks import choice, describe, flag, integer, number, positive_int
from fastsat.grad import check_input, check_logits, check_objective_args, frozen, input_grad
from fastsat.ops import accumulation_dtype

__all__ = [
    "METHODS",
    "compute",
    "gradcam_pp",
    "gradient",
    "gradient_sign",
    "gradient_x_input",
    "guided_backprop",
    "integrated_gradients",
    "minmax_scale",
    "smoothgrad",
]

SMOOTHGRAD_VARIANTS = ("mean", "squared", "vargrad")
SIGMA_UNITS = ("range", "pixel")
IG_METHODS = ("trapezoid", "left", "right", "midpoint")
#: What Integrated Gradients integrates: the target's logit (Sundararajan et al.; fastsat's default)
#: or its cross-entropy loss (what the SAT authors' code does, with the true label as target).
IG_OBJECTIVES = ("logit", "loss")


def _given_target(x: torch.Tensor, target: int | torch.Tensor | None) -> torch.Tensor | None:
    """``target`` as (B,) int64 class indices on x's device, None staying None. One class for the
    whole batch may be any integer: Python, numpy, or a 0-d CPU tensor."""
    batch = x.shape[0]
    if target is None:
        return None
    if not isinstance(target, torch.Tensor) or target.dim() == 0:
        return torch.full((batch,), integer(target, "target", minimum=0), dtype=torch.long, device=x.device)
    if target.dtype != torch.long or target.shape != (batch,):
        raise ValueError(
            f"target: expected a ({batch},) int64 tensor, got shape {tuple(target.shape)} dtype {target.dtype}"
        )
    return target.to(x.device)


def _resolve_target(
    model: nn.Module, x: torch.Tensor, target: int | torch.Tensor | None, mode: str | None
) -> torch.Tensor:
    """(B,) int64 class indices: ``target`` broadcast to the batch, or the prediction at x."""
    given = _given_target(x, target)
    if given is not None:
        return given
    with frozen(model, mode), torch.no_grad():
        return model(x).argmax(dim=1)


def _logit_grad(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None, mode: str | None, objective: str = "logit"
) -> torch.Tensor:
    """∇_x Ψ^target(x) (``objective="loss"``: ∇_x CE(Ψ(x), target)) shaped like x, float64 for
    float64 x, else float32; target None: the class predicted in the same forward pass (labels
    range-checked by ``input_grad``)."""
    if objective == "loss":
        return input_grad(model, x, objective="ce", y=target, mode=mode).grad
    return input_grad(model, x, objective="logit", target=target, mode=mode).grad


def _accumulator(x: torch.Tensor) -> torch.Tensor:
    """Zeros for a running sum over gradients of x: float64 for float64 x, else float32."""
    return torch.zeros(x.shape, dtype=accumulation_dtype(x.dtype), device=x.device)


def _chunks(total: int, chunk_size: int | None) -> Iterator[range]:
    step = total if chunk_size is None else chunk_size
    for start in range(0, total, step):
        yield range(start, min(start + step, total))


def _point_grads(
    model: nn.Module,
    points: list[torch.Tensor],
    target: torch.Tensor,
    mode: str | None,
    objective: str = "logit",
) -> torch.Tensor:
    """Gradients at several (B, ...) points in one pass: (len(points), B, ...), dtype as _logit_grad."""
    stacked = torch.cat(points)
    grads = _logit_grad(model, stacked, target.repeat(len(points)), mode, objective)
    return grads.reshape(len(points), *points[0].shape)


def gradient(
    model: nn.Module, x: torch.Tensor, target: int | torch.Tensor | None = None, *, mode: str | None = "eval"
) -> torch.Tensor:
    """Vanilla saliency ∇_x Ψ^target(x): float32, shaped like x (B, ...), pixel space."""
    check_input(model, x, finite=True)
    return _logit_grad(model, x, _given_target(x, target), mode).float()


def gradient_sign(
    model: nn.Module, x: torch.Tensor, target: int | torch.Tensor | None = None, *, mode: str | None = "eval"
) -> torch.Tensor:
    """The sign of the vanilla saliency, sign(∇_x Ψ^target(x)) ∈ {−1, 0, 1}: float32, shaped like x.

    This is what the SAT authors' "guided backprop" teacher maps are (METHODS.md §6): their hook
    sits on ``nn.ReLU`` modules but their ResNet applies ``F.relu``, so it never fires and the map
    is the sign of the plain gradient. fastsat's :func:`guided_backprop` is the real method.
    """
    return gradient(model, x, target, mode=mode).sign()


def gradient_x_input(
    model: nn.Module, x: torch.Tensor, target: int | torch.Tensor | None = None, *, mode: str | None = "eval"
) -> torch.Tensor:
    """Gradient ⊙ input, x ⊙ ∇_x Ψ^target(x): float32, shaped like x.

    For a positively one-homogeneous network (bias-free ReLU net) the map sums to the logit
    (Euler's identity), i.e. it is Integrated Gradients with a zero baseline.
    """
    check_input(model, x, finite=True)
    return (_logit_grad(model, x, _given_target(x, target), mode) * x).float()


def smoothgrad(
    model: nn.Module,
    x: torch.Tensor,
    target: int | torch.Tensor | None = None,
    *,
    n_samples: int = 50,
    sigma: float = 0.15,
    sigma_units: str = "range",
    variant: str = "mean",
    seed: int | None = None,
    chunk_size: int | None = None,
    mode: str | None = "eval",
) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017): statistics of ∇Ψ^target over x + N(0, σ²), float32 like x.

    n_samples: noise draws per image (default 50). sigma: noise standard deviation; with
    ``sigma_units="range"`` (default) a fraction of each image's value range, σ_b = sigma ·
    (max x_b − min x_b) (default 0.15, i.e. 15 % of the range, within the 10–20 % of METHODS.md §1); with
    ``"pixel"`` an absolute standard deviation in pixel units. Noisy inputs are not clipped.
    variant: "mean" (SmoothGrad, mean of g), "squared" (mean of g²) or "vargrad" (variance of g,
    population form mean(g²) − mean(g)²). seed: int for a private generator (reproducible,
    independent of torch's global RNG), None to draw from torch's global RNG. chunk_size: noise
    draws per forward/backward pass (see the module docstring).
    """
    check_input(model, x, finite=True)
    n_samples = positive_int(n_samples, "n_samples")
    chunk_size = positive_int(chunk_size, "chunk_size", allow_none=True)
    sigma = number(sigma, "sigma", minimum=0)
    choice(sigma_units, "sigma_units", SIGMA_UNITS)
    choice(variant, "variant", SMOOTHGRAD_VARIANTS)
    seed = _checks.seed(seed, allow_none=True)
    target = _resolve_target(model, x, target, mode)
    x = x.detach()
    if sigma_units == "range":
        flat = x.reshape(x.shape[0], -1)
        std = sigma * (flat.amax(dim=1) - flat.amin(dim=1))
        std = std.reshape((-1,) + (1,) * (x.dim() - 1))
    else:
        std = sigma
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed)
    total = _accumulator(x)
    total_sq = torch.zeros_like(total) if variant != "mean" else None
    for chunk in _chunks(n_samples, chunk_size):
        # One draw of x's shape per sample, in sample order, so any chunking draws the same noise.
        points = [x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) for _ in chunk]
        for g in _point_grads(model, points, target, mode):
            if total_sq is not None:
                total_sq += g * g
            total += g
    mean = total / n_samples
    if variant == "mean":
        return mean.float()
    mean_sq = total_sq / n_samples
    if variant == "squared":
        return mean_sq.float()
    return (mean_sq - mean * mean).clamp_(min=0.0).float()


def _ig_path(steps: int, method: str) -> tuple[list[float], list[float]]:
    """Points t_k ∈ [0, 1] and quadrature weights w_k (Σ w_k = 1) of the path integral."""
    if method == "trapezoid":
        if steps < 2:
            raise ValueError(f"steps: expected at least 2 points for the trapezoid rule, got {steps}")
        ts = [k / (steps - 1) for k in range(steps)]
        weights = [1.0 / (steps - 1)] * steps
        weights[0] = weights[-1] = 0.5 / (steps - 1)
        return ts, weights
    offset = {"left": 0.0, "right": 1.0, "midpoint": 0.5}[method]
    return [(k + offset) / steps for k in range(steps)], [1.0 / steps] * steps


def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target: int | torch.Tensor | None = None,
    *,
    baseline: float | torch.Tensor | None = None,
    steps: int = 50,
    method: str = "trapezoid",
    chunk_size: int | None = None,
    objective: str = "logit",
    mode: str | None = "eval",
) -> torch.Tensor:
    """Integrated Gradients (Sundararajan et al. 2017): (x − x') ⊙ ∫₀¹ ∇F(x' + t(x − x')) dt with
    F = Ψ^target (``objective="logit"``, the default: the method as published) or F = the
    cross-entropy loss CE(Ψ(·), target) (``objective="loss"``: what the SAT authors' code
    integrates, with the true label as ``target``; METHODS.md §6).

    baseline x': None (default, the zero image), a number (constant image) or a tensor that
    broadcasts to x's shape, in pixel space. steps: number of gradient evaluations along the path
    (default 50). method: quadrature — "trapezoid" (default; t_k = k/(steps−1), end points at half
    weight), or the Riemann sums "left" (k/steps), "right" ((k+1)/steps), "midpoint"
    ((k+½)/steps). Completeness: the map sums to Ψ^target(x) − Ψ^target(x') up to the quadrature
    error (F(x) − F(x') for either objective). chunk_size: path points per forward/backward pass
    (see the module docstring). Returns float32, shaped like x.
    """
    check_input(model, x, finite=True)
    steps = positive_int(steps, "steps")
    chunk_size = positive_int(chunk_size, "chunk_size", allow_none=True)
    choice(method, "method", IG_METHODS)
    choice(objective, "objective", IG_OBJECTIVES)
    if objective == "loss" and target is None:
        raise ValueError("target: objective 'loss' differentiates the loss of the labels; expected the (B,) labels, "
                         "got None")
    ts, weights = _ig_path(steps, method)
    x = x.detach()
    if baseline is None:
        baseline = torch.zeros_like(x)
    elif isinstance(baseline, torch.Tensor):
        try:
            baseline = torch.broadcast_to(baseline.detach().to(device=x.device, dtype=x.dtype), x.shape)
        except RuntimeError as err:
            raise ValueError(
                f"baseline: expected a tensor that broadcasts to x's shape {tuple(x.shape)}, "
                f"got shape {tuple(baseline.shape)}"
            ) from err
    else:
        baseline = torch.full_like(x, number(baseline, "baseline"))
    target = _resolve_target(model, x, target, mode)
    delta = x - baseline
    total = _accumulator(x)
    for chunk in _chunks(steps, chunk_size):
        grads = _point_grads(model, [baseline + ts[k] * delta for k in chunk], target, mode, objective)
        for k, g in zip(chunk, grads, strict=True):
            total += weights[k] * g
    return (delta * total).float()


class _PositiveGrad(torch.autograd.Function):
    """Identity forward; backward lets only positive gradients through (guided backprop)."""

    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
        # A copy, not a view: later in-place ops of the model may modify the output.
        return t.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(min=0)


def _guide_relu(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    return _PositiveGrad.apply(output)


def guided_backprop(
    model: nn.Module, x: torch.Tensor, target: int | torch.Tensor | None = None, *, mode: str | None = "eval"
) -> torch.Tensor:
    """Guided backprop (Springenberg et al. 2015): the gradient with every ReLU passing back only
    positive gradients at positive inputs. float32, shaped like x.

    Only ``nn.ReLU`` modules (in-place or not) are guided, via forward hooks that are removed
    afterwards, also on error. ReLUs applied functionally (``F.relu``, ``torch.relu``,
    ``x.relu()``) are invisible to hooks and keep their ordinary backward; a model with no
    ``nn.ReLU`` module at all raises ValueError.
    """
    check_input(model, x, finite=True)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError(
            "model: expected nn.ReLU modules for guided backprop to hook, got none "
            "(functional relu calls cannot be hooked)"
        )
    handles = [m.register_forward_hook(_guide_relu) for m in relus]
    try:
        return gradient(model, x, target, mode=mode)
    finally:
        for handle in handles:
            handle.remove()


@torch.enable_grad()  # a caller's torch.no_grad() is fine: the forward below is differentiated
def gradcam_pp(
    model: nn.Module,
    x: torch.Tensor,
    target: int | torch.Tensor | None = None,
    *,
    layer: nn.Module,
    relu: bool = True,
    mode: str | None = "eval",
) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al. 2018) at ``layer``: float32 (B, 1, H, W) maps.

    layer: a submodule of ``model`` run exactly once per forward, whose output A is (B, C, h, w)
    (e.g. the last convolutional stage). With G = ∂Ψ^target/∂A (the exponential-score form of the
    paper, in which higher derivatives are powers of G):
    α_kij = G²_kij / (2 G²_kij + Σ_ab A_kab · G³_kij) (0 where G = 0), w_k = Σ_ij α_kij · relu(G_kij),
    map = relu(Σ_k w_k A_k), upsampled bilinearly (align_corners=False) to x's H×W.
    The single channel broadcasts over x's channels. relu: False leaves out the final ReLU
    (map = Σ_k w_k A_k, negative evidence kept), as the SAT authors' code does before its min–max
    scaling (METHODS.md §6); the default True is the published method.
    """
    check_input(model, x, finite=True)
    relu = flag(relu, "relu")
    if not isinstance(layer, nn.Module) or not any(m is layer for m in model.modules()):
        raise ValueError(f"layer: expected a submodule of model, got {describe(layer)}")
    if x.dim() != 4:
        raise ValueError(f"x: expected (B, C, H, W) images for Grad-CAM++, got shape {tuple(x.shape)}")
    target = _given_target(x, target)
    activations: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: activations.append(output))
    try:
        with frozen(model, mode):
            logits = model(x.detach().requires_grad_(True))
    finally:
        handle.remove()
    check_logits(logits, x.shape[0], finite=True)
    if len(activations) != 1:
        raise ValueError(f"layer: expected a layer that runs once per forward pass, got one that ran "
                         f"{len(activations)} times")
    act = activations[0]
    if not isinstance(act, torch.Tensor) or act.dim() != 4 or act.shape[0] != x.shape[0]:
        raise ValueError(f"layer: expected a (B, C, h, w) output, got {getattr(act, 'shape', type(act).__name__)}")
    if target is None:
        target = logits.detach().argmax(dim=1)
    else:
        check_objective_args("logit", tuple(logits.shape), target=target)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), act)
    act, grad = act.detach().float(), grad.float()
    grad_sq = grad * grad
    denom = 2.0 * grad_sq + act.sum(dim=(2, 3), keepdim=True) * grad_sq * grad
    alpha = torch.where(grad != 0, grad_sq / torch.where(denom != 0, denom, 1.0), 0.0)
    weights = (alpha * grad.clamp(min=0)).sum(dim=(2, 3), keepdim=True)
    cam = (weights * act).sum(dim=1, keepdim=True)
    if relu:
        cam = cam.clamp(min=0)
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)


def minmax_scale(maps: torch.Tensor) -> torch.Tensor:
    """Scale each sample's map to [0, 1]: (m − min) / (max − min) over all its elements.

    maps: (B, ...) floating tensor. A constant map becomes all zeros. Returns float32, same shape.
    """
    if not isinstance(maps, torch.Tensor) or not maps.is_floating_point() or maps.dim() < 2:
        got = getattr(maps, "shape", type(maps).__name__)
        raise ValueError(f"maps: expected a floating (B, ...) tensor, got {got}")
    flat = maps.float().reshape(maps.shape[0], -1)
    lo = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - lo
    scaled = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, 1.0), 0.0)
    return scaled.reshape(maps.shape)


METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "gradient": gradient,
    "gradient_sign": gradient_sign,
    "gradient_x_input": gradient_x_input,
    "smoothgrad": smoothgrad,
    "integrated_gradients": integrated_gradients,
    "guided_backprop": guided_backprop,
    "gradcam_pp": gradcam_pp,
}


def compute(method: str, model: nn.Module, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """Call the saliency method named ``method`` (a key of :data:`METHODS`) with ``kwargs``.

    E.g. ``compute("smoothgrad", teacher, x, n_samples=10)`` or
    ``compute("gradcam_pp", teacher, x, layer=teacher.layer4)``.
    """
    choice(method, "method", tuple(METHODS))
    return METHODS[method](model, x, **kwargs)
