"""Layer-wise densities from one global density: uniform, Erdos-Renyi (ER) and Erdos-Renyi-Kernel (ERK).

ER and ERK give layer l a density proportional to a raw score (ER: (n0 + n1) / (n0 * n1) over the first two
dims; ERK: sum(shape) / prod(shape), kernel dims included), scaled by one epsilon so that the number of active
weights matches ``density * total``. A layer whose density would exceed 1 is made dense and epsilon is solved
again over the others (RigL's solver), so the global density stays exact instead of drifting below the target.

A distribution is a callable ``(shapes, density) -> {name: density}``; `DISTRIBUTIONS` names the three built in,
which `DynamicSparsity(distribution=...)` and `layer_densities` take by name or as objects alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from .registry import resolve_policy

__all__ = ["layer_densities", "uniform", "er", "erk", "DISTRIBUTIONS", "get_distribution"]

Shapes = Mapping[str, Sequence[int]]
Distribution = Callable[[Shapes, float], dict[str, float]]


def _raw_score(kind: str, shape: Sequence[int]) -> float:
    if kind == "erk":
        return sum(shape) / math.prod(shape)
    if len(shape) < 2:  # ER is defined on (fan_out, fan_in); a vector has one fan
        return 1.0 / shape[0]
    return (shape[0] + shape[1]) / (shape[0] * shape[1])


def _solve(kind: str, shapes: Shapes, density: float) -> dict[str, float]:
    if density >= 1.0:
        return {name: float(density) for name in shapes}
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: _raw_score(kind, shape) for name, shape in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(sizes.values()) - sum(sizes[n] for n in dense)
        weighted = sum(raw[n] * sizes[n] for n in shapes if n not in dense)
        epsilon = budget / weighted
        over = [n for n in shapes if n not in dense and epsilon * raw[n] > 1.0]
        if not over:
            break
        # As RigL: only the layers with the largest raw score go dense, then epsilon is solved again.
        top = max(raw[n] for n in over)
        dense.update(n for n in over if raw[n] == top)
    return {name: 1.0 if name in dense else epsilon * raw[name] for name in shapes}


def uniform(shapes: Shapes, density: float) -> dict[str, float]:
    """Every layer at ``density``.

    Args:
        shapes: {weight name: weight shape}.
        density: the global fraction of weights kept.
    """
    return {name: float(density) for name in shapes}


def er(shapes: Shapes, density: float) -> dict[str, float]:
    """Erdos-Renyi: density proportional to (n0 + n1) / (n0 * n1) of each weight's first two dims.

    Args:
        shapes: {weight name: weight shape}.
        density: the global fraction of weights kept.
    """
    return _solve("er", shapes, density)


def erk(shapes: Shapes, density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel: density proportional to sum(shape) / prod(shape), kernel dims included.

    Args:
        shapes: {weight name: weight shape}.
        density: the global fraction of weights kept.
    """
    return _solve("erk", shapes, density)


DISTRIBUTIONS: dict[str, Distribution] = {"uniform": uniform, "er": er, "erk": erk}


def get_distribution(spec: str | Distribution) -> Distribution:
    """The distribution ``spec`` names or is.

    Args:
        spec: a key of `DISTRIBUTIONS`, or a callable ``(shapes, density) -> {name: density}``.
    """
    return resolve_policy(
        "distribution", spec, DISTRIBUTIONS, callable, "a callable (shapes, density) -> {name: density}"
    )


def layer_densities(shapes: Shapes, density: float, kind: str | Distribution = "uniform") -> dict[str, float]:
    """Per-layer densities for weights of the given ``shapes`` whose element-weighted mean is ``density``.

    Args:
        shapes: {weight name: weight shape}.
        density: the global fraction of weights kept, in (0, 1].
        kind: ``"uniform"``, ``"er"``, ``"erk"``, or a callable ``(shapes, density) -> {name: density}``.
    """
    return get_distribution(kind)(shapes, density)
