"""One configuration (fastsat.train.TrainConfig): fit, the YAML loader and `fastsat train` take the same
options with the same defaults; --help shows every option; unknown keys name the nearest valid one."""

import dataclasses
import inspect
import re

import pytest
import torch
import yaml
from torch import nn

import fastsat.train as T
import fastsat.train.trainer as trainer_module
from fastsat import cli
from fastsat._options import show, specs

FIELDS = {f.name: f for f in dataclasses.fields(T.TrainConfig)}
DEFAULTS = {name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for name, f in FIELDS.items()}
# One valid value other than the default for every field; the first test checks it covers them all.
OTHER = {
    "recipe": "pgd", "recipe_options": {"steps": 3, "eps": 4 / 255, "attack_mode": "train"}, "epochs": 3,
    "batch_size": 16, "augment": False, "num_workers": 2, "optimizer": "adam", "lr": 0.05, "momentum": 0.5, "weight_decay": 0.0,
    "schedule": "cosine", "precision": "bf16", "channels_last": True, "compile": True, "ema": 0.9, "seed": 7,
    "clip": (0.25, 0.75), "eval_eps": 2 / 255, "eval_steps": 3, "eval_batch_size": 64, "early_stop_drop": None,
    "out_dir": "runs/x", "resume": "runs/x/checkpoint.pt", "progress": False, "sync_batchnorm": True,
    "resize_schedule": ("0:8", "2:12"),
}
RECIPE_OPTION_NAMES = {f.name for cls in T.RECIPES.values() for f in dataclasses.fields(cls) if f.init} - set(FIELDS)
CLI_ONLY = {spec.name for section in cli.COMMANDS["train"].sections if section is not T.TrainConfig
            for spec in specs(section)}


def _flat(values: dict) -> dict:
    """A TrainConfig's keyword values as flat settings (recipe options by name)."""
    return {**{k: v for k, v in values.items() if k != "recipe_options"}, **values.get("recipe_options", {})}


def _argv(flat: dict) -> list[str]:
    argv = []
    for key, value in flat.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return argv


def _train_config(settings: dict) -> T.TrainConfig:
    return cli._sections("train", settings)[T.TrainConfig]


@pytest.fixture
def captured(monkeypatch):
    """fit's Trainer replaced by one that records its configuration and trains nothing."""
    seen = []

    class Recording:
        def __init__(self, model, train_data, config, **kw):
            seen.append(config)

        def fit(self):
            return T.FitResult()

    monkeypatch.setattr(trainer_module, "Trainer", Recording)
    return seen


def test_fit_yaml_and_cli_take_the_same_options_with_the_same_defaults(tmp_path, captured):
    assert set(OTHER) == set(FIELDS), "OTHER must give a value for every TrainConfig field"
    assert all(OTHER[k] != DEFAULTS[k] for k in FIELDS)
    model = nn.Linear(2, 2)

    # fit: its signature lists exactly the fields with their defaults, and it passes them on.
    parameters = inspect.signature(T.fit).parameters
    keywords = {n: p.default for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords.pop("eval_data") is None and keywords.pop("data_settings") is None
    assert keywords == DEFAULTS
    T.fit(model, None)
    T.fit(model, None, **OTHER)
    assert captured == [T.TrainConfig(), T.TrainConfig(**OTHER)]

    # The command line: one flag per field (recipe_options spelled as the recipes' own options).
    train_flags = {spec.name for spec in cli.command_specs("train")} - CLI_ONLY
    assert train_flags == (set(FIELDS) - {"recipe_options"}) | RECIPE_OPTION_NAMES
    assert _train_config(cli.load_config("train")) == T.TrainConfig()
    args = vars(cli.build_parser().parse_args(["train", *_argv(_flat(OTHER))]))
    args.pop("command")
    assert _train_config(cli.load_config("train", overrides=args)) == T.TrainConfig(**OTHER)

    # YAML: the same flat keys, the same values.
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in _flat(OTHER).items()}))
    assert _train_config(cli.load_config("train", path)) == T.TrainConfig(**OTHER)
    assert T.TrainConfig.from_settings(yaml.safe_load(path.read_text())) == T.TrainConfig(**OTHER)


def test_train_help_shows_every_option_with_its_default_and_choices(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    # One block per option: from its flag to the next option's flag.
    blocks = {m.group(1): " ".join(m.group(2).split())
              for m in re.finditer(r"^  --([a-z-]+)(.*?)(?=^  -|\Z)", text, flags=re.MULTILINE | re.DOTALL)}
    for spec in cli.command_specs("train"):
        block = blocks.get(spec.name.replace("_", "-"))
        assert block is not None, f"--{spec.name} missing from --help"
        assert f"(default: {show(spec.default)})" in block, f"--{spec.name}: no default in {block!r}"
        for value in spec.choices or ():
            assert str(value) in block, f"--{spec.name}: choice {value!r} missing from {block!r}"
    # The recipes' own defaults are generated into their options' help.
    assert "trades 0.031" in blocks["eps"] and "sat+pgd 5" in blocks["steps"]


def test_unknown_keys_name_the_nearest_valid_one(tmp_path, captured):
    path = tmp_path / "run.yaml"
    for key, nearest in (("epoch", "epochs"), ("stpes", "steps"), ("learning_rate", None)):
        path.write_text(f"{key}: 3\n")
        hint = f"unknown key '{key}'" + (f" \\(did you mean '{nearest}'\\?\\)" if nearest else "")
        with pytest.raises(ValueError, match=hint):
            cli.load_config("train", path)
        with pytest.raises(ValueError, match=hint):
            T.TrainConfig.from_settings({key: 3})
    with pytest.raises(TypeError, match="unknown option 'epoch' \\(did you mean 'epochs'\\?\\)"):
        T.fit(nn.Linear(2, 2), None, epoch=3)
    with pytest.raises(ValueError, match="unknown options \\['stpes'\\] \\(did you mean 'steps'\\?\\)"):
        T.TrainConfig(recipe="pgd", recipe_options={"stpes": 3})


def test_checks_accept_any_real_and_reject_bad_values():
    import numpy as np

    config = T.TrainConfig(lr=np.float32(0.5), epochs=np.int64(2), ema=torch.tensor(0.25), eval_eps=1 / 255)
    assert (config.lr, config.epochs, config.ema) == (0.5, 2, 0.25)
    assert type(config.lr) is float and type(config.epochs) is int
    for bad, error, name in (({"epochs": 2.5}, ValueError, "epochs"), ({"lr": "0.1"}, TypeError, "lr"),
                             ({"schedule": "cosin"}, ValueError, "did you mean 'cosine'"), ({"clip": (1, 0)}, ValueError, "clip"),
                             ({"augment": 1}, TypeError, "augment"), ({"ema": 1.0}, ValueError, "ema"),
                             ({"recipe_options": {"clip": (0, 1)}}, ValueError, "TrainConfig.clip")):
        with pytest.raises(error, match=name):
            T.TrainConfig(**bad)


def test_fast_early_stop_is_the_recipes_declaration_not_an_option(tmp_path):
    # Fast's early stop is a class attribute the trainer reads: not a field, so not in options()
    # and not in the checkpoint's record of the recipe's settings.
    assert T.Fast.early_stop is True and T.PGDTraining.early_stop is False
    assert "early_stop" not in T.Fast().options()
    with pytest.raises(ValueError, match="unknown options"):
        T.make_recipe("fast", early_stop=False)
    from fastsat.data import shapes

    data = shapes(16, size=8, num_classes=2, seed=0, cache_dir=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    T.fit(model, data, recipe="fast", epochs=1, batch_size=8, eval_data=data, eval_steps=1, out_dir=tmp_path, progress=False)
    recorded = T.load_checkpoint(tmp_path / "checkpoint.pt")["config"]["recipe_options"]
    assert recorded == T.Fast().options() and "early_stop" not in recorded


def test_the_config_builds_its_recipe_once_and_gives_each_run_a_fresh_copy(monkeypatch):
    built = []
    real = T.config.make_recipe

    def counting(*args, **kwargs):
        built.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(T.config, "make_recipe", counting)
    config = T.TrainConfig(recipe="free", recipe_options={"replays": 2}, clip=(0.25, 0.75))
    first, second = config.build_recipe(), config.build_recipe()
    config.recorded()
    assert len(built) == 1, f"the recipe was built {len(built)} times"
    assert first is not second and first.options() == second.options() == T.Free(replays=2, clip=(0.25, 0.75)).options()
    first.load_state_dict({"delta": torch.ones(1)})
    assert second.state_dict()["delta"] is None, "two runs of one config share the recipe's state"


def test_run_options_are_declared_by_the_recipes_and_taken_from_the_config():
    # clip is the run's for every recipe that perturbs its inputs (from_run), and for no other.
    assert T.PerturbationRecipe.from_run == ("clip",) and T.Standard.from_run == () and T.GradNorm.from_run == ()
    for name, cls in T.RECIPES.items():
        recipe = T.TrainConfig(recipe=name, clip=(0.25, 0.75)).build_recipe()
        assert {k: getattr(recipe, k) for k in cls.from_run} == {k: (0.25, 0.75) for k in cls.from_run}, name
    config = T.TrainConfig(recipe="pgd", clip=(0.25, 0.75))
    assert config.check_recipe(T.PGDTraining(clip=(0.25, 0.75))).clip == (0.25, 0.75)
    with pytest.raises(ValueError, match="not the one the configuration describes"):
        config.check_recipe(T.PGDTraining())
    with pytest.raises(TypeError, match="recipe: expected a Recipe"):
        config.check_recipe("pgd")


def test_recipe_docstrings_list_their_options_with_the_declared_defaults():
    for name, cls in T.RECIPES.items():
        for spec in specs(cls):
            assert f"    {spec.name}: {spec.help}" in cls.__doc__ and f"(default: {show(spec.default)})" in cls.__doc__, \
                f"{name}: help() does not document {spec.name}"
