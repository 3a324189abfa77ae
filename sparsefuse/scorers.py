"""Importance scorers: which active groups to drop. Higher score = more important = kept.

A scorer is called once per layer at each topology update with the weight (already masked), its dense gradient
(or None), the layer's granularity and the sparsifier's random generator, and returns one score per group.
Subclass `Scorer` to add one.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .masks import Granularity

__all__ = ["Scorer", "L1", "Magnitude", "Random"]


class Scorer:
    needs_grad = False

    def __call__(self, weight: Tensor, grad: Tensor | None, granularity: Granularity,
                 generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


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
        shape = granularity.groups_shape(weight.shape)
        return torch.rand(shape, generator=generator).to(weight.device)
