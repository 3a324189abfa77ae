"""Growth policies: which inactive groups to regrow. Higher score = regrown first.

Same call convention as the scorers: (weight, dense grad or None, granularity, generator) -> one score per group.
The sparsifier only ever picks among groups that were inactive before the update.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .masks import Granularity

__all__ = ["Growth", "Random", "Gradient"]


class Growth:
    needs_grad = False

    def __call__(self, weight: Tensor, grad: Tensor | None, granularity: Granularity,
                 generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Random(Growth):
    """Uniformly random inactive groups (SET; the E2ENet paper's rule)."""

    def __call__(self, weight, grad, granularity, generator):
        shape = granularity.groups_shape(weight.shape)
        return torch.rand(shape, generator=generator).to(weight.device)


class Gradient(Growth):
    """Largest dense-gradient magnitude, summed over each group (RigL).

    Needs the gradient of the last backward at update time: call ``sparsity.step()`` before ``zero_grad()``.
    """

    needs_grad = True

    def __call__(self, weight, grad, granularity, generator):
        return granularity.group_sum(grad.detach().abs().float())
