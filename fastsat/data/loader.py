"""Batch iteration in two modes: device-resident whole tensors, or a torch DataLoader with workers.

Both yield batch dicts on ``device`` (``image`` float32 (B, C, H, W) in [0, 1], ``label`` int64
(B,), optional ``box`` int64 (B, 4) and ``mask`` bool (B, 1, H, W)) and apply the same batched
:class:`~fastsat.data.augment.Augment` on the device after batching. Shuffling and augmentation
are seeded from ``(seed, epoch)``: the epoch counter advances at each new iteration and can be set
with ``set_epoch`` (e.g. when resuming), so a run is reproducible epoch by epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fastsat._checks import integer, positive_int
from fastsat._checks import seed as check_seed

from .augment import Augment
from .dataset import AnnotatedDataset

__all__ = ["DeviceLoader", "WorkerLoader", "loader"]

Batch = dict[str, torch.Tensor]


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (1 << 63)


class _Loader:
    """Shared state: batch size, shuffling, augmentation, device and the (seed, epoch) counter."""

    def __init__(self, dataset, *, batch_size, shuffle, augment, device, seed, drop_last) -> None:
        batch_size = positive_int(batch_size, "batch_size")
        if augment is True:
            augment = Augment()
        elif augment is False:
            augment = None
        if augment is not None and not callable(augment):
            raise TypeError(f"augment: expected None, a bool or an Augment, got {type(augment).__name__}")
        if len(dataset) == 0:
            raise ValueError("dataset: is empty")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.augment = augment
        self.device = torch.device(device)
        self.seed = check_seed(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use the shuffling/augmentation of epoch ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _generators(self) -> tuple[torch.Generator, torch.Generator]:
        """(CPU generator for the order, device generator for augmentation) of the current epoch."""
        seed = _epoch_seed(self.seed, self.epoch)
        self.epoch += 1
        order = torch.Generator().manual_seed(seed)
        aug = torch.Generator(device=self.device).manual_seed(seed + 1)
        return order, aug

    def _finish(self, batch: Batch, generator: torch.Generator) -> Batch:
        return self.augment(batch, generator) if self.augment is not None else batch


class DeviceLoader(_Loader):
    """Whole data set resident on ``device`` (uint8 images); batches are gathered and augmented there.

    Use it when the data fits in device memory: no worker processes, no host-to-device copy per
    batch. See :func:`loader` for the arguments.
    """

    def __init__(self, dataset: AnnotatedDataset, **kw) -> None:
        if not isinstance(dataset, AnnotatedDataset):
            raise TypeError(f"dataset: DeviceLoader needs an AnnotatedDataset, got {type(dataset).__name__}")
        super().__init__(dataset, **kw)
        self.tensors = {"image": dataset.images.to(self.device), "label": dataset.labels.to(self.device)}
        if dataset.boxes is not None:
            self.tensors["box"] = dataset.boxes.to(self.device)
        if dataset.masks is not None:
            self.tensors["mask"] = dataset.masks.to(self.device)

    def __iter__(self) -> Iterator[Batch]:
        order_gen, aug_gen = self._generators()
        n = len(self.dataset)
        order = torch.randperm(n, generator=order_gen) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            batch = {k: t[idx] for k, t in self.tensors.items()}
            batch["image"] = batch["image"].float().div_(255)
            yield self._finish(batch, aug_gen)


class WorkerLoader(_Loader):
    """A ``torch.utils.data.DataLoader`` over any map-style data set of sample dicts.

    Samples are decoded (and resized by the reader) in ``num_workers`` processes, collated on the
    host, moved to ``device`` and augmented there in batches. See :func:`loader` for the arguments.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, *, num_workers: int = 0, **kw) -> None:
        super().__init__(dataset, **kw)
        self.num_workers = integer(num_workers, "num_workers", minimum=0)

    def __iter__(self) -> Iterator[Batch]:
        order_gen, aug_gen = self._generators()
        batches = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            generator=order_gen,
            pin_memory=self.device.type == "cuda",
        )
        non_blocking = self.device.type == "cuda"
        for batch in batches:
            batch = {k: t.to(self.device, non_blocking=non_blocking) for k, t in batch.items()}
            yield self._finish(batch, aug_gen)


def loader(
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    augment: Augment | bool | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    resident: bool | None = None,
) -> DeviceLoader | WorkerLoader:
    """Iterate over ``dataset`` in batches of sample dicts on ``device``.

    Args:
        dataset: an :class:`AnnotatedDataset` (whole tensors, e.g. :func:`~fastsat.data.shapes`
            or CIFAR) or any map-style dataset of sample dicts (e.g. a file reader).
        batch_size: samples per batch.
        shuffle: reshuffle every epoch.
        augment: an :class:`Augment`, True for ``Augment()`` (4-pixel padded crop + flip), or
            None/False for none. Applied per batch on ``device``.
        device: where batches are delivered (and, in resident mode, where the data lives).
        num_workers: worker processes of the DataLoader mode (ignored in resident mode).
        seed: seeds shuffling and augmentation together with the epoch counter.
        drop_last: drop the last incomplete batch.
        resident: True for :class:`DeviceLoader` (a non-tensor dataset is first decoded with
            :meth:`AnnotatedDataset.from_samples`), False for :class:`WorkerLoader`; None picks
            resident for an :class:`AnnotatedDataset` and workers otherwise.

    Returns:
        An iterable with ``len()`` (batches per epoch) and ``set_epoch(epoch)``.
    """
    common = {"batch_size": batch_size, "shuffle": shuffle, "augment": augment, "device": device, "seed": seed,
              "drop_last": drop_last}  # fmt: skip
    if resident is None:
        resident = isinstance(dataset, AnnotatedDataset)
    if resident:
        if not isinstance(dataset, AnnotatedDataset):
            dataset = AnnotatedDataset.from_samples(dataset, dataset.classes)
        return DeviceLoader(dataset, **common)
    return WorkerLoader(dataset, num_workers=num_workers, **common)
