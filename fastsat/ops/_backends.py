"""The backend interface (:class:`Backend`), the table of backends, and which one runs an op.

A backend is a module with the four functions of :class:`Backend`. :data:`BACKEND_TABLE` has one
row per backend: how to import it, where it runs, how to get it. Rows are imported on first use,
so ``import fastsat`` never imports triton, never loads ``fastsat._C`` and never touches a GPU.

Choice: ``backend=`` if given, else ``$FASTSAT_BACKEND``, else ``auto``: ``cpp`` for CPU tensors;
for CUDA tensors the first available backend of the op's row of :data:`AUTO_CUDA`; ``torch`` when
none of them is available.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from fastsat._checks import choice

__all__ = ["AUTO_CUDA", "BACKENDS", "BACKEND_TABLE", "OPS", "Backend", "BackendSpec", "available_backends", "resolve"]


class Backend(Protocol):
    """What every backend module implements; :mod:`fastsat.ops.reference` is the specification.

    Arguments arrive checked and dense (contiguous or channels_last, see
    :mod:`fastsat.ops.functional`). ``grad``/``g`` has the dtype of ``x`` or, for float16/bfloat16
    ``x``, float32; every other floating-point tensor has the dtype of ``x``. Arithmetic is in the
    accumulation dtype (float32; float64 for float64 inputs), rounded to the input dtype once;
    statistics stay in the accumulation dtype. ``lo, hi`` is the clip box, ``l2`` picks the L2 ball
    over L∞; radii and steps are in pixel units.

    Seeds: an int gives the same numbers on every call of that backend; None draws fresh numbers
    from torch's generator of the tensors' device without a host read (the kernels read a seed
    drawn by :func:`fastsat.ops.reference.seed_tensor`), so CUDA-graph replays draw fresh ones.
    """

    def pgd_step(self, x: Tensor, grad: Tensor, x_nat: Tensor, out: Tensor, step_size: float, eps: float, l2: bool,
                 lo: float, hi: float, with_stats: bool) -> Tensor:
        """Writes the new iterate into ``out`` (which may be ``x``). Returns (B, 4)
        ``[<x_nat, g>, ||g||_2, ||x_nat||_2, ||x_new - x_nat||_p]`` if ``with_stats``, else an empty tensor."""
        ...

    def random_start(self, x_nat: Tensor, eps: float, l2: bool, lo: float, hi: float, seed: int | None) -> Tensor:
        """A point drawn uniformly from the ε-ball around ``x_nat``, clipped."""
        ...

    def alignment_stats(self, x: Tensor, g: Tensor) -> Tensor:
        """(B, 3) ``[<x, g>, ||g||_2, ||x||_2]``."""
        ...

    def sat_perturb(self, x: Tensor, eps: float, p: float, seed: int | None, lo: float, hi: float,
                    saliency: Tensor | None, boxes: Tensor | None, masks: Tensor | None) -> Tensor:
        """``clip(x - eps * s)``; exactly one of ``saliency`` / ``boxes`` / ``masks`` is given."""
        ...


#: The ops every backend implements (the methods of :class:`Backend`).
OPS = ("pgd_step", "random_start", "alignment_stats", "sat_perturb")


@dataclass(frozen=True)
class BackendSpec:
    """One row of :data:`BACKEND_TABLE`.

    load: imports the backend module (an ImportError marks the backend missing).
    missing: why the loaded backend cannot run on this machine, or None.
    runs_on: whether it runs on tensors of a device; ``tensors`` says which, for the error.
    how_to_get: what to install or build, for the error when it is missing.
    """

    load: Callable[[], Backend]
    missing: Callable[[Backend], str | None]
    runs_on: Callable[[torch.device], bool]
    tensors: str
    how_to_get: str = ""


# Import statements rather than importlib: torch.compile can trace them.
def _load_reference() -> Backend:
    from fastsat.ops import reference

    return reference


def _load_cpp() -> Backend:
    from fastsat.ops import _cpp

    return _cpp


def _load_triton() -> Backend:
    from fastsat.ops import _triton

    return _triton


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cuda_missing(module: Backend) -> str | None:
    if not module.HAS_CUDA:
        return "fastsat._C was built without CUDA kernels"
    return None if torch.cuda.is_available() else "no CUDA device is visible"


def _triton_missing(module: Backend) -> str | None:
    if torch.cuda.is_available() or _interpreting():
        return None
    return "no CUDA device is visible and TRITON_INTERPRET is not set"


BACKEND_TABLE: dict[str, BackendSpec] = {
    "triton": BackendSpec(
        _load_triton, _triton_missing, lambda d: d.type == "cuda" or (d.type == "cpu" and _interpreting()),
        "CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)",
        "install triton (`pip install triton`) and run on a CUDA device, "
        "or set TRITON_INTERPRET=1 to run the kernels on the CPU"),
    "cuda": BackendSpec(
        _load_cpp, _cuda_missing, lambda d: d.type == "cuda", "CUDA tensors",
        "build the extension on a machine with nvcc and a CUDA build of torch: "
        "`FASTSAT_BUILD_CUDA=1 pip install --no-build-isolation -e .`"),
    "cpp": BackendSpec(
        _load_cpp, lambda module: None, lambda d: d.type == "cpu", "CPU tensors",
        "build the extension: `pip install --no-build-isolation -e .` (needs a C++ compiler)"),
    "torch": BackendSpec(_load_reference, lambda module: None, lambda d: True, "tensors on any device"),
}

BACKENDS = ("auto", *BACKEND_TABLE)

# `auto`'s choice for CUDA tensors, per op: the backends in order of preference. PROVISIONAL: this
# is the order the project started from (cuda, then triton), not a measurement — no fastsat kernel
# has run on a GPU yet. `python -m bench.gpu` on a GPU prints this table, with the order its
# timings give, in exactly this form; paste it here (and keep both backends: until measured, no
# backend is known never to win).
AUTO_CUDA: dict[str, tuple[str, ...]] = {
    "pgd_step": ("cuda", "triton"),
    "random_start": ("cuda", "triton"),
    "alignment_stats": ("cuda", "triton"),
    "sat_perturb": ("cuda", "triton"),
}

_LOADED: dict[str, Backend | str] = {}


def _load(name: str) -> Backend | str:
    """The backend module, or a string saying why it cannot be imported (each tried once)."""
    if name not in _LOADED:
        try:
            _LOADED[name] = BACKEND_TABLE[name].load()
        except ImportError as err:
            _LOADED[name] = f"{err}"
    return _LOADED[name]


def _unavailable_reason(name: str, device: torch.device | None) -> str | None:
    loaded = _load(name)
    if isinstance(loaded, str):
        return loaded
    spec = BACKEND_TABLE[name]
    reason = spec.missing(loaded)
    if reason is None and device is not None and not spec.runs_on(device):
        reason = f"the {name} backend runs on {spec.tensors}, got a {device.type} tensor"
    return reason


def available_backends() -> dict[str, bool]:
    """Which backends can run on this machine, e.g. ``{"triton": False, "cuda": False, "cpp": True,
    "torch": True}``. Asking for a missing one explicitly raises an error saying how to get it."""
    return {name: _unavailable_reason(name, None) is None for name in BACKEND_TABLE}


def resolve(backend: str | None, device: torch.device, op: str) -> Backend:
    """The backend that runs ``op`` (one of :data:`OPS`) on tensors on ``device``. Traceable by
    torch.compile, which bakes the choice into the graph."""
    if backend is None:
        name = choice(os.environ.get("FASTSAT_BACKEND", "auto"), "backend (from $FASTSAT_BACKEND)", BACKENDS)
    else:
        name = choice(backend, "backend", BACKENDS)
    if name == "auto":
        preference = AUTO_CUDA[op] if device.type == "cuda" else ("cpp",)
        name = next((c for c in preference if _unavailable_reason(c, device) is None), "torch")
    reason = _unavailable_reason(name, device)
    if reason is not None:
        how = BACKEND_TABLE[name].how_to_get
        raise RuntimeError(f"fastsat backend {name!r} is not available: {reason}. {how}".strip())
    return _load(name)
