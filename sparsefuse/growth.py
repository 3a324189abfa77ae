"""Growth policies: which inactive groups to regrow. Higher score = regrown first.

Call convention: :class:`sparsefuse.policy.GroupScore`. The sparsifier only ever picks among groups that were
inactive before the update. Subclass `Growth` to add one.
"""

from __future__ import annotations

from .policy import GroupScore, random_scores

__all__ = ["Growth", "Random", "Gradient"]


class Growth(GroupScore):
    """Base class of growth policies."""


class Random(Growth):
    """Uniformly random inactive groups (SET; the E2ENet paper's rule)."""

    def __call__(self, weight, grad, granularity, generator):
        return random_scores(weight, granularity, generator)


class Gradient(Growth):
    """Largest dense-gradient magnitude, summed over each group (RigL).

    Needs the gradient of the last backward at update time: call ``sparsity.step()`` before ``zero_grad()``.
    """

    needs_grad = True

    def __call__(self, weight, grad, granularity, generator):
        return granularity.group_sum(grad.detach().abs().float())
