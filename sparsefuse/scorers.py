"""Importance scorers: which active groups to drop. Higher score = more important = kept.

Call convention: :class:`sparsefuse.policy.GroupScore`. Subclass `Scorer` to add one.
"""

from __future__ import annotations

from .policy import GroupScore, random_scores

__all__ = ["Scorer", "L1", "Magnitude", "Random"]


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


class Random(Scorer):
    """Uniform random scores (a control: drops groups regardless of their weights)."""

    def __call__(self, weight, grad, granularity, generator):
        return random_scores(weight, granularity, generator)
