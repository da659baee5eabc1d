"""Batched augmentation that moves image, mask and box together, on whatever device the batch is on.

Batches are the batch dicts of :mod:`fastsat.data`, plus an optional ``saliency`` map shaped like
the image or (B, 1, H, W), which moves like the image (0, no preference, where a crop reveals
padding); other keys pass through unchanged.

Box rules:

* crop: the box shifts with the content and is clipped to the image. It is *not* recomputed from
  the mask, so for a box that was tight on its mask it stays a (possibly loose) cover of the
  visible object. A box whose object left the image entirely becomes the empty box
  ``(0, 0, 0, 0)``, for which a box saliency map is -1 everywhere.
* flip: ``(x0, x1) -> (W - x1, W - x0)``; exact.
* resize: the smallest integer box containing the scaled box (see :func:`rescale_boxes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastsat._checks import clip_box, integer

from .dataset import clip_boxes, rescale_boxes, size_hw

__all__ = ["Augment", "crop_shift", "hflip", "resize"]


def crop_shift(batch: dict[str, torch.Tensor], shifts: torch.Tensor, padding: int | None = None) -> dict[str, torch.Tensor]:
    """Crop each sample at a shifted window: the padded-crop augmentation with given offsets.

    Output pixel (r, c) of sample b is input pixel ``(r + dy_b, c + dx_b)``, or 0 (black image,
    background mask) where that lies outside the input; equivalently, a crop of the zero-padded
    image. Boxes are shifted by ``(-dx, -dy)`` and clipped (empty -> ``(0, 0, 0, 0)``).

    Args:
        batch: batch dict (see module docstring).
        shifts: int64 (B, 2) offsets ``(dy, dx)`` in pixels.
        padding: a bound on ``|shifts|`` (pixels), e.g. the range they were drawn from; None reads
            the largest one from ``shifts`` (a host sync, which stalls a GPU).

    Returns:
        A new batch dict of the same shapes.
    """
    image = batch["image"]
    b, _, h, w = image.shape
    if shifts.shape != (b, 2):
        raise ValueError(f"shifts: expected shape ({b}, 2), got {tuple(shifts.shape)}")
    shifts = shifts.to(image.device, torch.int64)
    pad = (int(shifts.abs().max()) if b else 0) if padding is None else integer(padding, "padding", minimum=0)
    dy, dx = shifts[:, 0], shifts[:, 1]
    rows = (torch.arange(h, device=image.device) + pad + dy[:, None])[:, :, None]  # (B, H, 1)
    cols = (torch.arange(w, device=image.device) + pad + dx[:, None])[:, None, :]  # (B, 1, W)
    sample = torch.arange(b, device=image.device)[:, None, None]

    def shift(t: torch.Tensor) -> torch.Tensor:
        padded = F.pad(t, (pad, pad, pad, pad))
        # Advanced indices around a slice put the indexed dims first: (B, H, W, C).
        return padded[sample, :, rows, cols].permute(0, 3, 1, 2).contiguous()

    out = dict(batch)
    out["image"] = shift(image)
    if "mask" in batch:
        out["mask"] = shift(batch["mask"].to(torch.uint8)).bool()
    if "saliency" in batch:
        out["saliency"] = shift(batch["saliency"])
    if "box" in batch:
        offset = torch.stack([dx, dy, dx, dy], dim=1)
        out["box"] = clip_boxes(batch["box"] - offset, (h, w))
    return out


def hflip(batch: dict[str, torch.Tensor], which: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mirror the samples where ``which`` (bool (B,)) is True left-right, with their masks and boxes."""
    image = batch["image"]
    b, w = image.shape[0], image.shape[-1]
    if which.shape != (b,) or which.dtype != torch.bool:
        raise ValueError(f"which: expected bool of shape ({b},), got {which.dtype} {tuple(which.shape)}")
    which = which.to(image.device)
    sel = which.view(b, 1, 1, 1)
    out = dict(batch)
    out["image"] = torch.where(sel, image.flip(-1), image)
    for key in ("mask", "saliency"):
        if key in batch:
            out[key] = torch.where(sel, batch[key].flip(-1), batch[key])
    if "box" in batch:
        box = batch["box"]
        x0, y0, x1, y1 = box.unbind(1)
        mirrored = torch.stack([w - x1, y0, w - x0, y1], dim=1)
        empty = (x1 <= x0) | (y1 <= y0)
        out["box"] = torch.where((which & ~empty)[:, None], mirrored, box)
    return out


def resize(
    batch: dict[str, torch.Tensor], size: tuple[int, int], clip: tuple[float, float] = (0.0, 1.0)
) -> dict[str, torch.Tensor]:
    """Resize a batch to ``size`` = (H', W') pixels.

    Images: bilinear with antialiasing (for downscaling), float in the box ``clip`` (pixel units,
    default [0, 1]; the result is clamped to it against rounding) or uint8 (0-255, resized as bytes:
    the CPU's fast path, saturating and rounding to bytes). Masks: nearest-exact (pixel centres).
    Boxes: :func:`rescale_boxes` (smallest integer box containing the scaled box).
    """
    lo, hi = clip_box(clip)
    image = batch["image"]
    h, w = image.shape[-2:]
    size = (int(size[0]), int(size[1]))
    if size == (h, w):
        return dict(batch)
    out = dict(batch)
    resized = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    out["image"] = resized.clamp_(lo, hi) if image.is_floating_point() else resized
    if "mask" in batch:
        # Float on a GPU (nearest interpolation of integer dtypes is not implemented on every
        # device); bytes on the CPU, where they are.
        dtype = torch.uint8 if image.device.type == "cpu" else torch.float32
        out["mask"] = F.interpolate(batch["mask"].to(dtype), size=size, mode="nearest-exact") > 0
    if "saliency" in batch:
        out["saliency"] = F.interpolate(batch["saliency"], size=size, mode="bilinear", align_corners=False, antialias=True)
    if "box" in batch:
        out["box"] = rescale_boxes(batch["box"], (h, w), size)
    return out


@dataclass(frozen=True)
class Augment:
    """Random batched augmentation: padded random crop, horizontal flip, then resize.

    Args:
        padding: random crop of the image zero-padded by this many pixels on each side, i.e. a
            random shift by ``dy, dx`` uniform in ``[-padding, padding]`` (0 disables it).
        flip: mirror each sample left-right with probability 1/2.
        size: final (H, W) in pixels (an int means square); None keeps the input size.

    ``augment(batch, generator)`` draws its randomness from ``generator`` (a ``torch.Generator``
    on the batch's device) so that a seeded loader is reproducible.
    """

    padding: int = 4
    flip: bool = True
    size: int | tuple[int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "padding", integer(self.padding, "padding", minimum=0))
        if self.size is not None:
            object.__setattr__(self, "size", size_hw(self.size))

    def __call__(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        image = batch["image"]
        b, device = image.shape[0], image.device
        if self.padding:
            shifts = torch.randint(-self.padding, self.padding + 1, (b, 2), generator=generator, device=device)
            batch = crop_shift(batch, shifts, self.padding)
        if self.flip:
            batch = hflip(batch, torch.rand(b, generator=generator, device=device) < 0.5)
        if self.size is not None:
            batch = resize(batch, self.size)
        return batch
