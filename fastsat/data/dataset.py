"""In-memory annotated image data and the box/mask geometry shared by every reader.

Conventions used throughout :mod:`fastsat.data`:

* A **sample** is a dict ``{"image": float32 (C, H, W) in [0, 1] (pixel space), "label": int64 ()}``
  plus, when the data has them, ``"box": int64 (4,)`` and ``"mask": bool (1, H, W)``. A dataset
  either has boxes for every sample or for none (likewise masks), so ``default_collate`` always
  sees the same keys; a batch is the same dict with a leading batch dimension B.
* A **box** is ``(x0, y0, x1, y1)`` in half-open pixel coordinates: the object covers columns
  ``x0 <= c < x1`` and rows ``y0 <= r < y1``. The empty box is ``(0, 0, 0, 0)`` (it covers no
  pixel, so a box-based saliency map is -1 everywhere).
* Every data set has ``.mean`` and ``.std``: per-channel tuples in pixel units of [0, 1] images,
  the statistics a model should normalise its input with
  (``fastsat.models.create(name, num_classes=..., mean=ds.mean, std=ds.std)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastsat._checks import describe, number, positive_int

__all__ = [
    "EMPTY_BOX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AnnotatedDataset",
    "boxes_from_masks",
    "channel_stats",
    "check_labels",
    "check_stats",
    "clip_boxes",
    "rescale_boxes",
    "size_hw",
]

#: The box that covers no pixel.
EMPTY_BOX = (0, 0, 0, 0)

#: ImageNet's per-channel RGB mean and standard deviation in pixel units of [0, 1] images (the
#: published values every ImageNet model uses); fastsat's readers of ImageNet-style photographs
#: (Tiny ImageNet, Flowers-17, ImageFolder, Oxford-IIIT Pet, shards) report them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Stats = tuple[float, ...]


def channel_stats(images: torch.Tensor) -> tuple[Stats, Stats]:
    """Exact per-channel mean and (population) standard deviation of uint8 images, in pixel units
    of [0, 1] images.

    Args:
        images: uint8 (N, C, H, W), pixel value = 255 * intensity.

    Returns:
        ``(mean, std)``, two tuples of C floats. Computed from a 256-bin histogram per channel in
        float64, so there is no rounding from summing millions of values and no float copy.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError(f"images: expected a uint8 tensor of shape (N, C, H, W), got {describe(images)}")
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        p = counts / counts.sum()
        mean = float((p * values).sum())
        means.append(mean)
        stds.append(float((p * (values - mean) ** 2).sum().sqrt()))
    return tuple(means), tuple(stds)


def check_stats(mean: Sequence[float], std: Sequence[float], channels: int) -> tuple[Stats, Stats]:
    """``(mean, std)`` as tuples of ``channels`` floats, each mean in [0, 1] and each std > 0."""
    for name, value in (("mean", mean), ("std", std)):
        if not isinstance(value, Sequence) or len(value) != channels:
            raise ValueError(f"{name}: expected {channels} values (one per channel), got {describe(value)}")
    return (tuple(number(m, "mean", minimum=0, maximum=1) for m in mean),
            tuple(number(s, "std", minimum=0, exclusive_min=True) for s in std))  # fmt: skip


def size_hw(size: int | Sequence[int], name: str = "size") -> tuple[int, int]:
    """``size`` (an int for a square, or (H, W)) as a pair of positive Python ints, in pixels."""
    if isinstance(size, Sequence) and not isinstance(size, str):
        if len(size) != 2:
            raise ValueError(f"{name}: expected a positive int or (H, W) in pixels, got {describe(size)}")
        return positive_int(size[0], name), positive_int(size[1], name)
    side = positive_int(size, name)
    return side, side


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight half-open boxes of boolean masks.

    Args:
        masks: bool (B, 1, H, W) or (B, H, W).

    Returns:
        int64 (B, 4) boxes ``(x0, y0, x1, y1)``; the empty box ``(0, 0, 0, 0)`` for an empty mask.
    """
    if masks.dtype != torch.bool:
        raise TypeError(f"masks: expected a bool tensor, got {masks.dtype}")
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"masks: expected shape (B, 1, H, W), got {tuple(masks.shape)}")
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise ValueError(f"masks: expected shape (B, 1, H, W) or (B, H, W), got {tuple(masks.shape)}")
    h, w = masks.shape[-2:]
    cols = masks.any(dim=1)  # (B, W)
    rows = masks.any(dim=2)  # (B, H)
    # argmax returns the first maximal index, so the first True from each end.
    x0 = cols.int().argmax(dim=1)
    x1 = w - cols.flip(1).int().argmax(dim=1)
    y0 = rows.int().argmax(dim=1)
    y1 = h - rows.flip(1).int().argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).long()
    boxes[~cols.any(dim=1)] = 0
    return boxes


def rescale_boxes(boxes: torch.Tensor, from_hw: Sequence[int], to_hw: Sequence[int]) -> torch.Tensor:
    """Rescale half-open pixel boxes from an (H, W) image to an (H', W') image.

    The rescaled box is the smallest integer box that contains the scaled continuous box
    (floor of the start, ceil of the end), so an object is never cut by rounding; empty boxes stay
    empty.

    Args:
        boxes: int64 (..., 4) in pixels of the ``from_hw`` image.
        from_hw: (H, W) of the source image in pixels.
        to_hw: (H', W') of the target image in pixels.

    Returns:
        int64 (..., 4) in pixels of the ``to_hw`` image.
    """
    (h, w), (th, tw) = from_hw, to_hw
    if min(h, w, th, tw) <= 0:
        raise ValueError(f"from_hw/to_hw: expected positive sizes, got {tuple(from_hw)} -> {tuple(to_hw)}")
    boxes = boxes.long()
    x0, y0, x1, y1 = boxes.unbind(-1)
    # Integer arithmetic keeps the rounding exact: floor(a*t/s) and ceil(b*t/s).
    out = torch.stack(
        [
            torch.div(x0 * tw, w, rounding_mode="floor"),
            torch.div(y0 * th, h, rounding_mode="floor"),
            -torch.div(-x1 * tw, w, rounding_mode="floor"),
            -torch.div(-y1 * th, h, rounding_mode="floor"),
        ],
        dim=-1,
    )
    empty = (x1 <= x0) | (y1 <= y0)
    return out.masked_fill(empty.unsqueeze(-1), 0)


def clip_boxes(boxes: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
    """Clip half-open boxes to an (H, W) image; a box left with no pixel becomes ``(0, 0, 0, 0)``.

    Args:
        boxes: int64 (..., 4) in pixels.
        hw: (H, W) of the image in pixels.
    """
    h, w = hw
    x0, y0, x1, y1 = boxes.unbind(-1)
    out = torch.stack([x0.clamp(0, w), y0.clamp(0, h), x1.clamp(0, w), y1.clamp(0, h)], dim=-1)
    empty = (out[..., 2] <= out[..., 0]) | (out[..., 3] <= out[..., 1])
    return out.masked_fill(empty.unsqueeze(-1), 0)


def check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Raise ValueError naming ``where`` if a label lies outside ``[0, num_classes)``."""
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{where}: label {bad} out of range [0, {num_classes})")


class AnnotatedDataset(torch.utils.data.Dataset):
    """Whole-tensor image data with optional boxes and masks; the input of the device-resident loader.

    Attributes:
        images: uint8 (N, C, H, W), pixel value = 255 * intensity (stored as bytes to keep memory
            4x lower than float32; samples are returned as float32 in [0, 1]).
        labels: int64 (N,) in ``[0, num_classes)``.
        boxes: int64 (N, 4) half-open pixel boxes ``(x0, y0, x1, y1)``, or None.
        masks: bool (N, 1, H, W) object masks, or None.
        classes: list of ``num_classes`` class names.
        mean, std: per-channel tuples (pixel units of [0, 1] images), the statistics a model
            should normalise with: as given to the constructor (a reader passes the published
            values of its data set), else computed exactly from ``images`` on first access
            (:func:`channel_stats`).

    ``dataset[i]`` returns the sample dict described in :mod:`fastsat.data.dataset`.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        classes: Sequence[str],
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"images: expected a uint8 tensor of shape (N, C, H, W), got {describe(images)}")
        n, c, h, w = images.shape
        if labels.dtype != torch.int64 or labels.shape != (n,):
            raise TypeError(f"labels: expected int64 of shape ({n},), got {labels.dtype} {tuple(labels.shape)}")
        check_labels(labels, len(classes), "labels")
        if boxes is not None and (boxes.dtype != torch.int64 or boxes.shape != (n, 4)):
            raise TypeError(f"boxes: expected int64 of shape ({n}, 4), got {boxes.dtype} {tuple(boxes.shape)}")
        if masks is not None:
            if masks.dtype != torch.bool or masks.dim() != 4 or masks.shape[:2] != (n, 1):
                raise TypeError(f"masks: expected bool of shape ({n}, 1, H, W), got {masks.dtype} {tuple(masks.shape)}")
            if masks.shape[-2:] != (h, w):
                raise ValueError(f"masks: size {tuple(masks.shape[-2:])} does not match the images' {(h, w)}")
        self.images = images
        self.labels = labels
        self.boxes = boxes
        self.masks = masks
        self.classes = list(classes)
        if (mean is None) != (std is None):
            raise ValueError(f"mean, std: expected both or neither, got mean={describe(mean)}, std={describe(std)}")
        self._stats = None if mean is None else check_stats(mean, std, c)

    @property
    def mean(self) -> Stats:
        """Per-channel mean (pixel units of [0, 1] images)."""
        return self._channel_stats()[0]

    @property
    def std(self) -> Stats:
        """Per-channel standard deviation (pixel units of [0, 1] images)."""
        return self._channel_stats()[1]

    def _channel_stats(self) -> tuple[Stats, Stats]:
        if self._stats is None:
            self._stats = channel_stats(self.images)
        return self._stats

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return tuple(self.images.shape[-2:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def read(self, index: int, transform=None, rng=None) -> dict[str, torch.Tensor]:
        """Sample ``index`` with its image as stored, uint8 (C, H, W): what loader workers ship.

        ``transform(sample, rng)``, if given, is a per-sample transform such as
        :class:`~fastsat.data.transforms.RandomResizedCrop` (its box moves with the crop)."""
        sample = {"image": self.images[index], "label": self.labels[index]}
        if self.boxes is not None:
            sample["box"] = self.boxes[index]
        if self.masks is not None:
            sample["mask"] = self.masks[index]
        return sample if transform is None else transform(sample, rng)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.read(index)
        sample["image"] = sample["image"].float().div_(255)
        return sample

    def subset(self, indices: torch.Tensor | Sequence[int] | slice) -> AnnotatedDataset:
        """The samples at ``indices`` (a slice, index list or int64/bool tensor) as a new dataset.

        It keeps this data set's ``mean`` and ``std``: a split of the training data is normalised
        like the rest of it."""
        if not isinstance(indices, slice):
            indices = torch.as_tensor(indices)
        return AnnotatedDataset(
            self.images[indices],
            self.labels[indices],
            classes=self.classes,
            boxes=None if self.boxes is None else self.boxes[indices],
            masks=None if self.masks is None else self.masks[indices],
            mean=self.mean,
            std=self.std,
        )

    @classmethod
    def from_samples(cls, dataset: torch.utils.data.Dataset, classes: Sequence[str]) -> AnnotatedDataset:
        """Decode every sample of a map-style ``dataset`` (e.g. a file reader) into whole tensors.

        All samples must have the same image size (readers resize to one size). The result keeps
        ``dataset.mean``/``dataset.std`` when it has them, else computes them from the images.
        """
        # read() gives the decoded bytes where the data set has it (fastsat's readers); a float
        # sample in [0, 1] is rounded back to bytes.
        get = getattr(dataset, "read", dataset.__getitem__)
        samples = [get(i) for i in range(len(dataset))]
        if not samples:
            raise ValueError("dataset: is empty")
        images = torch.stack([s["image"] for s in samples])
        if images.dtype != torch.uint8:
            images = images.mul_(255).round_().to(torch.uint8)
        labels = torch.stack([torch.as_tensor(s["label"]) for s in samples]).long()
        boxes = torch.stack([s["box"] for s in samples]) if "box" in samples[0] else None
        masks = torch.stack([s["mask"] for s in samples]) if "mask" in samples[0] else None
        mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
        return cls(images, labels, classes=classes, boxes=boxes, masks=masks, mean=mean, std=std)
