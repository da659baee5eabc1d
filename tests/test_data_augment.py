"""Augmentation moves image, mask and box together; loaders deliver every sample, reproducibly."""

import pytest
import torch

from fastsat.data import (
    AnnotatedDataset,
    Augment,
    DeviceLoader,
    WorkerLoader,
    boxes_from_masks,
    crop_shift,
    dataset_loader,
    generate_shapes,
    hflip,
    rescale_boxes,
    resize,
)


def _batch(b=5, c=3, h=9, w=11, seed=0):
    """Random images with a random rectangular object per sample (mask and its tight box)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, c, h, w, generator=g)
    x0 = torch.randint(0, w - 3, (b,), generator=g)
    y0 = torch.randint(0, h - 3, (b,), generator=g)
    x1 = x0 + torch.randint(1, 4, (b,), generator=g)
    y1 = y0 + torch.randint(1, 4, (b,), generator=g)
    cols, rows = torch.arange(w), torch.arange(h)
    mask = ((cols[None, None, :] >= x0[:, None, None]) & (cols[None, None, :] < x1[:, None, None])
            & (rows[None, :, None] >= y0[:, None, None]) & (rows[None, :, None] < y1[:, None, None]))  # fmt: skip
    box = torch.stack([x0, y0, x1, y1], 1)
    return {"image": image, "label": torch.arange(b), "box": box, "mask": mask[:, None]}


def test_crop_shift_matches_reference_loop():
    batch = _batch()
    b, _, h, w = batch["image"].shape
    shifts = torch.tensor([[0, 0], [2, -3], [-1, 4], [-4, -4], [3, 1]])
    out = crop_shift(batch, shifts)
    for i in range(b):
        dy, dx = shifts[i].tolist()
        for r in range(h):
            for c in range(w):
                rr, cc = r + dy, c + dx
                inside = 0 <= rr < h and 0 <= cc < w
                want = batch["image"][i, :, rr, cc] if inside else torch.zeros(3)
                assert torch.equal(out["image"][i, :, r, c], want), f"sample {i} pixel {(r, c)}"
                want_mask = bool(batch["mask"][i, 0, rr, cc]) if inside else False
                assert bool(out["mask"][i, 0, r, c]) == want_mask, f"sample {i} mask pixel {(r, c)}"
    # The boxes were tight on the rectangles, so the shifted and clipped box is the tight box of the
    # shifted mask (empty where the object left the image).
    assert torch.equal(out["box"], boxes_from_masks(out["mask"]))
    assert torch.equal(out["label"], batch["label"])


def test_crop_that_removes_object_gives_empty_box():
    batch = _batch(b=1, h=8, w=8)
    batch["box"] = torch.tensor([[0, 0, 2, 2]])
    batch["mask"] = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    batch["mask"][..., :2, :2] = True
    out = crop_shift(batch, torch.tensor([[3, 3]]))
    assert out["box"].tolist() == [[0, 0, 0, 0]]
    assert not out["mask"].any()


def test_hflip_mirrors_image_mask_box():
    batch = _batch()
    which = torch.tensor([True, False, True, True, False])
    out = hflip(batch, which)
    w = batch["image"].shape[-1]
    for i in range(5):
        want = batch["image"][i].flip(-1) if which[i] else batch["image"][i]
        assert torch.equal(out["image"][i], want), f"sample {i}"
    assert torch.equal(out["box"], boxes_from_masks(out["mask"]))
    x0, y0, x1, y1 = batch["box"][0].tolist()
    assert out["box"][0].tolist() == [w - x1, y0, w - x0, y1]
    empty = dict(batch, box=torch.zeros(5, 4, dtype=torch.int64))
    assert not hflip(empty, which)["box"].any()  # the empty box stays (0, 0, 0, 0)


def test_resize_masks_and_boxes():
    batch = _batch(b=4, h=8, w=8)
    out = resize(batch, (16, 24))
    assert out["image"].shape == (4, 3, 16, 24) and out["mask"].shape == (4, 1, 16, 24)
    # Integer upscaling: nearest-exact repeats pixels, and the rescaled box is exactly the scaled box.
    assert torch.equal(out["mask"], batch["mask"].repeat_interleave(2, -2).repeat_interleave(3, -1))
    assert torch.equal(out["box"], batch["box"] * torch.tensor([3, 2, 3, 2]))
    assert torch.equal(out["box"], boxes_from_masks(out["mask"]))


def test_resize_keeps_images_in_the_runs_box():
    # An image in [-1, 1] (a run with clip=(-1, 1)) keeps its negative half; the default box is [0, 1].
    image = torch.rand(2, 3, 8, 8) * 2 - 1
    inside = resize({"image": image}, (4, 4), clip=(-1.0, 1.0))["image"]
    assert inside.min() < -0.2 and inside.min() >= -1 and inside.max() <= 1
    assert resize({"image": image}, (4, 4))["image"].min() == 0
    with pytest.raises(ValueError, match="clip"):
        resize({"image": image}, (4, 4), clip=(1.0, -1.0))


def test_rescale_boxes_rounds_outward():
    boxes = torch.tensor([[1, 1, 3, 3], [0, 0, 10, 10], [4, 4, 4, 9]])
    out = rescale_boxes(boxes, (10, 10), (4, 4))
    # 1 * 0.4 = 0.4 -> floor 0; 3 * 0.4 = 1.2 -> ceil 2; the empty box stays empty.
    assert out.tolist() == [[0, 0, 2, 2], [0, 0, 4, 4], [0, 0, 0, 0]]


def test_augment_reproducible_and_consistent():
    batch = _batch(b=16, h=12, w=12)
    aug = Augment(padding=3, flip=True, size=12)
    a = aug(batch, torch.Generator().manual_seed(4))
    b = aug(batch, torch.Generator().manual_seed(4))
    c = aug(batch, torch.Generator().manual_seed(5))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["image"], c["image"])
    # Rectangles stay rectangles under shift/clip/flip, so the boxes stay tight.
    assert torch.equal(a["box"], boxes_from_masks(a["mask"]))
    with pytest.raises(ValueError, match="padding"):
        Augment(padding=-1)
    with pytest.raises(ValueError, match="size"):
        Augment(size=(0, 4))


@pytest.mark.parametrize("channels", [1, 3])
def test_augment_moves_saliency_maps_like_the_image(channels):
    """A teacher's map travels with its image: a map equal to the image's first channels comes
    out equal to the augmented image's, through crop, flip and resize."""
    batch = _batch(b=8, h=12, w=12)
    batch["saliency"] = batch["image"][:, :channels].clone()
    out = Augment(padding=3, flip=True, size=(8, 10))(batch, torch.Generator().manual_seed(1))
    assert out["saliency"].shape == (8, channels, 8, 10)
    torch.testing.assert_close(out["saliency"], out["image"][:, :channels], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def data():
    return generate_shapes(50, size=8, seed=0)


def test_device_loader_covers_epoch_and_reproduces(data):
    batches = dataset_loader(data, batch_size=16, shuffle=True, seed=3)
    assert isinstance(batches, DeviceLoader) and len(batches) == 4
    first = list(batches)
    labels = torch.cat([b["label"] for b in first])
    assert sorted(labels.tolist()) == sorted(data.labels.tolist())
    images = torch.cat([b["image"] for b in first])
    # Every sample exactly once: match images back to the data set.
    flat = (data.images.float() / 255).flatten(1)
    matches = (images.flatten(1)[:, None, :] == flat[None]).all(-1)
    assert torch.equal(matches.sum(1), torch.ones(50, dtype=torch.long))
    assert torch.equal(matches.sum(0), torch.ones(50, dtype=torch.long))
    second = list(batches)  # the next epoch is shuffled differently
    assert not torch.equal(torch.cat([b["label"] for b in second]), labels)
    batches.set_epoch(0)
    replay = list(batches)
    for x, y in zip(first, replay):
        for key in x:
            assert torch.equal(x[key], y[key]), key
    dropped = dataset_loader(data, batch_size=16, drop_last=True)
    assert len(dropped) == 3 and sum(len(b["label"]) for b in dropped) == 48


def test_worker_loader_matches_dataset(data):
    plain = dataset_loader(data, batch_size=20, resident=False)
    assert isinstance(plain, WorkerLoader) and len(plain) == 3
    got = list(plain)
    for key, ref in (
        ("image", data.images.float() / 255),
        ("label", data.labels),
        ("box", data.boxes),
        ("mask", data.masks),
    ):
        assert torch.equal(torch.cat([b[key] for b in got]), ref), key
    workers = dataset_loader(data, batch_size=20, shuffle=True, augment=True, num_workers=2, seed=1, resident=False)
    a = list(workers)
    workers.set_epoch(0)
    b = list(workers)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["box"], y["box"])
    # Shapes are not rectangles: after a crop the clipped box covers the visible mask, maybe loosely.
    for batch in a:
        tight, box = boxes_from_masks(batch["mask"]), batch["box"]
        seen = batch["mask"].flatten(1).any(1)
        assert (box[seen, :2] <= tight[seen, :2]).all() and (box[seen, 2:] >= tight[seen, 2:]).all()
    assert sorted(torch.cat([x["label"] for x in a]).tolist()) == sorted(data.labels.tolist())


def test_resident_from_file_like_dataset(data):
    class Plain(torch.utils.data.Dataset):
        classes = data.classes

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

    batches = dataset_loader(Plain(), batch_size=50, resident=True)
    assert isinstance(batches, DeviceLoader)
    assert isinstance(batches.dataset, AnnotatedDataset)
    (batch,) = list(batches)
    assert torch.equal(batch["image"], data.images.float() / 255)
    assert torch.equal(batch["mask"], data.masks)


def test_loader_bad_arguments(data):
    with pytest.raises(ValueError, match="batch_size"):
        dataset_loader(data, batch_size=0)
    with pytest.raises(TypeError, match="augment"):
        dataset_loader(data, batch_size=4, augment="yes")
    with pytest.raises(ValueError, match="num_workers"):
        dataset_loader(data, batch_size=4, num_workers=-1, resident=False)
