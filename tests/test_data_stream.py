"""The input pipeline for data that does not fit in memory: per-sample crops that move annotations
with the image, uint8 worker loaders built once per run, the device prefetcher, and tar shards split
across DDP ranks and loader workers (every sample exactly once per epoch)."""

import io
import itertools
import json
import os
import random
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastsat.data import (
    DATA_KINDS,
    AnnotatedDataset,
    CenterCrop,
    DeviceLoader,
    DevicePrefetcher,
    RandomResizedCrop,
    Resize,
    ShardDataset,
    WorkerLoader,
    as_batch,
    as_batches,
    boxes_from_masks,
    crop_resize,
    data_kind,
    dataset_loader,
    generate_shapes,
    image_folder,
    pack_shards,
    shards,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _rectangle_sample(h=40, w=60, seed=0, channels=3):
    """A random uint8 image with one rectangular object: its mask, tight box, and a saliency map
    equal to the image's first channel (so a moved map can be checked against the moved image)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (channels, h, w), generator=g, dtype=torch.uint8)
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    mask[:, 10:25, 17:41] = True
    return {"image": image, "label": torch.tensor(3), "mask": mask, "box": boxes_from_masks(mask[None])[0],
            "saliency": image[:1].float() / 255}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Per-sample transforms


def test_crop_resize_integer_scale_moves_everything_exactly():
    sample = _rectangle_sample()
    crop = (12, 6, 52, 36)  # a 40 x 30 window, upscaled x2 to (60, 80): nearest-exact and outward rounding are exact
    out = crop_resize(sample, crop, (60, 80), flip=True)
    x0, y0, x1, y1 = crop
    want_mask = sample["mask"][:, y0:y1, x0:x1].repeat_interleave(2, -2).repeat_interleave(2, -1).flip(-1)
    assert torch.equal(out["mask"], want_mask)
    assert torch.equal(out["box"], boxes_from_masks(out["mask"][None])[0])  # rectangles stay tight
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 60, 80) and out["image"].is_contiguous()
    # The map was the image's first channel: it still is, up to uint8 rounding of the image (<= 1 level).
    torch.testing.assert_close(out["saliency"], out["image"][:1].float() / 255, rtol=0, atol=1.01 / 255)
    assert out["label"].item() == 3
    # The identity window at the same size is exact and unflipped.
    same = crop_resize(sample, (0, 0, 60, 40), (40, 60))
    assert torch.equal(same["image"], sample["image"]) and torch.equal(same["box"], sample["box"])


def test_crop_resize_clips_the_box_and_resizes_maps_of_another_resolution():
    sample = _rectangle_sample()
    sample["saliency"] = torch.nn.functional.interpolate(sample["saliency"][None], size=(20, 30), mode="bilinear")[0]
    out = crop_resize(sample, (30, 0, 60, 20), (20, 30))  # cuts the object: x in [30, 41), y in [10, 20)
    assert out["box"].tolist() == [0, 10, 11, 20]
    assert torch.equal(out["box"], boxes_from_masks(out["mask"][None])[0])
    assert out["saliency"].shape == (1, 20, 30)
    gone = crop_resize(sample, (45, 0, 60, 10), (10, 15))  # no object pixel visible
    assert gone["box"].tolist() == [0, 0, 0, 0] and not gone["mask"].any()
    with pytest.raises(ValueError, match="crop: expected a non-empty window"):
        crop_resize(sample, (0, 0, 61, 40), (4, 4))


def test_random_resized_crop_windows_are_valid_seeded_and_cover_the_ranges():
    transform = RandomResizedCrop(24, scale=(0.2, 0.9), ratio=(0.5, 2.0))
    windows = [transform.params(50, 70, random.Random(i)) for i in range(300)]
    for (x0, y0, x1, y1), _ in windows:
        assert 0 <= x0 < x1 <= 70 and 0 <= y0 < y1 <= 50
        area, aspect = (x1 - x0) * (y1 - y0) / 3500, (x1 - x0) / (y1 - y0)
        # Rounding each side to an integer moves the area and ratio by at most about 1 / side.
        assert 0.2 * 0.85 <= area <= 0.9 * 1.15 and 0.5 * 0.85 <= aspect <= 2.0 * 1.15, (x0, y0, x1, y1)
    flips = [flip for _, flip in windows]
    assert 100 < sum(flips) < 200  # p = 1/2
    assert transform.params(50, 70, random.Random(7)) == transform.params(50, 70, random.Random(7))
    # An image far outside the ratio range falls back to the central window of the nearest ratio.
    (x0, y0, x1, y1), _ = RandomResizedCrop(8, ratio=(0.75, 4 / 3)).params(2, 200, random.Random(0))
    assert (y0, y1) == (0, 2) and x1 - x0 == 3 and x0 == (200 - 3) // 2
    sample = transform(_rectangle_sample(50, 70), random.Random(3))
    assert sample["image"].shape == (3, 24, 24) and sample["mask"].shape == (1, 24, 24)
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCrop(8, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="size"):
        RandomResizedCrop(0)


def test_center_crop_is_the_standard_evaluation_crop():
    sample = _rectangle_sample(256, 300)
    out = CenterCrop(224)(sample)  # fraction 0.875 of 256: a 224 window, no resampling at all
    assert torch.equal(out["image"], sample["image"][:, 16:240, 38:262])
    assert Resize((20, 30))(sample)["image"].shape == (3, 20, 30)


# ----------------------------------------------------------------------------------------------
# Fixture files


def _image_folder(root, n_per_class=(5, 4), size=(32, 32), seed=0):
    """An ImageFolder of PNG and JPEG files with a rectangle mask per image (root/<class>/, masks/)."""
    rng = np.random.default_rng(seed)
    h, w = size
    for c, count in enumerate(n_per_class):
        for i in range(count):
            array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            folder = root / "images" / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            fmt = "PNG" if i % 2 else "JPEG"
            Image.fromarray(array).save(folder / f"c{c}_{i}.{'png' if fmt == 'PNG' else 'jpg'}", format=fmt)
            mask = np.zeros((h, w), np.uint8)
            y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
            mask[y0 : y0 + h // 3, x0 : x0 + w // 3] = 255
            (root / "masks").mkdir(exist_ok=True)
            Image.fromarray(mask).save(root / "masks" / f"c{c}_{i}.png")
    return root / "images"


def _key(image: torch.Tensor) -> bytes:
    """A sample's identity: its pixels (float [0, 1] or uint8)."""
    if image.is_floating_point():
        image = image.mul(255).round().to(torch.uint8)
    return image.contiguous().numpy().tobytes()


def test_image_files_read_gives_bytes_and_getitem_floats(tmp_path):
    ds = image_folder(_image_folder(tmp_path), masks=tmp_path / "masks", size=16)
    raw, sample = ds.read(2), ds[2]
    assert raw["image"].dtype == torch.uint8 and raw["image"].shape == (3, 16, 16)
    assert torch.equal(sample["image"], raw["image"].float() / 255)
    assert torch.equal(sample["mask"], raw["mask"]) and torch.equal(sample["box"], boxes_from_masks(raw["mask"][None])[0])
    native = ds.read(2, RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False), random.Random(0))
    assert native["image"].shape == (3, 8, 8)  # the crop started from the 32 x 32 file, not the 16 x 16 resize
    assert torch.equal(native["box"], boxes_from_masks(native["mask"][None])[0])


# ----------------------------------------------------------------------------------------------
# Worker loader and prefetcher


def test_device_prefetcher_converts_and_normalises_on_the_device_side():
    g = torch.Generator().manual_seed(0)
    host = [{"image": torch.randint(0, 256, (4, 3, 5, 5), generator=g, dtype=torch.uint8), "label": torch.arange(4)}
            for _ in range(3)]  # fmt: skip
    plain = list(DevicePrefetcher(host, "cpu"))
    assert len(plain) == 3 and len(DevicePrefetcher(host, "cpu")) == 3
    for got, batch in zip(plain, host):
        assert got["image"].dtype == torch.float32 and torch.equal(got["image"], batch["image"].float() / 255)
        assert torch.equal(got["label"], batch["label"])
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    normalised = list(DevicePrefetcher(host, "cpu", mean=mean, std=std))
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    for got, batch in zip(normalised, host):
        torch.testing.assert_close(got["image"], (batch["image"].float() / 255 - m) / s, rtol=1e-6, atol=1e-6)
    pairs = list(DevicePrefetcher([(b["image"], b["label"]) for b in host], "cpu"))
    assert isinstance(pairs[0], tuple) and torch.equal(pairs[1][0], plain[1]["image"])
    with pytest.raises(ValueError, match="mean, std"):
        DevicePrefetcher(host, "cpu", mean=mean)
    with pytest.raises(ValueError, match="std: expected 3 values"):
        DevicePrefetcher(host, "cpu", mean=mean, std=(0.2,))


def test_worker_loader_ships_bytes_and_matches_the_resident_loader():
    data = generate_shapes(40, size=8, seed=2)
    resident = dataset_loader(data, batch_size=16, shuffle=True, seed=5)
    workers = dataset_loader(data, batch_size=16, shuffle=True, seed=5, resident=False)
    assert isinstance(resident, DeviceLoader) and isinstance(workers, WorkerLoader) and len(workers) == 3
    host = next(iter(workers._batches))  # what crosses from the workers: bytes, not float32
    assert host["image"].dtype == torch.uint8
    for epoch in range(2):  # the same order every epoch, converted to the same floats
        for a, b in zip(resident, workers, strict=True):
            for key in a:
                assert torch.equal(a[key], b[key]), (epoch, key)


def _pid(sample, rng):
    """A transform recording which process decoded the sample."""
    return {**sample, "pid": torch.tensor(os.getpid())}


def test_workers_persist_across_epochs():
    data = generate_shapes(12, size=8, seed=0)
    batches = dataset_loader(data, batch_size=4, num_workers=2, transform=_pid, resident=False)
    pids = [set(torch.cat([b["pid"] for b in batches]).tolist()) for _ in range(2)]
    assert pids[0] == pids[1] and os.getpid() not in pids[0] and len(pids[0]) == 2


def _draw(sample, rng):
    """A transform recording its sample's first random number."""
    return {**Resize(8)(sample), "draw": torch.tensor(rng.random(), dtype=torch.float64)}


def test_per_sample_crops_are_seeded_by_sample_not_by_worker(tmp_path):
    ds = image_folder(_image_folder(tmp_path), masks=tmp_path / "masks", size=None)
    draws = [torch.cat([b["draw"] for b in dataset_loader(ds, batch_size=3, transform=_draw, num_workers=w)]) for w in (0, 2)]
    assert torch.equal(draws[0], draws[1]) and len(set(draws[0].tolist())) == len(ds)  # one stream per sample
    transform = RandomResizedCrop(12)
    one = dataset_loader(ds, batch_size=3, shuffle=True, transform=transform, seed=1)
    two = dataset_loader(ds, batch_size=3, shuffle=True, transform=transform, seed=1, num_workers=2)
    first, replay = list(one), list(two)
    assert [b["image"].shape for b in first] == [(3, 3, 12, 12)] * 3
    for a, b in zip(first, replay, strict=True):
        for key in ("image", "label", "box", "mask"):
            assert torch.equal(a[key], b[key]), key
        assert torch.equal(a["box"], boxes_from_masks(a["mask"]))
    assert not torch.equal(torch.cat([b["image"] for b in one]), torch.cat([b["image"] for b in first]))  # epoch 1
    one.set_epoch(0)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(one, first))


def test_in_memory_data_takes_per_sample_transforms_in_workers():
    data = generate_shapes(8, size=16, seed=1)
    (batch,) = list(dataset_loader(data, batch_size=8, transform=RandomResizedCrop(8, scale=(0.5, 1.0)), resident=False))
    assert batch["image"].shape == (8, 3, 8, 8) and batch["mask"].shape == (8, 1, 8, 8)
    # The stored boxes were tight on the masks; after a crop the moved box covers the visible mask.
    tight, seen = boxes_from_masks(batch["mask"]), batch["mask"].flatten(1).any(1)
    assert (batch["box"][seen, :2] <= tight[seen, :2]).all() and (batch["box"][seen, 2:] >= tight[seen, 2:]).all()
    with pytest.raises(ValueError, match="transform: per-sample transforms run in loader workers"):
        dataset_loader(data, batch_size=4, transform=RandomResizedCrop(8))
    with pytest.raises(TypeError, match="transform"):
        dataset_loader(data, batch_size=4, transform="crop", resident=False)


def test_saliency_maps_move_with_the_image_in_workers():
    """A data set without ``read`` (a user's, or the trainer's teacher-map wrapper) gets the
    transform on its float samples: the map stays the image's first channel."""

    class WithMaps(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            image = torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(i))
            return {"image": image, "label": torch.tensor(i), "saliency": image[:1].clone()}

    for batch in dataset_loader(WithMaps(), batch_size=3, transform=RandomResizedCrop(10), num_workers=2):
        torch.testing.assert_close(batch["saliency"], batch["image"][:, :1], rtol=0, atol=1e-6)


def test_map_style_ranks_share_every_epoch_exactly_once():
    data = generate_shapes(23, size=8, seed=0)
    seen = []
    for rank in range(2):
        for resident in (True, False):
            batches = dataset_loader(data, batch_size=4, shuffle=True, seed=3, rank=rank, world_size=2, resident=resident)
            got = [_key(image) for batch in batches for image in batch["image"]]
            assert len(batches) == 3 and len(got) == (12 if rank == 0 else 11)
            if resident:
                seen += got
    assert sorted(seen) == sorted(_key(image) for image in data.images)
    with pytest.raises(ValueError, match="rank"):
        dataset_loader(data, batch_size=4, rank=2, world_size=2)


# ----------------------------------------------------------------------------------------------
# Shards


def test_pack_shards_writes_webdataset_layout_and_reads_back_the_reader_samples(tmp_path):
    folder = _image_folder(tmp_path)
    index_path = pack_shards(folder, tmp_path / "shards", shard_size=4, masks=tmp_path / "masks")
    index = json.loads(index_path.read_text())
    assert index["count"] == 9 and [s["count"] for s in index["shards"]] == [4, 4, 1]
    assert index["classes"] == ["c0", "c1"] and index["annotations"] == "mask"
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:4] == ["000000000.jpg", "000000000.cls", "000000000.mask.png", "000000000.json"] or \
        names[:4] == ["000000000.png", "000000000.cls", "000000000.mask.png", "000000000.json"]  # fmt: skip
    assert len(names) == 16
    data = shards(tmp_path / "shards", size=32)
    assert isinstance(data, ShardDataset) and len(data) == 9 and data.num_classes == 2
    assert data.mean == (0.485, 0.456, 0.406) and data.std == (0.229, 0.224, 0.225)
    reader = image_folder(folder, masks=tmp_path / "masks", size=32)
    by_pixels = {_key(reader.read(i)["image"]): reader[i] for i in range(len(reader))}
    streamed = list(data)
    assert len(streamed) == 9
    for sample in streamed:  # the same bytes decoded by the same decoder: identical samples
        want = by_pixels.pop(_key(sample["image"]))
        for key in ("image", "label", "box", "mask"):
            assert torch.equal(sample[key], want[key]), key
    assert not by_pixels
    # Packed in a seeded random order, not class by class; the same seed gives the same bytes.
    labels = [s["label"].item() for s in streamed]
    assert labels != sorted(labels)
    again = pack_shards(folder, tmp_path / "again", shard_size=4, masks=tmp_path / "masks")
    for name in ("shard-000000.tar", "shard-000002.tar", "index.json"):
        assert (again.parent / name).read_bytes() == (tmp_path / "shards" / name).read_bytes(), name
    resident = data.materialize()
    assert isinstance(resident, AnnotatedDataset) and resident.images.shape == (9, 3, 32, 32)


def test_pack_shards_boxes_and_any_reader(tmp_path):
    folder = _image_folder(tmp_path, n_per_class=(2, 1))
    xml = tmp_path / "xml"
    xml.mkdir()
    for path in folder.rglob("*.*"):
        xml.joinpath(path.stem + ".xml").write_text(
            "<annotation><size><width>32</width><height>32</height></size>"
            "<object><bndbox><xmin>3</xmin><ymin>5</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object></annotation>"
        )
    pack_shards(folder, tmp_path / "boxes", boxes=xml)
    (sample, *_) = list(shards(tmp_path / "boxes", size=16))
    assert sample["box"].tolist() == [1, 2, 10, 15]  # (2, 4, 20, 30) half-open, halved outward
    pack_shards(image_folder(folder, size=8), tmp_path / "plain", seed=None)
    plain = list(shards(tmp_path / "plain", size=8))
    assert [s["label"].item() for s in plain] == [0, 0, 1] and set(plain[0]) == {"image", "label"}
    with pytest.raises(ValueError, match="boxes, masks"):
        pack_shards(image_folder(folder), tmp_path / "x", boxes=xml)


def test_shard_errors_name_the_file(tmp_path):
    folder = _image_folder(tmp_path, n_per_class=(2, 1))
    (folder / "c0" / "c0_0.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"c0_0.jpg: cannot decode image"):
        pack_shards(folder, tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="index.json"):
        shards(tmp_path / "nowhere")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "index.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="index.json: malformed shard index"):
        shards(tmp_path / "odd")


def test_shares_are_exact_and_balanced():
    from fastsat import _dist

    for total in (0, 1, 7, 13):
        for parts in (1, 2, 3, 5):
            ranges = [_dist.shard(total, p, parts) for p in range(parts)]
            assert ranges[0].start == 0 and ranges[-1].stop == total
            assert all(a.stop == b.start for a, b in itertools.pairwise(ranges))
            sizes = [len(r) for r in ranges]
            assert max(sizes) - min(sizes) <= 1


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    folder = _image_folder(root, n_per_class=(7, 6), size=(16, 16), seed=1)
    pack_shards(folder, root / "shards", shard_size=3, masks=root / "masks")  # 13 samples: 3+3+3+3+1
    return shards(root / "shards", size=16)


def test_two_ranks_by_two_workers_see_every_sample_exactly_once(packed):
    everything = sorted(_key(s["image"]) for s in packed)
    assert len(set(everything)) == 13
    for epoch in range(2):
        seen, counts = [], []
        for rank in range(2):
            batches = dataset_loader(packed, batch_size=2, shuffle=True, seed=4, num_workers=2, rank=rank, world_size=2)
            batches.set_epoch(epoch)
            got = list(batches)
            assert len(got) == len(batches)  # len() counts each worker's last partial batch
            keys = [_key(image) for batch in got for image in batch["image"]]
            seen += keys
            counts.append(len(keys))
        assert sorted(seen) == everything, f"epoch {epoch}: a sample was dropped or duplicated"
        assert sorted(counts) == [6, 7]


def test_shard_stream_shuffling_is_epoch_seeded_and_reproducible(packed):
    batches = dataset_loader(packed, batch_size=13, shuffle=True, seed=9, transform=RandomResizedCrop(8))
    (first,), (second,) = list(batches), list(batches)
    assert sorted(first["label"].tolist()) == sorted(second["label"].tolist())
    assert not torch.equal(first["image"], second["image"])
    batches.set_epoch(0)
    (replay,) = list(batches)
    for key in ("image", "label", "box", "mask"):
        assert torch.equal(first[key], replay[key]), key
    assert torch.equal(first["box"], boxes_from_masks(first["mask"]))
    # The same epoch with the workers splitting the stream: the same samples, each cropped the same way.
    workers = dataset_loader(packed, batch_size=13, shuffle=True, seed=9, transform=RandomResizedCrop(8), num_workers=2)
    split = {_key(image): image for batch in workers for image in batch["image"]}
    assert sorted(split) == sorted(_key(image) for image in first["image"])
    plain = dataset_loader(packed, batch_size=5)  # no shuffle: packed order
    assert torch.equal(torch.cat([b["image"] for b in plain]), torch.stack([s["image"] for s in packed]))


def test_persistent_stream_workers_follow_the_epoch(packed):
    """The epoch reaches workers that outlive it: a run's second epoch equals a fresh loader's epoch 1."""
    options = {"batch_size": 4, "shuffle": True, "seed": 2, "num_workers": 2, "transform": RandomResizedCrop(8)}
    run = dataset_loader(packed, **options)
    first, second = list(run), list(run)
    fresh = dataset_loader(packed, **options)
    fresh.set_epoch(1)
    for a, b in zip(second, fresh, strict=True):
        assert torch.equal(a["image"], b["image"])
    assert not torch.equal(torch.cat([b["image"] for b in first]), torch.cat([b["image"] for b in second]))


def test_data_kind_tells_every_source_apart(packed):
    x, y = torch.rand(2, 3, 4, 4), torch.tensor([0, 1])
    dataset = generate_shapes(4, size=8, num_classes=2, seed=0)
    assert data_kind((x, y)) == "pair"
    assert data_kind(dataset) == "dataset"
    assert data_kind(packed) == "shards"
    assert data_kind([(x, y)]) == "batches"
    assert data_kind(torch.utils.data.DataLoader(dataset, batch_size=2)) == "batches"
    assert data_kind((x, y, y)) == "batches"  # three tensors are not a pair
    with pytest.raises(TypeError, match="data: expected a Dataset or an iterable of batches with len\\(\\), got int"):
        data_kind(3)
    assert set(DATA_KINDS) == {"pair", "dataset", "shards", "batches"}


def test_as_batches_streams_shards(packed):
    batches = as_batches(packed, batch_size=4, shuffle=False, seed=0, device=torch.device("cpu"))
    assert isinstance(batches, WorkerLoader) and len(batches) == 4
    batch = as_batch(next(iter(batches)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32


def test_tar_members_in_other_tools_layout_are_grouped_by_key(tmp_path):
    """WebDataset's key rule (path up to the first dot of the file name) with directories in names."""
    from fastsat.data.shards import _members

    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        for name, blob in [("a/0001.jpg", b"1"), ("a/0001.cls", b"0"), ("a/0002.jpg", b"2"), ("a/0002.cls", b"1"),
                           ("b/0001.jpg", b"3"), ("b/0001.cls", b"1")]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    assert [(p, f["jpg"]) for p, _, f in _members(path, 0, 3, 3)] == [(0, b"1"), (1, b"2"), (2, b"3")]
    assert [(p, f["cls"]) for p, _, f in _members(path, 1, 1, 3)] == [(1, b"1")]


# ----------------------------------------------------------------------------------------------
# Shards handed over by someone else: confined, bounded, and every fault named


def _png_bytes(size=(8, 8)):
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _crafted_shards(root, members, count, files=("shard-000000.tar",)):
    """A shard folder whose one tar holds ``members`` ((name, bytes), or a header's bytes alone) and whose index lists ``files`` with ``count`` samples each."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "shard-000000.tar", "wb") as handle:
        for member in members:
            if isinstance(member, bytes):  # a header alone: its data is never written
                handle.write(member)
                continue
            name, blob = member
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            handle.write(info.tobuf(format=tarfile.GNU_FORMAT))
            handle.write(blob + b"\0" * (-len(blob) % tarfile.BLOCKSIZE))
        handle.write(b"\0" * 2 * tarfile.BLOCKSIZE)
    index = {"format": "fastsat-shards", "version": 1, "classes": ["a", "b"], "annotations": "none",
             "mean": [0.5] * 3, "std": [0.25] * 3, "count": count * len(files),
             "shards": [{"file": f, "count": count} for f in files]}
    (root / "index.json").write_text(json.dumps(index))
    return root


def _sample(key, label=b"1", image=None):
    return [(f"{key}.png", _png_bytes() if image is None else image), (f"{key}.cls", label)]


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "sub/../../outside.tar", "link.tar", 7, ""])
def test_shard_index_entries_stay_inside_the_folder(tmp_path, name):
    (tmp_path / "outside.tar").write_bytes(b"")
    root = _crafted_shards(tmp_path / "shards", _sample("0"), 1, files=[name])
    (root / "link.tar").symlink_to(tmp_path / "outside.tar")  # a link leading out of the folder
    with pytest.raises(ValueError, match=r"index.json: malformed shard index \(shard file: .*(inside|leads outside)"):
        shards(root)


def test_an_oversized_index_is_refused_unread(tmp_path, monkeypatch):
    shards_module = sys.modules["fastsat.data.shards"]  # fastsat.data.shards is also the function's name
    root = _crafted_shards(tmp_path / "shards", _sample("0"), 1)
    monkeypatch.setattr(shards_module, "MAX_MEMBER_BYTES", 100)
    with pytest.raises(ValueError, match=r"index.json: expected a shard index of at most 100 bytes"):
        shards(root)


def test_a_link_inside_the_folder_is_allowed(tmp_path):
    root = _crafted_shards(tmp_path / "shards", _sample("0"), 1, files=["link.tar"])
    (root / "link.tar").symlink_to(root / "shard-000000.tar")
    assert len(list(shards(root, size=8))) == 1


def _huge_header(kind):
    """A tar header of a 6 GiB member (for a GNU sparse one, its real size) and no data."""
    header = tarfile.TarInfo("0.png")
    header.type, header.size = kind, 6 << 30
    block = bytearray(header.tobuf(format=tarfile.GNU_FORMAT))
    if kind == tarfile.GNUTYPE_SPARSE:
        block[483:495] = b"%011o\0" % (6 << 30)  # the GNU header's real size field
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block[:512])  # the header checksum, over the new bytes
    return bytes(block)


@pytest.mark.parametrize("kind, got", [(tarfile.GNUTYPE_SPARSE, "a sparse file"), (tarfile.REGTYPE, "6442450944 bytes")])
def test_a_huge_or_sparse_member_is_refused_before_it_is_read(tmp_path, kind, got):
    import tracemalloc

    root = _crafted_shards(tmp_path / "shards", [_huge_header(kind), *_sample("0")[1:]], 1)
    with tarfile.open(root / "shard-000000.tar") as tar:
        assert tar.next().size == 6 << 30  # declared in a file of a few KiB
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=rf"shard-000000.tar: member 0.png: expected a plain file of at most "
                                             rf"{64 << 20} bytes \(MAX_MEMBER_BYTES\), got {got}"):
            list(shards(root, size=8))
        assert tracemalloc.get_traced_memory()[1] < 32 << 20  # nothing of the declared size was allocated
    finally:
        tracemalloc.stop()


def test_broken_tars_are_value_errors_naming_the_shard(tmp_path):
    root = _crafted_shards(tmp_path / "shards", _sample("0") + _sample("1"), 2)
    tar = root / "shard-000000.tar"
    whole = tar.read_bytes()
    tar.write_bytes(b"this is no tar archive" * 40)
    with pytest.raises(ValueError, match=r"shard-000000.tar: not a readable tar shard"):
        list(shards(root, size=8))
    tar.write_bytes(whole[: 3 * tarfile.BLOCKSIZE + 100])  # cut inside the second member's data
    with pytest.raises(ValueError, match=r"shard-000000.tar: not a readable tar shard at member 0"):
        list(shards(root, size=8))


@pytest.mark.parametrize("label, match", [
    (b"x1", r"member 0.cls: expected the label as ASCII decimal digits, got b'x1'"),
    (b"-1", r"member 0.cls: expected the label as ASCII decimal digits"),
    (b"7", r"member 0.cls: label 7 out of range \[0, 2\)"),
    (b"9" * 5000, r"member 0.cls: expected the label as ASCII decimal digits"),
])
def test_a_bad_label_member_is_named(tmp_path, label, match):
    root = _crafted_shards(tmp_path / "shards", _sample("0", label=label), 1)
    with pytest.raises(ValueError, match=match):
        list(shards(root, size=8))


def test_undecodable_images_and_decompression_bombs_name_the_member(tmp_path, monkeypatch):
    root = _crafted_shards(tmp_path / "shards", _sample("0", image=b"\x89PNG\r\n\x1a\n broken"), 1)
    with pytest.raises(ValueError, match=r"shard-000000.tar: member 0.png: cannot decode image"):
        list(shards(root, size=8))
    root = _crafted_shards(tmp_path / "bomb", _sample("0", image=_png_bytes((64, 64))), 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64)  # 64 x 64 pixels is then more than twice the limit
    with pytest.raises(ValueError, match=r"bomb/shard-000000.tar: member 0.png: cannot decode image "
                                         r"\(DecompressionBombError"):
        list(shards(root, size=8))


@pytest.mark.parametrize("meta, match", [
    (b"{", r"member 0.json: expected \{\"box\": \[x0, y0, x1, y1\], ...\} \(Expecting property name"),
    (b'{"label": 1}', r"member 0.json: expected .* \('box'\)"),
    (b'{"box": [0, 0, 4, 1e400]}', r"member 0.json: expected .* \(box: expected 4 integers"),
    (b'{"box": [0, 0, 4, 99999999999999999999999]}', r"member 0.json: expected .* \(box: expected 4 integers"),
])
def test_a_bad_box_member_is_named(tmp_path, meta, match):
    root = _crafted_shards(tmp_path / "shards", _sample("0") + [("0.json", meta)], 1)
    index = json.loads((root / "index.json").read_text())
    (root / "index.json").write_text(json.dumps({**index, "annotations": "box"}))
    with pytest.raises(ValueError, match=match):
        list(shards(root, size=8))


@pytest.mark.parametrize("count, found", [(3, "found 2"), (1, "found more")])
def test_a_shard_whose_sample_count_differs_from_the_index_is_refused(tmp_path, count, found):
    root = _crafted_shards(tmp_path / "shards", _sample("0") + _sample("1"), count)
    with pytest.raises(ValueError, match=rf"shard-000000.tar: expected {count} samples \(index.json\), {found}"):
        list(shards(root, size=8))
