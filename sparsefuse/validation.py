"""Argument checks shared by the core and the examples, so every refusal reads the same."""

from __future__ import annotations

__all__ = ["positive_int"]


def positive_int(name: str, value, fix: str = "", *, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum`` (bools refused), else raise ValueError naming ``name``.

    ``fix``, when given, ends the message: what the argument means or how to choose it.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {expected}, got {value!r}" + (f"; {fix}" if fix else ""))
    return value
