"""The ``fastsat`` command: ``fastsat train | eval | saliency | analyze | demo``.

Every command reads its settings from built-in defaults, then an optional YAML file
(``--config run.yaml``, keys spelled as the options with underscores), then the command line;
``fastsat <command> --help`` lists every option with its default and unit. ε and step sizes are in
pixel units of images in [0, 1] and accept fractions (``--eps 8/255``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch
import yaml

__all__ = ["COMMANDS", "load_config", "main"]

log = logging.getLogger("fastsat")


def number(text: object) -> float:
    """A float from a number or a fraction string such as "8/255"."""
    if isinstance(text, bool):
        raise TypeError(f"expected a number, got {text!r}")
    if isinstance(text, (int, float)):
        return float(text)
    try:
        return float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"expected a number or a fraction like 8/255, got {text!r}") from None


def numbers(text: object) -> list[float]:
    """A list of numbers from a YAML list or a comma-separated string ("2/255,4/255")."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    return [number(item) for item in items]


def names(text: object) -> list[str]:
    """A list of names from a YAML list or a comma-separated string ("pgd,apgd-ce")."""
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    return [str(item).strip() for item in items]


def optional(convert):
    def parse(text):
        return None if text is None or str(text).lower() in ("none", "null", "") else convert(text)
    parse.__name__ = convert.__name__
    parse.inner = convert
    return parse


def boolean(text: object) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


@dataclass(frozen=True)
class Option:
    name: str
    convert: object
    default: object
    help: str
    choices: tuple | None = None


DATA = [
    Option("dataset", str, "shapes", "data set: built-in synthetic shapes, or files in --data-dir",
           ("shapes", "cifar10", "cifar100", "tiny_imagenet", "imagefolder")),
    Option("data_dir", optional(str), None, "directory of the data set's files (cifar: the batches folder; "
           "imagefolder: with train/ and val/ class folders)"),
    Option("n_train", int, 5000, "shapes: training images (count)"),
    Option("n_test", int, 1000, "shapes: test images (count)"),
    Option("image_size", int, 32, "image side in pixels (images are resized to it)"),
    Option("num_classes", int, 10, "shapes: number of classes (2–12); other data sets set their own"),
    Option("data_seed", int, 0, "shapes: generator seed of the training images (test uses seed+1)"),
    Option("batch_size", int, 128, "images per batch"),
    Option("num_workers", int, 0, "DataLoader worker processes for file data sets"),
    Option("device", str, "auto", "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."),
]
MODEL = [
    Option("model", str, "preactresnet18", "architecture from fastsat.models.names()"),
    Option("width", optional(int), None, "channels of the first stage (None: the model's default)"),
]
CHECKPOINT = [
    Option("checkpoint", optional(str), None, "trained weights: a checkpoint.pt/best.pt written by `fastsat train` "
           "(its run's config.yaml supplies data and model settings)"),
]
TRAIN = DATA + MODEL + [
    Option("recipe", str, "sat", "training recipe",
           ("standard", "pgd", "trades", "fast", "free", "sat", "sat+pgd", "sat+trades", "gradnorm")),
    Option("eps", optional(number), None, "training radius ε in pixel units (None: the recipe's default, 8/255; trades 0.031)"),
    Option("step_size", optional(number), None, "attack step in pixel units (None: recipe default — pgd/sat+* 2/255, trades 0.007, fast 1.25ε)"),
    Option("steps", optional(int), None, "attack iterations (None: recipe default — pgd 10, sat+pgd 5, trades 10)"),
    Option("beta", optional(number), None, "TRADES KL weight β (None: trades 6, sat+trades 1)"),
    Option("lam", optional(number), None, "gradnorm: weight λ of ‖∇ₓCE‖² (None: 0.1)"),
    Option("replays", optional(int), None, "free: replays m per batch (None: 8)"),
    Option("sat_maps", str, "boxes", "sat*: saliency source — boxes/masks from the data, or teacher maps",
           ("boxes", "masks", "teacher")),
    Option("sat_a", number, 0.6, "sat*: curriculum base a in p_e = 1 − a^(e/10)"),
    Option("teacher", optional(str), None, "sat_maps=teacher: the teacher's checkpoint (from `fastsat train`)"),
    Option("saliency_method", str, "smoothgrad", "sat_maps=teacher: the teacher's saliency method",
           ("guided_backprop", "smoothgrad", "integrated_gradients", "gradcam_pp")),
    Option("epochs", int, 10, "training epochs"),
    Option("optimizer", str, "sgd", "optimizer", ("sgd", "adam")),
    Option("lr", number, 0.1, "peak learning rate"),
    Option("momentum", number, 0.9, "SGD momentum"),
    Option("weight_decay", number, 5e-4, "L2 weight decay"),
    Option("schedule", str, "piecewise", "learning-rate schedule (per step)", ("piecewise", "cosine", "onecycle", "constant")),
    Option("precision", str, "fp32", "autocast precision (fp16 adds a GradScaler)", ("fp32", "bf16", "fp16")),
    Option("channels_last", boolean, False, "NHWC memory format"),
    Option("compile", boolean, False, "torch.compile the model"),
    Option("ema", optional(number), None, "decay of an EMA of the weights used for evaluation (e.g. 0.999); None: off"),
    Option("augment", boolean, True, "padded random crop (4 px) + horizontal flip"),
    Option("seed", int, 0, "seed of weights init, data order and all randomness"),
    Option("attack_mode", str, "eval", "model mode while a recipe's attack runs (batch-norm statistics)", ("eval", "train")),
    Option("eval_eps", number, 8 / 255, "per-epoch PGD evaluation radius in pixel units"),
    Option("eval_steps", int, 10, "per-epoch PGD evaluation iterations (step eval_eps/4)"),
    Option("out_dir", str, "runs/train", "run directory: checkpoint.pt, best.pt, metrics.jsonl/.csv, config.yaml"),
    Option("resume", boolean, False, "continue from out_dir/checkpoint.pt if it exists"),
    Option("progress", optional(boolean), None, "progress bars (None: only on a terminal)"),
]
EVAL = DATA + MODEL + CHECKPOINT + [
    Option("eps", numbers, [2 / 255, 4 / 255, 8 / 255], "radii in pixel units, comma-separated (fractions allowed)"),
    Option("attacks", names, ["pgd"],
           "comma-separated attacks from pgd, apgd-ce, apgd-dlr"),
    Option("steps", int, 10, "iterations per attack"),
    Option("restarts", int, 1, "random restarts per attack"),
    Option("max_samples", optional(int), None, "evaluate only the first N test images (None: all)"),
    Option("out", optional(str), None, "also write the results as JSON to this file"),
]
SALIENCY = DATA + MODEL + CHECKPOINT + [
    Option("methods", names,
           ["gradient", "smoothgrad", "integrated_gradients", "guided_backprop", "gradcam_pp"],
           "comma-separated saliency methods (fastsat.saliency.METHODS)"),
    Option("n_samples", int, 8, "test images to explain (count)"),
    Option("out_dir", str, "runs/saliency", "where maps.pt and saliency_grid.png go"),
]
ANALYZE = DATA + MODEL + CHECKPOINT + [
    Option("n_samples", int, 256, "test images to analyse (count)"),
    Option("target", str, "predicted", "logit whose gradient defines α", ("predicted", "label", "loss")),
    Option("out_dir", str, "runs/analyze", "where alignment.csv/.json, alignment_scatter.png, saliency_grid.png go"),
]
DEMO = [
    Option("quick", boolean, False, "a seconds-long smoke version (tiny data, 1 epoch) for tests"),
    Option("epochs", optional(int), None, "epochs per recipe (None: 10, quick: 1)"),
    Option("n_train", optional(int), None, "training images (None: 3000, quick: 64)"),
    Option("n_test", optional(int), None, "test images for evaluation and analysis (None: 200, quick: 16)"),
    Option("image_size", optional(int), None, "image side in pixels (None: 16, quick: 12)"),
    Option("recipes", names, None,
           "comma-separated subset of the demo's recipes (None: all six)"),
    Option("seed", int, 0, "seed for data, weights and training"),
    Option("device", str, "auto", "torch device: auto, cpu, cuda, ..."),
    Option("out_dir", str, "runs/demo", "where report.md, report.html and the figures go"),
]
COMMANDS = {
    "train": (TRAIN, "train a model with a recipe (checkpoints, logs and config in --out-dir)"),
    "eval": (EVAL, "clean and PGD/APGD accuracy at a list of ε"),
    "saliency": (SALIENCY, "saliency maps of test images and a PNG grid"),
    "analyze": (ANALYZE, "the Etmann alignment/robustness table and plots"),
    "demo": (DEMO, "train six recipes briefly on the shapes data and write runs/demo/report.md/.html"),
}


def _help(option: Option) -> str:
    default = option.default if not isinstance(option.default, float) else f"{option.default:.6g}"
    choices = f"; one of {', '.join(option.choices)}" if option.choices else ""
    return f"{option.help}{choices} (default: {default})".replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (options, summary) in COMMANDS.items():
        cmd = sub.add_parser(name, help=summary, description=summary)
        cmd.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                         help="YAML file of settings (keys as the options below, with underscores); the command line overrides it")
        for option in options:
            flag = "--" + option.name.replace("_", "-")
            if getattr(option.convert, "inner", option.convert) is boolean:
                cmd.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=_help(option))
            else:
                cmd.add_argument(flag, type=option.convert, choices=option.choices, default=argparse.SUPPRESS,
                                 help=_help(option), metavar=option.name.upper())
    return parser


def load_config(command: str, path: Path | None = None, overrides: dict | None = None) -> dict:
    """Settings of ``command``: defaults, then the YAML file ``path``, then ``overrides``.

    YAML values go through the same conversion and checks as command-line values; an unknown key
    raises ValueError naming it."""
    options = {o.name: o for o in COMMANDS[command][0]}
    config = {name: option.default for name, option in options.items()}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config: {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config: {path} must hold a mapping of option: value")
        for key, value in loaded.items():
            key = str(key).replace("-", "_")
            if key not in options:
                raise ValueError(f"config: {path} has unknown key {key!r} for `fastsat {command}`; known: {sorted(options)}")
            config[key] = _convert(options[key], value, f"{path}: {key}")
    for key, value in (overrides or {}).items():
        config[key] = value
    return config


def _convert(option: Option, value: object, where: str) -> object:
    try:
        converted = option.convert(value) if value is not None or option.default is None else value
    except (TypeError, ValueError) as err:
        raise ValueError(f"config {where}: {err}") from None
    if option.choices is not None and converted not in option.choices:
        raise ValueError(f"config {where}: expected one of {option.choices}, got {converted!r}")
    return converted


# --- building blocks shared by the commands -------------------------------------------------------

def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _datasets(cfg: dict):
    """(train, test) datasets of the configured data set."""
    from fastsat import data

    name, root, size = cfg["dataset"], cfg.get("data_dir"), cfg["image_size"]
    if name == "shapes":
        seed = cfg["data_seed"]
        return (data.shapes(cfg["n_train"], size=size, num_classes=cfg["num_classes"], seed=seed),
                data.shapes(cfg["n_test"], size=size, num_classes=cfg["num_classes"], seed=seed + 1))
    if root is None:
        raise ValueError(f"data_dir: dataset {name!r} needs --data-dir")
    if name in ("cifar10", "cifar100"):
        reader = getattr(data, name)
        return reader(root, train=True, size=size), reader(root, train=False, size=size)
    if name == "tiny_imagenet":
        return data.tiny_imagenet(root, split="train", size=size), data.tiny_imagenet(root, split="val", size=size)
    return data.image_folder(Path(root) / "train", size=size), data.image_folder(Path(root) / "val", size=size)


def _num_classes(dataset) -> int:
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise ValueError("dataset: has no class list")
    return len(classes)


def _model(cfg: dict, num_classes: int):
    from fastsat import models

    kwargs = {} if cfg.get("width") is None else {"width": cfg["width"]}
    return models.create(cfg["model"], num_classes=num_classes, **kwargs)


def _run_config(checkpoint: Path) -> dict:
    path = checkpoint.parent / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _trained_model(cfg: dict, num_classes: int, device: torch.device):
    from fastsat.train import load_checkpoint

    model = _model(cfg, num_classes)
    if cfg.get("checkpoint"):
        state = load_checkpoint(cfg["checkpoint"])
        # A run trained with --ema was evaluated (and chose best.pt) on the averaged weights: use them.
        ema = state.get("ema")
        weights = state["model"] if ema is None else {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}
        model.load_state_dict(weights)
    else:
        log.warning("no --checkpoint given: using an untrained %s", cfg["model"])
    return model.to(device).eval()


def _with_run_config(command: str, args: dict) -> dict:
    """For eval/saliency/analyze: the training run's data/model settings under the user's."""
    path = args.pop("config", None)
    checkpoint = args.get("checkpoint")
    if checkpoint is None and path is not None:
        checkpoint = (yaml.safe_load(Path(path).read_text()) or {}).get("checkpoint")
    base = {}
    if checkpoint is not None:
        keys = {o.name for o in DATA + MODEL}
        base = {k: v for k, v in _run_config(Path(checkpoint)).items() if k in keys}
    return load_config(command, path, {**base, **args})


# --- commands ------------------------------------------------------------------------------------

def cmd_train(cfg: dict) -> dict:
    from fastsat import train
    from fastsat.train.checkpoint import atomic_write_text

    device = _device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    train_set, test_set = _datasets(cfg)
    model = _model(cfg, _num_classes(train_set)).to(device)
    recipe_options = {key: cfg[key] for key in ("eps", "step_size", "steps", "beta", "lam", "replays") if cfg[key] is not None}
    if cfg["recipe"].startswith("sat"):
        recipe_options["maps"] = "saliency" if cfg["sat_maps"] == "teacher" else cfg["sat_maps"]
        recipe_options["a"] = cfg["sat_a"]
    train_data, augment = train_set, cfg["augment"]
    if cfg["recipe"].startswith("sat") and cfg["sat_maps"] == "teacher":
        if cfg["teacher"] is None:
            raise ValueError("teacher: sat_maps=teacher needs --teacher CHECKPOINT")
        teacher_cfg = {**cfg, **{k: v for k, v in _run_config(Path(cfg["teacher"])).items() if k in ("model", "width")},
                       "checkpoint": cfg["teacher"]}
        teacher = _trained_model(teacher_cfg, _num_classes(train_set), device)
        maps = train.teacher_saliency(teacher, train_set.images, method=cfg["saliency_method"])
        train_data = train.SaliencyDataset(train_set, maps)  # augmentation moves the maps too
    # Only the recipe's own options go to it (e.g. eps means nothing to `standard`).
    accepted = train.make_recipe(cfg["recipe"]).options()
    recipe_options = {k: v for k, v in recipe_options.items() if k in accepted}
    out_dir = Path(cfg["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    result = train.fit(
        model, train_data, recipe=cfg["recipe"], recipe_options=recipe_options, epochs=cfg["epochs"],
        batch_size=cfg["batch_size"], augment=augment, optimizer=cfg["optimizer"], lr=cfg["lr"],
        momentum=cfg["momentum"], weight_decay=cfg["weight_decay"], schedule=cfg["schedule"],
        precision=cfg["precision"], channels_last=cfg["channels_last"], compile=cfg["compile"], ema=cfg["ema"],
        seed=cfg["seed"], attack_mode=cfg["attack_mode"] if "attack_mode" in accepted else None,
        eval_data=test_set, eval_eps=cfg["eval_eps"], eval_steps=cfg["eval_steps"], out_dir=out_dir,
        resume=cfg["resume"], progress=cfg["progress"],
    )
    last = result.history[-1]
    print(json.dumps({"checkpoint": str(result.checkpoint), "stopped": result.stopped, **last}, indent=1))
    return last


def cmd_eval(cfg: dict) -> dict:
    from fastsat.evaluate import evaluate
    from fastsat.train.checkpoint import atomic_write_text

    device = _device(cfg["device"])
    _, test_set = _datasets(cfg)
    model = _trained_model(cfg, _num_classes(test_set), device)
    report = evaluate(model, test_set, eps=cfg["eps"], attacks=cfg["attacks"], steps=cfg["steps"],
                      restarts=cfg["restarts"], batch_size=cfg["batch_size"], max_samples=cfg["max_samples"])
    print(f"clean accuracy {report['clean_acc']:.4f} on {report['n']} images")
    for name, rows in report["attacks"].items():
        for row in rows:
            print(f"{name:9s} eps {row['eps'] * 255:6.2f}/255  robust accuracy {row['acc']:.4f}")
    if cfg["out"]:
        atomic_write_text(Path(cfg["out"]), json.dumps(report, indent=1))
    return report


def _first_images(dataset, n: int, device: torch.device):
    from fastsat.data import as_batch, make_loader

    batch = as_batch(next(iter(make_loader(dataset, batch_size=n, shuffle=False, seed=0, device=device))), device)
    return batch["image"][:n], batch["label"][:n]


def cmd_saliency(cfg: dict) -> dict:
    from fastsat import saliency
    from fastsat.models import default_cam_layer
    from fastsat.report import saliency_grid
    from fastsat.train.checkpoint import atomic_save

    device = _device(cfg["device"])
    _, test_set = _datasets(cfg)
    model = _trained_model(cfg, _num_classes(test_set), device)
    x, _ = _first_images(test_set, cfg["n_samples"], device)
    maps = {}
    for method in cfg["methods"]:
        kwargs = {"layer": default_cam_layer(model)} if method == "gradcam_pp" else {}
        maps[method] = saliency.compute(method, model, x, **kwargs).cpu()
    out_dir = Path(cfg["out_dir"])
    atomic_save({"images": x.cpu(), "maps": maps}, out_dir / "maps.pt")
    grid = saliency_grid(out_dir / "saliency_grid.png", x.cpu(), maps)
    print(f"wrote {out_dir / 'maps.pt'} and {grid}")
    return {"maps": str(out_dir / "maps.pt"), "grid": str(grid)}


def cmd_analyze(cfg: dict) -> dict:
    from fastsat.alignment import analyze

    device = _device(cfg["device"])
    _, test_set = _datasets(cfg)
    model = _trained_model(cfg, _num_classes(test_set), device)
    x, y = _first_images(test_set, cfg["n_samples"], device)
    result = analyze(model, (x, y), out_dir=cfg["out_dir"], target=cfg["target"])
    for key in ("n", "accuracy", "median_alpha", "median_rho", "spearman_alpha_rho", "spearman_alpha_bin_rho_tilde"):
        print(f"{key:30s} {result.summary[key]}")
    return result.summary


def cmd_demo(cfg: dict) -> dict:
    from fastsat.demo import run_demo

    report = run_demo(**cfg)
    print(f"wrote {report}")
    return {"report": str(report)}


_RUN = {"train": cmd_train, "eval": cmd_eval, "saliency": cmd_saliency, "analyze": cmd_analyze, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastsat`` console script. Returns the exit status."""
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if command in ("eval", "saliency", "analyze"):
            cfg = _with_run_config(command, args)
        else:
            cfg = load_config(command, args.pop("config", None), args)
        _RUN[command](cfg)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"fastsat {command}: error: {err}", file=sys.stderr)
        return 2 if not isinstance(err, FloatingPointError) else 1
    return 0
