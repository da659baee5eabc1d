"""One place where whatever a data source yields becomes fastsat's batch dict.

Accepted items: the dicts of :mod:`fastsat.data` (``{"image", "label", optional "box", "mask",
"saliency"}``) and ``(x, y)`` / ``[x, y, ...]`` sequences from a user's own DataLoader (extra
elements are ignored).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fastsat.data.loader import loader
from fastsat.data.shards import ShardDataset

__all__ = ["as_batch", "make_loader"]

_OPTIONAL_KEYS = ("box", "mask", "saliency")


def as_batch(item: object, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Normalise one batch to ``{"image": (B, C, H, W) float, "label": (B,) int64, ...}``.

    Args:
        item: a dict with ``"image"`` and ``"label"`` (plus optional ``"box"`` int64 (B, 4)
            half-open pixel boxes, ``"mask"`` bool (B, 1, H, W), ``"saliency"`` float map shaped
            like the image or (B, 1, H, W)), or a sequence ``(x, y, ...)``.
        device: where to move the tensors (non-blocking); None leaves them where they are.

    Returns:
        A new dict; images in pixel space as given (inside the run's ``clip`` box, [0, 1] by default).
    """
    if isinstance(item, Mapping):
        missing = [key for key in ("image", "label") if key not in item]
        if missing:
            raise ValueError(f"batch: a dict batch needs keys 'image' and 'label', missing {missing}")
        batch = {key: item[key] for key in ("image", "label", *_OPTIONAL_KEYS) if item.get(key) is not None}
    elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) >= 2:
        batch = {"image": item[0], "label": item[1]}
    else:
        raise TypeError(f"batch: expected a dict with 'image'/'label' or an (x, y) pair, got {type(item).__name__}")
    image, label = batch["image"], batch["label"]
    if not isinstance(image, Tensor) or not image.is_floating_point() or image.dim() != 4:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise TypeError(f"batch: image must be a float tensor (B, C, H, W), got {shape}")
    if not isinstance(label, Tensor) or label.dtype.is_floating_point or label.shape != image.shape[:1]:
        shape = tuple(label.shape) if isinstance(label, Tensor) else type(label).__name__
        raise TypeError(f"batch: label must be an integer tensor of shape ({image.shape[0]},), got {shape}")
    batch["label"] = label.long()
    if device is not None:
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    return batch


def make_loader(data: object, *, batch_size: int, shuffle: bool, seed: int, device: torch.device, augment: bool = False,
                num_workers: int = 0, rank: int | None = None, world_size: int | None = None):
    """``data`` as an iterable of batches: a map-style dataset (e.g. :func:`fastsat.data.shapes`)
    or a :class:`~fastsat.data.ShardDataset` goes through :func:`fastsat.data.loader`
    (device-resident for in-memory data, worker processes otherwise; ``rank``/``world_size`` as
    there: this process's share, by default torch.distributed's; ``num_workers`` decode file data in
    worker processes); anything else
    iterable with ``len()`` (a user's DataLoader, a list of (x, y) batches) is used as it is, and a
    single ``(x, y)`` tensor pair is one batch."""
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return [data]
    map_style = isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset)
    if map_style or isinstance(data, ShardDataset):
        return loader(data, batch_size=batch_size, shuffle=shuffle, seed=seed, device=device, augment=augment,
                      num_workers=num_workers, rank=rank, world_size=world_size)
    if not hasattr(data, "__iter__") or not hasattr(data, "__len__"):
        raise TypeError(f"data: expected a Dataset or an iterable of batches with len(), got {type(data).__name__}")
    return data
