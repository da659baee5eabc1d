"""The fastsat command line: config files, overrides, --help, and a tiny end-to-end train/eval."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from fastsat import cli

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_config_then_command_line_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"recipe": "pgd", "eps": "4/255", "epochs": 3, "lr": 0.05, "channels-last": True}))
    args = vars(cli.build_parser().parse_args(["train", "--config", str(config), "--epochs", "7", "--steps", "3"]))
    args.pop("command")
    cfg = cli.load_config("train", args.pop("config"), args)
    assert cfg["recipe"] == "pgd"  # from the file
    assert cfg["eps"] == pytest.approx(4 / 255, rel=1e-15)  # fraction parsed
    assert cfg["epochs"] == 7 and cfg["steps"] == 3  # command line wins
    assert cfg["channels_last"] is True and cfg["lr"] == 0.05
    assert cfg["optimizer"] == "sgd"  # default


def test_eval_eps_list_parsing():
    args = vars(cli.build_parser().parse_args(["eval", "--eps", "2/255,4/255, 0.5", "--attacks", "pgd,apgd-ce"]))
    assert args["eps"] == pytest.approx([2 / 255, 4 / 255, 0.5], rel=1e-15)
    assert args["attacks"] == ["pgd", "apgd-ce"]


def test_bad_config_is_reported(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("epoch: 3\n")
    with pytest.raises(ValueError, match="unknown key 'epoch'"):
        cli.load_config("train", config)
    config.write_text("recipe: madry\n")
    with pytest.raises(ValueError, match="recipe"):
        cli.load_config("train", config)
    config.write_text("eps: eight\n")
    with pytest.raises(ValueError, match="eps"):
        cli.load_config("train", config)
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    with pytest.raises(SystemExit):
        cli.main(["train", "--recipe", "madry"])


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_lists_every_option_with_its_default(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    positional = cli.COMMANDS[command].positional
    for option in cli.command_specs(command):
        flag = option.name.upper() if option.name in positional else "--" + option.name.replace("_", "-")
        assert flag in text, f"{command}: {flag} missing from --help"
    assert text.count("(default:") >= len(cli.command_specs(command)) - len(positional)


def test_demo_help_states_the_demo_sizes():
    # The demo's sizes live in fastsat.demo; its --help must quote them, not a stale copy.
    from fastsat.demo import FULL_SIZES, QUICK_SIZES

    helps = {option.name: option.help for option in cli.command_specs("demo")}
    for key in ("epochs", "n_train", "n_test", "image_size"):
        want = f"None: {FULL_SIZES[key]}, quick: {QUICK_SIZES[key]}"
        assert want in helps[key], f"demo --{key} help {helps[key]!r} does not say {want!r}"


def test_train_then_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--n-train", "32", "--n-test", "16", "--image-size", "12", "--num-classes", "3", "--model", "madrycnn",
              "--width", "4", "--batch-size", "16", "--device", "cpu"]
    status = cli.main(["train", *common, "--recipe", "sat", "--maps", "masks", "--epochs", "2", "--eval-steps", "2",
                       "--out-dir", str(out), "--no-augment", "--no-progress"])
    assert status == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["recipe"] == "sat" and saved["maps"] == "masks"
    # eval takes data and model settings from the run's config.yaml.
    status = cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--eps", "0,8/255", "--steps", "2",
                       "--out", str(tmp_path / "eval.json")])
    assert status == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n"] == 16
    pgd = report["attacks"]["pgd"]
    assert pgd[0]["acc"] == pytest.approx(report["clean_acc"]) and pgd[1]["acc"] <= report["clean_acc"]


def test_teacher_maps_then_saliency_and_analyze(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSAT_CACHE", str(tmp_path / "cache"))
    common = ["--n-train", "32", "--n-test", "8", "--image-size", "12", "--num-classes", "3", "--model", "madrycnn",
              "--width", "4", "--batch-size", "16", "--device", "cpu", "--no-progress", "--eval-steps", "1"]
    teacher = tmp_path / "teacher"
    assert cli.main(["train", *common, "--recipe", "standard", "--epochs", "1", "--out-dir", str(teacher)]) == 0
    student = tmp_path / "student"
    assert cli.main(["train", *common, "--recipe", "sat", "--maps", "saliency", "--teacher", str(teacher / "checkpoint.pt"),
                     "--saliency-method", "guided_backprop", "--epochs", "1", "--out-dir", str(student)]) == 0
    cached = list((tmp_path / "cache").glob("sat-maps-guided_backprop-*.pt"))
    assert len(cached) == 1, f"expected one cached map file, found {cached}"
    assert cli.main(["saliency", "--checkpoint", str(student / "checkpoint.pt"), "--methods", "gradient,gradcam_pp",
                     "--n-samples", "3", "--out-dir", str(tmp_path / "maps")]) == 0
    assert (tmp_path / "maps" / "saliency_grid.png").stat().st_size > 0
    assert cli.main(["analyze", "--checkpoint", str(student / "checkpoint.pt"), "--n-samples", "6",
                     "--out-dir", str(tmp_path / "analysis")]) == 0
    assert {"alignment.csv", "alignment.json", "alignment_scatter.png"} <= {p.name for p in (tmp_path / "analysis").iterdir()}


def test_a_checkpoint_with_ema_loads_the_averaged_weights(tmp_path):
    # fit() evaluates the EMA weights every epoch; `fastsat eval` on that checkpoint must score the same weights.
    import torch

    from fastsat import data, train

    options = cli.ModelOptions(model="madrycnn", width=4)
    train_set = data.shapes(32, size=12, num_classes=3, seed=0, cache_dir=False)
    torch.manual_seed(0)
    model = cli._model(options, train_set)
    train.fit(model, train_set, recipe="standard", epochs=1, batch_size=16, ema=0.5, out_dir=tmp_path, progress=False)
    saved = train.load_checkpoint(tmp_path / "checkpoint.pt")["ema"]
    ema = {k.removeprefix("module."): v for k, v in saved.items() if k != "n_averaged"}  # either checkpoint layout
    loaded = cli._trained_model(options, train_set, torch.device("cpu"), str(tmp_path / "checkpoint.pt")).state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, ema[key]), f"{key}: loaded weights differ from the EMA's"
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in loaded.items()), "EMA equals the raw weights: the test cannot tell"


def test_models_normalise_with_the_training_sets_statistics(tmp_path):
    # `fastsat train` builds the model with the training set's .mean/.std, and `fastsat eval` rebuilds it so.
    import torch

    from fastsat import data
    from fastsat.train import load_checkpoint

    out = tmp_path / "run"
    assert cli.main(["train", "--n-train", "32", "--n-test", "8", "--image-size", "12", "--num-classes", "3",
                     "--model", "madrycnn", "--width", "4", "--batch-size", "16", "--device", "cpu", "--recipe", "standard",
                     "--epochs", "1", "--eval-steps", "1", "--out-dir", str(out), "--no-progress"]) == 0
    train_set = data.shapes(32, size=12, num_classes=3, seed=0)
    state = load_checkpoint(out / "checkpoint.pt")["model"]
    for key in ("mean", "std"):
        want = torch.tensor(getattr(train_set, key))
        assert torch.allclose(state[f"normalize.{key}"].flatten(), want, rtol=0, atol=1e-7), f"{key}: {state[f'normalize.{key}']}"
    assert not torch.allclose(torch.tensor(train_set.mean), torch.zeros(3)), "identity statistics: the test cannot tell"
    model = cli._trained_model(cli.ModelOptions(model="madrycnn", width=4), train_set, torch.device("cpu"),
                               str(out / "checkpoint.pt"))
    assert model.normalize.enabled


def _image_folder(root: Path, per_class: int) -> Path:
    """An ImageFolder of 32x32 JPEGs: two classes (dark and bright images), ``per_class`` each."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label, name in enumerate(("dark", "bright")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(32, 32, 3, generator=generator) * 120 + 120 * label).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / name / f"{name}{i}.jpg")
    return root


def test_data_pack_then_train_on_the_shards(tmp_path):
    for split, count in (("train", 5), ("val", 2)):
        _image_folder(tmp_path / "images" / split, count)
        assert cli.main(["data", "pack", str(tmp_path / "images" / split), str(tmp_path / "shards" / split),
                         "--shard-size", "4"]) == 0
    index = json.loads((tmp_path / "shards" / "train" / "index.json").read_text())
    assert index["count"] == 10 and [s["count"] for s in index["shards"]] == [4, 4, 2]
    assert index["classes"] == ["bright", "dark"]
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "shards", "--data-dir", str(tmp_path / "shards"), "--image-size", "16",
                     "--model", "madrycnn", "--width", "4", "--recipe", "fast", "--epochs", "1", "--batch-size", "5",
                     "--eval-steps", "1", "--device", "cpu", "--no-progress", "--out-dir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["images_per_s"] > 0


def test_data_pack_refuses_bad_options(tmp_path, capsys):
    assert cli.main(["data", "pack", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    with pytest.raises(SystemExit):
        cli.main(["data", "pack", str(tmp_path), str(tmp_path / "out"), "--missing-boxes", "drop"])
    assert "missing_boxes" in capsys.readouterr().err


def test_the_imagenet_configs_differ_only_in_the_radius():
    four, two = (cli.load_config("train", CONFIGS / "fast-at" / f"resnet50-imagenet-eps{k}.yaml") for k in (4, 2))
    differing = {key for key in four if four[key] != two[key]}
    assert differing == {"eps", "eval_eps"} and four["eps"] == 2 * two["eps"] == pytest.approx(4 / 255)


@pytest.mark.parametrize("name", ["resnet50-imagenet-eps4", "resnet50-tiny-imagenet-eps4"])
def test_fast_at_configs_train_end_to_end(name, tmp_path):
    config = CONFIGS / "fast-at" / f"{name}.yaml"
    # The repository's ResNet-50 Fast-AT configs as they are, on a fixture ImageFolder: only the data,
    # the length, the width and what a CPU cannot do (fp16) are overridden. One batch of all 8 images:
    # from batches of 4, the batch-norm statistics of layer4's 1x1 maps made the Tiny ImageNet run's
    # eval-mode logits overflow to NaN after epoch 1 (which evaluation refuses).
    _image_folder(tmp_path / "images" / "train", 4)
    _image_folder(tmp_path / "images" / "val", 2)
    settings = yaml.safe_load(config.read_text())
    assert settings["model"] == "resnet50" and settings["recipe"] == "fast" and settings["resize_schedule"]
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--dataset", "imagefolder", "--data-dir", str(tmp_path / "images"),
                     "--image-size", "32", "--epochs", "2", "--batch-size", "8", "--width", "4", "--precision", "fp32",
                     "--eval-steps", "1", "--device", "cpu", "--no-progress", "--out-dir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["resize_schedule"] == settings["resize_schedule"].split(",") and saved["stem"] == "imagenet"


def test_progressive_resizing_feeds_each_phase_its_size():
    from fastsat import data, models, train

    model = models.create("madrycnn", num_classes=3, width=4, hidden=16)
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(tuple(args[0].shape[-2:])) if module.training else None)
    train_set = data.shapes(8, size=12, num_classes=3, seed=0, cache_dir=False)
    train.fit(model, train_set, recipe="standard", epochs=3, batch_size=4, resize_schedule=["0:6", "2:16"], progress=False)
    assert sizes == [(6, 6)] * 4 + [(16, 16)] * 2  # 2 batches per epoch: epochs 1-2 at 6 px, epoch 3 at 16 px


def test_resize_schedule_is_checked():
    from fastsat.train import TrainConfig

    for bad in (["6:128"], ["0:128", "0:224"], ["0:0"], ["0-128"]):
        with pytest.raises(ValueError, match="resize_schedule"):
            TrainConfig(resize_schedule=bad)
    with pytest.raises(TypeError, match="resize_schedule"):
        TrainConfig(resize_schedule="0:128")
    assert TrainConfig(resize_schedule=["0:128", "6:224"]).image_size(5) == 128
    assert TrainConfig(resize_schedule=["0:128", "6:224"]).image_size(6) == 224
