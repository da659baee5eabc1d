"""Data with annotations: built-in synthetic shapes, readers for data on disk, augmentation, loaders.

A sample is ``{"image": float32 (C, H, W) in [0, 1] (pixel space), "label": int64 (),
"box": int64 (4,) (optional), "mask": bool (1, H, W) (optional)}``; boxes are half-open pixel
coordinates ``(x0, y0, x1, y1)`` (columns ``x0 <= c < x1``, rows ``y0 <= r < y1``) and
``(0, 0, 0, 0)`` is the empty box. A batch is the same dict with a leading batch dimension.
Every data set has ``.mean`` and ``.std`` (per channel, pixel units of [0, 1] images) to build a
model that normalises like it: ``models.create(name, num_classes=..., mean=ds.mean, std=ds.std)``.

A named data set's (train, test) pair, as the CLI reads it: ``data.create("cifar10", "data/cifar")``.
Any data source (an ``(x, y)`` pair, a data set, shards, your own loader) becomes batches with
:func:`as_batches`; :func:`dataset_loader` is the loader it uses for data sets.

Typical use::

    from fastsat import data
    train = data.shapes(50_000, size=32, seed=0)          # cached under $FASTSAT_CACHE
    test = data.shapes(10_000, size=32, seed=1)
    batches = data.dataset_loader(train, batch_size=128, shuffle=True, augment=True, device="cuda")
    for batch in batches:
        x, y, box, mask = batch["image"], batch["label"], batch["box"], batch["mask"]

Data that does not fit in memory: decode in worker processes, crop per sample, prefetch to the
device (see :mod:`fastsat.data.loader`), from image files or from tar shards::

    data.pack_shards("imagenet/train", "shards/train", boxes="imagenet/Annotation")   # once
    train = data.shards("shards/train")
    batches = data.dataset_loader(train, batch_size=256, shuffle=True, transform=data.RandomResizedCrop(224),
                                  num_workers=8, device="cuda")
"""

import functools
import warnings
from collections.abc import Callable

from .augment import Augment, crop_shift, hflip, resize
from .batch import DATA_KINDS, as_batch, as_batches, data_kind
from .dataset import (
    EMPTY_BOX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AnnotatedDataset,
    boxes_from_masks,
    channel_stats,
    clip_boxes,
    rescale_boxes,
)
from .loader import DeviceLoader, DevicePrefetcher, WorkerLoader, dataset_loader
from .readers import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    FLOWERS17_CLASSES,
    ImageFiles,
    Record,
    cifar10,
    cifar100,
    digits,
    flowers17,
    image_folder,
    oxford_pets,
    tiny_imagenet,
)
from .registry import DATASETS, DatasetEntry, create
from .shapes import SHAPE_NAMES, default_cache_dir, generate_shapes, shapes
from .shards import ShardDataset, pack_shards, shards
from .transforms import CenterCrop, RandomResizedCrop, Resize, crop_resize

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "DATA_KINDS",
    "EMPTY_BOX",
    "FLOWERS17_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPE_NAMES",
    "AnnotatedDataset",
    "Augment",
    "CenterCrop",
    "DatasetEntry",
    "DeviceLoader",
    "DevicePrefetcher",
    "ImageFiles",
    "RandomResizedCrop",
    "Record",
    "Resize",
    "ShardDataset",
    "WorkerLoader",
    "as_batch",
    "as_batches",
    "boxes_from_masks",
    "channel_stats",
    "cifar10",
    "cifar100",
    "clip_boxes",
    "create",
    "crop_resize",
    "crop_shift",
    "data_kind",
    "dataset_loader",
    "default_cache_dir",
    "digits",
    "flowers17",
    "generate_shapes",
    "hflip",
    "image_folder",
    "loader",
    "make_loader",
    "oxford_pets",
    "pack_shards",
    "rescale_boxes",
    "resize",
    "shapes",
    "shards",
    "tiny_imagenet",
]


def _renamed(new: Callable, old: str) -> Callable:
    """``new`` under its old name for one release, warning on every call."""

    @functools.wraps(new)
    def alias(*args, **kwargs):
        warnings.warn(f"fastsat.data.{old} is deprecated and will be removed in the next release: use "
                      f"fastsat.data.{new.__name__}", DeprecationWarning, stacklevel=2)
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old
    alias.__doc__ = f"Deprecated alias of :func:`{new.__name__}`."
    return alias


loader = _renamed(dataset_loader, "loader")
make_loader = _renamed(as_batches, "make_loader")
