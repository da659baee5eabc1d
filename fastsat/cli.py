"""The ``fastsat`` command: ``fastsat train | eval | saliency | analyze | demo | data pack``.

Every command reads its settings from built-in defaults, then an optional YAML file
(``--config run.yaml``, keys spelled as the options with underscores), then the command line;
``fastsat <command> --help`` lists every option with its default, unit and choices. ε and step
sizes are in pixel units of images in [0, 1] and accept fractions (``--eps 8/255``).

No option is listed here by hand: ``fastsat train``'s come from :class:`fastsat.train.TrainConfig`
and the recipes' declared options, the other commands' from the small dataclasses below; choices
come from the registries (recipes, schedules, optimizers, precisions, ``fastsat.models.names()``,
the data sets below, attacks, saliency methods). See :mod:`fastsat._options`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import yaml

from fastsat import _dist, data, models, saliency
from fastsat._checks import choice, flag, mapping, number, path, positive_int, seed, writable_path
from fastsat._checks import device as device_of
from fastsat._io import atomic_save, atomic_write_text, locked_folder
from fastsat._options import Spec, is_sequence, option, parse, show, specs, unknown_keys, validate
from fastsat.alignment import ALIGNMENT_TARGETS
from fastsat.demo import DEMO_RECIPES, FULL_SIZES, QUICK_SIZES, run_demo
from fastsat.evaluate import ATTACKS, SUITES, evaluate
from fastsat.models import default_cam_layer
from fastsat.report import analyze, saliency_grid
from fastsat.train import (
    TEACHER_METHODS,
    TEACHER_STYLES,
    SaliencyDataset,
    TrainConfig,
    distributed,
    fit,
    teacher_saliency,
)
from fastsat.train.checkpoint import load_trained_weights

__all__ = ["COMMANDS", "build_parser", "command_specs", "load_config", "main"]

log = logging.getLogger("fastsat")


# --- data sets: fastsat.data.create, their files only from --data-dir ------------------------------

def _datasets(options: DataOptions) -> tuple:
    """The (train, test) data sets of ``--dataset``."""
    if options.data_dir is None and data.DATASETS[options.dataset].reads_files:
        raise ValueError(f"data_dir: dataset {options.dataset!r} needs --data-dir (the folder of its files; a run's "
                         "config.yaml never supplies it)")
    return data.create(options.dataset, options.data_dir, size=options.image_size, n_train=options.n_train,
                       n_test=options.n_test, num_classes=options.num_classes, seed=options.data_seed)


# --- the options of each command ---------------------------------------------------------------------

def _each(check: Callable) -> Callable:
    """A check of every item of a list option."""
    return lambda values, name: [check(value, name) for value in values]


_CREATE = inspect.signature(data.create).parameters  # data.create's defaults are the CLI's


@dataclass(frozen=True)
class DataOptions:
    dataset: str = option("shapes", "data set: the built-in synthetic shapes, or files in --data-dir",
                          choices=tuple(data.DATASETS))
    data_dir: str | None = option(None, "directory of the data set's files (cifar: the batches folder; imagefolder: "
                                  "with train/ and val/ class folders; shards: with train/ and val/ written by "
                                  "`fastsat data pack`)", check=functools.partial(path, allow_none=True))
    n_train: int = option(_CREATE["n_train"].default, "shapes: training images (count)", check=positive_int)
    n_test: int = option(_CREATE["n_test"].default, "shapes: test images (count)", check=positive_int)
    image_size: int = option(32, "image side in pixels (images are resized to it)", check=positive_int)
    num_classes: int = option(_CREATE["num_classes"].default, "shapes: number of classes (2–12); other data sets set "
                              "their own", check=positive_int)
    data_seed: int = option(_CREATE["seed"].default, "shapes: generator seed of the training images (the test images use seed + 1)", check=seed)

    def __post_init__(self):
        validate(self)


def _pretrained(value: object, name: str) -> bool | str:
    return value if isinstance(value, bool) else path(value, name)


@dataclass(frozen=True)
class ModelOptions:
    model: str = option("preactresnet18", f"architecture: a zoo name ({', '.join(models.names())}), "
                        "package.module:factory (your classifier: factory(num_classes=K, **model_args), the module "
                        "importable) or timm:NAME (pip install 'fastsat[timm]'); it normalises its input with the "
                        "training set's statistics", check=models.check_name)
    model_args: Mapping[str, object] | None = option(
        None, "keyword arguments of the model (zoo class, factory or timm.create_model), a YAML mapping such as "
        "'{depth: 3}'", check=functools.partial(mapping, allow_none=True))
    pretrained: bool | str = option(False, "timm:NAME only: true loads timm's pretrained weights, a path that local "
                                    "weights file (fastsat eval loads the checkpoint instead)", check=_pretrained)
    width: int | None = option(None, "channels of the first stage; None: the model's default",
                               check=functools.partial(positive_int, allow_none=True))
    stem: str | None = option(None, "resnet* only: cifar (3x3 conv, stride 1: 32 px inputs) or imagenet (7x7 conv, "
                              "stride 2, max-pool: 224 px inputs); None: the model's default (cifar)",
                              choices=("cifar", "imagenet"))

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class DeviceOptions:
    device: str = option("auto", "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class CheckpointOptions:
    checkpoint: str | None = option(None, "trained weights: a checkpoint.pt/best.pt written by `fastsat train` (its "
                                    "run's config.yaml supplies data and model settings)",
                                    check=functools.partial(path, allow_none=True))

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class TeacherOptions:
    teacher: str | None = option(None, "maps=saliency: the teacher's checkpoint (written by `fastsat train`)",
                                 check=functools.partial(path, allow_none=True))
    saliency_method: str = option("smoothgrad", "maps=saliency: the teacher's saliency method",
                                  choices=tuple(TEACHER_METHODS))
    saliency_style: str = option("fastsat", "maps=saliency: the published methods (fastsat) or what the SAT authors' "
                                 "code computes (authors; see fastsat.train.teacher)", choices=tuple(TEACHER_STYLES))

    def __post_init__(self):
        validate(self)


_EVALUATE = inspect.signature(evaluate).parameters


@dataclass(frozen=True)
class EvalOptions:
    suite: str = option(_EVALUATE["suite"].default, "quick: the attacks below; standard: also AutoAttack at each ε; rapid: "
                        "also a cheaper protocol for model selection (APGD-CE, APGD-T on 3 targets, Square only where "
                        "masking is flagged) at each ε; paper: also the SAT authors' PGD-5 at 1..8/255 and CW L2 (all "
                        "three with gradient-masking checks)",
                        choices=tuple(SUITES))
    eps: Sequence[float] = option(factory=lambda: list(_EVALUATE["eps"].default), help="radii in pixel units, comma-separated",
                              check=_each(functools.partial(number, minimum=0)))
    attacks: Sequence[str] = option(factory=lambda: list(_EVALUATE["attacks"].default), help="attacks, comma-separated",
                                choices=tuple(ATTACKS))
    steps: int = option(_EVALUATE["steps"].default, "iterations per attack", check=positive_int)
    restarts: int = option(_EVALUATE["restarts"].default, "random restarts per attack", check=positive_int)
    max_samples: int | None = option(_EVALUATE["max_samples"].default, "evaluate only the first N test images; None: all",
                                     check=functools.partial(positive_int, allow_none=True))
    batch_size: int = option(_EVALUATE["batch_size"].default, "test images per batch", check=positive_int)
    out: str | None = option(None, "also write the results as JSON to this file",
                             check=functools.partial(writable_path, allow_none=True))

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class SaliencyOptions:
    methods: Sequence[str] = option(factory=lambda: ["gradient", "smoothgrad", "integrated_gradients", "guided_backprop",
                                                 "gradcam_pp"],
                                help="saliency methods, comma-separated", choices=tuple(saliency.METHODS))
    n_samples: int = option(8, "test images to explain (count)", check=positive_int)
    out_dir: str = option("runs/saliency", "where maps.pt and saliency_grid.png go",
                          check=functools.partial(writable_path, folder=True))

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class AnalyzeOptions:
    n_samples: int = option(256, "test images to analyse (count)", check=positive_int)
    target: str = option(inspect.signature(analyze).parameters["target"].default, "logit whose gradient defines α",
                         choices=ALIGNMENT_TARGETS)
    out_dir: str = option("runs/analyze", "where alignment.csv/.json, alignment_scatter.png, saliency_grid.png go",
                          check=functools.partial(writable_path, folder=True))

    def __post_init__(self):
        validate(self)


_DEMO = inspect.signature(run_demo).parameters


def _demo_size(key: str, what: str) -> object:
    return option(_DEMO[key].default, f"{what} (None: {FULL_SIZES[key]}, quick: {QUICK_SIZES[key]})",
                  check=functools.partial(positive_int, allow_none=True))


@dataclass(frozen=True)
class DemoOptions:
    quick: bool = option(_DEMO["quick"].default, "a seconds-long smoke version (tiny data, 1 epoch) for tests",
                         check=flag)
    epochs: int | None = _demo_size("epochs", "epochs per recipe")
    n_train: int | None = _demo_size("n_train", "training images")
    n_test: int | None = _demo_size("n_test", "test images for evaluation and analysis")
    image_size: int | None = _demo_size("image_size", "image side in pixels")
    seeds: int | None = _demo_size("seeds", "seeds, each training every run from its own data and initial weights")
    recipes: Sequence[str] | None = option(_DEMO["recipes"].default, "a subset of the demo's runs, comma-separated (None: all)",
                                       choices=tuple(DEMO_RECIPES))
    seed: int = option(_DEMO["seed"].default, "seed for data, weights and training", check=seed)
    device: str = option(_DEMO["device"].default, "torch device: auto, cpu, cuda, ...")
    out_dir: str = option(str(_DEMO["out_dir"].default), "where report.md, report.html and the figures go", check=path)

    def __post_init__(self):
        validate(self)


# --- settings: defaults ← run config ← YAML ← command line -----------------------------------------

def command_specs(command: str) -> list[Spec]:
    """Every option of ``command``, in ``--help`` order (TrainConfig as flat settings)."""
    return [spec for section in COMMANDS[command].sections
            for spec in (TrainConfig.setting_specs() if section is TrainConfig else specs(section))]


def _sections(command: str, settings: dict) -> dict[type, object]:
    """The command's option dataclasses built (and checked) from flat ``settings``."""
    built = {}
    for section in COMMANDS[command].sections:
        if section is TrainConfig:
            names = {spec.name for spec in TrainConfig.setting_specs()}
            built[section] = TrainConfig.from_settings({k: v for k, v in settings.items() if k in names})
        else:
            built[section] = section(**{f.name: settings[f.name] for f in fields(section)})
    return built


def load_config(command: str, path: str | Path | None = None, overrides: dict | None = None,
                base: dict | None = None) -> dict:
    """Flat settings of ``command``: its defaults, then ``base`` (e.g. the training run's data and
    model settings), then the YAML file ``path``, then ``overrides`` (the command line).

    YAML values are read as the option's type (fractions, comma lists) and every value is checked
    as the command will use it; an unknown key raises ValueError naming it and the nearest valid one."""
    options = {spec.name: spec for spec in command_specs(command)}
    config = {name: spec.default for name, spec in options.items()}
    config.update(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config: {path} does not exist")
        loaded = {str(key).replace("-", "_"): value for key, value in _read_yaml(path, "config").items()}
        unknown_keys(loaded, options, f"config {path} for `fastsat {command}`")
        for key, value in loaded.items():
            config[key] = _read(options[key], value, f"config {path}")
    config.update(overrides or {})
    try:
        _sections(command, config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config{f' {path}' if path is not None else ''}: {err}") from None
    return config


def _read_yaml(path: Path, name: str) -> dict:
    """The mapping of option: value in the YAML file ``path`` (empty: {}), read with ``safe_load``;
    a file that is not UTF-8 text, not YAML or not a mapping raises ValueError naming ``name``, the
    file and, for syntax errors, the line."""
    raw = path.read_bytes()
    try:
        loaded = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        bad = raw[err.start : err.end]
        raise ValueError(f"{name}: {path}, line {line}: not UTF-8 text ({err.reason} {bad!r})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"{name}: {path}{where}: not valid YAML ({problem})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{name}: {path} must hold a mapping of option: value, got {type(loaded).__name__}")  # noqa: TRY004 (a bad file)
    return loaded


def _read(spec: Spec, value: object, where: str) -> object:
    try:
        return parse(spec.type, value, spec.name)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _run_settings(checkpoint: str | Path, keys: set[str]) -> dict:
    """The settings among ``keys`` of the training run that wrote ``checkpoint`` (its config.yaml),
    logged. Never ``data_dir``: a downloaded run's config.yaml must not point fastsat at files
    (CIFAR batches are pickles), so the data's folder is always given on the command line."""
    run = Path(checkpoint).parent / "config.yaml"
    saved = _read_yaml(run, "run config") if run.is_file() else {}
    specs_by_name = {s.name: s for s in specs(DataOptions) + specs(ModelOptions)}
    taken = {k: _read(specs_by_name[k], v, f"run config {run}") for k, v in saved.items()
             if k in keys and k != "data_dir"}
    if taken:
        log.info("settings from the run's %s (the command line overrides them): %s", run,
                 ", ".join(f"{k}={v}" for k, v in taken.items()))
    return taken


# --- the command line ----------------------------------------------------------------------------------

def _help(spec: Spec) -> str:
    each = "each " if is_sequence(spec.type) else ""
    choices = f"; {each}one of {', '.join(map(str, spec.choices))}" if spec.choices else ""
    return f"{spec.help}{choices} (default: {show(spec.default)})".replace("%", "%%")


def _kinds(kind: object) -> list:
    """The non-None types of an annotation (X | None → [X])."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(kind) if a is not type(None)]
    return [kind]


def _converter(spec: Spec) -> Callable[[str], object]:
    """Text → value, checked against the choices at once (the message names the nearest one)."""
    def convert(text: str) -> object:
        try:
            value = parse(spec.type, text, spec.name)
            if spec.choices is not None and value is not None:
                for item in value if is_sequence(spec.type) else [value]:
                    choice(item, spec.name, spec.choices)
            return value
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = spec.name
    return convert


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every command, generated from :func:`command_specs`."""
    parser = argparse.ArgumentParser(prog="fastsat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tops = dict.fromkeys(name.split()[0] for name in COMMANDS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(tops) + "}")
    groups = {}  # "data" -> the sub-parsers of `fastsat data ...`
    for name, command in COMMANDS.items():
        top, _, action = name.partition(" ")
        if action:
            if top not in groups:
                groups[top] = sub.add_parser(top, help=f"{top} commands").add_subparsers(dest="action", required=True)
            cmd = groups[top].add_parser(action, help=command.summary, description=command.summary)
        else:
            cmd = sub.add_parser(name, help=command.summary, description=command.summary)
        cmd.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                         help="YAML file of settings (keys as the options below, with underscores); the command line overrides it")
        for spec in command_specs(name):
            flag = "--" + spec.name.replace("_", "-")
            kinds = _kinds(spec.type)
            if spec.name in command.positional:
                cmd.add_argument(spec.name, type=_converter(spec), help=spec.help, metavar=spec.name.upper())
            elif kinds == [bool]:
                cmd.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=_help(spec))
            elif bool in kinds:  # a switch or a value (resume: true, or a checkpoint's path)
                cmd.add_argument(flag, nargs="?", const=True, type=_converter(spec), default=argparse.SUPPRESS,
                                 help=_help(spec), metavar=spec.name.upper())
            else:
                cmd.add_argument(flag, type=_converter(spec), default=argparse.SUPPRESS, help=_help(spec),
                                 metavar=spec.name.upper())
    return parser


# --- building blocks shared by the commands ----------------------------------------------------------

def _num_classes(dataset) -> int:
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise ValueError("dataset: has no class list")
    return len(classes)


def _model(options: ModelOptions, train_set, *, pretrained: bool = True) -> torch.nn.Module:
    """A fresh model for ``train_set``'s classes, normalising with its statistics
    (``.mean``/``.std``); ``pretrained=False`` skips the options' pretrained weights (a checkpoint follows)."""
    kwargs = {key: getattr(options, key) for key in ("width", "stem") if getattr(options, key) is not None}
    return models.create(options.model, num_classes=_num_classes(train_set), mean=train_set.mean, std=train_set.std,
                         pretrained=options.pretrained if pretrained else False, **(options.model_args or {}), **kwargs)


def _trained_model(options: ModelOptions, train_set, device: torch.device, checkpoint: str | None) -> torch.nn.Module:
    model = _model(options, train_set, pretrained=checkpoint is None)
    if checkpoint:
        load_trained_weights(model, checkpoint)
    else:
        log.warning("no --checkpoint given: using an untrained %s", options.model)
    return model.to(device).eval()


def _first_images(dataset, n: int, device: torch.device):
    batch = data.as_batch(next(iter(data.as_batches(dataset, batch_size=n, shuffle=False, seed=0, device=device))), device)
    return batch["image"][:n], batch["label"][:n]


# --- commands ------------------------------------------------------------------------------------

def cmd_train(cfg: dict) -> dict:
    """Train; under ``torchrun`` on every rank (DDP, see :mod:`fastsat.train.distributed`): each rank
    on its own device (``cuda:LOCAL_RANK`` for a CUDA device), rank 0 writing the files."""
    parts = _sections("train", cfg)
    device = distributed.setup(device_of(parts[DeviceOptions].device))
    try:
        return _train(cfg, parts, device)
    finally:
        distributed.teardown()


def _train(cfg: dict, parts: dict, device: torch.device) -> dict:
    config: TrainConfig = parts[TrainConfig]
    teacher: TeacherOptions = parts[TeacherOptions]
    torch.manual_seed(config.seed)
    train_set, test_set = _datasets(parts[DataOptions])
    model = _model(parts[ModelOptions], train_set).to(device)
    train_data = train_set
    if "saliency" in config.build_recipe().batch_keys:
        if teacher.teacher is None:
            raise ValueError("teacher: maps=saliency needs --teacher CHECKPOINT (a run of `fastsat train`)")
        model_keys = {f.name for f in fields(ModelOptions)}
        teacher_model = ModelOptions(**{**{k: cfg[k] for k in model_keys}, **_run_settings(teacher.teacher, model_keys)})
        teacher_net = _trained_model(teacher_model, train_set, device, teacher.teacher)
        maps = teacher_saliency(teacher_net, train_set.images, method=teacher.saliency_method,
                                style=teacher.saliency_style, labels=train_set.labels)
        train_data = SaliencyDataset(train_set, maps)  # augmentation moves the maps too
    if config.out_dir is None:
        log.warning("no --out-dir: no checkpoint, logs or config.yaml of this run are kept")
    is_writer = config.out_dir is not None and _dist.is_main()
    # The run folder is locked before config.yaml is written: a second run there is refused before
    # it changes anything of the first one's (the trainer takes the same lock again).
    with locked_folder(config.out_dir, "out_dir") if is_writer else contextlib.nullcontext():
        if is_writer:
            atomic_write_text(Path(config.out_dir) / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        # The data settings (not the folder, which may move) are recorded, so a resume on other data names them.
        settings = {k: v for k, v in asdict(parts[DataOptions]).items() if k != "data_dir"}
        result = fit(model, train_data, config, eval_data=test_set, data_settings=settings)
    last = result.history[-1]
    if _dist.is_main():
        print(json.dumps({"checkpoint": str(result.checkpoint), "stopped": result.stopped, **last}, indent=1))
    return last


class TrainedRun(typing.NamedTuple):
    """What the commands that read a trained run (eval, saliency, analyze) start from."""

    parts: dict  # the command's option dataclasses, built from its settings (see _sections)
    model: torch.nn.Module  # the trained model, in eval mode on ``device``
    test_set: object
    device: torch.device


def _trained_run(command: str, cfg: dict) -> TrainedRun:
    parts = _sections(command, cfg)
    device = device_of(parts[DeviceOptions].device)
    train_set, test_set = _datasets(parts[DataOptions])
    model = _trained_model(parts[ModelOptions], train_set, device, parts[CheckpointOptions].checkpoint)
    return TrainedRun(parts, model, test_set, device)


def cmd_eval(cfg: dict) -> dict:
    parts, model, test_set, _ = _trained_run("eval", cfg)
    options: EvalOptions = parts[EvalOptions]
    report = evaluate(model, test_set, suite=options.suite, eps=options.eps, attacks=options.attacks, steps=options.steps,
                      restarts=options.restarts, batch_size=options.batch_size, max_samples=options.max_samples)
    print(f"clean accuracy {report['clean_acc']:.4f} on {report['n']} images ({report['points_per_s']:.1f} images/s)")
    rows = [(name, row) for name, attack_rows in report["attacks"].items() for row in attack_rows]
    rows += [("autoattack", row) for row in report.get("standard", [])]
    rows += [("rapid", row) for row in report.get("rapid", [])]
    rows += [("paper-pgd5", row) for row in report.get("paper", {}).get("pgd", [])]
    for name, row in rows:
        print(f"{name:10s} eps {row['eps'] * 255:6.2f}/255  robust accuracy {row['acc']:.4f}")
    if "rapid" in report:
        ran = any(row["square_on"] == "all" for row in report["rapid"])
        print("rapid      Square " + ("ran on every point left robust (a gradient-masking flag was raised)" if ran
                                      else "skipped (no gradient-masking flag; only the probe on the check subset)"))
    if "paper" in report:
        print("cw-l2      robust accuracy {acc:.4f} at L2 {eps:g}, median minimal L2 {median_l2}".format(**report["paper"]["cw"]))
    if "masking" in report:
        print("gradient-masking flags: " + (", ".join(report["masking"]["flags"]) or "none"))
        for flag_name in report["masking"]["flags"]:
            print(f"  {flag_name}: {report['masking']['checks'][flag_name]['meaning']}")
    if options.out:
        atomic_write_text(Path(options.out), json.dumps(report, indent=1))
    return report


def cmd_saliency(cfg: dict) -> dict:
    parts, model, test_set, device = _trained_run("saliency", cfg)
    options: SaliencyOptions = parts[SaliencyOptions]
    x, _ = _first_images(test_set, options.n_samples, device)
    maps = {}
    for method in options.methods:
        kwargs = {"layer": default_cam_layer(model)} if method == "gradcam_pp" else {}
        maps[method] = saliency.compute(method, model, x, **kwargs).cpu()
    out_dir = Path(options.out_dir)
    atomic_save({"images": x.cpu(), "maps": maps}, out_dir / "maps.pt")
    grid = saliency_grid(out_dir / "saliency_grid.png", x.cpu(), maps)
    print(f"wrote {out_dir / 'maps.pt'} and {grid}")
    return {"maps": str(out_dir / "maps.pt"), "grid": str(grid)}


def cmd_analyze(cfg: dict) -> dict:
    parts, model, test_set, device = _trained_run("analyze", cfg)
    options: AnalyzeOptions = parts[AnalyzeOptions]
    x, y = _first_images(test_set, options.n_samples, device)
    result = analyze(model, (x, y), out_dir=options.out_dir, target=options.target)
    for key in ("n", "accuracy", "median_alpha", "median_rho", "spearman_alpha_rho", "spearman_alpha_bin_rho_tilde"):
        print(f"{key:30s} {result.summary[key]}")
    return result.summary


def cmd_demo(cfg: dict) -> dict:
    options = _sections("demo", cfg)[DemoOptions]
    report = run_demo(**{f.name: getattr(options, f.name) for f in fields(DemoOptions)})
    print(f"wrote {report}")
    return {"report": str(report)}


_PACK = inspect.signature(data.pack_shards).parameters


@dataclass(frozen=True)
class PackOptions:
    source: str = option(None, "an ImageFolder directory <class>/<image> (positional)", check=path)
    out_dir: str = option(None, "where the tar shards and index.json go (positional)", check=path)
    shard_size: int = option(_PACK["shard_size"].default, "samples per tar shard (count)", check=positive_int)
    boxes: str | None = option(_PACK["boxes"].default, "directory of PASCAL VOC XML boxes, <stem>.xml per image (flat or in <class>/)",
                               check=functools.partial(path, allow_none=True))
    masks: str | None = option(_PACK["masks"].default, "directory of <stem>.png segmentation masks",
                               check=functools.partial(path, allow_none=True))
    missing_boxes: str = option(_PACK["missing_boxes"].default, "an image without a box file: leave it out, fail, or "
                                "give it the full image as its box", choices=("skip", "error", "full"))
    seed: int | None = option(_PACK["seed"].default, "samples are written in a random order seeded with it; None: "
                              "the source's order", check=functools.partial(seed, allow_none=True))

    def __post_init__(self):
        validate(self)


def cmd_pack(cfg: dict) -> dict:
    options = _sections("data pack", cfg)[PackOptions]
    index = data.pack_shards(**{f.name: getattr(options, f.name) for f in fields(PackOptions)})
    print(f"wrote {index}")
    return {"index": str(index)}


@dataclass(frozen=True)
class Command:
    summary: str
    sections: tuple[type, ...]  # the option dataclasses, in --help order
    run: Callable[[dict], dict]
    positional: tuple[str, ...] = ()  # options given by position, in order (required)


_TRAINED = (DataOptions, ModelOptions, DeviceOptions, CheckpointOptions)
COMMANDS: dict[str, Command] = {
    "train": Command("train a model with a recipe (checkpoints, logs and config in --out-dir)",
                     (DataOptions, ModelOptions, DeviceOptions, TeacherOptions, TrainConfig), cmd_train),
    "eval": Command("clean and PGD/APGD accuracy at a list of ε", (*_TRAINED, EvalOptions), cmd_eval),
    "saliency": Command("saliency maps of test images and a PNG grid", (*_TRAINED, SaliencyOptions), cmd_saliency),
    "analyze": Command("the Etmann alignment/robustness table and plots", (*_TRAINED, AnalyzeOptions), cmd_analyze),
    "demo": Command("train six recipes and a noise-only control briefly on the shapes data over a few seeds "
                    "and write runs/demo/report.md/.html", (DemoOptions,), cmd_demo),
    "data pack": Command("write an ImageFolder (+ VOC boxes / masks) as tar shards for `--dataset shards`",
                         (PackOptions,), cmd_pack, positional=("source", "out_dir")),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastsat`` console script. Returns the exit status."""
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    if "action" in args:  # fastsat data pack ...
        command = f"{command} {args.pop('action')}"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config_file = args.pop("config", None)
        base = None
        if command in ("eval", "saliency", "analyze"):
            # The training run's data and model settings, under the user's YAML file and command line.
            checkpoint = args.get("checkpoint")
            if checkpoint is None and config_file is not None and Path(config_file).is_file():
                checkpoint = _read_yaml(Path(config_file), "config").get("checkpoint")
                checkpoint = path(checkpoint, f"checkpoint (config {config_file})", allow_none=True)
            if checkpoint is not None:
                base = _run_settings(checkpoint, {f.name for f in fields(DataOptions) + fields(ModelOptions)})
        cfg = load_config(command, config_file, args, base)
        COMMANDS[command].run(cfg)
    # fastsat's own errors (TypeError and ValueError: a bad argument; OSError: a missing file, a full
    # disk, a folder that cannot be written; FloatingPointError: a run that diverged) are messages for
    # the user, printed without a traceback.
    except (TypeError, ValueError, OSError, FloatingPointError) as err:
        print(f"fastsat {command}: error: {err}", file=sys.stderr)
        return 2 if not isinstance(err, FloatingPointError) else 1
    return 0
