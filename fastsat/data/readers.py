"""Readers for annotated image data sets as users have them on disk (nothing is ever downloaded).

Every reader returns samples in the format of :mod:`fastsat.data.dataset`, resized to a requested
``size`` (H, W) in pixels with boxes and masks rescaled alongside:

==================  =====================================  =========================  ===============
reader              layout under ``root``                  annotations                returns
==================  =====================================  =========================  ===============
:func:`cifar10`     ``data_batch_1..5``, ``test_batch``    none                       AnnotatedDataset
:func:`cifar100`    ``train``, ``test`` (fine labels)      none                       AnnotatedDataset
:func:`tiny_imagenet` ``wnids.txt``, ``train/<wnid>/...``,  boxes                      ImageFiles
                    ``val/images``, ``val/val_annotations.txt``
:func:`flowers17`   ``jpg/image_XXXX.jpg``,                masks (+ tight boxes)      ImageFiles
                    ``trimaps/image_XXXX.png``
:func:`image_folder` ``<class>/<image>``, VOC ``.xml``     boxes (optional)           ImageFiles
:func:`oxford_pets` ``images/*.jpg``, ``annotations/...``  masks (+ tight boxes)      ImageFiles
:func:`digits`      none: bundled with scikit-learn        none                       AnnotatedDataset
==================  =====================================  =========================  ===============

Errors: a missing file raises FileNotFoundError naming it; an undecodable or malformed file
raises ValueError naming it (at construction for index files, at ``dataset[i]`` for images and
masks); a mask whose size differs from its image, or a label outside ``[0, num_classes)``, raises
ValueError naming the file.

Images are decoded with Pillow to uint8 and resized (:class:`~fastsat.data.transforms.Resize`)
with torch's antialiased bilinear filter; masks with nearest neighbour; boxes with
:func:`~fastsat.data.dataset.rescale_boxes`.

Normalisation statistics (``.mean``/``.std``, per channel, pixel units of [0, 1] images): CIFAR-10
and CIFAR-100 report the published statistics of their training sets (:data:`CIFAR10_MEAN` ...;
the standard deviation over all training pixels, not the often-copied (0.2023, 0.1994, 0.2010),
which is not that statistic); the photograph readers report ImageNet's
(:data:`~fastsat.data.dataset.IMAGENET_MEAN`, :data:`~fastsat.data.dataset.IMAGENET_STD`), the
standard for ImageNet-style data; :func:`digits` reports the exact statistics of its training split.
Test splits report the training statistics too.
"""

from __future__ import annotations

import codecs
import functools
import io
import os
import pickle
import random
import re
import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastsat._checks import choice, describe, number
from fastsat._checks import seed as check_seed

from .augment import resize
from .dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AnnotatedDataset,
    boxes_from_masks,
    channel_stats,
    check_labels,
    check_stats,
    clip_boxes,
    size_hw,
)
from .transforms import Resize, SampleTransform

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "FLOWERS17_CLASSES",
    "ImageFiles",
    "cifar10",
    "cifar100",
    "digits",
    "flowers17",
    "image_folder",
    "oxford_pets",
    "tiny_imagenet",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

#: Oxford Flowers-17 class names, in the order of the image numbers (80 images each).
FLOWERS17_CLASSES = (
    "daffodil", "snowdrop", "lily valley", "bluebell", "crocus", "iris", "tigerlily", "tulip",
    "fritillary", "sunflower", "daisy", "colts' foot", "dandelion", "cowslip", "buttercup",
    "windflower", "pansy",
)  # fmt: skip

#: Per-channel RGB mean and standard deviation of the CIFAR-10 / CIFAR-100 training images, in
#: pixel units of [0, 1] images (over all 50,000 x 32 x 32 pixels).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def confined(folder: Path, name: object, where: str, *, resolve: bool = False) -> Path:
    """``folder / name`` for a ``name`` read from an index file (``where`` names the file and line
    in errors): a non-empty relative path without ".." parts — else a crafted index could read any
    file — and with ``resolve``, one whose target (symbolic links followed) lies inside ``folder``
    too. ValueError otherwise."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise ValueError(f"{where}: expected a relative path inside {folder}, got {name!r:.120}")
    path = folder / name
    if resolve and not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{where}: {name!r} leads outside {folder} (to {path.resolve()})")
    return path


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return path


# ----------------------------------------------------------------------------------------------
# File-backed data


@dataclass(frozen=True)
class Record:
    """One sample on disk.

    ``box`` is in the source image's pixels (half-open); ``annotation`` is the mask image or XML
    file the dataset's annotation parser reads.
    """

    image: Path
    label: int
    box: tuple[int, int, int, int] | None = None
    annotation: Path | None = None


#: Reads a record's annotation file given the decoded image (PIL): returns a bool (H, W) mask
#: array or a source-pixel box ``(x0, y0, x1, y1)``; raises ValueError naming the file on a mismatch.
AnnotationParser = Callable[[Record, Image.Image], object]


class ImageFiles(torch.utils.data.Dataset):
    """Map-style data set decoding image files (and their masks / boxes) on access.

    Args:
        records: the samples; labels must lie in ``[0, len(classes))``.
        classes: class names.
        size: output (H, W) in pixels (int: square); None keeps each image's own size.
        annotations: "none", "box" (``Record.box`` or parsed from ``Record.annotation``) or "mask"
            (parsed from ``Record.annotation``; samples also get the mask's tight box).
        parse: reads ``Record.annotation`` (see :data:`AnnotationParser`); needed unless every
            annotation is a ``Record.box``.
        where: the index file or directory the records come from (named in label errors).
        mean, std: the per-channel statistics a model should normalise with (pixel units of
            [0, 1] images); default ImageNet's.

    ``dataset[i]`` returns ``{"image": float32 (3, H, W) in [0, 1], "label": int64 (),
    "box": int64 (4,)?, "mask": bool (1, H, W)?}``; ``read(i, transform, rng)`` the same with the
    image as uint8, optionally cropped by a per-sample transform (what loader workers use).
    ``materialize()`` decodes everything into an :class:`AnnotatedDataset` for the device-resident
    loader.
    """

    def __init__(
        self,
        records: Sequence[Record],
        classes: Sequence[str],
        *,
        size: int | Sequence[int] | None,
        annotations: str = "none",
        parse: AnnotationParser | None = None,
        where: str | os.PathLike = "records",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        choice(annotations, "annotations", ("none", "box", "mask"))
        if not records:
            raise ValueError(f"{where}: no samples found")
        check_labels(torch.tensor([r.label for r in records]), len(classes), str(where))
        self.records = list(records)
        self.classes = list(classes)
        self.size = None if size is None else size_hw(size)
        self.annotations = annotations
        self.parse = parse
        self.mean, self.std = check_stats(mean, std, 3)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """Output (H, W) in pixels, or None when each image keeps its own size."""
        return self.size

    def __len__(self) -> int:
        return len(self.records)

    def read(
        self, index: int, transform: SampleTransform | None = None, rng: random.Random | None = None
    ) -> dict[str, torch.Tensor]:
        """Sample ``index`` with its image as decoded bytes: what loader workers ship.

        Args:
            index: sample number.
            transform: applied to the sample at the image's own resolution (e.g. a
                :class:`~fastsat.data.transforms.RandomResizedCrop`); None resizes to ``size``
                (or keeps the image as it is when ``size`` is None).
            rng: the transform's randomness.

        Returns:
            ``{"image": uint8 (3, H, W), "label": int64 (), "box": int64 (4,)?, "mask": bool (1, H, W)?}``;
            for "mask" annotations the box is the tight box of the transformed mask.
        """
        record = self.records[index]
        image = decode_image(record.image, "image")
        mask = None if self.annotations != "mask" else self.parse(record, image)
        box = None
        if self.annotations == "box":
            box = record.box if record.box is not None else self.parse(record, image)
        sample = annotated_sample(pixels(image), record.label, box=box, mask=mask)
        if transform is None and self.size is not None:
            transform = Resize(self.size)
        return finish_sample(sample, transform, rng)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.read(index)
        sample["image"] = sample["image"].float().div_(255)
        return sample

    def materialize(self) -> AnnotatedDataset:
        """Decode every sample into whole tensors (needs a fixed ``size``)."""
        if self.size is None:
            raise ValueError("size: materialize() needs a fixed output size")
        return AnnotatedDataset.from_samples(self, self.classes)


def pixels(image: Image.Image) -> torch.Tensor:
    """A decoded PIL image as RGB uint8 (3, H, W) (a view of one fresh copy of its bytes)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def annotated_sample(
    image: torch.Tensor, label: int, *, box: Sequence[int] | None = None, mask: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """The sample dict of a decoded uint8 (C, H, W) image at its own resolution: ``box`` (source
    pixels, half-open) clipped to the image, ``mask`` (bool (H, W) array) as bool (1, H, W)."""
    sample = {"image": image, "label": torch.tensor(label, dtype=torch.int64)}
    if mask is not None:
        sample["mask"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))[None]
    if box is not None:
        sample["box"] = clip_boxes(torch.tensor(box, dtype=torch.int64), tuple(image.shape[-2:]))
    return sample


def finish_sample(
    sample: dict[str, torch.Tensor], transform: SampleTransform | None, rng: random.Random | None
) -> dict[str, torch.Tensor]:
    """Apply ``transform``; a masked sample's box becomes the tight box of its final mask."""
    if transform is not None:
        sample = transform(sample, rng)
    if "mask" in sample:
        sample["box"] = boxes_from_masks(sample["mask"][None])[0]
    sample["image"] = sample["image"].contiguous()
    return sample


def decode_image(source: Path | bytes, what: str, name: str | None = None) -> Image.Image:
    """Fully decode an image file (or its bytes, called ``name`` in errors); errors name it.

    The file is read whole and decoded from memory: no file handle outlives the call, and the
    decoded image needs no copy (a copy per sample measured ~5% of a 224-pixel training sample).
    """
    where = source if name is None else name
    if isinstance(source, Path):
        source = _require(source).read_bytes()
    try:
        image = Image.open(io.BytesIO(source))
        image.load()
    # What Pillow's decoders raise on corrupt, truncated or crafted files (a decompression bomb:
    # more than twice Image.MAX_IMAGE_PIXELS pixels).
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as err:
        raise ValueError(f"{where}: cannot decode {what} ({type(err).__name__}: {err})") from err
    return image


def _open_mask(record: Record, image: Image.Image) -> Image.Image:
    """Decode ``record.annotation``, checking that it has the size of the decoded ``image``."""
    mask = decode_image(record.annotation, "mask")
    if mask.size != image.size:
        raise ValueError(
            f"{record.annotation}: mask size {mask.size[0]}x{mask.size[1]} does not match image "
            f"{record.image} size {image.size[0]}x{image.size[1]} (width x height)"
        )
    return mask


# ----------------------------------------------------------------------------------------------
# CIFAR


def _dtype_without_objects(*args: object) -> np.dtype:
    """``numpy.dtype`` for the unpickler, refusing object dtypes (whose items would be pickles)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"object dtype {dtype} (CIFAR arrays are uint8)")
    return dtype


@functools.cache
def _cifar_globals() -> dict[tuple[str, str], object]:
    """What the CIFAR python batches may reference, by (module, name): numpy arrays and dtypes
    under numpy 1's and numpy 2's module names (the published files were written by Python 2's
    cPickle with numpy 1; re-pickled ones by numpy 2, protocol 5 via ``_frombuffer``), and
    ``_codecs.encode``, which Python 3 uses for bytes in pickles of protocol <= 2."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _dtype_without_objects,
             ("_codecs", "encode"): codecs.encode}
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, str/bytes, numbers and numpy arrays, and nothing else: a pickle can
    name any importable callable, so a crafted batch would otherwise run code when read."""

    def find_class(self, module: str, name: str) -> object:
        allowed = _cifar_globals().get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name} (a CIFAR batch holds only "
                                         "dicts, lists, bytes and numpy arrays)")
        return allowed


def _unpickle(path: Path) -> dict[str, object]:
    _require(path)
    try:
        with open(path, "rb") as f:
            blob = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as err:  # pickle raises many types on a corrupt file
        raise ValueError(f"{path}: not a readable CIFAR pickle batch ({err})") from err
    if isinstance(blob, dict):
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in blob.items()}
    raise ValueError(f"{path}: not a CIFAR pickle batch (expected a dict, got {type(blob).__name__})")


def _cifar(files: list[Path], label_key: str, classes: list[str], size, stats: tuple) -> AnnotatedDataset:
    images, labels = [], []
    for path in files:
        blob = _unpickle(path)
        if "data" not in blob or label_key not in blob:
            raise ValueError(f"{path}: missing 'data' or {label_key!r} in CIFAR batch")
        # The types first: a cast would wrap other values into [0, 255] silently, and a nested list
        # (which a pickle can make of repeated references) could expand without bound.
        data, raw_labels = blob["data"], blob[label_key]
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8):
            raise ValueError(f"{path}: expected 'data' as a uint8 numpy array, got {describe(data)}")
        integers = (isinstance(raw_labels, list) and all(type(v) is int and abs(v) < 2**62 for v in raw_labels)) or (
            isinstance(raw_labels, np.ndarray) and raw_labels.ndim == 1 and raw_labels.dtype.kind in "iu")
        if not integers:
            raise ValueError(f"{path}: expected {label_key!r} as a list of integers, got {describe(raw_labels)}")
        batch_labels = torch.as_tensor(np.asarray(raw_labels, dtype=np.int64))
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != batch_labels.numel():
            raise ValueError(
                f"{path}: expected 'data' of shape (N, 3072) with N labels, got {data.shape} "
                f"and {batch_labels.numel()} labels"
            )
        check_labels(batch_labels, len(classes), str(path))
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(batch_labels)
    mean, std = stats
    data = AnnotatedDataset(torch.cat(images), torch.cat(labels), classes=classes, mean=mean, std=std)
    hw = None if size is None else size_hw(size)
    if hw is None or hw == (32, 32):
        return data
    resized = [
        resize({"image": data.images[i : i + 1024].float().div_(255)}, hw)["image"].mul_(255).round_().to(torch.uint8)
        for i in range(0, len(data), 1024)
    ]
    return AnnotatedDataset(torch.cat(resized), data.labels, classes=classes, mean=mean, std=std)


def _meta_names(path: Path, key: str, count: int) -> list[str]:
    if not path.exists():
        return [str(i) for i in range(count)]
    names = _unpickle(path).get(key)
    if names is None or len(names) != count:
        raise ValueError(f"{path}: expected {count} names under {key!r}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def cifar10(
    root: str | os.PathLike, *, train: bool = True, size: int | Sequence[int] | None = None
) -> AnnotatedDataset:
    """CIFAR-10 from the python pickle batches in ``root`` (``cifar-10-batches-py``).

    Args:
        root: directory holding ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and
            optionally ``batches.meta`` (class names).
        train: the 50,000 training images, else the 10,000 test images.
        size: output (H, W) in pixels; None keeps 32x32.

    ``.mean``/``.std`` are :data:`CIFAR10_MEAN`/:data:`CIFAR10_STD` (for either split).

    The batches are Python pickles, read by an unpickler that builds only dicts, lists, bytes,
    numbers and numpy arrays: a file naming anything else (which could run code) is refused with
    a ValueError naming it.
    """
    root = Path(root)
    files = [root / f"data_batch_{i}" for i in range(1, 6)] if train else [root / "test_batch"]
    classes = _meta_names(root / "batches.meta", "label_names", 10)
    return _cifar(files, "labels", classes, size, (CIFAR10_MEAN, CIFAR10_STD))


def cifar100(
    root: str | os.PathLike, *, train: bool = True, size: int | Sequence[int] | None = None
) -> AnnotatedDataset:
    """CIFAR-100 (fine labels, 100 classes) from ``root`` (``cifar-100-python``): files ``train``,
    ``test`` and optionally ``meta``. Arguments as :func:`cifar10`; ``.mean``/``.std`` are
    :data:`CIFAR100_MEAN`/:data:`CIFAR100_STD`."""
    root = Path(root)
    classes = _meta_names(root / "meta", "fine_label_names", 100)
    return _cifar([root / ("train" if train else "test")], "fine_labels", classes, size, (CIFAR100_MEAN, CIFAR100_STD))


# ----------------------------------------------------------------------------------------------
# Tiny ImageNet


def _read_lines(path: Path) -> list[tuple[int, list[str]]]:
    """Non-empty, non-comment lines of a text file as (line number, whitespace-split fields)."""
    try:
        text = _require(path).read_text()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a text file ({err})") from err
    return [
        (n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.startswith("#")
    ]


def _ints(fields: list[str], path: Path, lineno: int) -> tuple[int, ...]:
    try:
        return tuple(int(f) for f in fields)
    except ValueError as err:
        raise ValueError(f"{path}:{lineno}: expected integers, got {fields}") from err


def tiny_imagenet(
    root: str | os.PathLike, *, split: str = "train", size: int | Sequence[int] | None = 64
) -> ImageFiles:
    """Tiny ImageNet (200 classes, 64x64) with its bounding boxes.

    Args:
        root: directory holding ``wnids.txt`` (class order = label order), ``train/<wnid>/images/``
            with ``train/<wnid>/<wnid>_boxes.txt`` (``file x0 y0 x1 y1`` per line) and
            ``val/images/`` with ``val/val_annotations.txt`` (``file wnid x0 y0 x1 y1``).
        split: "train" or "val" (the test split has no labels).
        size: output (H, W) in pixels; default 64 (native).

    Box corners in the files are inclusive pixel indices; samples carry them half-open.
    """
    choice(split, "split", ("train", "val"))
    root = Path(root)
    wnids_file = root / "wnids.txt"
    wnid_lines = _read_lines(wnids_file)
    for lineno, fields in wnid_lines:  # each names a folder
        confined(root / "train", fields[0], f"{wnids_file}:{lineno}")
    wnids = [fields[0] for _, fields in wnid_lines]
    index = {w: i for i, w in enumerate(wnids)}
    records = []

    def box_of(fields: list[str], path: Path, lineno: int) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = _ints(fields, path, lineno)
        return (x0, y0, x1 + 1, y1 + 1)

    if split == "train":
        for wnid in wnids:
            boxes_file = root / "train" / wnid / f"{wnid}_boxes.txt"
            for lineno, fields in _read_lines(boxes_file):
                if len(fields) != 5:
                    raise ValueError(f"{boxes_file}:{lineno}: expected 'file x0 y0 x1 y1', got {fields}")
                image = confined(root / "train" / wnid / "images", fields[0], f"{boxes_file}:{lineno}")
                records.append(Record(_require(image), index[wnid], box_of(fields[1:], boxes_file, lineno)))
        where = root / "train"
    else:
        where = root / "val" / "val_annotations.txt"
        for lineno, fields in _read_lines(where):
            if len(fields) != 6:
                raise ValueError(f"{where}:{lineno}: expected 'file wnid x0 y0 x1 y1', got {fields}")
            if fields[1] not in index:
                raise ValueError(f"{where}:{lineno}: class {fields[1]!r} is not in {wnids_file} (label out of range)")
            image = confined(root / "val" / "images", fields[0], f"{where}:{lineno}")
            records.append(Record(_require(image), index[fields[1]], box_of(fields[2:], where, lineno)))
    return ImageFiles(records, wnids, size=size, annotations="box", where=where)


# ----------------------------------------------------------------------------------------------
# Oxford Flowers-17


def flowers17(
    root: str | os.PathLike,
    *,
    size: int | Sequence[int] | None = 224,
    segmented_only: bool = True,
    indices: Iterable[int] | None = None,
    foreground_rgb: tuple[int, int, int] = (128, 0, 0),
) -> ImageFiles:
    """Oxford Flowers-17 with its segmentations (trimaps).

    Args:
        root: directory holding ``jpg/image_XXXX.jpg`` (1-based numbers; images 80k+1 .. 80k+80
            are class k) and, for masks, ``trimaps/image_XXXX.png``.
        size: output (H, W) in pixels; default 224.
        segmented_only: keep only the images that have a trimap and give them masks (and the
            masks' tight boxes); False gives all images without masks.
        indices: optional image numbers (1-based) of a split, e.g. ``trn1`` from ``datasplits.mat``.
        foreground_rgb: trimap colour of the flower (the VOC-palette red the trimaps use); every
            other colour is background.
    """
    root = Path(root)
    jpg_dir = _require(root / "jpg")
    wanted = None if indices is None else {int(i) for i in indices}
    records = []
    for path in sorted(jpg_dir.iterdir()):
        match = re.fullmatch(r"image_(\d{4})\.jpg", path.name)
        if match is None:
            continue
        number = int(match.group(1))
        if wanted is not None and number not in wanted:
            continue
        label = (number - 1) // 80
        if number < 1 or label >= len(FLOWERS17_CLASSES):
            raise ValueError(f"{path}: image number {number} gives label {label}, out of range [0, 17)")
        trimap = root / "trimaps" / f"image_{number:04d}.png"
        if segmented_only:
            if not trimap.exists():
                continue
            records.append(Record(path, label, annotation=trimap))
        else:
            records.append(Record(path, label))
    if segmented_only:
        _require(root / "trimaps")
    colour = np.asarray(foreground_rgb, dtype=np.uint8)

    def parse(record: Record, image: Image.Image) -> np.ndarray:
        trimap = np.asarray(_open_mask(record, image).convert("RGB"))
        return (trimap == colour).all(axis=-1)

    return ImageFiles(
        records,
        FLOWERS17_CLASSES,
        size=size,
        annotations="mask" if segmented_only else "none",
        parse=parse,
        where=jpg_dir,
    )


# ----------------------------------------------------------------------------------------------
# ImageFolder with PASCAL VOC XML boxes (ImageNet's train boxes)


def _voc_box(record: Record, image: Image.Image) -> tuple[int, int, int, int]:
    """Union of all object boxes in a PASCAL VOC XML file, half-open in source pixels."""
    path = record.annotation
    try:
        tree = ET.parse(_require(path)).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{path}: malformed XML ({err})") from err
    size = tree.find("size")
    if size is not None and size.findtext("width") and size.findtext("height"):
        try:
            xml_wh = (int(size.findtext("width")), int(size.findtext("height")))
        except ValueError as err:
            raise ValueError(f"{path}: <size> needs integer width and height ({err})") from err
        if xml_wh != image.size:
            raise ValueError(
                f"{path}: annotated size {xml_wh[0]}x{xml_wh[1]} does not match image {record.image} "
                f"size {image.size[0]}x{image.size[1]} (width x height)"
            )
    boxes = []
    for obj in tree.iter("bndbox"):
        try:
            xmin, ymin, xmax, ymax = (int(float(obj.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError, OverflowError) as err:  # OverflowError: int(float("inf"))
            raise ValueError(f"{path}: bndbox needs numeric xmin, ymin, xmax, ymax") from err
        boxes.append((xmin - 1, ymin - 1, xmax, ymax))  # 1-based inclusive -> 0-based half-open
    if not boxes:
        raise ValueError(f"{path}: no <bndbox> in annotation")
    x0, y0, x1, y1 = zip(*boxes)
    return (min(x0), min(y0), max(x1), max(y1))


def image_folder(
    root: str | os.PathLike,
    *,
    annotations: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    size: int | Sequence[int] | None = 224,
    missing_boxes: str = "skip",
) -> ImageFiles:
    """ImageFolder layout ``root/<class>/<image>`` with optional PASCAL VOC XML boxes or masks.

    Args:
        root: one sub-directory per class (sorted names = label order) holding images
            (.jpg/.jpeg/.png/.bmp/.webp, any case).
        annotations: directory of ``<image stem>.xml`` files, flat or in ``<class>/``
            sub-directories (ImageNet's ``Annotation/<wnid>/<stem>.xml``); None: no boxes.
        masks: instead of ``annotations``, a directory of ``<image stem>.png`` segmentation masks
            (flat or in ``<class>/`` sub-directories) the size of their images; a nonzero pixel
            is the object. Samples also get the mask's tight box.
        size: output (H, W) in pixels; default 224. Boxes are rescaled with the image.
        missing_boxes: for an image without its XML (or mask) file: "skip" it, "error", or "full"
            (box, or mask, = the whole image).

    A sample's box is the union of all ``<bndbox>`` elements in its XML (corners read as VOC's
    1-based inclusive pixels); the XML's ``<size>``, when present, must match the image.
    """
    choice(missing_boxes, "missing_boxes", ("skip", "error", "full"))
    if annotations is not None and masks is not None:
        raise ValueError("annotations, masks: expected boxes (annotations=) or masks (masks=), got both")
    root = _require(Path(root))
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    kind, folder, suffix = ("box", annotations, ".xml") if masks is None else ("mask", masks, ".png")
    files = {}
    if folder is not None:
        files = {p.stem: p for p in _require(Path(folder)).rglob("*" + suffix)}
    records = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if folder is None:
                records.append(Record(path, label))
            elif path.stem in files:
                records.append(Record(path, label, annotation=files[path.stem]))
            elif missing_boxes == "error":
                what = "box annotation" if kind == "box" else "mask"
                raise FileNotFoundError(f"{Path(folder) / (path.stem + suffix)}: no {what} for {path}")
            elif missing_boxes == "full":
                # No annotation file: the mask parser covers the image; the box is larger than
                # any image and clipped to it when decoded.
                records.append(Record(path, label, box=(0, 0, 1 << 30, 1 << 30) if kind == "box" else None))
    return ImageFiles(
        records,
        classes,
        size=size,
        annotations="none" if folder is None else kind,
        parse=_voc_box if kind == "box" else _nonzero_mask,
        where=root,
    )


def _nonzero_mask(record: Record, image: Image.Image) -> np.ndarray:
    """The nonzero pixels of ``record.annotation`` (any image mode), or the whole image without one."""
    if record.annotation is None:
        return np.ones(image.size[::-1], dtype=bool)
    return np.asarray(_open_mask(record, image).convert("L")) > 0


# ----------------------------------------------------------------------------------------------
# Oxford-IIIT Pet


def oxford_pets(
    root: str | os.PathLike, *, split: str | None = None, size: int | Sequence[int] | None = 224
) -> ImageFiles:
    """Oxford-IIIT Pet (37 breeds) with trimap masks.

    Args:
        root: directory holding ``images/<name>.jpg`` and ``annotations/`` with ``list.txt``
            (``name class_id species breed_id``, class ids 1..37), ``trainval.txt``/``test.txt``
            and ``trimaps/<name>.png`` (1 = pet, 2 = background, 3 = border).
        split: None (all of ``list.txt``), "trainval" or "test".
        size: output (H, W) in pixels; default 224.

    The mask is the pet including its border region (trimap value 1 or 3); samples also get the
    mask's tight box.
    """
    root = Path(root)
    choice(split, "split", (None, "trainval", "test"))
    index_file = root / "annotations" / ("list.txt" if split is None else f"{split}.txt")
    records, names = [], {}
    for lineno, fields in _read_lines(index_file):
        if len(fields) < 2:
            raise ValueError(f"{index_file}:{lineno}: expected 'name class_id species breed_id', got {fields}")
        (class_id,) = _ints(fields[1:2], index_file, lineno)
        if not 1 <= class_id <= 37:
            raise ValueError(f"{index_file}:{lineno}: class id {class_id} out of range [1, 37]")
        names.setdefault(class_id - 1, fields[0].rsplit("_", 1)[0])
        image = _require(confined(root / "images", f"{fields[0]}.jpg", f"{index_file}:{lineno}"))
        trimap = confined(root / "annotations" / "trimaps", f"{fields[0]}.png", f"{index_file}:{lineno}")
        records.append(Record(image, class_id - 1, annotation=trimap))
    classes = [names.get(i, str(i + 1)) for i in range(37)]

    def parse(record: Record, image: Image.Image) -> np.ndarray:
        trimap = np.asarray(_open_mask(record, image).convert("L"))
        return (trimap == 1) | (trimap == 3)

    return ImageFiles(records, classes, size=size, annotations="mask", parse=parse, where=index_file)


# ----------------------------------------------------------------------------------------------
# scikit-learn's handwritten digits (bundled with the package: a real data set without a download)


def digits(
    *, train: bool = True, test_fraction: float = 0.25, seed: int = 0, size: int | Sequence[int] | None = None,
    ink: float = 0.5,
) -> AnnotatedDataset:
    """scikit-learn's handwritten digits (UCI optical digits test set): 1,797 grey 8x8 images of
    the digits 0–9, shipped inside the scikit-learn package (``sklearn.datasets.load_digits``),
    so it needs no download: a real data set for Etmann et al.'s MNIST-style experiments on a CPU.

    Args:
        train: the training split, else the test split.
        test_fraction: share of the 1,797 images in the test split (default 0.25: 1,348 / 449),
            strictly between 0 and 1.
        seed: seed of the random permutation that splits them (the same seed gives the same,
            disjoint splits).
        size: output (H, W) in pixels; None keeps 8x8.
        ink: grey level (fraction of white, default 0.5) at or above which a pixel is ink: the
            masks are the ink, the boxes its tight bounding box (SAT's weak maps).

    Returns:
        An :class:`AnnotatedDataset` of uint8 (N, 1, H, W) images (the 0–16 grey levels scaled to
        0–255, rounded; ink is light on a dark ground), int64 labels 0–9, classes "0".."9", bool
        (N, 1, H, W) ink masks and int64 (N, 4) boxes; ``.mean``/``.std`` are the exact
        statistics of the training split (for either split).

    Raises:
        ImportError: scikit-learn is not installed (``pip install scikit-learn``, or
            ``pip install fastsat[paper]``).
    """
    test_fraction = number(test_fraction, "test_fraction", minimum=0, maximum=1, exclusive_min=True, exclusive_max=True)
    ink = number(ink, "ink", minimum=1 / 255, maximum=1)  # below one grey level every pixel would be ink
    seed = check_seed(seed)
    try:
        from sklearn.datasets import load_digits  # optional dependency: imported only when this reader is used
    except ImportError as err:
        raise ImportError(
            "digits: needs the scikit-learn package (it ships the data set); install it with "
            "`pip install scikit-learn` or `pip install fastsat[paper]`"
        ) from err
    bunch = load_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8))[:, None]
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(labels))
    test_part, train_part = order[:n_test], order[n_test:]
    if size is not None and size_hw(size) != (8, 8):
        images = resize({"image": images}, size_hw(size))["image"]
    mean, std = channel_stats(images[train_part])
    part = train_part if train else test_part
    masks = images[part] >= round(ink * 255)
    return AnnotatedDataset(images[part], labels[part], classes=[str(d) for d in range(10)], boxes=boxes_from_masks(masks),
                            masks=masks, mean=mean, std=std)
