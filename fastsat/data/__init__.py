"""Data with annotations: built-in synthetic shapes, readers for data on disk, augmentation, loaders.

A sample is ``{"image": float32 (C, H, W) in [0, 1] (pixel space), "label": int64 (),
"box": int64 (4,) (optional), "mask": bool (1, H, W) (optional)}``; boxes are half-open pixel
coordinates ``(x0, y0, x1, y1)`` (columns ``x0 <= c < x1``, rows ``y0 <= r < y1``) and
``(0, 0, 0, 0)`` is the empty box. A batch is the same dict with a leading batch dimension.
Every data set has ``.mean`` and ``.std`` (per channel, pixel units of [0, 1] images) to build a
model that normalises like it: ``models.create(name, num_classes=..., mean=ds.mean, std=ds.std)``.

Typical use::

    from fastsat import data
    train = data.shapes(50_000, size=32, seed=0)          # cached under $FASTSAT_CACHE
    test = data.shapes(10_000, size=32, seed=1)
    batches = data.loader(train, batch_size=128, shuffle=True, augment=True, device="cuda")
    for batch in batches:
        x, y, box, mask = batch["image"], batch["label"], batch["box"], batch["mask"]

Data that does not fit in memory: decode in worker processes, crop per sample, prefetch to the
device (see :mod:`fastsat.data.loader`), from image files or from tar shards::

    data.pack_shards("imagenet/train", "shards/train", boxes="imagenet/Annotation")   # once
    train = data.shards("shards/train")
    batches = data.loader(train, batch_size=256, shuffle=True, transform=data.RandomResizedCrop(224),
                          num_workers=8, device="cuda")
"""

from .augment import Augment, crop_shift, hflip, resize
from .batch import as_batch, make_loader
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
from .loader import DeviceLoader, DevicePrefetcher, WorkerLoader, loader
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
from .shapes import SHAPE_NAMES, default_cache_dir, generate_shapes, shapes
from .shards import ShardDataset, pack_shards, shards
from .transforms import CenterCrop, RandomResizedCrop, Resize, crop_resize

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "EMPTY_BOX",
    "FLOWERS17_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPE_NAMES",
    "AnnotatedDataset",
    "Augment",
    "CenterCrop",
    "DeviceLoader",
    "DevicePrefetcher",
    "ImageFiles",
    "RandomResizedCrop",
    "Record",
    "Resize",
    "ShardDataset",
    "WorkerLoader",
    "as_batch",
    "boxes_from_masks",
    "channel_stats",
    "cifar10",
    "cifar100",
    "clip_boxes",
    "crop_resize",
    "crop_shift",
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
