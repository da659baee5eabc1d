"""Reading checkpoints, their checksum, and the random-number-generator state a bit-exact resume needs.

Checkpoints are written (atomically, :func:`fastsat._io.atomic_save`) by
:meth:`fastsat.train.Trainer.checkpoint`; their ``"format"`` is :data:`CHECKPOINT_FORMAT`.
Format 1 (fastsat before the TrainConfig) still loads: :func:`load_checkpoint` brings its
recorded settings to today's names. Every file the trainer writes (checkpoint.pt, best.pt) carries
a ``"checksum"`` of its weights (:func:`sealed`), verified on load; files written before it have
none and load as they are.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastsat._checks import describe
from fastsat.train.recipes import RECIPES, PerturbationRecipe, Recipe

__all__ = ["CHECKPOINT_FORMAT", "capture_rng", "load_checkpoint", "load_weights", "restore_rng", "sealed",
           "weights_checksum"]

#: 2: the config records every option that changes a run's results (TrainConfig's), and the recipe
#: options hold the input box ``clip`` and no longer Fast's ``early_stop``.
CHECKPOINT_FORMAT = 2

# The entries of a checkpoint that hold weights (the model's, and the EMA's average or None).
_WEIGHTS = ("model", "ema")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by the trainer — checkpoint.pt, or best.pt (the best epoch's
    ``"model"`` and ``"epoch"`` only) — with tensors on the CPU (``weights_only``: nothing in the
    file is executed), and verify its weights' checksum. A format-1 checkpoint comes back in the
    current format.

    Raises:
        FileNotFoundError: no such file. ValueError (naming the file): unreadable, of a newer
            format, not a file the trainer writes (e.g. a bare state dict), or weights that do not
            match their checksum (a corrupt file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from err
    _check_layout(state, path)
    version = state.get("format")
    if version is not None and version > CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} has format {version}; this fastsat reads formats up to "
                         f"{CHECKPOINT_FORMAT} (upgrade fastsat)")
    if "checksum" in state and state["checksum"] != weights_checksum(state):
        raise ValueError(f"checkpoint {path} is corrupt: its weights do not match the checksum stored with them "
                         "(the file was changed after it was written); use another copy or retrain")
    if version == 1:
        state = _from_format_1(state)
    return state


def _check_layout(state: object, path: Path) -> None:
    """ValueError unless ``state`` is what the trainer writes: a dict whose "model" is a mapping of
    tensors (a bare state dict — the weights alone — is named as such)."""
    expected = ("expected a file written by fastsat's trainer (checkpoint.pt or best.pt: a dict holding the "
                "weights under 'model')")
    if isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} is a bare state dict ({len(state)} tensors such as "
                         f"{next(iter(state))!r}); {expected}")
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        held = sorted(map(str, state))[:8] if isinstance(state, Mapping) else describe(state)
        raise ValueError(f"checkpoint {path} holds {held}; {expected}")


def weights_checksum(state: Mapping) -> str:
    """SHA-256 (hex) of the weights in ``state`` (its "model" and "ema" state dicts): every
    tensor's name, dtype, shape and bytes, in sorted order of entry and name."""
    digest = hashlib.sha256()
    for entry in _WEIGHTS:
        weights = state.get(entry)
        if weights is None:
            continue
        for name in sorted(weights):
            tensor = weights[name].detach().cpu().contiguous()
            digest.update(f"{entry}/{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def sealed(state: dict) -> dict:
    """``state`` with the ``"checksum"`` of its weights (:func:`weights_checksum`) added: what the
    trainer saves."""
    return {**state, "checksum": weights_checksum(state)}


def load_weights(module: nn.Module, weights: Mapping, source: object) -> None:
    """``module.load_state_dict(weights)`` with a clear error: a ValueError naming ``source`` (the
    checkpoint) and the missing, unexpected or differently shaped entries — e.g. another
    architecture or class count than the one that was saved."""
    own = module.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in weights and weights[k].shape != own[k].shape]
    problems = [f"{what}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}" for what, items in
                (("missing", missing), ("unexpected", unexpected), ("shape saved vs model's", shapes)) if items]
    if problems:
        raise ValueError(f"checkpoint {source} does not fit the model ({'; '.join(problems)}); expected the "
                         "architecture and class count it was written with")
    module.load_state_dict(weights)


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
