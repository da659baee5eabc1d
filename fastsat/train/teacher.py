"""SAT's strong saliency maps: a teacher network's maps for a whole dataset, computed batched
once and cached on disk (METHODS.md §2).

Post-processing as in the SAT authors' code: guided backprop and the gradient sign → the sign in
{−1, 0, 1}; SmoothGrad (σ = 0.15 of the image range, 10 samples), Integrated Gradients (zero
baseline, 100 steps) and Grad-CAM++ (last convolutional stage, upsampled) → min–max scaled to
[0, 1] per image. Maps are float32 (N, C, H, W) (Grad-CAM++: (N, 1, H, W)).

Two styles (``style=``), see :data:`TEACHER_STYLES`:

- ``"fastsat"`` (default): the methods as published — real guided backprop, IG and Grad-CAM++
  of the teacher's predicted class, Grad-CAM++ with its final ReLU.
- ``"authors"``: what the SAT authors' code computes (METHODS.md §6) — their "guided backprop" is
  the sign of the plain input gradient (:func:`fastsat.saliency.gradient_sign`: their hook never
  fires on a ResNet that uses ``F.relu``), their IG integrates the cross-entropy loss of the true
  label (needs ``labels``), their Grad-CAM++ has no ReLU before the min–max scaling. SmoothGrad
  and ``gradient_sign`` are the same in both styles.

Maps belong to the un-augmented images; :class:`SaliencyDataset` attaches them as the sample's
``"saliency"`` entry, which the data pipeline's crop/flip moves together with the image.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from fastsat import saliency
from fastsat._checks import choice, describe, positive_int
from fastsat._io import atomic_save
from fastsat.data import default_cache_dir
from fastsat.models import default_cam_layer

__all__ = ["TEACHER_METHODS", "TEACHER_STYLES", "SaliencyDataset", "teacher_saliency"]

#: Saliency method → keyword defaults (METHODS.md §2).
TEACHER_METHODS: dict[str, dict] = {
    "guided_backprop": {},
    "gradient_sign": {},
    "smoothgrad": {"n_samples": 10, "sigma": 0.15, "seed": 0},
    "integrated_gradients": {"steps": 100},
    "gradcam_pp": {},
}

#: Style → method → (the saliency method actually run, keyword overrides): the published methods,
#: or what the SAT authors' code computes (see the module docstring).
TEACHER_STYLES: dict[str, dict[str, tuple[str, dict]]] = {
    "fastsat": {method: (method, {}) for method in TEACHER_METHODS},
    "authors": {
        **{method: (method, {}) for method in TEACHER_METHODS},
        "guided_backprop": ("gradient_sign", {}),
        "integrated_gradients": ("integrated_gradients", {"objective": "loss"}),
        "gradcam_pp": ("gradcam_pp", {"relu": False}),
    },
}
_SIGN_METHODS = ("guided_backprop", "gradient_sign")


def _fingerprint(teacher: nn.Module, images: Tensor, method: str, options: dict, labels: Tensor | None) -> str:
    digest = hashlib.sha256()
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(str(tuple(images.shape)).encode() + str(images.dtype).encode())
    digest.update(images.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    if labels is not None:
        digest.update(labels.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps({"method": method, "options": options}, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def teacher_saliency(
    teacher: nn.Module,
    images: Tensor,
    *,
    method: str = "smoothgrad",
    style: str = "fastsat",
    labels: Tensor | None = None,
    batch_size: int = 256,
    cache_dir: str | os.PathLike | None | bool = None,
    **options,
) -> Tensor:
    """SAT maps of ``images`` from ``teacher``, cached under a key of teacher weights, method,
    options and image bytes.

    Args:
        teacher: trained classifier on pixel-space input (its device is used).
        images: (N, C, H, W) uint8 (0–255) or float in [0, 1] — e.g. ``dataset.images``.
        method: one of :data:`TEACHER_METHODS`. options: override its defaults (e.g.
            ``n_samples=25``; ``layer=`` for Grad-CAM++, default :func:`fastsat.models.default_cam_layer`).
        style: "fastsat" (the published methods, of the predicted class) or "authors" (what the
            SAT authors' code computes), see :data:`TEACHER_STYLES`.
        labels: (N,) int64 true labels; needed by ``style="authors"`` with Integrated Gradients
            (the loss of the true label), ignored otherwise.
        batch_size: images per batched saliency call (default 256).
        cache_dir: directory of the cache (default ``fastsat.data.default_cache_dir()``), False
            for no cache. The file is written atomically; an unreadable one is recomputed.

    Returns:
        float32 (N, C, H, W) maps on the CPU (Grad-CAM++: (N, 1, H, W)).
    """
    choice(method, "method", tuple(TEACHER_METHODS))
    choice(style, "style", tuple(TEACHER_STYLES))
    batch_size = positive_int(batch_size, "batch_size")
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise TypeError(f"images: expected an (N, C, H, W) tensor, got {describe(images)}")
    run, overrides = TEACHER_STYLES[style][method]
    options = {**TEACHER_METHODS[method], **overrides, **options}
    if options.get("objective") != "loss":
        labels = None  # only the loss of the true label reads them
    elif not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
        raise ValueError(f"labels: expected ({images.shape[0]},) int64 true labels for the {style!r} style's "
                         f"{method}, got {describe(labels)}")
    if method == "gradcam_pp":
        options.setdefault("layer", default_cam_layer(teacher))
    path = None
    if cache_dir is not False:
        key_options = {k: v for k, v in options.items() if k != "layer"}
        if "layer" in options:
            key_options["layer"] = next(n for n, m in teacher.named_modules() if m is options["layer"])
        directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = directory / f"sat-maps-{method}-{_fingerprint(teacher, images, run, key_options, labels)}.pt"
        if path.exists():
            try:
                return torch.load(path, weights_only=True)
            except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:  # truncated or foreign
                warnings.warn(f"SAT map cache {path} is unreadable ({err}); recomputing it", stacklevel=2)
    device = next(teacher.parameters()).device
    maps = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        target = {} if labels is None else {"target": labels[start : start + batch_size].to(device)}
        # SmoothGrad's seed is the base of a reproducible stream: each batch draws its own noise.
        seeded = {"seed": options["seed"] + start} if options.get("seed") is not None else {}
        raw = saliency.compute(run, teacher, x, **{**options, **seeded}, **target)
        maps.append((raw.sign() if method in _SIGN_METHODS else saliency.minmax_scale(raw)).cpu())
    result = torch.cat(maps)
    if path is not None:
        atomic_save(result, path)
    return result


class SaliencyDataset(torch.utils.data.Dataset):
    """A map-style dataset of sample dicts with a ``"saliency"`` entry added from ``maps`` (N, ...),
    for the ``sat`` recipes with ``maps="saliency"``."""

    def __init__(self, dataset: torch.utils.data.Dataset, maps: Tensor):
        if len(dataset) != maps.shape[0]:
            raise ValueError(f"maps: {maps.shape[0]} maps for a dataset of {len(dataset)} samples")
        self.dataset, self.maps = dataset, maps
        # What a model built for this data reads from a fastsat dataset: its classes and statistics.
        self.classes = getattr(dataset, "classes", None)
        self.mean, self.std = getattr(dataset, "mean", None), getattr(dataset, "std", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "saliency": self.maps[index]}
