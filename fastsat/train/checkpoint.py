"""Reading checkpoints, and the random-number-generator state a bit-exact resume needs.

Checkpoints are written (atomically, :func:`fastsat._io.atomic_save`) by
:meth:`fastsat.train.Trainer.checkpoint`; their ``"format"`` is :data:`CHECKPOINT_FORMAT`.
Format 1 (fastsat before the TrainConfig) still loads: :func:`load_checkpoint` brings its
recorded settings to today's names.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from fastsat.train.recipes import RECIPES, PerturbationRecipe, Recipe

__all__ = ["CHECKPOINT_FORMAT", "capture_rng", "load_checkpoint", "restore_rng"]

#: 2: the config records every option that changes a run's results (TrainConfig's), and the recipe
#: options hold the input box ``clip`` and no longer Fast's ``early_stop``.
CHECKPOINT_FORMAT = 2


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by the trainer (tensors land on the CPU; ``weights_only``), or
    best.pt. A format-1 checkpoint comes back in the current format.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable, or of a newer format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from err
    version = state.get("format") if isinstance(state, dict) else None
    if version is not None and version > CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} has format {version}; this fastsat reads formats up to "
                         f"{CHECKPOINT_FORMAT} (upgrade fastsat)")
    if version == 1:
        state = _from_format_1(state)
    return state


def _from_format_1(state: dict) -> dict:
    """Format 1 recorded fewer settings (resuming compares only those) and the recipe options as
    they were then: Fast's ``early_stop`` among them, and no ``clip`` (it was always (0, 1)). Its EMA
    was torch's AveragedModel's state dict ("module."-prefixed weights and an ``n_averaged``
    counter); the average is now the model's own state dict."""
    config = dict(state["config"])
    options = {k: v for k, v in config["recipe_options"].items() if k != "early_stop"}
    if issubclass(RECIPES.get(config["recipe"], Recipe), PerturbationRecipe):
        options["clip"] = (0.0, 1.0)
    config["recipe_options"] = options
    ema = state.get("ema")
    if ema is not None:
        ema = {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}
    return {**state, "format": CHECKPOINT_FORMAT, "config": config, "ema": ema}


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict:
    """The state of python's, numpy's and torch's global generators (CPU and, if used, CUDA), plus
    ``generators`` (e.g. a data loader's shuffling generator), in a ``weights_only``-safe form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate(_as_tuple(state["python"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise ValueError(f"checkpoint has no state for the generator {name!r}; it was written for other data")
        gen.set_state(saved[name])


def _as_tuple(value):
    # torch.save keeps tuples, but be tolerant of lists (python's setstate insists on tuples).
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
