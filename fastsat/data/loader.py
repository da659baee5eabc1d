"""Batch iteration in two modes: device-resident whole tensors, or worker processes streaming from disk.

Both yield the batch dicts of :mod:`fastsat.data` on ``device`` and apply the same batched
:class:`~fastsat.data.augment.Augment` on the device after batching. Shuffling and augmentation
are seeded from ``(seed, epoch)``: the epoch counter advances at each new iteration and can be set
with ``set_epoch`` (e.g. when resuming), so a run is reproducible epoch by epoch.

Worker mode (:class:`WorkerLoader`, for data that does not fit in memory) builds one
``torch.utils.data.DataLoader`` for the whole run:

* worker processes, kept alive across epochs (``persistent_workers``), decode JPEG/PNG to uint8
  and apply an optional per-sample ``transform`` (e.g.
  :class:`~fastsat.data.transforms.RandomResizedCrop`, which moves masks, boxes and saliency maps
  with the image) with a generator seeded by ``(seed, epoch, sample)`` — the result does not
  depend on the number of workers;
* batches travel as uint8 (4x less than float32) through shared memory into pinned host memory
  (on CUDA), and :class:`DevicePrefetcher` copies batch k+1 to the device on a side stream while
  batch k is being used, then converts it to float there;
* map-style data (files, in-memory tensors): a sampler in the main process deals this rank's share
  of the epoch's order to the workers; shards (:class:`~fastsat.data.shards.ShardDataset`): the
  stream is split across ranks and then across workers (:class:`~fastsat.data.shards.ShardStream`).

Distributed data parallel: ``rank``/``world_size`` (default: from ``torch.distributed`` when it is
initialised) give each rank a disjoint share of every epoch — all ranks together see every sample
exactly once; rank shares differ by at most one sample.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from fastsat import _dist
from fastsat._checks import integer, positive_int
from fastsat._checks import seed as check_seed
from fastsat._random import epoch_seed, mix_seed

from .augment import Augment
from .dataset import AnnotatedDataset, check_stats
from .shards import ShardDataset, ShardStream
from .transforms import SampleTransform

__all__ = ["DeviceLoader", "DevicePrefetcher", "WorkerLoader", "dataset_loader"]

Batch = dict[str, torch.Tensor]


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``(rank, world_size)``: as given, else torch.distributed's when initialised, else (0, 1)."""
    if rank is None and world_size is None:
        return _dist.rank(), _dist.world_size()
    world_size = positive_int(1 if world_size is None else world_size, "world_size")
    rank = integer(0 if rank is None else rank, "rank", minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank: expected an integer in [0, {world_size}) (world_size={world_size}), got {rank}")
    return rank, world_size


def _order(n: int, shuffle: bool, epoch_seed: int) -> torch.Tensor:
    """The epoch's order of ``n`` samples: a permutation seeded by ``epoch_seed``, or 0 .. n-1."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed)) if shuffle else torch.arange(n)


class _Loader:
    """Shared state: batch size, shuffling, augmentation, device, rank and the (seed, epoch) counter."""

    def __init__(self, dataset, *, batch_size, shuffle, augment, device, seed, drop_last, rank, world_size) -> None:
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
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use the shuffling/augmentation of epoch ``epoch``."""
        self.epoch = integer(epoch, "epoch", minimum=0)

    def _batches_of(self, count: int) -> int:
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self._batches_of(len(range(self.rank, len(self.dataset), self.world_size)))

    def _next_epoch(self) -> tuple[int, int, torch.Generator]:
        """(epoch, its seed, device generator for augmentation) of this iteration; advances the counter.

        The batch augmentation's stream is this rank's own (ranks must not draw the same crops and
        flips for their different samples); rank 0's is the single-process one."""
        epoch, seed = self.epoch, epoch_seed(self.seed, self.epoch)
        self.epoch += 1
        augment_seed = seed + 1 if self.rank == 0 else mix_seed(seed, self.rank)
        return epoch, seed, torch.Generator(device=self.device).manual_seed(augment_seed)

    def _finish(self, batch: Batch, generator: torch.Generator) -> Batch:
        return self.augment(batch, generator) if self.augment is not None else batch


class DeviceLoader(_Loader):
    """Whole data set resident on ``device`` (uint8 images); batches are gathered and augmented there.

    Use it when the data fits in device memory: no worker processes, no host-to-device copy per
    batch. See :func:`dataset_loader` for the arguments.
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
        _, seed, aug_gen = self._next_epoch()
        order = _order(len(self.dataset), self.shuffle, seed)[self.rank :: self.world_size].to(self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            batch = {k: t[idx] for k, t in self.tensors.items()}
            batch["image"] = batch["image"].float().div_(255)
            yield self._finish(batch, aug_gen)


class _Keys(torch.utils.data.Sampler):
    """This rank's share of an epoch's order, as ``(index, sample seed)`` keys for :class:`_Reader`.

    Runs in the main process, so setting ``epoch_seed`` reaches persistent workers."""

    def __init__(self, n: int, shuffle: bool, rank: int, world_size: int) -> None:
        self.n, self.shuffle, self.rank, self.world_size = n, shuffle, rank, world_size
        self.epoch_seed = 0

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in _order(self.n, self.shuffle, self.epoch_seed)[self.rank :: self.world_size].tolist():
            yield index, mix_seed(self.epoch_seed, index)


class _Reader(torch.utils.data.Dataset):
    """Worker side of a map-style data set: key ``(index, seed)`` -> the sample, with uint8 image
    where the data set can give one (``read``), after the per-sample transform."""

    def __init__(self, dataset: torch.utils.data.Dataset, transform: SampleTransform | None) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Batch:
        index, seed = key
        rng = random.Random(seed)
        read = getattr(self.dataset, "read", None)
        if read is not None:
            return read(index, self.transform, rng)
        sample = self.dataset[index]
        return sample if self.transform is None else self.transform(sample, rng)


class DevicePrefetcher:
    """Batches from a host iterable, delivered on ``device`` one batch ahead, with images as float.

    Each batch (a dict with ``"image"``, or a sequence ``(x, y, ...)``) is copied to ``device``
    (non-blocking: from pinned memory the copy overlaps compute), then its uint8 images become
    float32 in [0, 1] (``/ 255``) and, if ``mean``/``std`` are given, ``(x - mean) / std`` —
    all on the device. On CUDA the copy and conversion of batch k+1 run on a side stream while the
    caller works on batch k. Float images pass unchanged (apart from the optional normalisation).

    fastsat's models normalise inside (:mod:`fastsat.models`) and attacks work in pixel space, so
    leave ``mean``/``std`` as None for them; they are for models that expect normalised input.

    Args:
        batches: any iterable of batches (e.g. a ``DataLoader``); ``len()`` is passed through.
        device: where batches are delivered.
        mean, std: per-channel statistics (pixel units of [0, 1] images), both or neither.
    """

    def __init__(
        self,
        batches: Iterable,
        device: str | torch.device,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if (mean is None) != (std is None):
            raise ValueError("mean, std: expected both or neither")
        self.batches, self.device = batches, torch.device(device)
        self.mean = self.std = None
        if mean is not None:
            # The channel count is the batches' (unknown here); mean and std must at least agree.
            mean, std = check_stats(mean, std, len(mean))
            self.mean = torch.tensor(mean).view(1, -1, 1, 1).to(self.device)
            self.std = torch.tensor(std).view(1, -1, 1, 1).to(self.device)

    def __len__(self) -> int:
        return len(self.batches)

    def _image(self, image: torch.Tensor) -> torch.Tensor:
        if not image.is_floating_point():
            image = image.float().div_(255)
        if self.mean is not None:
            image = (image - self.mean) / self.std
        return image

    def _load(self, batch: object, stream: torch.cuda.Stream | None) -> object:
        """Issue the copy and conversion of one batch (on ``stream`` when given)."""
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if isinstance(batch, Mapping):
                out = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                       for k, v in batch.items()}  # fmt: skip
                out["image"] = self._image(out["image"])
                return out
            out = [v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for v in batch]
            out[0] = self._image(out[0])
            return type(batch)(out) if isinstance(batch, tuple) else out

    def __iter__(self) -> Iterator:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        batches = iter(self.batches)
        pending = next(batches, None)
        pending = None if pending is None else self._load(pending, stream)
        while pending is not None:
            batch = pending
            if stream is not None:
                # The caller's stream waits for the copy; the tensors must outlive their use there.
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(stream)
                for value in batch.values() if isinstance(batch, Mapping) else batch:
                    if isinstance(value, torch.Tensor):
                        value.record_stream(current)
            following = next(batches, None)
            pending = None if following is None else self._load(following, stream)
            yield batch


class WorkerLoader(_Loader):
    """A ``torch.utils.data.DataLoader`` over a map-style data set of sample dicts or a
    :class:`~fastsat.data.shards.ShardDataset`, built once for the run (see the module docstring).

    Args (besides those of :func:`dataset_loader`):
        num_workers: worker processes (0: decode in the main process).
        transform: per-sample transform applied in the workers (e.g.
            :class:`~fastsat.data.transforms.RandomResizedCrop`); None: the data set's own size.
        prefetch_factor: batches each worker prepares ahead (DataLoader's; default 2).
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset | ShardDataset,
        *,
        num_workers: int = 0,
        transform: SampleTransform | None = None,
        prefetch_factor: int = 2,
        **kw,
    ) -> None:
        super().__init__(dataset, **kw)
        self.num_workers = integer(num_workers, "num_workers", minimum=0)
        if transform is not None and not callable(transform):
            raise TypeError(f"transform: expected None or a per-sample transform, got {type(transform).__name__}")
        self._keys = None
        if isinstance(dataset, ShardDataset):
            self._source = ShardStream(dataset, transform=transform, shuffle=self.shuffle, seed=self.seed,
                                       rank=self.rank, world_size=self.world_size)  # fmt: skip
        else:
            self._keys = _Keys(len(dataset), self.shuffle, self.rank, self.world_size)
            self._source = _Reader(dataset, transform)
        workers = self.num_workers > 0
        self._batches = torch.utils.data.DataLoader(
            self._source,
            batch_size=self.batch_size,
            sampler=self._keys,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers,
            prefetch_factor=positive_int(prefetch_factor, "prefetch_factor") if workers else None,
        )

    def __len__(self) -> int:
        if self._keys is not None:
            return super().__len__()
        # Each worker batches its own part of the stream, so each part ends in its own last batch.
        return sum(self._batches_of(count) for count in self._source.count(max(1, self.num_workers)))

    def __iter__(self) -> Iterator[Batch]:
        epoch, seed, aug_gen = self._next_epoch()
        if self._keys is not None:
            self._keys.epoch_seed = seed
        else:
            self._source.set_epoch(epoch)
        for batch in DevicePrefetcher(self._batches, self.device):
            yield self._finish(batch, aug_gen)


def dataset_loader(
    dataset: torch.utils.data.Dataset | ShardDataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    augment: Augment | bool | None = None,
    transform: SampleTransform | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    resident: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> DeviceLoader | WorkerLoader:
    """Iterate over ``dataset`` in batches of sample dicts on ``device``.

    Args:
        dataset: an :class:`AnnotatedDataset` (whole tensors, e.g. :func:`~fastsat.data.shapes`
            or CIFAR), any map-style dataset of sample dicts (e.g. a file reader), or a
            :class:`~fastsat.data.shards.ShardDataset` (:func:`~fastsat.data.shards`).
        batch_size: samples per batch.
        shuffle: reshuffle every epoch.
        augment: an :class:`Augment`, True for ``Augment()`` (4-pixel padded crop + flip), or
            None/False for none. Applied per batch on ``device``.
        transform: worker mode only: a per-sample transform applied in the workers before
            batching, e.g. ``RandomResizedCrop(224)`` for ImageNet-style training or
            ``CenterCrop(224)`` for evaluation (see :mod:`fastsat.data.transforms`); None resizes to
            the data set's size.
        device: where batches are delivered (and, in resident mode, where the data lives).
        num_workers: worker processes of the worker mode (ignored in resident mode).
        seed: seeds shuffling and augmentation together with the epoch counter.
        drop_last: drop the last incomplete batch (in a sharded stream: of each worker).
        resident: True for :class:`DeviceLoader` (a non-tensor dataset is first decoded with
            its ``materialize()`` or :meth:`AnnotatedDataset.from_samples`), False for
            :class:`WorkerLoader`; None picks resident for an :class:`AnnotatedDataset` and
            workers otherwise.
        rank, world_size: this process's share of every epoch under distributed data parallel;
            default torch.distributed's when it is initialised, else (0, 1).

    Returns:
        An iterable with ``len()`` (batches per epoch on this rank) and ``set_epoch(epoch)``.
    """
    common = {"batch_size": batch_size, "shuffle": shuffle, "augment": augment, "device": device, "seed": seed,
              "drop_last": drop_last, "rank": rank, "world_size": world_size}  # fmt: skip
    if resident is None:
        resident = isinstance(dataset, AnnotatedDataset)
    if resident:
        if transform is not None:
            raise ValueError("transform: per-sample transforms run in loader workers; expected None with resident=True")
        if not isinstance(dataset, AnnotatedDataset):
            materialize = getattr(dataset, "materialize", None)
            dataset = materialize() if materialize is not None else AnnotatedDataset.from_samples(dataset, dataset.classes)
        return DeviceLoader(dataset, **common)
    return WorkerLoader(dataset, num_workers=num_workers, transform=transform, **common)
