"""The named data sets: :data:`DATASETS` maps a name to how its (train, test) pair is read, and
:func:`create` reads one, as ``fastsat train --dataset NAME`` does."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastsat._checks import choice

from .readers import cifar10, cifar100, image_folder, tiny_imagenet
from .shapes import shapes
from .shards import shards

__all__ = ["DATASETS", "DatasetEntry", "create"]


@dataclass(frozen=True)
class DatasetEntry:
    """One row of :data:`DATASETS`.

    read: ``read(root, sized, n_train=, n_test=, num_classes=, seed=) -> (train, test)``; ``root``
        is the folder of the files (None for a generated data set), ``sized`` the keywords passed
        to every reader (``{"size": side}`` or none), the others are for generated data.
    reads_files: whether it needs ``data_dir``.
    """

    read: Callable[..., tuple]
    reads_files: bool = True


def _shapes(root: Path | None, sized: dict, *, n_train: int, n_test: int, num_classes: int, seed: int) -> tuple:
    return (shapes(n_train, seed=seed, num_classes=num_classes, **sized),
            shapes(n_test, seed=seed + 1, num_classes=num_classes, **sized))


def _train_test(read: Callable, train: dict, test: dict) -> Callable[..., tuple]:
    """A reader called once per split, with ``train`` / ``test`` as its split keywords."""

    def read_both(root: Path, sized: dict, **_: object) -> tuple:
        return read(root, **train, **sized), read(root, **test, **sized)

    return read_both


def _in_folders(read: Callable) -> Callable[..., tuple]:
    """A reader of one folder, called on ``root/train`` and ``root/val``."""

    def read_both(root: Path, sized: dict, **_: object) -> tuple:
        return read(root / "train", **sized), read(root / "val", **sized)

    return read_both


DATASETS: dict[str, DatasetEntry] = {
    "shapes": DatasetEntry(_shapes, reads_files=False),
    "cifar10": DatasetEntry(_train_test(cifar10, {"train": True}, {"train": False})),
    "cifar100": DatasetEntry(_train_test(cifar100, {"train": True}, {"train": False})),
    "tiny_imagenet": DatasetEntry(_train_test(tiny_imagenet, {"split": "train"}, {"split": "val"})),
    "imagefolder": DatasetEntry(_in_folders(image_folder)),
    "shards": DatasetEntry(_in_folders(shards)),
}


def create(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    size: int | None = None,
    n_train: int = 5000,
    n_test: int = 1000,
    num_classes: int = 10,
    seed: int = 0,
) -> tuple:
    """The (train, test) data sets named ``name`` (one of :data:`DATASETS`).

    Args:
        data_dir: the folder of the files (cifar10/100: the batches folder; tiny_imagenet: its
            root; imagefolder: with ``train/`` and ``val/`` class folders; shards: with ``train/``
            and ``val/`` written by :func:`~fastsat.data.pack_shards`). Not used by ``shapes``.
        size: image side in pixels; None keeps each reader's default.
        n_train, n_test, num_classes, seed: ``shapes`` only: image counts, classes (2–12) and the
            generator seed of the training images (the test images use ``seed + 1``).
    """
    entry = DATASETS[choice(name, "dataset", tuple(DATASETS))]
    if entry.reads_files and data_dir is None:
        raise ValueError(f"data_dir: dataset {name!r} reads files; expected the folder holding them, got None")
    root = None if data_dir is None else Path(data_dir)
    sized = {} if size is None else {"size": size}
    return entry.read(root, sized, n_train=n_train, n_test=n_test, num_classes=num_classes, seed=seed)
