"""Synthetic shapes: determinism, caching, and masks/boxes consistent with each other and the pixels."""

import warnings

import pytest
import torch

from fastsat.data import SHAPE_NAMES, AnnotatedDataset, boxes_from_masks, generate_shapes, shapes


def _tight_box_reference(mask: torch.Tensor) -> list[int]:
    """Half-open tight box of one (H, W) bool mask, by plain Python loops."""
    rows = [r for r in range(mask.shape[0]) if mask[r].any()]
    cols = [c for c in range(mask.shape[1]) if mask[:, c].any()]
    if not rows:
        return [0, 0, 0, 0]
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


@pytest.fixture(scope="module")
def small():
    return generate_shapes(96, size=16, num_classes=12, seed=3)


def test_types_and_shapes(small):
    assert small.images.dtype == torch.uint8 and small.images.shape == (96, 3, 16, 16)
    assert small.labels.dtype == torch.int64 and small.labels.shape == (96,)
    assert small.boxes.dtype == torch.int64 and small.boxes.shape == (96, 4)
    assert small.masks.dtype == torch.bool and small.masks.shape == (96, 1, 16, 16)
    assert small.classes == list(SHAPE_NAMES)
    sample = small[5]
    assert set(sample) == {"image", "label", "box", "mask"}
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 16, 16)
    assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
    torch.testing.assert_close(sample["image"], small.images[5].float() / 255, rtol=0, atol=0)


def test_mean_std_are_the_images_statistics(small):
    """shapes' normalisation statistics are computed from its own images (float64 reference)."""
    pixels = small.images.double().div(255).transpose(0, 1).flatten(1)  # (C, N*H*W)
    assert isinstance(small.mean, tuple) and isinstance(small.std, tuple) and len(small.mean) == 3
    torch.testing.assert_close(torch.tensor(small.mean, dtype=torch.float64), pixels.mean(1), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.tensor(small.std, dtype=torch.float64), pixels.std(1, unbiased=False),
                               rtol=0, atol=1e-12)
    # A split of the data keeps the statistics of the whole; another seed has its own.
    part = small.subset(slice(0, 10))
    assert part.mean == small.mean and part.std == small.std
    assert generate_shapes(96, size=16, num_classes=12, seed=4).mean != small.mean


def test_labels_balanced_per_chunk():
    labels = generate_shapes(512, size=8, num_classes=12, seed=0).labels  # exactly one chunk
    counts = torch.bincount(labels, minlength=12)
    assert counts.max() - counts.min() <= 1, counts.tolist()


def test_deterministic_per_seed_and_prefix_stable():
    a = generate_shapes(40, size=16, seed=7)
    b = generate_shapes(40, size=16, seed=7)
    c = generate_shapes(40, size=16, seed=8)
    longer = generate_shapes(600, size=16, seed=7)  # spans two chunks of 512
    for name in ("images", "labels", "boxes", "masks"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(getattr(a, name), getattr(longer, name)[:40]), name
    assert not torch.equal(a.images, c.images)


def test_boxes_are_tight_boxes_of_masks(small):
    for i in range(len(small)):
        assert small.boxes[i].tolist() == _tight_box_reference(small.masks[i, 0]), f"sample {i}"
    assert torch.equal(boxes_from_masks(small.masks), small.boxes)


def test_masks_nonempty_and_inside():
    data = generate_shapes(200, size=32, seed=0)
    area = data.masks.flatten(1).float().mean(1)
    assert area.min() > 0.01, f"smallest object covers {area.min():.4f} of the image"
    x0, y0, x1, y1 = data.boxes.unbind(1)
    assert ((x1 > x0) & (y1 > y0)).all()


def test_masks_match_pixels():
    """The mask is the painted shape: uniform colour inside, contrasting with the surroundings."""
    data = generate_shapes(64, size=32, seed=1)
    img = data.images.float() / 255
    mask = data.masks.float()
    inside_n = mask.sum((2, 3))
    inside_mean = (img * mask).sum((2, 3)) / inside_n
    inside_std = (((img - inside_mean[..., None, None]) ** 2 * mask).sum((2, 3)) / inside_n).sqrt()
    # The shape is one colour c <= 1 times a shading 1 + 0.1 sin(.), whose std is at most
    # 0.1 / sqrt(2) = 0.0707, plus 8-bit rounding (< 0.002): above 0.075 background leaked in.
    assert inside_std.max() < 0.075, f"max in-mask std {inside_std.max():.3f}"
    # A 1-pixel ring just outside the mask differs from the shape colour (contrast 0.3-0.55 per
    # channel from the base colour, minus texture): the median contrast is far above noise.
    ring = (torch.nn.functional.max_pool2d(mask, 3, 1, 1) - mask).clamp(min=0)
    ring_mean = (img * ring).sum((2, 3)) / ring.sum((2, 3))
    contrast = (inside_mean - ring_mean).abs().amax(1)
    assert contrast.median() > 0.2, f"median shape/background contrast {contrast.median():.3f}"


@pytest.mark.parametrize("size", [8, 64])
def test_any_resolution(size):
    data = generate_shapes(4, size=size, seed=0)
    assert data.images.shape == (4, 3, size, size) and data.masks.shape == (4, 1, size, size)


def test_cache_roundtrip_env_and_corruption(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSAT_CACHE", str(tmp_path / "env"))
    first = shapes(20, size=16, seed=2)
    files = list((tmp_path / "env").iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt", files  # no temporary file left behind
    again = shapes(20, size=16, seed=2)
    assert isinstance(again, AnnotatedDataset) and torch.equal(first.images, again.images)
    assert again.mean == first.mean and again.std == first.std
    assert torch.equal(first.masks, again.masks) and torch.equal(first.boxes, again.boxes)
    files[0].write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable"):
        regenerated = shapes(20, size=16, seed=2)
    assert torch.equal(regenerated.images, first.images)
    explicit = tmp_path / "explicit"
    shapes(20, size=16, seed=2, cache_dir=explicit)
    assert len(list(explicit.iterdir())) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uncached = shapes(20, size=16, seed=2, cache_dir=False)
    assert torch.equal(uncached.labels, first.labels)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "n:"),
        ({"n": 4, "size": 4}, "size:"),
        ({"n": 4, "num_classes": 13}, "num_classes:"),
        ({"n": 4, "num_classes": 1}, "num_classes:"),
        ({"n": 4, "seed": -1}, "seed:"),
        ({"n": 4, "size": 16.0}, "size:"),
        ({"n": 4, "polarity": "dark"}, "polarity:"),
    ],
)
def test_bad_arguments(kwargs, match, tmp_path):
    n = kwargs.pop("n")
    with pytest.raises(ValueError, match=match):
        generate_shapes(n, **kwargs)
    with pytest.raises(ValueError, match=match):  # checked before the cache is looked at
        shapes(n, cache_dir=tmp_path, **kwargs)
    with pytest.raises(TypeError, match="n: expected"):
        generate_shapes("4")


def test_generation_restores_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generate_shapes(4, size=8, seed=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_clutter_and_polarity_change_the_look_of_the_same_scenes(tmp_path):
    """The options keep every scene (labels, masks, boxes) and change how it is drawn: without
    clutter the background is flat up to pixel noise; with polarity="light" the object is lighter
    than the background on every channel, so SAT's −ε·S lowers its contrast everywhere."""
    default = generate_shapes(64, size=16, num_classes=4, seed=5)
    for clutter in (True, False):
        for polarity in ("random", "light"):
            other = generate_shapes(64, size=16, num_classes=4, seed=5, clutter=clutter, polarity=polarity)
            assert torch.equal(other.labels, default.labels) and torch.equal(other.masks, default.masks)
            cached = shapes(64, size=16, num_classes=4, seed=5, clutter=clutter, polarity=polarity, cache_dir=tmp_path)
            assert torch.equal(cached.images, other.images), "the cache keys the options"
    assert len(list(tmp_path.iterdir())) == 4
    plain = generate_shapes(64, size=16, num_classes=4, seed=5, clutter=False, polarity="light").images.float() / 255
    mask = default.masks.expand_as(plain)
    background_spread = torch.stack([plain[i, c][~mask[i, c]].std() for i in range(64) for c in range(3)])
    assert background_spread.max() < 0.04, "flat background: pixel noise only (std 0.029)"
    inside = torch.stack([(plain[i] * mask[i]).sum((1, 2)) / mask[i][0].sum() for i in range(64)])
    outside = torch.stack([(plain[i] * ~mask[i]).sum((1, 2)) / (~mask[i][0]).sum() for i in range(64)])
    assert (inside > outside + 0.2).all(), "light polarity: lighter on every channel of every image"
    random_polarity = default.images.float() / 255
    inside = torch.stack([(random_polarity[i] * mask[i]).sum((1, 2)) / mask[i][0].sum() for i in range(64)])
    outside = torch.stack([(random_polarity[i] * ~mask[i]).sum((1, 2)) / (~mask[i][0]).sum() for i in range(64)])
    darker = (inside < outside).sum().item()
    assert 0.2 * inside.numel() < darker < 0.8 * inside.numel(), "random polarity: darker on some channels"
