"""Deprecated alias of the option helpers, which moved to the internal :mod:`fastsat._options`;
removed in the next release. The options of a command are :func:`fastsat.cli.command_specs`."""

import warnings

from fastsat import _options


def __getattr__(name: str) -> object:
    if name in _options.__all__:
        warnings.warn(f"fastsat.train.options.{name} is deprecated and will be removed in the next release: the "
                      "option helpers are internal now (fastsat._options); for the options of a command, with "
                      "their defaults and help, use fastsat.cli.command_specs(command)", DeprecationWarning,
                      stacklevel=2)
        return getattr(_options, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
