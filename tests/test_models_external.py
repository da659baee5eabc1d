"""Models from outside the zoo (fastsat.models.create): "package.module:factory" with a classifier
defined here, through fit, checkpoint, resume and `fastsat eval`; "timm:NAME" where timm imports."""

import importlib
import json
import sys

import pytest
import torch
from torch import nn

import fastsat.train as T
from fastsat import cli, models
from fastsat.data import shapes

HERE = "test_models_external"  # pytest puts tests/ on sys.path: this file is importable by that name


def small_classifier(num_classes: int, width: int = 4) -> nn.Module:
    """A user's own classifier of normalised 3-channel input (any size)."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, num_classes))


def not_a_module(num_classes: int) -> str:
    return "model"


TRAIN = shapes(32, size=12, num_classes=3, seed=0, cache_dir=False)
TEST = shapes(16, size=12, num_classes=3, seed=1, cache_dir=False)


def _create(**kw):
    torch.manual_seed(0)
    return models.create(f"{HERE}:small_classifier", num_classes=3, mean=TRAIN.mean, std=TRAIN.std, width=5, **kw)


def test_a_factory_model_is_built_with_its_arguments_behind_the_datas_normalisation():
    model = _create()
    assert isinstance(model, models.Normalized) and model.net[0].out_channels == 5 and model.net[-1].out_features == 3
    x = torch.rand(4, 3, 12, 12)
    mean, std = torch.tensor(TRAIN.mean).view(1, 3, 1, 1), torch.tensor(TRAIN.std).view(1, 3, 1, 1)
    model.eval()
    assert torch.equal(model(x), model.net((x - mean) / std))
    assert models.default_cam_layer(model) is model.net[0]


@pytest.mark.parametrize("recipe, options", [("pgd", {"steps": 1, "awp_gamma": 5e-3}), ("trades", {"steps": 1}),
                                             ("mart", {"steps": 1}), ("nfgsm", {}), ("gradalign", {}), ("sat", {}),
                                             ("free", {"replays": 2})])
def test_a_factory_model_trains_with_the_recipes(recipe, options):
    model = _create()
    before = [p.detach().clone() for p in model.parameters()]
    result = T.fit(model, TRAIN, recipe=recipe, recipe_options=options, epochs=1, batch_size=16, progress=False,
                   channels_last=True)
    assert len(result.history) == 1 and result.history[0]["train_loss"] > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)), "no weight moved"


class _Stop(Exception):
    pass


def test_a_factory_model_checkpoints_resumes_and_evaluates_from_the_cli(tmp_path, monkeypatch):
    out = tmp_path / "run"
    common = ["--model", f"{HERE}:small_classifier", "--model-args", "{width: 5}", "--n-train", "32", "--n-test", "16",
              "--image-size", "12", "--num-classes", "3", "--batch-size", "16", "--device", "cpu", "--recipe", "fast",
              "--eval-steps", "2", "--no-progress", "--out-dir", str(out)]
    real_log = T.Trainer.log

    def stop_after_the_first_epoch(self, record):
        real_log(self, record)
        if record["epoch"] == 1:
            raise _Stop

    monkeypatch.setattr(T.Trainer, "log", stop_after_the_first_epoch)
    with pytest.raises(_Stop):
        cli.main(["train", *common, "--epochs", "2"])
    first = (out / "metrics.jsonl").read_text()
    monkeypatch.undo()
    assert cli.main(["train", *common, "--epochs", "2", "--resume"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and json.loads(first) == rows[0]  # resumed, not restarted
    state = T.load_checkpoint(out / "checkpoint.pt")
    assert state["model"]["net.0.weight"].shape[0] == 5 and "normalize.mean" in state["model"]
    # eval rebuilds the model from the run's config.yaml (model and model_args) and loads the weights.
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--eps", "0,8/255", "--steps", "2",
                     "--out", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n"] == 16 and report["attacks"]["pgd"][0]["acc"] == pytest.approx(report["clean_acc"])


def test_bad_model_names_and_arguments_are_reported(capsys):
    with pytest.raises(ValueError, match="name: cannot import 'no_such_module'"):
        models.create("no_such_module:net", num_classes=3)
    with pytest.raises(ValueError, match="has no 'missing'"):
        models.create(f"{HERE}:missing", num_classes=3)
    with pytest.raises(TypeError, match="expected a callable factory"):
        models.create(f"{HERE}:HERE", num_classes=3)
    with pytest.raises(TypeError, match="returned 'model'"):
        models.create(f"{HERE}:not_a_module", num_classes=3)
    with pytest.raises(ValueError, match="'package.module:factory'"):
        models.create("a:b:c", num_classes=3)
    with pytest.raises(ValueError, match="name: expected one of"):
        models.create("resnet11", num_classes=3)
    with pytest.raises(ValueError, match="pretrained: only timm"):
        models.create("resnet18", num_classes=3, pretrained=True)
    with pytest.raises(SystemExit):  # argparse reports the option and exits
        cli.main(["train", "--model-args", "{width: [", "--epochs", "1"])
    assert "model_args: expected a YAML mapping" in capsys.readouterr().err
    with pytest.raises(TypeError, match="model_args: expected a mapping"):
        cli.ModelOptions(model_args=[1, 2])


def test_the_convnext_fast_at_config_reads_as_the_resnet50_one_with_its_own_model_and_optimiser():
    from pathlib import Path

    configs = Path(__file__).parent.parent / "configs" / "fast-at"
    convnext, resnet = (cli.load_config("train", configs / f"{name}-imagenet-eps4.yaml") for name in ("convnext-t", "resnet50"))
    assert convnext["model"] == "timm:convnext_tiny" and convnext["pretrained"] is True
    same = ("recipe", "eps", "epochs", "batch_size", "resize_schedule", "image_size", "eval_eps", "dataset")
    assert {key: convnext[key] for key in same} == {key: resnet[key] for key in same}


def _timm_imports() -> bool:
    try:
        importlib.import_module("timm")
    except (ImportError, RuntimeError):
        return False
    return True


# scripts/setup_env.sh installs timm beside CPU torch 2.13 with the registry's torchvision 0.28.0 (a CUDA
# build; tests/conftest.py lets its Python parts import), so these run on the development machine and in CI.
needs_timm = pytest.mark.skipif(not _timm_imports(), reason="timm does not import here (not installed, or a torchvision "
                                                             "built for another torch)")


def test_without_timm_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # what an absent package does to `import timm`
    with pytest.raises(ImportError, match=r"pip install 'fastsat\[timm\]'"):
        models.create("timm:resnet18", num_classes=3)


@needs_timm
def test_a_timm_model_trains_and_loads_a_local_weights_file(tmp_path):
    import timm

    torch.manual_seed(0)
    model = models.create("timm:resnet18", num_classes=3, mean=TRAIN.mean, std=TRAIN.std)
    assert isinstance(model, models.Normalized)
    result = T.fit(model, TRAIN, recipe="nfgsm", epochs=1, batch_size=16, progress=False, eval_data=TEST, eval_steps=1)
    assert len(result.history) == 1
    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=3).state_dict(), weights)
    loaded = models.create("timm:resnet18", num_classes=3, pretrained=str(weights))
    saved = torch.load(weights)
    assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in saved.items())


@needs_timm
def test_a_weights_file_with_another_class_count_keeps_all_but_the_fresh_classifier(tmp_path):
    import timm

    imagenet = timm.create_model("resnet18", num_classes=1000).state_dict()
    weights = tmp_path / "imagenet.pth"
    torch.save(imagenet, weights)
    loaded = models.create("timm:resnet18", num_classes=3, pretrained=str(weights)).net.state_dict()
    assert loaded["fc.weight"].shape == (3, 512)
    assert all(torch.equal(loaded[k], v) for k, v in imagenet.items() if not k.startswith("fc."))


@needs_timm
def test_model_args_that_make_timm_read_files_are_refused(tmp_path):
    for key in ("checkpoint_path", "pretrained_cfg_overlay"):
        with pytest.raises(ValueError, match=rf"model_args: \['{key}'\] would make timm read weights files"):
            models.create("timm:resnet18", num_classes=3, **{key: str(tmp_path / "w.pth")})


@needs_timm
def test_a_weights_file_that_does_not_fit_is_refused_naming_it(tmp_path):
    import timm

    other = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34", num_classes=3).state_dict(), other)
    with pytest.raises(ValueError, match=r"pretrained: .*resnet34.pth.* does not fit"):
        models.create("timm:resnet18", num_classes=3, pretrained=str(other))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a weights file")
    with pytest.raises(ValueError, match=r"pretrained: cannot read .*garbage.pth"):
        models.create("timm:resnet18", num_classes=3, pretrained=str(garbage))


@needs_timm
def test_the_convnext_fast_at_config_trains_end_to_end(tmp_path):
    from pathlib import Path

    from test_cli import _image_folder

    config = Path(__file__).parent.parent / "configs" / "fast-at" / "convnext-t-imagenet-eps4.yaml"
    _image_folder(tmp_path / "images" / "train", 4)
    _image_folder(tmp_path / "images" / "val", 2)
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--dataset", "imagefolder", "--data-dir", str(tmp_path / "images"),
                     "--pretrained", "false", "--image-size", "32", "--resize-schedule", "0:32", "--epochs", "1",
                     "--batch-size", "4", "--precision", "fp32", "--eval-steps", "1", "--no-progress",
                     "--out-dir", str(out)]) == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1
