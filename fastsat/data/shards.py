"""Sharded on-disk data for runs whose images do not fit in memory, read as a stream.

Layout of a packed data set (written by :func:`pack_shards`, read by :func:`shards`)::

    out_dir/index.json            {"format": "fastsat-shards", "version": 1, "classes": [...],
                                   "annotations": "none" | "box" | "mask", "mean": [...], "std": [...],
                                   "count": N, "shards": [{"file": "shard-000000.tar", "count": n0}, ...]}
    out_dir/shard-000000.tar      samples 0 .. n0-1, each as files sharing a key (WebDataset's layout):
        000000000.jpg             the source image's bytes, never re-encoded (.png, .webp, ... as it was)
        000000000.cls             the label, ASCII decimal
        000000000.json            {"label": 3, "source": "n01/img.JPEG", "box": [x0, y0, x1, y1]}
                                  (box only with boxes: half-open pixels of the source image)
        000000000.mask.png        1-bit segmentation mask at the image's size (only with masks)

Why plain POSIX tar in WebDataset's layout, written with Python's ``tarfile``: a shard is read
front to back (sequential I/O, the fast path of disks and object stores alike), any tar tool can
list or extract it, and the ``webdataset`` package reads these shards as they are
(``webdataset.WebDataset(urls).decode()``), so nothing here is a private format — yet fastsat
needs no dependency for it. What fastsat takes from neither library is the split: WebDataset
hands whole shards to ranks and workers, which gives them unequal sample counts (and DDP ranks
unequal step counts) unless the shard count divides evenly. Here every epoch's sample sequence
(shards in a seeded order, concatenated) is cut into contiguous, near-equal ranges, first across
DDP ranks and then across each rank's loader workers, so every sample is read exactly once per
epoch and per-rank counts differ by at most one. Reading the tar costs little next to decoding
(bench/bench_data.py measures both: see bench/results/).

Shuffling: :func:`pack_shards` writes the samples in a seeded random order (an ImageFolder is sorted
by class); each epoch then visits the shards in a ``(seed, epoch)`` order and passes each worker's
samples through a seeded shuffle buffer. Per-sample augmentation draws from a generator seeded by
``(seed, epoch, sample number)``. Everything is reproducible for a given (seed, epoch, ranks,
workers).
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastsat import _dist
from fastsat._checks import choice, describe, integer, positive_int
from fastsat._checks import seed as check_seed
from fastsat._io import atomic_write, atomic_write_text
from fastsat._random import mix_seed

from .dataset import AnnotatedDataset, check_labels, check_stats, clip_boxes, size_hw
from .readers import ImageFiles, annotated_sample, confined, decode_image, finish_sample, image_folder, pixels
from .transforms import Resize, SampleTransform

__all__ = ["MAX_MEMBER_BYTES", "ShardDataset", "pack_shards", "shards"]

_FORMAT, _VERSION = "fastsat-shards", 1
_IMAGE_EXTENSIONS = ("jpg", "png", "webp", "bmp")


# ----------------------------------------------------------------------------------------------
# Writing


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: identical input, identical shard
    tar.addfile(info, io.BytesIO(data))


def _sample_files(data: ImageFiles, index: int, key: str, root: Path | None) -> list[tuple[str, bytes]]:
    """The tar members of record ``index``: image bytes as they are, label, metadata, mask."""
    record = data.records[index]
    raw = record.image.read_bytes()
    image = decode_image(raw, "image", str(record.image))  # a full decode: a corrupt file fails here, not mid-epoch
    ext = {"jpeg": "jpg"}.get((image.format or "").lower(), (image.format or "").lower())
    if ext not in _IMAGE_EXTENSIONS:
        raise ValueError(f"{record.image}: image format {image.format} is not one of {_IMAGE_EXTENSIONS}")
    source = record.image.relative_to(root) if root is not None and record.image.is_relative_to(root) else record.image
    meta = {"label": record.label, "source": str(source)}
    files = [(f"{key}.{ext}", raw), (f"{key}.cls", str(record.label).encode())]
    if data.annotations == "box":
        box = record.box if record.box is not None else data.parse(record, image)
        h, w = image.size[::-1]
        meta["box"] = clip_boxes(torch.tensor(box, dtype=torch.int64), (h, w)).tolist()
    elif data.annotations == "mask":
        mask = Image.fromarray(np.ascontiguousarray(data.parse(record, image), dtype=bool))
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG")
        files.append((f"{key}.mask.png", buffer.getvalue()))
    files.append((f"{key}.json", json.dumps(meta).encode()))
    return files


def pack_shards(
    source: str | os.PathLike | ImageFiles,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 1000,
    boxes: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    missing_boxes: str = "skip",
    seed: int | None = 0,
) -> Path:
    """Write a data set as tar shards (the format in the module docstring); returns ``index.json``'s path.

    Args:
        source: an ImageFolder directory ``<class>/<image>`` (read with
            :func:`~fastsat.data.image_folder`), or any file reader's :class:`ImageFiles` (Tiny
            ImageNet, Flowers-17, Oxford-IIIT Pet, ...), whose annotations are packed with it
            (not its ``size``: shards keep the source images; :func:`shards` takes the size).
        out_dir: where the shards and ``index.json`` go (created; files of the same names are
            replaced, each atomically, ``index.json`` last).
        shard_size: samples per shard (default 1000: about 110 MB of ImageNet JPEGs).
        boxes: for a directory ``source``: PASCAL VOC XML boxes, as ``image_folder(annotations=)``.
        masks: for a directory ``source``: ``<stem>.png`` masks, as ``image_folder(masks=)``.
        missing_boxes: as :func:`~fastsat.data.image_folder` ("skip", "error", "full").
        seed: the samples are written in the order of a random permutation seeded with it (an
            ImageFolder is sorted by class, which a stream must not be); None keeps the order.

    Every image is decoded once while packing, so an unreadable file fails here, naming it.
    """
    shard_size = positive_int(shard_size, "shard_size")
    seed = None if seed is None else check_seed(seed)
    choice(missing_boxes, "missing_boxes", ("skip", "error", "full"))
    if isinstance(source, ImageFiles):
        if boxes is not None or masks is not None:
            raise ValueError("boxes, masks: an ImageFiles source packs its own annotations; expected None")
        data, root = source, None
    elif isinstance(source, (str, os.PathLike)):
        root = Path(source)
        data = image_folder(root, annotations=boxes, masks=masks, size=None, missing_boxes=missing_boxes)
    else:
        raise TypeError(f"source: expected an ImageFolder directory or an ImageFiles data set, got {describe(source)}")
    out_dir = Path(out_dir)
    order = list(range(len(data)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    entries = []
    for number, start in enumerate(range(0, len(order), shard_size)):
        chunk = order[start : start + shard_size]
        name = f"shard-{number:06d}.tar"

        def write(handle, chunk=chunk, start=start):
            with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for offset, index in enumerate(chunk):
                    for member, blob in _sample_files(data, index, f"{start + offset:09d}", root):
                        _tar_add(tar, member, blob)

        atomic_write(out_dir / name, write)
        entries.append({"file": name, "count": len(chunk)})
    index = {
        "format": _FORMAT,
        "version": _VERSION,
        "classes": list(data.classes),
        "annotations": data.annotations,
        "mean": list(data.mean),
        "std": list(data.std),
        "count": len(order),
        "shards": entries,
    }
    return atomic_write_text(out_dir / "index.json", json.dumps(index, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------
# Reading


#: The largest tar member a shard may hold, in bytes (an image, its mask or its metadata): a
#: crafted shard declaring a bigger one is refused before anything is read.
MAX_MEMBER_BYTES = 64 << 20


def _members(path: Path, skip: int, take: int, count: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Samples ``skip .. skip + take - 1`` of a shard of ``count`` samples as (position, key,
    {extension: bytes}), read front to back; the data of skipped samples is seeked over unread.
    (``tarfile``'s seekable mode: it measured 13k samples/s against 9.5k for its pipe mode ``r|``
    on 50 KiB samples.) A shard that is no tar, holds a sparse or oversized member, or whose
    sample count differs from ``count`` raises ValueError naming it (and the member)."""
    position, key, files = -1, None, {}
    try:
        with open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for member in tar:
                if member.issparse() or member.size > MAX_MEMBER_BYTES:
                    got = "a sparse file" if member.issparse() else f"{member.size} bytes"
                    raise ValueError(f"{path}: member {member.name}: expected a plain file of at most "
                                     f"{MAX_MEMBER_BYTES} bytes (MAX_MEMBER_BYTES), got {got}")
                if not member.isfile():
                    continue
                # WebDataset's rule: the key is the path up to the first dot of the file name.
                folder, _, name = member.name.rpartition("/")
                stem, _, ext = name.partition(".")
                member_key = f"{folder}/{stem}" if folder else stem
                if member_key != key:
                    if files:
                        yield position, key, files
                        files = {}
                    position, key = position + 1, member_key
                    if position >= count:
                        raise ValueError(f"{path}: expected {count} samples (index.json), found more (at member "
                                         f"{member.name})")
                    if position >= skip + take:
                        return
                if position >= skip:
                    files[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as err:
        where = f" at member {key}" if key is not None else ""
        raise ValueError(f"{path}: not a readable tar shard{where} ({err})") from err
    if files:
        yield position, key, files
    if position + 1 < min(skip + take, count):
        raise ValueError(f"{path}: expected {count} samples (index.json), found {position + 1}")


class ShardDataset:
    """A packed data set (see the module docstring), read as a stream by :func:`fastsat.data.dataset_loader`.

    Attributes:
        root: the directory of ``index.json``.
        classes, num_classes: class names (label order) and their number.
        annotations: "none", "box" or "mask" (samples then also get the mask's tight box).
        mean, std: per-channel statistics a model should normalise with (pixel units of [0, 1]
            images), those of the packed reader (ImageNet's for photographs).
        image_size: (H, W) samples are resized to when no per-sample transform is given, or None.
        files, counts: the shard paths and their sample counts, in packed order.

    Shards may come from anyone: ``index.json`` may name only files inside ``root`` (links
    resolved), it and its members are bounded by :data:`MAX_MEMBER_BYTES` (sparse members refused); a
    broken tar, an undecodable image, a bad ``.cls`` or a shard whose sample count differs from
    the index raises ValueError naming the shard and the member.

    ``len(ds)`` is the number of samples; iterating yields them in packed order as float samples
    (one process, every sample), like indexing a map-style data set would; ``materialize()``
    decodes them all into an :class:`AnnotatedDataset`.
    """

    def __init__(self, root: str | os.PathLike, *, size: int | Sequence[int] | None = 224) -> None:
        root = Path(root)
        index_file = root / "index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{index_file}: no such file (write one with fastsat.data.pack_shards)")
        if index_file.stat().st_size > MAX_MEMBER_BYTES:
            raise ValueError(f"{index_file}: expected a shard index of at most {MAX_MEMBER_BYTES} bytes "
                             f"(MAX_MEMBER_BYTES), got {index_file.stat().st_size}")
        try:
            index = json.loads(index_file.read_text())
            if index.get("format") != _FORMAT or index.get("version") != _VERSION:
                raise ValueError(f"not a {_FORMAT} v{_VERSION} index")
            self.classes = [str(c) for c in index["classes"]]
            self.annotations = choice(index["annotations"], "annotations", ("none", "box", "mask"))
            self.mean, self.std = check_stats(index["mean"], index["std"], 3)
            self.files = [confined(root, entry["file"], "shard file", resolve=True) for entry in index["shards"]]
            self.counts = [integer(entry["count"], "count", minimum=1) for entry in index["shards"]]
            if sum(self.counts) != index["count"]:
                raise ValueError(f"shard counts add up to {sum(self.counts)}, not count={index['count']}")
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ValueError(f"{index_file}: malformed shard index ({err})") from err
        self.root = root
        self.image_size = None if size is None else size_hw(size)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return sum(self.counts)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for sample in ShardStream(self):
            sample["image"] = sample["image"].float().div_(255)
            yield sample

    def materialize(self) -> AnnotatedDataset:
        """Decode every sample, in packed order, into whole tensors (needs a fixed ``size``)."""
        if self.image_size is None:
            raise ValueError("size: materialize() needs a fixed output size")
        samples = list(ShardStream(self))
        images = torch.stack([s["image"] for s in samples])
        labels = torch.stack([s["label"] for s in samples])
        boxes = torch.stack([s["box"] for s in samples]) if self.annotations != "none" else None
        masks = torch.stack([s["mask"] for s in samples]) if self.annotations == "mask" else None
        return AnnotatedDataset(images, labels, classes=self.classes, boxes=boxes, masks=masks, mean=self.mean,
                                std=self.std)  # fmt: skip

    def decode(self, files: dict[str, bytes], where: str) -> dict[str, torch.Tensor]:
        """One sample's tar members as a uint8 sample dict at the image's own resolution; ``where``
        (shard and key) names the member in errors."""
        ext = next((e for e in _IMAGE_EXTENSIONS if e in files), None)
        needed = {"box": ["json"], "mask": ["mask.png"]}.get(self.annotations, [])
        if ext is None or any(e not in files for e in ["cls", *needed]):
            raise ValueError(f"{where}: expected an image ({', '.join(_IMAGE_EXTENSIONS)}), a .cls"
                             f"{''.join(f' and a .{e}' for e in needed)}, got {sorted(files)}")
        image = decode_image(files[ext], "image", f"{where}.{ext}")
        text = files["cls"].strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 18):  # 18 digits: any int64
            raise ValueError(f"{where}.cls: expected the label as ASCII decimal digits, got {text[:32]!r}")
        label = int(text)
        check_labels(torch.tensor([label]), self.num_classes, f"{where}.cls")
        box = mask = None
        if self.annotations == "box":
            try:
                box = json.loads(files["json"])["box"]
                if not (isinstance(box, list) and len(box) == 4 and all(type(v) is int and abs(v) < 2**62 for v in box)):
                    raise ValueError(f"box: expected 4 integers, got {box!r:.80}")
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{where}.json: expected {{\"box\": [x0, y0, x1, y1], ...}} ({err})") from err
        elif self.annotations == "mask":
            mask = np.asarray(decode_image(files["mask.png"], "mask", f"{where}.mask.png").convert("L")) > 0
            if mask.shape != tuple(image.size[::-1]):
                raise ValueError(f"{where}.mask.png: mask size {mask.shape[::-1]} does not match the image's "
                                 f"{image.size} (width, height)")
        return annotated_sample(pixels(image), label, box=box, mask=mask)


def shards(root: str | os.PathLike, *, size: int | Sequence[int] | None = 224) -> ShardDataset:
    """Open a data set written by :func:`pack_shards`.

    Args:
        root: the directory holding ``index.json`` and the shards.
        size: output (H, W) in pixels when the loader applies no per-sample transform (default 224);
            None keeps each image's size (then batches need a transform).
    """
    return ShardDataset(Path(root), size=size)


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's samples of a :class:`ShardDataset` for one epoch, split across loader workers.

    Per epoch (``set_epoch``; the value lives in shared memory, so persistent workers see it):
    the shards are ordered (seeded by ``(seed, epoch)`` if ``shuffle``, else packed order), their
    samples concatenated and cut into ``world_size`` contiguous near-equal ranges, rank ``rank``'s
    range again into one per DataLoader worker (:func:`partition`). A worker streams its range
    through a seeded shuffle buffer of ``buffer`` samples (if ``shuffle``), decodes each sample and
    applies ``transform`` (default: resize to the data set's ``image_size``) with a
    ``random.Random`` seeded by ``(seed, epoch, sample number)``. Yields uint8 sample dicts.
    """

    def __init__(
        self,
        data: ShardDataset,
        *,
        transform: SampleTransform | None = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buffer: int = 512,
    ) -> None:
        self.world_size = positive_int(world_size, "world_size")
        self.rank = integer(rank, "rank", minimum=0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank: expected an integer in [0, {self.world_size}), got {self.rank}")
        if transform is None and data.image_size is not None:
            transform = Resize(data.image_size)
        self.data, self.transform, self.shuffle = data, transform, bool(shuffle)
        self.seed, self.buffer = check_seed(seed), positive_int(buffer, "buffer")
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(integer(epoch, "epoch", minimum=0))

    def _order(self, epoch: int) -> list[int]:
        """Shard numbers in this epoch's reading order."""
        n = len(self.data.files)
        if not self.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch))).tolist()

    def worker_range(self, worker: int, workers: int) -> tuple[int, int]:
        """``[start, stop)`` in the epoch's concatenated sample sequence for (this rank, ``worker``)."""
        mine = _dist.shard(len(self.data), self.rank, self.world_size)
        theirs = _dist.shard(len(mine), worker, workers)
        return mine.start + theirs.start, mine.start + theirs.stop

    def count(self, workers: int) -> list[int]:
        """Samples each of ``workers`` loader workers yields per epoch, on this rank."""
        return [stop - start for start, stop in (self.worker_range(w, workers) for w in range(workers))]

    def _plan(self, epoch: int, worker: int, workers: int) -> Iterator[tuple[int, int, int]]:
        """(shard number, skip, take) for the worker's range, in reading order."""
        start, stop = self.worker_range(worker, workers)
        offset = 0
        for shard in self._order(epoch):
            count = self.data.counts[shard]
            lo, hi = max(start, offset), min(stop, offset + count)
            if lo < hi:
                yield shard, lo - offset, hi - lo
            offset += count

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch = int(self._epoch)
        first = [0]
        for count in self.data.counts[:-1]:
            first.append(first[-1] + count)  # the packed number of each shard's first sample
        items = (
            (first[shard] + position, files, f"{self.data.files[shard]}: member {key}")
            for shard, skip, take in self._plan(epoch, worker, workers)
            for position, key, files in _members(self.data.files[shard], skip, take, self.data.counts[shard])
        )
        if self.shuffle:
            items = _shuffled(items, self.buffer, random.Random(mix_seed(self.seed, epoch, self.rank, worker)))
        for number, files, where in items:
            sample = self.data.decode(files, where)
            yield finish_sample(sample, self.transform, random.Random(mix_seed(self.seed, epoch, number)))


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: holds up to ``size`` items and yields a random one as each new one comes in."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        buffer[j], item = item, buffer[j]
        yield item
    rng.shuffle(buffer)
    yield from buffer
