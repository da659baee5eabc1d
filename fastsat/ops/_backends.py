"""Which backend runs an op: explicit choice, ``FASTSAT_BACKEND``, or ``auto`` by device.

Backends are imported lazily, on first use, so ``import fastsat`` never imports triton, never
loads ``fastsat._C`` and never touches a GPU.

- ``torch``: ``fastsat.ops.reference``, pure PyTorch, any device, float64 too.
- ``cpp``: the C++ CPU kernels of the ``fastsat._C`` extension (CPU tensors).
- ``cuda``: the CUDA kernels of the same extension when built with CUDA (CUDA tensors).
- ``triton``: the Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).

``auto`` picks ``cpp`` for CPU tensors and, for CUDA tensors, the first available backend of the
op's row of :data:`AUTO_CUDA`, falling back to ``torch`` when neither is available.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from fastsat._checks import choice

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")
#: The ops that dispatch through :func:`resolve`.
OPS = ("pgd_step", "random_start", "alignment_stats", "sat_perturb")

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

_HOW_TO_GET = {
    "cpp": "build the extension: `pip install --no-build-isolation -e .` (needs a C++ compiler)",
    "cuda": "build the extension on a machine with nvcc and a CUDA build of torch: "
            "`FASTSAT_BUILD_CUDA=1 pip install --no-build-isolation -e .`",
    "triton": "install triton (`pip install triton`) and run on a CUDA device, "
              "or set TRITON_INTERPRET=1 to run the kernels on the CPU",
}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _import(name: str) -> ModuleType:
    # Import statements rather than importlib: torch.compile can trace them.
    if name == "torch":
        from fastsat.ops import reference as module
    elif name in ("cpp", "cuda"):
        from fastsat.ops import _cpp as module
    else:
        from fastsat.ops import _triton as module
    return module


_LOADED: dict[str, ModuleType | str] = {}


def _load(name: str) -> ModuleType | str:
    """The backend module, or a string saying why it cannot be loaded (each tried once)."""
    if name not in _LOADED:
        try:
            module = _import(name)
        except ImportError as err:
            _LOADED[name] = f"{err}"
        else:
            _LOADED[name] = "fastsat._C was built without CUDA kernels" if name == "cuda" and not module.HAS_CUDA else module
    return _LOADED[name]


def _unavailable_reason(name: str, device: torch.device | None) -> str | None:
    loaded = _load(name)
    if isinstance(loaded, str):
        return loaded
    if name == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible"
    if name == "triton" and not (torch.cuda.is_available() or _interpreting()):
        return "no CUDA device is visible and TRITON_INTERPRET is not set"
    if device is None:
        return None
    if name == "cpp" and device.type != "cpu":
        return f"the cpp backend runs on CPU tensors, got a {device.type} tensor"
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got a {device.type} tensor"
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        return f"the triton backend runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got a {device.type} tensor"
    return None


def available_backends() -> dict[str, bool]:
    """Which backends can run on this machine, e.g. ``{"triton": False, "cuda": False, "cpp": True,
    "torch": True}``. Asking for a missing one explicitly raises an error saying how to get it."""
    return {name: _unavailable_reason(name, None) is None for name in BACKENDS[1:]}


def resolve(backend: str | None, device: torch.device, op: str) -> ModuleType:
    """The backend module that runs ``op`` (one of :data:`OPS`) on tensors on ``device``.
    Traceable by torch.compile, which bakes the choice into the graph."""
    if backend is None:
        name = choice(os.environ.get("FASTSAT_BACKEND", "auto"), "backend (from $FASTSAT_BACKEND)", BACKENDS)
    else:
        name = choice(backend, "backend", BACKENDS)
    if name == "auto":
        preference = AUTO_CUDA[op] if device.type == "cuda" else ("cpp",)
        name = next((c for c in preference if _unavailable_reason(c, device) is None), "torch")
    reason = _unavailable_reason(name, device)
    if reason is not None:
        how = _HOW_TO_GET.get(name, "")
        raise RuntimeError(f"fastsat backend {name!r} is not available: {reason}. {how}".strip())
    return _load(name)
