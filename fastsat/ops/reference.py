"""Pure-PyTorch reference implementations of the fused ops: the specification every kernel is
tested against (METHODS.md §2 and §4), and the ``torch`` backend.

The functions implement :class:`fastsat.ops._backends.Backend` (arguments, dtypes, seeds). With
``seed=None`` they sample from torch's generator of the device directly. Written for clarity, not
speed: several passes over memory where the kernels make one or two.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "alignment_stats", "pgd_step", "random_start", "sat_perturb", "seed_tensor"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_sample_sum(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(dim=1)


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) tensor so it broadcasts against ``like`` (B, ...)."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def pgd_step(
    x: Tensor,
    grad: Tensor,
    x_nat: Tensor,
    out: Tensor,
    step_size: float,
    eps: float,
    l2: bool,
    lo: float,
    hi: float,
    with_stats: bool,
) -> Tensor:
    acc = accumulation_dtype(x.dtype)
    xf, gf, nf = x.to(acc), grad.to(acc), x_nat.to(acc)
    grad_norm = _per_sample_sum(gf * gf).sqrt()
    if l2:
        # A zero gradient takes no step instead of dividing by zero.
        scale = torch.where(grad_norm > 0, step_size / grad_norm, torch.zeros_like(grad_norm))
        delta = xf + _per_sample(scale, gf) * gf - nf
        delta_norm = _per_sample_sum(delta * delta).sqrt()
        shrink = torch.where(delta_norm > eps, eps / delta_norm, torch.ones_like(delta_norm))
        new = (nf + _per_sample(shrink, delta) * delta).clamp(lo, hi)
    else:
        stepped = xf + step_size * torch.sign(gf)
        new = torch.minimum(torch.maximum(stepped, nf - eps), nf + eps).clamp(lo, hi)
    new_stored = new.to(x.dtype)
    if not with_stats:
        out.copy_(new_stored)
        return torch.empty(0, device=x.device, dtype=acc)
    # Statistics are taken before ``out`` is written: ``out`` may alias ``x`` or ``x_nat``.
    delta = new_stored.to(acc) - nf
    if l2:
        final_delta_norm = _per_sample_sum(delta * delta).sqrt()
    else:
        final_delta_norm = delta.abs().reshape(delta.shape[0], -1).amax(dim=1)
    stats = torch.stack(
        [_per_sample_sum(nf * gf), grad_norm, _per_sample_sum(nf * nf).sqrt(), final_delta_norm],
        dim=1,
    )
    out.copy_(new_stored)
    return stats


def seed_tensor(seed: int | None, device: torch.device) -> Tensor:
    """The seed as the kernels read it: a (1,) int64 tensor on ``device``. ``None`` draws one in
    [0, 2**62) from torch's generator of that device (no host sync; graph-safe on CUDA), so
    ``torch.manual_seed`` makes the draws reproducible."""
    if seed is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    return torch.full((1,), seed, dtype=torch.int64, device=device)


def _generator(device: torch.device, seed: int | None) -> torch.Generator | None:
    """A generator seeded with ``seed``, or None (torch's default generator of the device)."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def random_start(x_nat: Tensor, eps: float, l2: bool, lo: float, hi: float, seed: int | None) -> Tensor:
    acc = accumulation_dtype(x_nat.dtype)
    gen = _generator(x_nat.device, seed)
    nf = x_nat.to(acc)
    if l2:
        # Uniform in the L2 ball of dimension d: a uniform direction (normalised Gaussian) and a
        # radius eps * U^(1/d), so the volume, not the radius, is uniform.
        direction = torch.randn(nf.shape, generator=gen, device=nf.device, dtype=acc)
        direction = direction / _per_sample(_per_sample_sum(direction * direction).sqrt(), nf)
        dim = nf[0].numel()
        radius = eps * torch.rand(nf.shape[0], generator=gen, device=nf.device, dtype=acc) ** (1.0 / dim)
        delta = direction * _per_sample(radius, nf)
    else:
        uniform = torch.rand(nf.shape, generator=gen, device=nf.device, dtype=acc)
        delta = (2.0 * uniform - 1.0) * eps
    return (nf + delta).clamp(lo, hi).to(x_nat.dtype)


def alignment_stats(x: Tensor, g: Tensor) -> Tensor:
    acc = accumulation_dtype(x.dtype)
    xf, gf = x.to(acc), g.to(acc)
    return torch.stack(
        [_per_sample_sum(xf * gf), _per_sample_sum(gf * gf).sqrt(), _per_sample_sum(xf * xf).sqrt()],
        dim=1,
    )


def saliency_from_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    """(B, 4) half-open ``x0, y0, x1, y1`` boxes → (B, 1, H, W) map, +1 inside, -1 outside."""
    cols = torch.arange(width, device=boxes.device).reshape(1, 1, 1, width)
    rows = torch.arange(height, device=boxes.device).reshape(1, 1, height, 1)
    x0, y0, x1, y1 = (boxes[:, i].reshape(-1, 1, 1, 1) for i in range(4))
    inside = (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)
    return torch.where(inside, 1.0, -1.0)


def sat_perturb(
    x: Tensor,
    eps: float,
    p: float,
    seed: int | None,
    lo: float,
    hi: float,
    saliency: Tensor | None,
    boxes: Tensor | None,
    masks: Tensor | None,
) -> Tensor:
    acc = accumulation_dtype(x.dtype)
    if saliency is not None:
        target = saliency.to(acc)
    elif boxes is not None:
        target = saliency_from_boxes(boxes, x.shape[-2], x.shape[-1]).to(acc)
    else:
        target = torch.where(masks.bool(), 1.0, -1.0).to(acc)
    gen = _generator(x.device, seed)
    sign_draw = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float32)
    keep_draw = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float32)
    noise = torch.where(sign_draw < 0.5, -1.0, 1.0).to(acc)
    s = torch.where(keep_draw < p, target.expand_as(noise), noise)
    return (x.to(acc) - eps * s).clamp(lo, hi).to(x.dtype)
