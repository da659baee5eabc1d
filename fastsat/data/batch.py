"""Data of any kind as batches: :func:`data_kind` tells the kinds of source apart,
:func:`as_batches` iterates any of them, :func:`as_batch` makes what they yield fastsat's batch dict.

Accepted batches: the dicts of :mod:`fastsat.data` (``{"image", "label", optional "box", "mask",
"saliency"}``) and ``(x, y)`` / ``[x, y, ...]`` sequences from a user's own DataLoader (extra
elements are ignored).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fastsat.data.loader import dataset_loader
from fastsat.data.shards import ShardDataset

__all__ = ["DATA_KINDS", "as_batch", "as_batches", "data_kind"]

#: What :func:`data_kind` tells apart.
DATA_KINDS = ("pair", "dataset", "shards", "batches")

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


def data_kind(data: object) -> str:
    """Which kind of data source ``data`` is, one of :data:`DATA_KINDS`:

    - ``"pair"``: an ``(x, y)`` tuple of tensors, one batch;
    - ``"dataset"``: a map-style ``torch.utils.data.Dataset`` (e.g. :func:`fastsat.data.shapes`);
    - ``"shards"``: a :class:`~fastsat.data.ShardDataset`;
    - ``"batches"``: any other iterable with ``len()`` (a user's DataLoader, a list of batches).

    Raises TypeError for anything else."""
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return "pair"
    if isinstance(data, ShardDataset):
        return "shards"
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        return "dataset"
    if hasattr(data, "__iter__") and hasattr(data, "__len__"):
        return "batches"
    raise TypeError(f"data: expected a Dataset or an iterable of batches with len(), got {type(data).__name__}")


def as_batches(data: object, *, batch_size: int, shuffle: bool, seed: int, device: torch.device, augment: bool = False,
               num_workers: int = 0, rank: int | None = None, world_size: int | None = None):
    """Any data source (:func:`data_kind`) as an iterable of batches with ``len()``: a dataset or
    shards through :func:`~fastsat.data.dataset_loader` (the other arguments as there), a pair as
    one batch, an iterable of batches as it is."""
    kind = data_kind(data)
    if kind == "pair":
        return [data]
    if kind in ("dataset", "shards"):
        return dataset_loader(data, batch_size=batch_size, shuffle=shuffle, seed=seed, device=device, augment=augment,
                              num_workers=num_workers, rank=rank, world_size=world_size)
    return data
