"""Importance scorers: which active groups to drop. Higher score = more important = kept.

Call convention: [`GroupScore`][sparsefuse.policy.GroupScore]. Subclass `Scorer` to add one. Names for
`DynamicSparsity(scorer=...)`: ``"l1"``, ``"magnitude"``, ``"random"`` (`SCORERS`).
"""

from __future__ import annotations

from .deprecation import module_aliases
from .policy import GroupScore, random_scores
from .registry import resolve_policy

__all__ = ["Scorer", "L1", "Magnitude", "RandomDrop", "SCORERS", "get_scorer"]


class Scorer(GroupScore):
    """Base class of drop scorers."""


class L1(Scorer):
    """Sum of |w| over each group: the E2ENet paper's rule for dropping kernels."""

    def __call__(self, weight, grad, granularity, generator):
        return granularity.group_sum(weight.detach().abs().float())


class Magnitude(Scorer):
    """L2 norm of each group. Ranks exactly like L1 for element groups; differs for kernels, channels and blocks."""

    def __call__(self, weight, grad, granularity, generator):
        return granularity.group_sum(weight.detach().float().square()).sqrt()


class RandomDrop(Scorer):
    """Uniform random scores (a control: drops groups regardless of their weights)."""

    def __call__(self, weight, grad, granularity, generator):
        return random_scores(weight, granularity, generator)


SCORERS = {"l1": L1, "magnitude": Magnitude, "random": RandomDrop}


def get_scorer(spec: str | Scorer) -> Scorer:
    """The scorer ``spec`` names or is.

    Args:
        spec: a key of `SCORERS`, a [`Scorer`][sparsefuse.scorers.Scorer], or any callable with its convention.
    """
    return resolve_policy(
        "scorer",
        spec,
        SCORERS,
        callable,
        "a sparsefuse.scorers.Scorer such as L1(), or a callable (weight, grad, granularity, generator) -> scores",
    )


__getattr__ = module_aliases(__name__, {"Random": RandomDrop})
