"""Argument checks shared by every layer of fastsat, with one message style.

Each check returns the value in its canonical Python form or raises, before any work is done, with
``"<name>: expected <what>, got <value>"``:

- ``TypeError`` when the value is not of the kind asked for at all (a string where a number is meant);
- ``ValueError`` when it is of the right kind but outside what is allowed (a negative radius, 2.5
  steps, an unknown choice).

Numbers: wherever a number is meant, any real is accepted — Python ``int``/``float``, numpy
scalars, and 0-d tensors on the CPU (a CUDA scalar would cost a host sync, so it is refused with a
message saying so). ``bool`` is never a number here.

This module sits below every other one (it imports only torch and the standard library).
"""

from __future__ import annotations

import contextlib
import difflib
import math
import numbers
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

__all__ = [
    "choice",
    "clip_box",
    "describe",
    "flag",
    "host_checks_enabled",
    "integer",
    "mapping",
    "nearest",
    "no_host_checks",
    "number",
    "path",
    "positive_int",
    "positive_number",
    "seed",
    "writable_path",
]


def describe(value: object, limit: int = 80) -> str:
    """A short, unambiguous rendering of ``value`` for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text if isinstance(value, (int, float, str, type(None))) else f"{type(value).__name__} {text}"


def _scalar(value: object, name: str, expected: str) -> object:
    """Python scalar behind ``value`` (numpy scalars and 0-d CPU tensors unwrapped); TypeError if
    ``value`` is no real number."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name}: expected {expected}, got {describe(value)}")
        if value.device.type != "cpu":
            raise TypeError(f"{name}: expected {expected} (a 0-d tensor must be on the CPU: reading one from "
                            f"{value.device} would synchronise with it), got {describe(value)}")
        return value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {expected}, got {describe(value)}")
    return value


def _bounds_text(minimum: float | None, maximum: float | None, exclusive_min: bool, exclusive_max: bool) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if exclusive_min else '>='} {minimum:g}")
    if maximum is not None:
        parts.append(f"{'<' if exclusive_max else '<='} {maximum:g}")
    return " and ".join(parts)


def number(
    value: object,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_min: bool = False,
    exclusive_max: bool = False,
    allow_none: bool = False,
) -> float | None:
    """A finite real number within the given bounds, as a Python float (None passes with ``allow_none``).

    Example: ``number(eps, "eps", minimum=0)`` accepts 0.031, ``np.float32(8/255)`` and
    ``torch.tensor(0.1)``; it rejects ``-1`` (ValueError), ``"0.1"`` and ``True`` (TypeError).
    """
    if value is None and allow_none:
        return None
    bounds = _bounds_text(minimum, maximum, exclusive_min, exclusive_max)
    expected = f"a finite number {bounds}".rstrip() + (" or None" if allow_none else "")
    value = float(_scalar(value, name, expected))
    too_low = minimum is not None and (value < minimum or (exclusive_min and value == minimum))
    too_high = maximum is not None and (value > maximum or (exclusive_max and value == maximum))
    if not math.isfinite(value) or too_low or too_high:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def positive_number(value: object, name: str, *, allow_none: bool = False) -> float | None:
    """A finite real number > 0 (a radius, a learning rate, ...) as a Python float."""
    return number(value, name, minimum=0, exclusive_min=True, allow_none=allow_none)


def integer(value: object, name: str, *, minimum: int | None = None, allow_none: bool = False) -> int | None:
    """An integer ≥ ``minimum`` as a Python int (None passes with ``allow_none``): Python and numpy
    integers and 0-d integer CPU tensors. Any float (2.5, and 2.0 too: a count is an int) is a
    ValueError."""
    if value is None and allow_none:
        return None
    expected = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (" or None" if allow_none else "")
    scalar = _scalar(value, name, expected)
    if not isinstance(scalar, numbers.Integral) or (minimum is not None and scalar < minimum):
        raise ValueError(f"{name}: expected {expected}, got {describe(value)}")
    return int(scalar)


def positive_int(value: object, name: str, *, allow_none: bool = False) -> int | None:
    """An integer ≥ 1 (a count of steps, samples, epochs, ...)."""
    return integer(value, name, minimum=1, allow_none=allow_none)


def seed(value: object, name: str = "seed", *, allow_none: bool = False) -> int | None:
    """A random seed: an integer in [0, 2**63) (None passes with ``allow_none``)."""
    result = integer(value, name, minimum=0, allow_none=allow_none)
    if result is not None and result >= 2**63:
        raise ValueError(f"{name}: expected an integer in [0, 2**63), got {result}")
    return result


def device(value: object, name: str = "device") -> torch.device:
    """A torch device this machine has: a name such as "cpu" or "cuda:1", or "auto" (the GPU where
    there is one, else the CPU). Nothing is initialised on it."""
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{name}: expected a device name such as 'cpu', 'cuda:0' or 'auto', got {describe(value)}")
    try:
        result = torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name}: {err}") from None
    if result.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (result.index is not None and result.index >= count):
            raise ValueError(f"{name}: expected a device this machine has (cpu{', cuda:0' if count else ''}"
                             f"{f' .. cuda:{count - 1}' if count > 1 else ''}, or auto), got {value!r}: "
                             f"{'torch sees no CUDA GPU' if count == 0 else f'{count} CUDA GPUs'}")
    return result


def flag(value: object, name: str, *, allow_none: bool = False) -> bool | None:
    """A switch: ``True`` or ``False`` (None passes with ``allow_none``). 1, 0 and strings are
    TypeErrors: a switch is not a count or a word."""
    if (value is None and allow_none) or isinstance(value, bool):
        return value
    raise TypeError(f"{name}: expected True or False{' or None' if allow_none else ''}, got {describe(value)}")


def mapping(value: object, name: str, *, allow_none: bool = False) -> dict | None:
    """Keyword arguments: a mapping with ``str`` keys, as a ``dict`` (None passes with ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise TypeError(f"{name}: expected a mapping of name: value{' or None' if allow_none else ''}, got {describe(value)}")
    return dict(value)


def path(value: object, name: str, *, allow_none: bool = False) -> str | None:
    """A file-system path (``str`` or ``os.PathLike``) as a ``str`` (None passes with ``allow_none``)."""
    if value is None and allow_none:
        return None
    expected = "a path" + (" or None" if allow_none else "")
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name}: expected {expected}, got {describe(value)}")
    if not os.fspath(value):
        raise ValueError(f"{name}: expected {expected}, got an empty path")
    return os.fspath(value)


def writable_path(value: object, name: str, *, folder: bool = False, allow_none: bool = False) -> str | None:
    """A path (as :func:`path`) where a file — or with ``folder``, a folder of files — can be
    written: checked before long work, so that a run does not fail at its very end. It must not be
    a folder (with ``folder``: a file), and the nearest existing folder on the way to it must be
    writable (missing folders below it are created by the writer). None passes with ``allow_none``."""
    text = path(value, name, allow_none=allow_none)
    if text is None:
        return None
    target = os.path.abspath(text)
    if os.path.isdir(target) != folder and os.path.exists(target):
        raise ValueError(f"{name}: expected the path of a {'folder' if folder else 'file'} to write, got the existing "
                         f"{'file' if folder else 'folder'} {text}")
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not folder and existing == target:
        existing = os.path.dirname(target)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot write {text}: {existing} is not a writable folder")
    return text


def nearest(word: str, options: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the closest of ``options`` to ``word``, or "" when none is close."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def choice(value: object, name: str, choices: Sequence[object]) -> object:
    """``value`` if it is one of ``choices``, else ValueError listing them and the nearest one."""
    if value not in choices:
        hint = nearest(value, [c for c in choices if isinstance(c, str)]) if isinstance(value, str) else ""
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {describe(value)}{hint}")
    return value


def clip_box(clip: object, name: str = "clip") -> tuple[float, float]:
    """The valid input box ``(lo, hi)`` as two finite floats with lo <= hi (pixel space)."""
    if not isinstance(clip, (tuple, list)) or len(clip) != 2:
        raise TypeError(f"{name}: expected a pair (lo, hi), got {describe(clip)}")
    lo, hi = (number(v, name) for v in clip)
    if lo > hi:
        raise ValueError(f"{name}: expected lo <= hi, got {describe(clip)}")
    return lo, hi


# --- checks that read tensor values on the host ---------------------------------------------------

_host_checks_disabled = 0


@contextlib.contextmanager
def no_host_checks() -> Iterator[None]:
    """Inside this context, skip the checks that must read tensor *values* back to the host — and so
    stall a GPU until it catches up: finiteness, value ranges (inputs inside the box, labels below
    K, boxes inside the image), attack output audits and the zero-gradient/probability warnings.
    Checks of shapes, dtypes and devices still run (they cost nothing).

    The trainer checks the first batch of every epoch with everything on, then runs the rest of the
    epoch inside this context, so that a training step never waits for the device (it checks every
    batch's pixels and labels on the device instead, read once at the epoch's end). Nestable.
    """
    global _host_checks_disabled
    _host_checks_disabled += 1
    try:
        yield
    finally:
        _host_checks_disabled -= 1


def host_checks_enabled() -> bool:
    """False inside :func:`no_host_checks`, and while ``torch.compile`` traces: a graph cannot read
    values back (its fake tensors have none), and the compiled code then depends on no nesting
    depth of :func:`no_host_checks` (a guard on it would compile the same graph once per depth)."""
    return not torch.compiler.is_compiling() and _host_checks_disabled == 0
