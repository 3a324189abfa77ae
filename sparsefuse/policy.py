"""The call convention shared by scorers (what to drop) and growth policies (what to regrow).

A policy is called once per layer at each topology update with the weight (already masked), its dense gradient
(or None), the layer's granularity and the sparsifier's keyed random generator, and returns one score per group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .masks import Granularity

__all__ = ["GroupScore", "random_scores"]


class GroupScore(ABC):
    """Base class of scorers and growth policies. Set ``needs_grad = True`` if ``__call__`` reads ``grad``."""

    needs_grad = False

    @abstractmethod
    def __call__(
        self, weight: Tensor, grad: Tensor | None, granularity: Granularity, generator: torch.Generator
    ) -> Tensor:
        """One score per group, in ``granularity.groups_shape(weight.shape)``.

        Args:
            weight: the layer's weight, already masked.
            grad: its dense gradient from the last backward, or None.
            granularity: the layer's bound granularity.
            generator: the sparsifier's generator for this (step, layer): draw random numbers from it only.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def random_scores(weight: Tensor, granularity: Granularity, generator: torch.Generator) -> Tensor:
    """Uniform scores in group shape, drawn on the CPU so every device and replica draws the same numbers."""
    return torch.rand(granularity.groups_shape(weight.shape), generator=generator).to(weight.device)
