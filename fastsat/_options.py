"""Declared options: one dataclass field per option carries its default, its help text (with units)
and its allowed values; validation, the YAML keys and the command line's flags are derived from it.

A field is declared with :func:`option`, e.g. ``epochs: int = option(10, "training epochs",
check=positive_int)``; the dataclass's ``__post_init__`` calls :func:`validate`, and
:func:`specs` lists the fields as :class:`Spec` rows that :mod:`fastsat.cli` turns into argparse
options and :func:`parse` uses to read text (the command line, strings in YAML).

Why not tyro or jsonargparse (both well kept, both generate a CLI from a dataclass): fastsat's
command line needs three things neither gives without as much glue as this module — fractions
wherever a radius is meant (``--eps 8/255``), the recipe options flattened from the registry of
recipes (``--steps`` with each recipe's own default shown), and YAML errors that name the nearest
valid key through :func:`fastsat._checks.nearest` — and a new dependency would be one more thing
to install for every user of the library, who never sees the CLI. Plain dataclass fields plus
``typing.get_type_hints`` cover the handful of types used here (bool, int, float, str, optionals,
pairs and lists).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction

import yaml

from fastsat._checks import choice, describe, nearest

__all__ = ["Spec", "document", "is_sequence", "option", "parse", "show", "specs", "unknown_keys", "validate"]

Check = Callable[[object, str], object]


@dataclasses.dataclass(frozen=True)
class Spec:
    """One user-facing option: its name (a field name; the flag is ``--name-with-dashes``), its
    type (a resolved annotation), default, help text and allowed values (None: any)."""

    name: str
    type: object
    default: object
    help: str
    choices: tuple | None = None


def option(
    default: object = dataclasses.MISSING,
    help: str = "",
    *,
    choices: tuple | None = None,
    check: Check | None = None,
    factory: Callable[[], object] | None = None,
    recorded: bool = True,
) -> dataclasses.Field:
    """A dataclass field declaring one option.

    Args:
        default: the default value (``factory`` for a mutable one).
        help: one line for ``--help``: what it is, with units.
        choices: the allowed values (checked by :func:`validate`, listed by ``--help``).
        check: ``check(value, name) -> canonical value`` raising TypeError/ValueError, usually a
            function of :mod:`fastsat._checks` (e.g. ``positive_int``).
        recorded: False for options that cannot change a run's results (where files go, progress
            bars); the trainer does not compare them when resuming.
    """
    metadata = {"help": help, "choices": choices, "check": check, "recorded": recorded}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def validate(obj: object) -> None:
    """Check every option field of the dataclass instance ``obj`` and store its canonical value
    (e.g. a numpy float as a Python float). Call it from ``__post_init__``."""
    for field in dataclasses.fields(obj):
        if not field.init:
            continue
        value = getattr(obj, field.name)
        choices = field.metadata.get("choices")
        if choices is not None and not (value is None and _optional(type(obj), field.name)):  # lists: each item
            one = functools.partial(choice, name=field.name, choices=choices)
            value = [one(v) for v in value] if isinstance(value, (list, tuple)) else one(value)
        if field.metadata.get("check") is not None:
            value = field.metadata["check"](value, field.name)
        object.__setattr__(obj, field.name, value)  # also for frozen dataclasses


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _optional(cls: type, name: str) -> bool:
    """Whether the field ``name`` of ``cls`` is declared ``X | None``."""
    return type(None) in typing.get_args(_hints(cls)[name])


def specs(cls: type) -> list[Spec]:
    """The options of the dataclass ``cls``, in field order."""
    hints = _hints(cls)
    rows = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        rows.append(Spec(field.name, hints[field.name], default, field.metadata.get("help", ""), field.metadata.get("choices")))
    return rows


def document(cls: type) -> type:
    """Append an "Options" section generated from the fields to the docstring of the dataclass
    ``cls`` (so ``help(cls)`` shows each option's meaning, choices and default); returns ``cls``."""
    lines = [f"    {spec.name}: {spec.help}" + (f"; one of {', '.join(map(str, spec.choices))}" if spec.choices else "")
             + f" (default: {show(spec.default)})." for spec in specs(cls)]
    cls.__doc__ = f"{cls.__doc__.rstrip()}\n\n    Options:\n\n" + "\n".join(lines) + "\n"
    return cls


def unknown_keys(keys: object, known: object, where: str) -> None:
    """ValueError naming the first key of ``keys`` that is not in ``known``, and the nearest known one."""
    known = list(known)
    for key in keys:
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r}{nearest(key, known)}; known keys: {', '.join(sorted(known))}")


_SEQUENCES = (list, tuple, Sequence)  # annotation origins read as comma-separated items (Sequence: a list)
_MAPPINGS = (dict, Mapping)  # annotation origins read as YAML text
_NONE = ("none", "null", "")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse(kind: object, value: object, name: str) -> object:
    """``value`` read as the declared type ``kind`` when it is text (the command line, or a string
    in YAML): numbers accept fractions (``"8/255"``), booleans true/false/yes/no/on/off/1/0, an
    optional ``none``/``null``/empty, lists and pairs comma-separated items (``"2/255,4/255"``),
    mappings YAML (``"{depth: 3}"``).
    Values that are not text pass through unchanged (lists item by item) for the field's check.

    Raises:
        ValueError: text that does not read as ``kind``, with ``name`` in the message.
    """
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        others = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE and len(others) < len(args)):
            return None
        if bool in others and str in others:  # a flag or a path (resume): a boolean word means the flag
            word = isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE
            return _boolean(value, name) if isinstance(value, bool) or word else value
        return parse(others[0], value, name) if len(others) == 1 else value
    if origin in _MAPPINGS and isinstance(value, str):  # YAML text: "{depth: 3, widen: 2}"
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"{name}: expected a YAML mapping like '{{depth: 3}}', got {describe(value)} "
                             f"({getattr(err, 'problem', None) or err})") from None
    if origin in _SEQUENCES and isinstance(value, (list, tuple, str)):
        items = [item.strip() for item in value.split(",")] if isinstance(value, str) else value
        return (tuple if origin is tuple else list)(parse(args[0], item, name) for item in items)
    if not isinstance(value, str):
        return value
    if kind is bool:
        return _boolean(value, name)
    if kind is int:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name}: expected an integer, got {describe(value)}") from None
    if kind is float:
        try:
            return float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError, OverflowError):  # OverflowError: beyond a float, e.g. 1e999
            raise ValueError(f"{name}: expected a finite number or a fraction like 8/255, got {describe(value)}") from None
    return value


def is_sequence(kind: object) -> bool:
    """Whether the annotation ``kind`` holds several values (a list, pair or sequence; optional or not)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        kind = args[0]
    return typing.get_origin(kind) in _SEQUENCES


def _boolean(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in _TRUE + _FALSE:
        return word in _TRUE
    raise ValueError(f"{name}: expected true or false, got {describe(value)}")


def show(value: object) -> str:
    """A default for ``--help``: radii and steps that are whole multiples of 1/255 (below 0.1) as
    ``k/255``, other floats to 6 significant digits, sequences comma-separated."""
    if isinstance(value, float):
        k = round(value * 255)
        return f"{k}/255" if 0 < value < 0.1 and abs(value * 255 - k) < 1e-9 else f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ",".join(show(v) for v in value)
    if isinstance(value, Mapping) and not value:
        return "none"
    return str(value)
