"""Renamed or moved public names keep working for one release and warn, naming the new one."""

import importlib

import pytest
import torch

from fastsat import _options, data


def test_train_options_warns_and_names_the_public_path():
    options = importlib.import_module("fastsat.train.options")
    with pytest.warns(DeprecationWarning, match=r"fastsat\.train\.options\.show is deprecated.*fastsat\._options.*"
                                                r"fastsat\.cli\.command_specs"):
        show = options.show
    assert show is _options.show
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        options.nothing  # noqa: B018


@pytest.mark.parametrize("old,new", [("loader", "dataset_loader"), ("make_loader", "as_batches")])
def test_renamed_data_functions_warn_and_do_the_same(old, new):
    dataset = data.generate_shapes(6, size=8, num_classes=2, seed=0)
    with pytest.warns(DeprecationWarning, match=rf"fastsat\.data\.{old} is deprecated .*use fastsat\.data\.{new}$"):
        batches = getattr(data, old)(dataset, batch_size=4, shuffle=True, seed=1, device=torch.device("cpu"))
    again = getattr(data, new)(dataset, batch_size=4, shuffle=True, seed=1, device=torch.device("cpu"))
    for got, want in zip(batches, again, strict=True):
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["label"], want["label"])
    assert getattr(data, old).__name__ == old and old in data.__all__
