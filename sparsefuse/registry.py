"""One rule for every policy argument of `DynamicSparsity`: a registered name or an object.

Every policy argument (``granularity``, ``distribution``, ``scorer``, ``growth``, ``schedule``, ``regrow_init``)
accepts an object: an instance of the policy's class, or a callable that follows its convention. Policies that
need no parameter also have a name (``"kernel"``, ``"erk"``, ``"l1"``, ``"gradient"``, ``"reinit"``, ...), which
stands for the policy built with its defaults. Policies with a required parameter have no name: a schedule needs
``every`` and ``drop_fraction``, a ``Block`` granularity its shape, so they are always given as objects. Each policy
module keeps its names in a dict (``sparsefuse.masks.GRANULARITIES``, ``sparsefuse.scorers.SCORERS``, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

__all__ = ["resolve_policy"]


def resolve_policy(
    role: str, spec: object, names: Mapping[str, object], accepts: Callable[[object], bool], expected: str
) -> object:
    """The policy ``spec`` names or is, for the argument ``role``.

    Args:
        role: the argument's name, for messages.
        spec: a name in ``names`` or an object.
        names: {name: class (built with no arguments) or ready object}; empty for policies without names.
        accepts: whether an object is a valid policy of this kind.
        expected: what a valid object is, for messages (e.g. "a sparsefuse.scorers.Scorer such as L1()").

    Raises:
        ValueError: an unknown name; the message lists the valid ones.
        TypeError: anything else that is not a valid policy object, a class given instead of an instance included.
    """
    if isinstance(spec, str) and names:
        if spec not in names:
            raise ValueError(f"unknown {role} {spec!r}: use one of {sorted(names)}, or {expected}")
        value = names[spec]
        return value() if isinstance(value, type) else value
    if isinstance(spec, type):
        raise TypeError(f"{role} must be an instance, got the class {spec.__name__}: write {spec.__name__}(...)")
    if not accepts(spec):
        named = f"one of the names {sorted(names)} or " if names else ""
        raise TypeError(f"{role} must be {named}{expected}, got {type(spec).__name__} {spec!r}")
    return spec
