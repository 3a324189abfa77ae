"""Growth policies: which inactive groups to regrow (higher score = regrown first), and what regrown weights hold.

Call convention: [`GroupScore`][sparsefuse.policy.GroupScore]. The sparsifier only ever picks among groups that were
inactive before the update. Subclass `Growth` to add one. Names for `DynamicSparsity(growth=...)`: ``"random"``,
``"gradient"`` (`GROWTHS`); for ``regrow_init``: ``"zeros"``, ``"reinit"`` (`REGROW_INITS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .deprecation import module_aliases
from .policy import GroupScore, random_scores
from .registry import resolve_policy

__all__ = [
    "Growth",
    "RandomGrowth",
    "Gradient",
    "GROWTHS",
    "get_growth",
    "zero_init",
    "default_init",
    "REGROW_INITS",
    "get_regrow_init",
]


class Growth(GroupScore):
    """Base class of growth policies."""


class RandomGrowth(Growth):
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


GROWTHS = {"random": RandomGrowth, "gradient": Gradient}


def get_growth(spec: str | Growth) -> Growth:
    """The growth policy ``spec`` names or is.

    Args:
        spec: a key of `GROWTHS`, a [`Growth`][sparsefuse.growth.Growth], or any callable with its convention.
    """
    return resolve_policy(
        "growth",
        spec,
        GROWTHS,
        callable,
        "a sparsefuse.growth.Growth such as Gradient(), or a callable (weight, grad, granularity, generator) -> scores",
    )


def zero_init(weight: Tensor, generator: torch.Generator) -> None:
    """Regrown weights start at 0 (RigL, and the E2ENet authors' code).

    Args:
        weight: a tensor shaped like the weight, filled in place.
        generator: unused.
    """
    weight.zero_()


def default_init(weight: Tensor, generator: torch.Generator) -> None:
    """Regrown weights get fresh values from the init torch's Conv*/Linear ``reset_parameters()`` applies.

    Args:
        weight: a tensor shaped like the weight, filled in place.
        generator: the sparsifier's generator for this (step, layer).
    """
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)


REGROW_INITS = {"zeros": zero_init, "reinit": default_init}


def get_regrow_init(spec: str | Callable[[Tensor, torch.Generator], None]) -> Callable[[Tensor, torch.Generator], None]:
    """The regrowth init ``spec`` names or is.

    Args:
        spec: a key of `REGROW_INITS`, or a callable ``(tensor, generator) -> None`` that fills its argument in
            place.
    """
    return resolve_policy(
        "regrow_init", spec, REGROW_INITS, callable, "a callable (weight_like_tensor, generator) -> None"
    )


__getattr__ = module_aliases(__name__, {"Random": RandomGrowth})
