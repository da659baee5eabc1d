"""The files of a run folder: their names and keys, writing and reading them, their checksum, and
the random-number-generator state a bit-exact resume needs.

A run folder holds checkpoint.pt (:data:`CHECKPOINT_NAME`, every epoch: what a resume needs, see
:meth:`fastsat.train.Trainer.state_dict`) and best.pt (:data:`BEST_NAME`: the best epoch's
evaluated weights and its epoch). Both are written atomically and carry a checksum of their weights
(:func:`sealed`), verified on load; files written before the checksum load as they are. The format
is :data:`CHECKPOINT_FORMAT`; format 1 (before TrainConfig) loads in today's form.
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
from fastsat._io import atomic_save
from fastsat.train.recipes import RECIPES

__all__ = ["BEST_NAME", "CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "capture_rng", "is_best_file",
           "load_checkpoint", "load_trained_weights", "load_weights", "restore_rng", "save_best", "save_checkpoint", "sealed",
           "trained_weights", "weights_checksum"]

#: 2: the config records every option that changes a run's results (TrainConfig's), and the recipe
#: options hold the input box ``clip`` and no longer Fast's ``early_stop``.
CHECKPOINT_FORMAT = 2
CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"

# The keys of checkpoint.pt (best.pt holds EPOCH_KEY and MODEL_KEY), and of both files' checksum.
FORMAT_KEY, CONFIG_KEY, DATA_KEY, EPOCH_KEY, WORLD_SIZE_KEY = "format", "config", "data", "epoch", "world_size"
MODEL_KEY, EMA_KEY = "model", "ema"  # state dicts: the trained model's, the EMA's average (or None)
OPTIMIZER_KEY, SCHEDULER_KEY, SCALER_KEY, RECIPE_KEY = "optimizer", "scheduler", "scaler", "recipe_state"
RNG_KEY, HISTORY_KEY, BEST_KEY, CHECKSUM_KEY = "rng", "history", "best", "checksum"
_WEIGHTS = (MODEL_KEY, EMA_KEY)


def save_checkpoint(state: dict, out_dir: Path) -> Path:
    """Write ``state`` (:meth:`fastsat.train.Trainer.state_dict`), sealed, as out_dir/checkpoint.pt; its path."""
    path = out_dir / CHECKPOINT_NAME
    atomic_save(sealed(state), path)
    return path


def save_best(out_dir: Path, epoch: int, weights: Mapping) -> None:
    """Write best.pt: the best epoch (1-based) and the weights evaluated at it, sealed."""
    atomic_save(sealed({EPOCH_KEY: epoch, MODEL_KEY: weights}), out_dir / BEST_NAME)


def is_best_file(state: Mapping) -> bool:
    """Whether ``state`` is best.pt's contents (weights alone: nothing a resume needs)."""
    return set(state) <= {EPOCH_KEY, MODEL_KEY, CHECKSUM_KEY}


def trained_weights(state: Mapping) -> Mapping:
    """The weights to evaluate from a loaded checkpoint.pt or best.pt: the EMA's average when the
    run kept one (it was the module evaluated and kept as best), else the model's."""
    ema = state.get(EMA_KEY)
    return state[MODEL_KEY] if ema is None else ema


def load_trained_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a finished run's weights (:func:`trained_weights` of the checkpoint at ``path``) into
    ``model``; returns ``model``. Raises as :func:`load_checkpoint` and :func:`load_weights`."""
    load_weights(model, trained_weights(load_checkpoint(path)), path)
    return model


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
    version = state.get(FORMAT_KEY)
    if version is not None and version > CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} has format {version}; this fastsat reads formats up to "
                         f"{CHECKPOINT_FORMAT} (upgrade fastsat)")
    if CHECKSUM_KEY in state and state[CHECKSUM_KEY] != weights_checksum(state):
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
    weights = state.get(MODEL_KEY) if isinstance(state, dict) else None
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
    return {**state, CHECKSUM_KEY: weights_checksum(state)}


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
    config = dict(state[CONFIG_KEY])
    options = {k: v for k, v in config["recipe_options"].items() if k != "early_stop"}
    if "clip" in getattr(RECIPES.get(config["recipe"]), "from_run", ()):
        options["clip"] = (0.0, 1.0)
    config["recipe_options"] = options
    ema = state.get(EMA_KEY)
    if ema is not None:
        ema = {k.removeprefix("module."): v for k, v in ema.items() if k.startswith("module.")}
    return {**state, FORMAT_KEY: CHECKPOINT_FORMAT, CONFIG_KEY: config, EMA_KEY: ema}


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
