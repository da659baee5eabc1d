"""fastsat.data.create: the named data sets, as the CLI reads them."""

import pickle

import numpy as np
import pytest
import torch

from fastsat import data


def test_create_shapes_is_the_seeded_pair(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTSAT_CACHE", str(tmp_path))  # not the user's cache; the reference is generated uncached
    train, test = data.create("shapes", size=12, n_train=6, n_test=4, num_classes=3, seed=5)
    assert torch.equal(train.images, data.generate_shapes(6, size=12, num_classes=3, seed=5).images)
    assert torch.equal(test.images, data.generate_shapes(4, size=12, num_classes=3, seed=6).images)


def test_create_reads_both_splits_from_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    for name, count in (("data_batch_1", 4), ("data_batch_2", 4), ("data_batch_3", 4), ("data_batch_4", 4),
                        ("data_batch_5", 4), ("test_batch", 3)):
        blob = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8), "labels": list(range(count))}
        (tmp_path / name).write_bytes(pickle.dumps(blob))
    train, test = data.create("cifar10", tmp_path, size=16)
    assert (len(train), len(test)) == (20, 3) and train.images.shape[-2:] == (16, 16)


def test_create_names_the_nearest_data_set_and_needs_a_folder_for_files():
    with pytest.raises(ValueError, match=r"dataset: expected one of 'shapes', .*got 'cifr10' \(did you mean 'cifar10'\?\)"):
        data.create("cifr10")
    with pytest.raises(ValueError, match=r"data_dir: dataset 'imagefolder' reads files; expected the folder"):
        data.create("imagefolder")
    assert [name for name, entry in data.DATASETS.items() if not entry.reads_files] == ["shapes"]

