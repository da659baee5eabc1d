"""Per-sample geometry for data that does not fit in memory: crop, resize and flip one decoded sample
in a loader worker, moving its mask, box and saliency map with the image.

A transform is called as ``transform(sample, rng)`` on a sample dict at the resolution it was
decoded at: ``image`` uint8 (C, H, W) (pixel value = 255 * intensity; float images in [0, 1]
work too), optional ``mask`` bool (1, H, W), ``box`` int64 (4,) half-open source pixels
``(x0, y0, x1, y1)``, ``saliency`` float (C', h, w) covering the whole image at any resolution (a
teacher's map); other keys pass through. ``rng`` is a ``random.Random``: the loaders seed one per
sample from ``(seed, epoch, sample index)``, so a crop does not depend on which worker drew it.

Every transform is one integer crop window ``(x0, y0, x1, y1)`` of the source, resized to ``size``
and optionally mirrored (:func:`crop_resize`):

* image: bilinear with antialiasing (uint8 stays uint8, rounded);
* mask: nearest-exact (pixel centres);
* box: shifted into the window and clipped to it (a cover of the visible part of the object; the
  empty box ``(0, 0, 0, 0)`` if none is visible), then rescaled outward
  (:func:`~fastsat.data.dataset.rescale_boxes`), then mirrored with the image;
* saliency: first resized to the image's (H, W) if it is at another resolution, then exactly as
  the image (bilinear, float).

===========================  ===============================================================
:class:`Resize`              the whole image to ``size`` (what readers do by default)
:class:`CenterCrop`          the central ``fraction`` of the image, resized (evaluation)
:class:`RandomResizedCrop`   random area and aspect ratio, resized, random flip (training)
===========================  ===============================================================
"""

from __future__ import annotations

import abc
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastsat._checks import describe, number

from .augment import hflip, resize
from .dataset import clip_boxes, size_hw

__all__ = ["CenterCrop", "RandomResizedCrop", "Resize", "SampleTransform", "crop_resize"]

Sample = dict[str, torch.Tensor]
#: ``transform(sample, rng) -> sample``, see the module docstring.
SampleTransform = Callable[[Sample, "random.Random | None"], Sample]


def crop_resize(
    sample: Sample, crop: tuple[int, int, int, int], size: tuple[int, int], flip: bool = False
) -> Sample:
    """The window ``crop = (x0, y0, x1, y1)`` (half-open source pixels, inside the image) of one
    sample, resized to ``size = (H', W')`` and mirrored left-right if ``flip``; see the module
    docstring for how each entry moves. Returns a new dict with a contiguous image."""
    image = sample["image"]
    h, w = image.shape[-2:]
    x0, y0, x1, y1 = (int(v) for v in crop)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"crop: expected a non-empty window inside the {w}x{h} image, got {(x0, y0, x1, y1)}")
    batch = {"image": image[None, :, y0:y1, x0:x1]}
    if "mask" in sample:
        batch["mask"] = sample["mask"][None, :, y0:y1, x0:x1]
    if "box" in sample:
        origin = torch.tensor([x0, y0, x0, y0], dtype=torch.int64)
        batch["box"] = clip_boxes(sample["box"][None] - origin, (y1 - y0, x1 - x0))
    if "saliency" in sample:
        saliency = sample["saliency"][None]
        if saliency.shape[-2:] != (h, w):
            saliency = F.interpolate(saliency.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        batch["saliency"] = saliency[..., y0:y1, x0:x1]
    batch = resize(batch, size)
    if flip:
        batch = hflip(batch, torch.ones(1, dtype=torch.bool))
    out = dict(sample)
    out.update({key: value[0] for key, value in batch.items()})
    out["image"] = out["image"].contiguous()
    return out


class _Window(abc.ABC):
    """A transform given by a crop window and a flip per sample: ``params`` chooses, :func:`crop_resize` applies."""

    size: tuple[int, int]

    @abc.abstractmethod
    def params(self, h: int, w: int, rng: random.Random | None) -> tuple[tuple[int, int, int, int], bool]:
        """``(crop, flip)`` for an (h, w) source image; ``crop`` is (x0, y0, x1, y1) in source pixels."""

    def __call__(self, sample: Sample, rng: random.Random | None = None) -> Sample:
        h, w = sample["image"].shape[-2:]
        crop, flip = self.params(h, w, rng)
        return crop_resize(sample, crop, self.size, flip)


@dataclass(frozen=True)
class Resize(_Window):
    """The whole image resized to ``size`` (int: square, or (H, W), pixels); deterministic."""

    size: tuple[int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", size_hw(self.size))

    def params(self, h, w, rng=None):
        return (0, 0, w, h), False


@dataclass(frozen=True)
class CenterCrop(_Window):
    """The central window of the image with the aspect ratio of ``size`` and ``fraction`` of the
    largest such window's side, resized to ``size``; deterministic. With ``fraction=0.875`` and a
    square ``size`` of 224 this is the usual evaluation crop (resize the short side to 256, crop 224).
    """

    size: tuple[int, int]
    fraction: float = 0.875

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", size_hw(self.size))
        object.__setattr__(self, "fraction", number(self.fraction, "fraction", minimum=0, maximum=1, exclusive_min=True))

    def params(self, h, w, rng=None):
        oh, ow = self.size
        scale = min(h / oh, w / ow) * self.fraction
        ch, cw = min(h, max(1, round(oh * scale))), min(w, max(1, round(ow * scale)))
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        return (x0, y0, x0 + cw, y0 + ch), False


@dataclass(frozen=True)
class RandomResizedCrop(_Window):
    """Inception-style random crop (Szegedy et al. 2015; torchvision's algorithm): a window of
    ``scale`` (fraction of the image area, uniform) and aspect ratio ``ratio`` (width / height,
    log-uniform), resized to ``size``; 10 tries, then the central window of the nearest allowed
    ratio. With ``flip``, mirrored left-right with probability 1/2.

    Args:
        size: output int (square) or (H, W), pixels.
        scale: (lo, hi) area fractions, 0 < lo <= hi <= 1; default (0.08, 1).
        ratio: (lo, hi) aspect ratios, 0 < lo <= hi; default (3/4, 4/3).
        flip: random horizontal flip.
    """

    size: tuple[int, int]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", size_hw(self.size))
        for name, pair, top in (("scale", self.scale, 1.0), ("ratio", self.ratio, None)):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"{name}: expected a pair (lo, hi), got {describe(pair)}")
            lo = number(pair[0], name, minimum=0, exclusive_min=True, maximum=top)
            hi = number(pair[1], name, minimum=lo, maximum=top)
            object.__setattr__(self, name, (lo, hi))

    def params(self, h, w, rng=None):
        rng = rng if rng is not None else random.Random()
        area = h * w
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                y0, x0 = rng.randint(0, h - ch), rng.randint(0, w - cw)
                return (x0, y0, x0 + cw, y0 + ch), self.flip and rng.random() < 0.5
        aspect = min(max(w / h, self.ratio[0]), self.ratio[1])
        cw, ch = (w, max(1, min(h, round(w / aspect)))) if w / h <= aspect else (max(1, min(w, round(h * aspect))), h)
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        return (x0, y0, x0 + cw, y0 + ch), self.flip and rng.random() < 0.5
