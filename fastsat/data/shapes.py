"""Synthetic *shapes*: the built-in, download-free data set with exact masks and boxes.

Each image shows one shape (the class) with a random colour, scale, position and rotation, drawn
over a textured, cluttered background (smooth colour noise, a sinusoidal grating, pixel noise and a
few short distractor strokes). The class is carried by the shape's outline only: its colour is
drawn relative to the background, independently of the class, and every shape is shown at every
rotation, so classes differ by geometry, not orientation or colour.

Two options make an easier testbed (``clutter=False``) and one where SAT's −ε·S has a meaning
(``polarity="light"``): with the default ``polarity="random"`` the shape moves away from the
background on each channel in a random direction, so subtracting ε·S (S = +1 on the object)
brightens the object on some channels and darkens it on others; with ``"light"`` the shape is
lighter than the background on every channel, so −ε·S always lowers the object's contrast.

The shape is drawn last, so its segmentation mask is exactly the set of pixels painted with the
shape's colour, and the box is the tight box of the mask. Generation is vectorised in torch over
chunks of images; every chunk has its own seed derived from ``seed``, so
``shapes(n, seed=s)`` is a prefix of ``shapes(m, seed=s)`` for ``n < m`` and results do not depend
on the thread count.
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from fastsat._checks import choice, flag, integer, positive_int
from fastsat._checks import seed as check_seed
from fastsat._io import atomic_save
from fastsat._threads import one_thread

from .dataset import AnnotatedDataset, boxes_from_masks

__all__ = ["POLARITIES", "SHAPE_NAMES", "default_cache_dir", "generate_shapes", "shapes"]

#: Class names, in label order. ``num_classes=k`` uses the first k.
SHAPE_NAMES = (
    "disk",
    "ring",
    "square",
    "triangle",
    "star",
    "plus",
    "crescent",
    "half-disk",
    "bar",
    "L",
    "frame",
    "T",
)

# Bump when the generator's output changes, so stale cache files are never read.
_VERSION = 3
#: Values of ``polarity``: the object's contrast direction per channel.
POLARITIES = ("random", "light")
# Images per chunk: 512, fewer for large images to bound memory (about 4M pixels per chunk);
# fixed per image size so that chunk boundaries (hence seeds) do not depend on n.
_CHUNK_PIXELS = 1 << 22


def default_cache_dir() -> Path:
    """``$FASTSAT_CACHE`` if set, else ``~/.cache/fastsat``."""
    return Path(os.environ.get("FASTSAT_CACHE") or Path.home() / ".cache" / "fastsat")


def _inside_one(kind: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whether local coordinates (u, v) (float32, any shape) lie inside shape ``kind``.

    Coordinates are in the shape's frame, where every shape fits in the unit disk.
    """
    name = SHAPE_NAMES[kind]
    if name == "disk":
        return u * u + v * v <= 0.8**2
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 0.9**2) & (r2 >= 0.5**2)
    if name == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.68
    if name == "triangle":  # equilateral, circumradius 0.95: three half-planes at apothem 0.475
        inside = torch.ones_like(u, dtype=torch.bool)
        for k in range(3):
            ang = math.pi / 2 + 2 * math.pi * k / 3
            inside &= (u * math.cos(ang) + v * math.sin(ang)) <= 0.475
        return inside
    if name == "star":  # 5 points: the radius is a triangle wave in the angle, 0.42 to 1.0
        phase = torch.atan2(v, u) * (5 / (2 * math.pi)) % 1.0
        radius = 0.42 + 0.58 * (1 - (2 * phase - 1).abs())
        return u * u + v * v <= radius * radius
    if name == "plus":
        au, av = u.abs(), v.abs()
        return ((au <= 0.26) & (av <= 0.9)) | ((av <= 0.26) & (au <= 0.9))
    if name == "crescent":
        return (u * u + v * v <= 0.9**2) & ((u - 0.45) ** 2 + v * v > 0.7**2)
    if name == "half-disk":
        return ((u * u + (v + 0.35) ** 2) <= 0.95**2) & (v >= -0.35)
    if name == "bar":
        return (u.abs() <= 0.95) & (v.abs() <= 0.3)
    if name == "L":
        return (torch.maximum(u.abs(), v.abs()) <= 0.7) & ((u <= -0.2) | (v <= -0.2))
    if name == "frame":
        cheb = torch.maximum(u.abs(), v.abs())
        return (cheb <= 0.8) & (cheb >= 0.45)
    # "T"
    au = u.abs()
    return ((au <= 0.8) & (v >= 0.35) & (v <= 0.8)) | ((au <= 0.22) & (v >= -0.8) & (v <= 0.35))


def _inside(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Shape masks: bool (B, H, W) from kind int64 (B,) and local coordinates u, v float32 (B, H, W)."""
    out = torch.zeros_like(u, dtype=torch.bool)
    for k in kind.unique().tolist():
        idx = (kind == k).nonzero().squeeze(1)
        out[idx] = _inside_one(k, u[idx], v[idx])
    return out


def _chunk(
    count: int, size: int, num_classes: int, seed: int, clutter: bool = True, polarity: str = "random"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate ``count`` images; returns uint8 (count, 3, size, size), int64 labels, bool masks.

    The random draws are the same whatever ``clutter`` and ``polarity`` are, so the two options
    change the look of the same scenes (same labels, shapes, positions and masks)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    # Balanced labels within the chunk, in random order.
    labels = (torch.arange(count) % num_classes)[torch.randperm(count, generator=g)]
    coords = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    ys, xs = coords.view(1, size, 1), coords.view(1, 1, size)

    # Background: base colour + smooth colour noise + grating + pixel noise.
    base = 0.2 + 0.6 * rand(count, 3, 1, 1)
    smooth = F.interpolate(rand(count, 3, 4, 4) - 0.5, size=(size, size), mode="bilinear", align_corners=False)
    freq = (1.5 + 4.0 * rand(count, 1, 1)) * (2 * math.pi / size)
    ori = rand(count, 1, 1) * math.pi
    grating = torch.sin(freq * (xs * torch.cos(ori) + ys * torch.sin(ori)) + 2 * math.pi * rand(count, 1, 1))
    if polarity == "light":  # room above the background on every channel
        base = 0.05 + 0.5 * (base - 0.2) / 0.6
    grating_colour = rand(count, 3, 1, 1)  # drawn either way: the options keep the same scenes
    image = base + 0.3 * smooth + 0.08 * grating.unsqueeze(1) * grating_colour if clutter else base.expand(-1, -1, size, size).clone()
    image += 0.1 * (rand(count, 3, size, size) - 0.5)  # pixel noise, std 0.029

    # Clutter: 5 short thin horizontal or vertical strokes in random colours, well below the
    # shapes' size so that they distract without imitating a class (a bar or an L). Axis-aligned
    # strokes are separable (row test & column test), which keeps them cheap.
    for _ in range(5):
        cx, cy = size * rand(count, 1, 1), size * rand(count, 1, 1)
        long = size * (0.04 + 0.08 * rand(count, 1, 1))  # half-extents
        thin = size * (0.02 + 0.02 * rand(count, 1, 1))
        vertical = rand(count, 1, 1) < 0.5
        half_w, half_h = torch.where(vertical, thin, long), torch.where(vertical, long, thin)
        stroke = ((xs - cx).abs() <= half_w) & ((ys - cy).abs() <= half_h) & clutter
        image = torch.where(stroke.unsqueeze(1), rand(count, 3, 1, 1), image)

    # The shape: radius 25-42% of the image side, fully inside, any rotation.
    radius = size * (0.25 + 0.17 * rand(count, 1, 1))
    cx = radius + (size - 2 * radius) * rand(count, 1, 1)
    cy = radius + (size - 2 * radius) * rand(count, 1, 1)
    theta = 2 * math.pi * rand(count, 1, 1)
    du, dv = (xs - cx) / radius, (ys - cy) / radius
    u = du * torch.cos(theta) + dv * torch.sin(theta)
    v = -du * torch.sin(theta) + dv * torch.cos(theta)
    mask = _inside(labels, u, v).unsqueeze(1)
    # Colour contrasts with the base: each channel moves 0.3-0.55 away from it, towards the side
    # with more room; the direction is per channel, so the hue is random and class-independent.
    away = torch.where(base < 0.5, 1.0, -1.0) if polarity == "random" else torch.ones_like(base)
    colour = (base + away * (0.3 + 0.25 * rand(count, 3, 1, 1))).clamp(0, 1)
    shading = 1 + 0.1 * grating.unsqueeze(1)  # mild texture on the shape too
    image = torch.where(mask, colour * shading, image)

    images = image.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return images, labels, mask


def _checked(n: object, size: object, num_classes: object, seed: object, clutter: object, polarity: object) -> tuple:
    """The arguments of :func:`shapes`, checked, or a ValueError/TypeError naming the bad one."""
    num_classes = integer(num_classes, "num_classes", minimum=2)
    if num_classes > len(SHAPE_NAMES):
        raise ValueError(f"num_classes: expected an integer in [2, {len(SHAPE_NAMES)}], got {num_classes}")
    return (positive_int(n, "n"), integer(size, "size", minimum=8), num_classes, check_seed(seed),
            flag(clutter, "clutter"), choice(polarity, "polarity", POLARITIES))


def generate_shapes(
    n: int, *, size: int = 32, num_classes: int = 10, seed: int = 0, clutter: bool = True, polarity: str = "random"
) -> AnnotatedDataset:
    """Generate the shapes data in memory (no cache). See :func:`shapes` for the arguments."""
    n, size, num_classes, seed, clutter, polarity = _checked(n, size, num_classes, seed, clutter, polarity)
    chunk = max(16, min(512, _CHUNK_PIXELS // (size * size)))
    images, labels, masks = [], [], []
    with one_thread():
        for index, start in enumerate(range(0, n, chunk)):
            # Always generate a full chunk (then truncate) so that a prefix of the data does not
            # depend on n; labels are balanced within each full chunk.
            imgs, labs, msks = _chunk(chunk, size, num_classes, seed * 1_000_003 + index, clutter, polarity)
            take = min(chunk, n - start)
            images.append(imgs[:take])
            labels.append(labs[:take])
            masks.append(msks[:take])
    masks_t = torch.cat(masks)
    return AnnotatedDataset(
        torch.cat(images),
        torch.cat(labels),
        classes=SHAPE_NAMES[:num_classes],
        boxes=boxes_from_masks(masks_t),
        masks=masks_t,
    )


def shapes(
    n: int,
    *,
    size: int = 32,
    num_classes: int = 10,
    seed: int = 0,
    clutter: bool = True,
    polarity: str = "random",
    cache_dir: str | os.PathLike | None | bool = None,
) -> AnnotatedDataset:
    """The built-in synthetic shapes data: ``n`` images with labels, exact masks and tight boxes.

    Args:
        n: number of images.
        size: image side in pixels (images are ``size`` x ``size``; 32, 64 and 224 are typical).
        num_classes: number of shape classes, 2 to 12 (default 10); names in ``SHAPE_NAMES``.
        seed: generator seed; the same arguments always give the same data, and
            ``shapes(n, seed=s)`` is the first ``n`` images of ``shapes(m, seed=s)`` for ``m > n``.
            Use different seeds for training and test data.
        clutter: draw the textured background (smooth colour noise, grating) and the distractor
            strokes (default True); False leaves a flat background with pixel noise.
        polarity: "random" (default): the shape's contrast direction is random per channel;
            "light": the shape is lighter than the background on every channel.
        cache_dir: directory of the on-disk cache; None uses :func:`default_cache_dir`
            (``$FASTSAT_CACHE`` or ``~/.cache/fastsat``), False disables caching. Cache files are
            written atomically (:func:`fastsat._io.atomic_save`); an unreadable one is regenerated.

    Returns:
        :class:`AnnotatedDataset` with images uint8 (n, 3, size, size), labels int64 (n,),
        boxes int64 (n, 4) (half-open pixel coordinates, tight box of the mask), masks bool
        (n, 1, size, size). ``dataset[i]`` gives the sample dict with a float32 image in [0, 1].
        ``.mean``/``.std`` are the exact per-channel statistics of these images.
    """
    n, size, num_classes, seed, clutter, polarity = _checked(n, size, num_classes, seed, clutter, polarity)
    options = {"size": size, "num_classes": num_classes, "seed": seed, "clutter": clutter, "polarity": polarity}
    if cache_dir is False:
        return generate_shapes(n, **options)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    look = "" if clutter and polarity == "random" else f"-clutter{int(clutter)}-{polarity}"
    path = directory / f"shapes-v{_VERSION}-n{n}-size{size}-k{num_classes}-seed{seed}{look}.pt"
    if path.exists():
        try:
            blob = torch.load(path, weights_only=True)
            return AnnotatedDataset(
                blob["images"],
                blob["labels"],
                classes=SHAPE_NAMES[:num_classes],
                boxes=blob["boxes"],
                masks=blob["masks"],
            )
        except (OSError, EOFError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as err:
            # A truncated or foreign file: regenerate it.
            warnings.warn(f"shapes cache {path} is unreadable ({err}); regenerating it", stacklevel=2)
    data = generate_shapes(n, **options)
    atomic_save({"images": data.images, "labels": data.labels, "boxes": data.boxes, "masks": data.masks}, path)
    return data
