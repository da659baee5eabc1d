"""configs/presets: every preset loads through `fastsat train --config` and says what it claims."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from fastsat import cli
from fastsat.train import TrainConfig

PRESETS = Path(__file__).resolve().parent.parent / "configs" / "presets"
FILES = sorted(PRESETS.glob("*.yaml"))


def _load(path: Path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recipe option the recipe does not take would warn
        settings = cli.load_config("train", path)
    return cli._sections("train", settings)


def test_there_are_presets_of_both_kinds():
    names = [p.stem for p in FILES]
    assert any("-authors-" in n for n in names) and any("-fastsat-" in n for n in names)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_preset_loads_and_names_its_style(path):
    parts = _load(path)
    config: TrainConfig = parts[TrainConfig]
    recipe = config.build_recipe()
    teacher = parts[cli.TeacherOptions]
    authors = "-authors-" in path.stem
    if "saliency" in recipe.batch_keys:
        assert teacher.saliency_style == ("authors" if authors else "fastsat")
    if hasattr(recipe, "attack_mode"):
        assert recipe.attack_mode == ("train" if authors else "eval")
    if config.recipe == "sat+trades":
        assert recipe.steps == (5 if authors else 10)
    if parts[cli.DataOptions].dataset == "tiny_imagenet" and authors:
        assert parts[cli.DataOptions].image_size == 32
    assert config.optimizer == "adam" and recipe.eps == pytest.approx(8 / 255)


def test_command_line_overrides_a_preset():
    settings = cli.load_config("train", PRESETS / "sat-trades-authors-cifar10.yaml", {"steps": 7})
    assert cli._sections("train", settings)[TrainConfig].build_recipe().steps == 7
