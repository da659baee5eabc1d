"""The one configuration of a training run: :class:`TrainConfig`.

Every training option and its default is declared once, here: :func:`fastsat.train.fit` takes the
fields as keyword arguments, ``fastsat train`` generates its flags and ``--help`` from them, and its
YAML files use the same keys (see :mod:`fastsat._options` for how, and why no library).

Outside Python — on the command line and in YAML — a run is written as *flat settings*: every
field except ``recipe_options``, plus the recipe's own options by name (``eps: 8/255``,
``steps: 5``, ``maps: masks``, ...; the union over :data:`fastsat.train.RECIPES`, declared on the
recipe classes). :meth:`TrainConfig.from_settings` reads them, :meth:`TrainConfig.settings` writes
them.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
import warnings
from collections.abc import Mapping, Sequence

from fastsat._checks import clip_box, describe, flag, integer, number, path, positive_int, positive_number, seed
from fastsat._options import Spec, document, option, parse, show, specs, unknown_keys, validate
from fastsat.train.recipes import PRECISIONS, RECIPES, Recipe, make_recipe

__all__ = ["OPTIMIZERS", "SCHEDULES", "TrainConfig", "recipe_option_specs"]

SCHEDULES = ("piecewise", "cosine", "onecycle", "constant")
OPTIMIZERS = ("sgd", "adam")
_FROM_RUN = sorted({name for cls in RECIPES.values() for name in cls.from_run})


def _recipe_options(value: object, name: str) -> dict:
    if value is None:  # as fit always took it: no options
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name}: expected a mapping of option: value, got {describe(value)}")
    for key in _FROM_RUN:
        if key in value:
            raise ValueError(f"{name}: {key!r} is the run's, not the recipe's; set it as TrainConfig.{key} "
                             f"(fit({key}=...))")
    return dict(value)


def _resume(value: object, name: str) -> bool | str:
    return value if isinstance(value, bool) else path(value, name)


def _resize_schedule(value: object, name: str) -> list[str] | None:
    """Progressive resizing phases as canonical "EPOCH:SIZE" strings (0-based epochs, increasing from 0)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name}: expected a list of 'EPOCH:SIZE' items like ['0:128', '6:224'], got {describe(value)}")
    phases = []
    for item in value:
        epoch, _, size = str(item).partition(":")
        try:
            phases.append((int(epoch), int(size)))
        except ValueError:
            raise ValueError(f"{name}: expected items 'EPOCH:SIZE' like 0:128, got {item!r}") from None
    epochs = [epoch for epoch, _ in phases]
    if not phases or epochs[0] != 0 or epochs != sorted(set(epochs)):
        raise ValueError(f"{name}: expected phases starting at epoch 0 with increasing epochs, got {list(value)}")
    if any(size < 1 for _, size in phases):
        raise ValueError(f"{name}: expected positive sizes (pixels), got {list(value)}")
    return [f"{epoch}:{size}" for epoch, size in phases]


@document
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run, with its default. Checked on construction (TypeError for a
    value of the wrong kind, ValueError for one out of range; any real number where a number is
    meant). Build one with keywords, :meth:`from_settings` (YAML), or ``dataclasses.replace``."""

    recipe: str = option("sat", "training recipe (fastsat.train.RECIPES)", choices=tuple(RECIPES))
    recipe_options: Mapping[str, object] = option(
        factory=dict, check=_recipe_options,
        help="the recipe's own hyper-parameters by name (eps, steps, maps, ...); unset ones (or None) keep the "
        "recipe's defaults")
    epochs: int = option(10, "training epochs", check=positive_int)
    batch_size: int = option(128, "images per batch (train_data given as a dataset)", check=positive_int)
    augment: bool = option(True, "padded random crop (4 px) + horizontal flip (train_data given as a dataset)",
                           check=flag)
    num_workers: int = option(
        0, "loader worker processes that decode data read from files (image folders, shards) while the device "
        "trains; in-memory data sets stay on the device and ignore it", check=functools.partial(integer, minimum=0),
        recorded=False)
    optimizer: str = option("sgd", "SGD with momentum, or Adam", choices=OPTIMIZERS)
    lr: float = option(0.1, "peak learning rate", check=positive_number)
    momentum: float = option(0.9, "SGD momentum", check=functools.partial(number, minimum=0, maximum=1, exclusive_max=True))
    weight_decay: float = option(5e-4, "L2 weight decay", check=functools.partial(number, minimum=0))
    schedule: str = option("piecewise", "per-step learning-rate schedule (see fastsat.train.lr_factor)", choices=SCHEDULES)
    precision: str = option("auto", "autocast precision of the training step, its attack included (evaluation stays "
                            "fp32); fp16 scales the loss; auto: bf16 on CUDA, fp32 elsewhere",
                            choices=("auto", *PRECISIONS))
    channels_last: bool | None = option(None, "NHWC memory format for model and inputs (faster convolutions on GPUs); "
                                        "None: on CUDA only", check=functools.partial(flag, allow_none=True))
    compile: bool | None = option(
        None, "torch.compile the model for the attack and the update (on CUDA also captured as CUDA graphs; falls "
        "back to eager, said once in the log, if compiling fails); None: on CUDA only",
        check=functools.partial(flag, allow_none=True))
    ema: float | None = option(
        None, "decay of an exponential moving average of the weights (e.g. 0.999), which is evaluated, kept as best "
        "and saved; None: off", check=functools.partial(number, minimum=0, maximum=1, exclusive_min=True,
                                                        exclusive_max=True, allow_none=True))
    seed: int = option(0, "seed of python, numpy and torch and of the data order", check=seed)
    sync_batchnorm: bool = option(False, "distributed runs: batch-norm statistics over the global batch (torch's "
                                  "SyncBatchNorm, CUDA only)", check=flag)
    resize_schedule: Sequence[str] | None = option(
        None, "progressive resizing, 'EPOCH:SIZE' items: from that 0-based epoch on, training batches are resized "
        "on the device to SIZE x SIZE pixels (e.g. 0:128,6:224,12:288, Fast-AT's ImageNet phases); None: the data's "
        "size", check=_resize_schedule)
    clip: tuple[float, float] = option((0.0, 1.0), "valid input box (lo, hi) in pixel units; every recipe keeps its "
                                       "inputs inside it", check=clip_box)
    eval_eps: float = option(8 / 255, "per-epoch evaluation: PGD radius (pixels, L∞)", check=positive_number)
    eval_steps: int = option(10, "per-epoch evaluation: PGD iterations (step eval_eps/4)", check=positive_int)
    eval_batch_size: int = option(256, "per-epoch evaluation: images per batch (eval_data given as a dataset)",
                                  check=positive_int)
    early_stop_drop: float | None = option(
        0.2, "single-step recipes (fast, nfgsm, gradalign): stop and restore the best epoch when PGD accuracy falls "
        "this much below its best (accuracy, 0-1), or to a quarter of a best of at least a quarter of this, on "
        "eval_data, or on a fixed training batch while FGSM accuracy rises (catastrophic overfitting; checked every "
        "epoch); None: never stop early",
        check=functools.partial(number, minimum=0, maximum=1, exclusive_min=True, allow_none=True))
    out_dir: str | None = option(
        None, "run directory: checkpoint.pt (every epoch), best.pt, metrics.jsonl/.csv, TensorBoard logs; "
        "None: nothing is kept on disk", check=functools.partial(path, allow_none=True), recorded=False)
    resume: bool | str = option(False, "true: continue from out_dir/checkpoint.pt if it exists; or a checkpoint's path",
                                check=_resume, recorded=False)
    progress: bool | None = option(None, "progress bars; None: only when stderr is a terminal",
                                   check=functools.partial(flag, allow_none=True), recorded=False)

    def __post_init__(self):
        validate(self)
        # The recipe is built once, here, so that it checks its options now, not at the first batch.
        run = {name: getattr(self, name) for name in RECIPES[self.recipe].from_run}
        object.__setattr__(self, "_recipe", make_recipe(self.recipe, **self.recipe_options, **run))

    def image_size(self, epoch: int) -> int | None:
        """The side (pixels) training batches are resized to in 0-based ``epoch`` (``resize_schedule``), or None."""
        phases = [tuple(map(int, item.split(":"))) for item in self.resize_schedule or ()]
        return next((size for start, size in reversed(phases) if epoch >= start), None)

    def build_recipe(self) -> Recipe:
        """The recipe this configuration describes, with the run's values of its ``from_run``
        options (``clip``): a fresh copy of the one built on construction, so that runs do not share
        a recipe's state (Free's δ)."""
        return dataclasses.replace(self._recipe)

    def check_recipe(self, recipe: Recipe) -> Recipe:
        """``recipe`` (a Recipe object, e.g. a subclass) if it is the recipe this configuration
        describes: the same name and options, ``from_run`` ones included.

        Raises:
            TypeError: not a Recipe. ValueError: another recipe, naming both.
        """
        if not isinstance(recipe, Recipe):
            raise TypeError(f"recipe: expected a Recipe, got {describe(recipe)}")
        mine = self._recipe
        if (recipe.name, recipe.options()) != (mine.name, mine.options()):
            raise ValueError(f"recipe: the Recipe object ({recipe.name!r}, {recipe.options()}) is not the one the "
                             f"configuration describes ({mine.name!r}, {mine.options()})")
        return recipe

    @classmethod
    def setting_specs(cls) -> list[Spec]:
        """The flat settings: the fields in order, with :func:`recipe_option_specs` in place of
        ``recipe_options`` (right after ``recipe``)."""
        return [row for spec in specs(cls)
                for row in (recipe_option_specs() if spec.name == "recipe_options" else [spec])]

    @classmethod
    def from_settings(cls, settings: Mapping, where: str = "settings") -> TrainConfig:
        """A configuration from flat settings (YAML keys, command-line options): fields by name
        (``recipe_options`` excepted) and recipe options by name; text is read as the field's
        type (``"8/255"``). A recipe option the chosen recipe does not take is ignored with a
        warning (one file can serve several recipes); a recipe option that is None keeps the
        recipe's default.

        Raises:
            ValueError: an unknown key (naming the nearest valid one), or a value that does not read.
        """
        recipe_specs = {spec.name: spec for spec in recipe_option_specs()}
        fields = {spec.name: spec for spec in cls.setting_specs() if spec.name not in recipe_specs}
        unknown_keys(settings, [*fields, *recipe_specs], where)
        values = {key: parse(fields[key].type, value, key) for key, value in settings.items() if key in fields}
        recipe = values.get("recipe", cls.recipe)
        takes = [f.name for f in dataclasses.fields(RECIPES[recipe])] if recipe in RECIPES else []
        options = {}
        for key, value in settings.items():
            if key in recipe_specs and value is not None:
                if key in takes:
                    options[key] = parse(recipe_specs[key].type, value, key)
                else:
                    warnings.warn(f"{where}: recipe {recipe!r} takes no {key!r}; ignored", stacklevel=2)
        return cls(**values, recipe_options=options)

    def settings(self) -> dict:
        """The flat settings (inverse of :meth:`from_settings`); plain values, ready for YAML."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "recipe_options"}
        flat["clip"] = list(self.clip)
        return {**flat, **self.recipe_options}

    def recorded(self) -> dict:
        """The options that can change a run's results (checkpoints record them; resuming compares
        them), with the recipe's options in full."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["recorded"]}
        values["recipe_options"] = self._recipe.options()
        return values


def recipe_option_specs() -> list[Spec]:
    """The recipe options as flat settings: one per option name over all recipes (``from_run`` ones
    excepted: they are TrainConfig's), default None (each recipe's own), the help naming each
    recipe's default."""
    by_name: dict[str, list[tuple[str, Spec]]] = {}
    for name, cls in RECIPES.items():
        for spec in specs(cls):
            if spec.name not in cls.from_run:
                by_name.setdefault(spec.name, []).append((name, spec))
    rows = []
    for key, entries in by_name.items():
        first = entries[0][1]
        defaults = ", ".join(f"{recipe} {show(spec.default)}" for recipe, spec in entries)
        own = "".join(f"; {recipe}: {spec.help}" for recipe, spec in entries if spec.help != first.help)
        help = f"{first.help}{own}. Recipe option; None: the recipe's default ({defaults})"
        rows.append(Spec(key, typing.Optional[first.type], None, help, first.choices))  # noqa: UP045
    return rows
