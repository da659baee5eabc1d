"""Every reader on tiny fixture files written in the real on-disk format, and its error paths."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastsat.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AnnotatedDataset,
    ImageFiles,
    boxes_from_masks,
    channel_stats,
    cifar10,
    cifar100,
    dataset_loader,
    digits,
    flowers17,
    image_folder,
    oxford_pets,
    tiny_imagenet,
)

RNG = np.random.default_rng(0)


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _rgb(h, w):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save_image(path, h, w):
    """Write a random RGB image (PNG pixels, whatever the file name says) and return its pixels."""
    array = _rgb(h, w)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Lossless PNG data keeps pixel checks exact; Pillow decodes by content, not by extension.
    Image.fromarray(array).save(path, format="PNG")
    return array


# ----------------------------------------------------------------------------------------------
# CIFAR


def _cifar_batch(path, n, label_key, num_classes):
    data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = RNG.integers(0, num_classes, n).tolist()
    with open(path, "wb") as f:
        pickle.dump({b"data": data, label_key.encode(): labels, b"batch_label": b"x"}, f)
    return data, labels


def test_cifar10(tmp_path):
    written = [_cifar_batch(tmp_path / f"data_batch_{i}", 3, "labels", 10) for i in range(1, 6)]
    _cifar_batch(tmp_path / "test_batch", 2, "labels", 10)
    with open(tmp_path / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    train = cifar10(tmp_path)
    assert isinstance(train, AnnotatedDataset) and len(train) == 15 and train.classes[3] == "c3"
    data = np.concatenate([d for d, _ in written]).reshape(-1, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(data))
    assert train.labels.tolist() == [label for _, labels in written for label in labels]
    sample = train[4]
    assert set(sample) == {"image", "label"} and sample["image"].shape == (3, 32, 32)
    assert len(cifar10(tmp_path, train=False)) == 2
    resized = cifar10(tmp_path, train=False, size=16)
    assert resized.images.shape == (2, 3, 16, 16)
    # The published CIFAR-10 training statistics, whatever the split or size (not these random pixels').
    for ds in (train, resized):
        assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)


def test_cifar100_and_errors(tmp_path):
    _, labels = _cifar_batch(tmp_path / "train", 4, "fine_labels", 100)
    ds = cifar100(tmp_path)
    assert ds.labels.tolist() == labels and ds.num_classes == 100
    assert ds.mean == (0.5071, 0.4865, 0.4409) and ds.std == (0.2673, 0.2564, 0.2762)
    with pytest.raises(FileNotFoundError, match="test"):
        cifar100(tmp_path, train=False)
    (tmp_path / "test").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match=r"test: not a readable CIFAR pickle"):
        cifar100(tmp_path, train=False)
    with open(tmp_path / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [100]}, f)
    with pytest.raises(ValueError, match=r"test: label 100 out of range \[0, 100\)"):
        cifar100(tmp_path, train=False)
    with open(tmp_path / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [1]}, f)
    with pytest.raises(ValueError, match="test: expected 'data' of shape"):
        cifar100(tmp_path, train=False)
    # Other types are refused, not cast: 300.0 would wrap to 44, a nested list could expand without bound.
    for data, labels, match in [(np.full((1, 3072), 300.0), [1], r"'data' as a uint8 numpy array, got ndarray"),
                                ([[0] * 3072], [1], r"'data' as a uint8 numpy array, got list"),
                                (np.zeros((1, 3072), np.uint8), [1.5], r"'fine_labels' as a list of integers"),
                                (np.zeros((1, 3072), np.uint8), [2**70], r"'fine_labels' as a list of integers")]:
        with open(tmp_path / "test", "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels}, f)
        with pytest.raises(ValueError, match=rf"test: expected {match}"):
            cifar100(tmp_path, train=False)


class _RunsCode:
    """Unpickling this writes the marker file: what a crafted data_batch_1 could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_in_every_pickle_protocol_load(tmp_path, protocol):
    data = RNG.integers(0, 256, (3, 3072), dtype=np.uint8)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": [0, 9, 4], b"filenames": [b"a.png", b"b.png", b"c.png"]}, f, protocol)
    ds = cifar10(tmp_path, train=False)
    assert torch.equal(ds.images, torch.from_numpy(data.reshape(3, 3, 32, 32))) and ds.labels.tolist() == [0, 9, 4]


@pytest.mark.parametrize("payload", ["reduce", "in_a_list", "object_array"])
def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path, payload):
    marker = tmp_path / "ran"
    blob = {
        "reduce": _RunsCode(marker),
        "in_a_list": {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_RunsCode(marker)]},
        # An object array's items are pickles themselves: refused at its dtype.
        "object_array": {b"data": np.array([_RunsCode(marker)], dtype=object), b"labels": [0]},
    }[payload]
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump(blob, f)
    with pytest.raises(ValueError, match=r"test_batch: not a readable CIFAR pickle batch \((refused global|object dtype)"):
        cifar10(tmp_path, train=False)
    assert not marker.exists()
    with open(tmp_path / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": _RunsCode(marker)}, f)
    with pytest.raises(ValueError, match=r"batches.meta: not a readable CIFAR pickle batch \(refused global"):
        cifar10(tmp_path, train=False)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Tiny ImageNet


def _tiny(root):
    wnids = ["n001", "n002"]
    (root).mkdir(exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        lines = []
        for k in range(2):
            name = f"{wnid}_{k}.JPEG"
            _save_image(root / "train" / wnid / "images" / name, 16, 16)
            lines.append(f"{name}\t{k}\t{k + 1}\t{10 + k}\t15")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(lines) + "\n")
    _save_image(root / "val" / "images" / "val_0.JPEG", 16, 16)
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn002\t2\t3\t7\t9\n")


def test_tiny_imagenet(tmp_path):
    _tiny(tmp_path)
    train = tiny_imagenet(tmp_path, size=16)
    assert isinstance(train, ImageFiles) and len(train) == 4 and train.classes == ["n001", "n002"]
    assert train.image_size == (16, 16)
    sample = train[3]  # n002_1: inclusive corners (1, 2, 11, 15) -> half-open (1, 2, 12, 16)
    assert sample["label"].item() == 1 and sample["box"].tolist() == [1, 2, 12, 16]
    assert set(sample) == {"image", "label", "box"} and sample["image"].shape == (3, 16, 16)
    pixels = np.array(Image.open(tmp_path / "train" / "n002" / "images" / "n002_1.JPEG"))
    assert torch.equal(sample["image"], torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    val = tiny_imagenet(tmp_path, split="val", size=32)  # boxes scale with the image (x2)
    assert val[0]["label"].item() == 1 and val[0]["box"].tolist() == [4, 6, 16, 20]
    assert val[0]["image"].shape == (3, 32, 32)
    assert train.mean == IMAGENET_MEAN == (0.485, 0.456, 0.406) and train.std == IMAGENET_STD == (0.229, 0.224, 0.225)
    resident = train.materialize()  # decoded into whole tensors, still normalised like ImageNet
    assert resident.mean == IMAGENET_MEAN and resident.std == IMAGENET_STD


def test_tiny_imagenet_errors(tmp_path):
    _tiny(tmp_path)
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn999\t2\t3\t7\t9\n")
    with pytest.raises(ValueError, match=r"val_annotations.txt:1: class 'n999'.*out of range"):
        tiny_imagenet(tmp_path, split="val")
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn001\t2\tx\t7\t9\n")
    with pytest.raises(ValueError, match=r"val_annotations.txt:1: expected integers"):
        tiny_imagenet(tmp_path, split="val")
    (tmp_path / "train" / "n001" / "images" / "n001_0.JPEG").unlink()
    with pytest.raises(FileNotFoundError, match="n001_0.JPEG"):
        tiny_imagenet(tmp_path)
    with pytest.raises(ValueError, match="split"):
        tiny_imagenet(tmp_path, split="test")
    (tmp_path / "wnids.txt").unlink()
    with pytest.raises(FileNotFoundError, match="wnids.txt"):
        tiny_imagenet(tmp_path)


def test_corrupt_image_named_at_access(tmp_path):
    _tiny(tmp_path)
    train = tiny_imagenet(tmp_path)
    (tmp_path / "train" / "n001" / "images" / "n001_1.JPEG").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"n001_1.JPEG: cannot decode image"):
        train[1]


# ----------------------------------------------------------------------------------------------
# Flowers-17


def _flowers(root, numbers, h=12, w=10):
    masks = {}
    (root / "jpg").mkdir(parents=True, exist_ok=True)
    for number in numbers:
        Image.fromarray(_rgb(h, w)).save(root / "jpg" / f"image_{number:04d}.jpg")  # a real JPEG
        trimap = np.zeros((h, w, 3), np.uint8)  # black background
        trimap[2:7, 3:8] = (128, 0, 0)  # the flower
        trimap[8:10, 1:3] = (128, 128, 0)  # another trimap class: not the flower
        _png(root / "trimaps" / f"image_{number:04d}.png", trimap)
        masks[number] = (trimap == (128, 0, 0)).all(-1)
    return masks


def test_flowers17(tmp_path):
    masks = _flowers(tmp_path, [1, 81, 1360])
    Image.fromarray(_rgb(12, 10)).save(tmp_path / "jpg" / "image_0002.jpg")  # no trimap
    ds = flowers17(tmp_path, size=(12, 10))
    assert len(ds) == 3 and [r.label for r in ds.records] == [0, 1, 16] and ds.num_classes == 17
    sample = ds[1]
    assert torch.equal(sample["mask"][0], torch.from_numpy(masks[81]))
    assert sample["box"].tolist() == [3, 2, 8, 7]
    big = flowers17(tmp_path, size=(24, 20))[0]  # mask upscaled by 2, box with it
    assert big["mask"].shape == (1, 24, 20) and big["box"].tolist() == [6, 4, 16, 14]
    assert torch.equal(big["box"], boxes_from_masks(big["mask"][None])[0])
    everything = flowers17(tmp_path, size=8, segmented_only=False)
    assert len(everything) == 4 and set(everything[0]) == {"image", "label"}
    split = flowers17(tmp_path, size=8, indices=[81])
    assert len(split) == 1 and split[0]["label"].item() == 1
    assert ds.mean == IMAGENET_MEAN and ds.std == IMAGENET_STD


def test_flowers17_errors(tmp_path):
    _flowers(tmp_path, [5])
    _png(tmp_path / "trimaps" / "image_0005.png", np.zeros((6, 6, 3), np.uint8))
    with pytest.raises(ValueError, match=r"image_0005.png: mask size 6x6 does not match image .*image_0005.jpg"):
        flowers17(tmp_path)[0]
    Image.fromarray(_rgb(4, 4)).save(tmp_path / "jpg" / "image_1361.jpg")
    with pytest.raises(ValueError, match=r"image_1361.jpg: .*label 17, out of range"):
        flowers17(tmp_path, segmented_only=False)
    with pytest.raises(FileNotFoundError, match="jpg"):
        flowers17(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------
# ImageFolder + PASCAL VOC XML


def _voc_xml(path, w, h, boxes):
    objects = "".join(
        f"<object><name>x</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>"
        for a, b, c, d in boxes
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objects}</annotation>"
    )


def test_image_folder_voc(tmp_path):
    root, ann = tmp_path / "train", tmp_path / "Annotation"
    _save_image(root / "n01" / "n01_1.JPEG", 20, 40)
    _save_image(root / "n01" / "n01_2.JPEG", 20, 40)  # no XML
    _save_image(root / "n02" / "n02_1.JPEG", 20, 40)
    (root / "n02" / "notes.txt").write_text("not an image")
    _voc_xml(ann / "n01" / "n01_1.xml", 40, 20, [(3, 2, 10, 8), (20, 5, 30, 12)])  # nested layout
    _voc_xml(ann / "n02_1.xml", 40, 20, [(1, 1, 40, 20)])  # flat layout, whole image
    ds = image_folder(root, annotations=ann, size=(10, 20))
    assert ds.classes == ["n01", "n02"] and len(ds) == 2  # the image without XML is skipped
    # Union of the two boxes in 1-based inclusive corners: (2, 1, 30, 12) half-open, then /2.
    assert ds[0]["box"].tolist() == [1, 0, 15, 6]
    assert ds[1]["box"].tolist() == [0, 0, 20, 10] and ds[1]["label"].item() == 1
    full = image_folder(root, annotations=ann, size=(10, 20), missing_boxes="full")
    assert len(full) == 3 and full[1]["box"].tolist() == [0, 0, 20, 10]
    with pytest.raises(FileNotFoundError, match=r"n01_2.xml: no box annotation"):
        image_folder(root, annotations=ann, missing_boxes="error")
    plain = image_folder(root, size=8)
    assert len(plain) == 3 and set(plain[0]) == {"image", "label"}
    assert plain.mean == IMAGENET_MEAN and plain.std == IMAGENET_STD
    batches = dataset_loader(ds, batch_size=2, resident=False)
    (batch,) = list(batches)
    assert batch["image"].shape == (2, 3, 10, 20) and batch["box"].shape == (2, 4)


def test_image_folder_masks(tmp_path):
    root, masks = tmp_path / "train", tmp_path / "masks"
    _save_image(root / "a" / "a_1.jpg", 12, 16)
    _save_image(root / "a" / "a_2.jpg", 12, 16)  # no mask
    mask = np.zeros((12, 16), np.uint8)
    mask[3:7, 5:12] = 200
    _png(masks / "a" / "a_1.png", mask)
    ds = image_folder(root, masks=masks, size=(12, 16))
    assert len(ds) == 1 and torch.equal(ds[0]["mask"][0], torch.from_numpy(mask > 0))
    assert ds[0]["box"].tolist() == [5, 3, 12, 7]
    full = image_folder(root, masks=masks, size=(6, 8), missing_boxes="full")
    assert len(full) == 2 and full[1]["mask"].all() and full[1]["box"].tolist() == [0, 0, 8, 6]
    with pytest.raises(FileNotFoundError, match=r"a_2.png: no mask for"):
        image_folder(root, masks=masks, missing_boxes="error")
    with pytest.raises(ValueError, match="annotations, masks"):
        image_folder(root, annotations=tmp_path, masks=masks)
    _png(masks / "a" / "a_1.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(ValueError, match=r"a_1.png: mask size 5x5 does not match image"):
        ds[0]


def test_image_folder_voc_errors(tmp_path):
    root, ann = tmp_path / "train", tmp_path / "ann"
    _save_image(root / "a" / "a_1.jpg", 20, 40)
    _voc_xml(ann / "a_1.xml", 41, 20, [(1, 1, 5, 5)])
    ds = image_folder(root, annotations=ann, size=8)
    with pytest.raises(ValueError, match=r"a_1.xml: annotated size 41x20 does not match image"):
        ds[0]
    (ann / "a_1.xml").write_text("<annotation><object>")
    with pytest.raises(ValueError, match=r"a_1.xml: malformed XML"):
        ds[0]
    _voc_xml(ann / "a_1.xml", "forty", 20, [(1, 1, 5, 5)])
    with pytest.raises(ValueError, match=r"a_1.xml: <size> needs integer width and height"):
        ds[0]
    _voc_xml(ann / "a_1.xml", 40, 20, [(1, 1, "inf", 5)])
    with pytest.raises(ValueError, match=r"a_1.xml: bndbox needs numeric xmin, ymin, xmax, ymax"):
        ds[0]
    with pytest.raises(ValueError, match="missing_boxes"):
        image_folder(root, annotations=ann, missing_boxes="maybe")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        image_folder(root, annotations=tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------
# Oxford-IIIT Pet


def _pets(root, names):
    lines = ["#Image CLASS-ID SPECIES BREED ID", "#ID: 1:37 Class ids"]
    trimaps = {}
    for name, class_id in names:
        _save_image(root / "images" / f"{name}.jpg", 12, 14)
        trimap = np.full((12, 14), 2, np.uint8)  # background
        trimap[3:9, 4:11] = 3  # border
        trimap[4:8, 5:10] = 1  # pet
        _png(root / "annotations" / "trimaps" / f"{name}.png", trimap)
        trimaps[name] = trimap
        lines.append(f"{name} {class_id} 1 1")
    (root / "annotations" / "list.txt").write_text("\n".join(lines) + "\n")
    return trimaps


def test_oxford_pets(tmp_path):
    trimaps = _pets(tmp_path, [("Abyssinian_1", 1), ("yorkshire_terrier_7", 37)])
    (tmp_path / "annotations" / "test.txt").write_text("yorkshire_terrier_7 37 2 25\n")
    ds = oxford_pets(tmp_path, size=(12, 14))
    assert len(ds) == 2 and ds.classes[0] == "Abyssinian" and ds.classes[36] == "yorkshire_terrier"
    sample = ds[1]
    want = torch.from_numpy(trimaps["yorkshire_terrier_7"] != 2)
    assert sample["label"].item() == 36 and torch.equal(sample["mask"][0], want)
    assert sample["box"].tolist() == [4, 3, 11, 9]
    test = oxford_pets(tmp_path, split="test", size=6)
    assert len(test) == 1 and test[0]["mask"].shape == (1, 6, 6)
    assert test.mean == IMAGENET_MEAN and test.std == IMAGENET_STD
    resident = dataset_loader(ds, batch_size=2, resident=True)
    (batch,) = list(resident)
    assert torch.equal(batch["mask"][1, 0], want)


def test_oxford_pets_errors(tmp_path):
    _pets(tmp_path, [("Bengal_3", 38)])
    with pytest.raises(ValueError, match=r"list.txt:3: class id 38 out of range"):
        oxford_pets(tmp_path)
    _pets(tmp_path, [("Bengal_3", 5)])
    (tmp_path / "annotations" / "trimaps" / "Bengal_3.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"Bengal_3.png: cannot decode mask"):
        oxford_pets(tmp_path)[0]
    (tmp_path / "annotations" / "trimaps" / "Bengal_3.png").unlink()
    with pytest.raises(FileNotFoundError, match="Bengal_3.png"):
        oxford_pets(tmp_path)[0]
    (tmp_path / "images" / "Bengal_3.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="Bengal_3.jpg"):
        oxford_pets(tmp_path)


@pytest.mark.parametrize("reader, index_file, line", [
    ("tiny_train", "wnids.txt", "../../../outside\n"),
    ("tiny_train", "train/n001/n001_boxes.txt", "../../../../outside.png 0 0 1 1\n"),
    ("tiny_val", "val/val_annotations.txt", "/etc/passwd n001 0 0 1 1\n"),
    ("pets", "annotations/list.txt", "../../outside 1 1 1\n"),
])
def test_index_files_cannot_name_files_outside_the_data_folder(tmp_path, reader, index_file, line):
    root = tmp_path / "data"
    _save_image(tmp_path / "outside.png", 8, 8)  # what a crafted index would read
    if reader == "pets":
        _pets(root, [("Bengal_3", 5)])
    else:
        _tiny(root)
    (root / index_file).write_text(line)
    with pytest.raises(ValueError, match=rf"{index_file}:1: expected a relative path inside .*, got '(\.\./|/etc)"):
        if reader == "pets":
            oxford_pets(root)
        else:
            tiny_imagenet(root, split="val" if reader == "tiny_val" else "train")


# ---------------------------------------------------------------------------------------------- digits


def test_digits_splits_are_the_bundled_data_scaled_to_bytes():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    bunch = sklearn_datasets.load_digits()
    train, test = digits(), digits(train=False)
    assert len(train) + len(test) == 1797 and len(test) == round(0.25 * 1797)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 8, 8)
    assert train.classes == [str(d) for d in range(10)]
    # Every image is one of sklearn's, grey levels 0–16 scaled to 0–255, with its own label; the
    # two splits together are the data set exactly once (compare as sorted byte rows + labels).
    expected = np.rint(bunch.images * 255 / 16).astype(np.uint8).reshape(1797, 64)
    rows = np.concatenate([train.images.reshape(-1, 64).numpy(), test.images.reshape(-1, 64).numpy()])
    labels = np.concatenate([train.labels.numpy(), test.labels.numpy()])
    key = lambda r, y: np.lexsort(np.column_stack([r, y]).T[::-1])
    ours, theirs = key(rows, labels), key(expected, bunch.target)
    np.testing.assert_array_equal(rows[ours], expected[theirs])
    np.testing.assert_array_equal(labels[ours], bunch.target[theirs])
    # The statistics are the training split's, for either split.
    assert train.mean == test.mean == channel_stats(train.images)[0]
    assert train.std == test.std == channel_stats(train.images)[1]
    # The seed changes the split; the same seed repeats it.
    assert torch.equal(digits(seed=0).images, train.images)
    assert not torch.equal(digits(seed=1).images, train.images)
    assert len(digits(test_fraction=0.5, train=False)) == round(0.5 * 1797)
    assert digits(size=16).images.shape[1:] == (1, 16, 16)
    with pytest.raises(ValueError, match="test_fraction"):
        digits(test_fraction=1.0)


def test_digits_masks_are_the_ink_and_boxes_its_tight_box():
    pytest.importorskip("sklearn.datasets")
    train = digits()
    assert train.masks.shape == train.images.shape and train.masks.dtype == torch.bool
    assert torch.equal(train.masks, train.images >= 128)
    assert torch.equal(train.boxes, boxes_from_masks(train.masks))
    assert torch.equal(digits(ink=0.25).masks, train.images >= 64)
    assert train[0]["mask"].shape == (1, 8, 8) and train[0]["box"].shape == (4,)
    with pytest.raises(ValueError, match="ink"):
        digits(ink=0.0)


def test_digits_without_scikit_learn_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="scikit-learn"):
        digits()


def test_importing_fastsat_does_not_import_scikit_learn():
    code = "import sys, fastsat, fastsat.data, fastsat.cli; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
