"""Old names that keep working for one release, each with a DeprecationWarning that names its replacement."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping

__all__ = ["renamed_kwarg", "module_aliases"]


def renamed_kwarg(old: str, new: str) -> Callable[[Callable], Callable]:
    """Decorate a function so that the keyword ``old`` is passed on as ``new``, with a DeprecationWarning."""

    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if old in kwargs:
                # For a constructor, name the class the caller built, not the base that defines __init__.
                called = type(args[0]).__name__ if function.__name__ == "__init__" and args else function.__qualname__
                if new in kwargs:
                    raise TypeError(f"{called}() got both {old}= and {new}=; pass only {new}=")
                warnings.warn(
                    f"{called}({old}=...) is deprecated and will be removed in the next release; use {new}=",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper

    return decorate


def module_aliases(module: str, aliases: Mapping[str, object]) -> Callable[[str], object]:
    """A module ``__getattr__`` that returns ``aliases[name]`` with a DeprecationWarning naming its new name."""

    def __getattr__(name: str) -> object:
        if name not in aliases:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target = aliases[name]
        warnings.warn(
            f"{module}.{name} is deprecated and will be removed in the next release; use {module}.{target.__name__}",
            DeprecationWarning,
            stacklevel=2,
        )
        return target

    return __getattr__
