"""Misuse that would otherwise go unnoticed, refused by DynamicSparsity with what to do instead.

Each of these leaves ``density()`` reporting the target while the model trains something else: a layer too small
for its density (masked off entirely), a frozen weight (its regrown groups stay zero forever), a weight replaced
after construction (the new tensor is never masked), ``step()`` called more often than the optimizer steps (the
schedule runs that much faster).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch

from .targets import Target

__all__ = ["check_keeps_a_group", "check_not_frozen", "check_attached", "frozen_error", "OptimizerSteps"]


def check_keeps_a_group(t: Target, keep: int) -> None:
    """Refuse a target whose density rounds to no group at all."""
    if keep > 0:
        return
    d, n = t.target_density, t.num_groups
    raise ValueError(
        f"density {d:.4g} keeps no group of {t.name!r}: round({d:.4g} * {n} groups of {t.granularity!r}) = 0, so "
        f"the layer would be masked off entirely. Give it a density of at least 1/{n} = {1 / n:.4g} "
        f"(density={{{t.name!r}: {1 / n:.4g}, 'default': ...}}), leave it out of `targets`, or use a finer "
        f"granularity"
    )


def check_not_frozen(targets: Iterable[Target], optimizer: torch.optim.Optimizer | None, dynamic: bool) -> None:
    """Refuse frozen targets of a sparsifier that changes the topology: they could never train what they regrow."""
    frozen = [t.name for t in targets if not t.param.requires_grad]
    if frozen and optimizer is not None and dynamic:
        raise ValueError(
            f"these targeted weights are frozen (requires_grad=False): {frozen}; the groups a topology update "
            f"regrows in them would stay zero, while density() counts them as active. Unfreeze them "
            f"(requires_grad_(True)) or leave them out of `targets`; a static sparsifier (schedule=None) may mask "
            f"frozen weights"
        )


def frozen_error(name: str, step: int) -> RuntimeError:
    return RuntimeError(
        f"{name!r} is frozen (requires_grad=False) at update step {step}: it gets no gradient, and the groups an "
        f"update regrows in it could never train. Unfreeze it (requires_grad_(True)), or build the sparsifier "
        f"without it (targets=...)"
    )


def check_attached(targets: Iterable[Target]) -> None:
    """Refuse to mask a weight the model no longer holds.

    Runs on every ``step()``: one pass over the targets (an empty list when all are attached), which measured no
    slower than an ``all()`` fast path, whose generator costs about what the list does.
    """
    replaced = [t.name for t in targets if not t.attached]
    if replaced:
        raise RuntimeError(
            f"the model's {replaced} are no longer the tensors DynamicSparsity masks: they were replaced after it "
            f"was built (by load_state_dict(..., assign=True), or by assigning a new nn.Parameter), so the new ones "
            f"are never masked and the optimizer does not update them. Load with assign=False, which copies into "
            f"the existing tensors, or build the optimizer and DynamicSparsity after replacing them (load the "
            f"sparsifier's state_dict() to keep its masks)"
        )


class OptimizerSteps:
    """Counts ``optimizer.step()`` calls through a step post-hook, so ``DynamicSparsity.step()`` can tell when it is
    called again for the same optimizer step. Nothing is counted without an optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer | None):
        self.count = 0
        self.at_last_step: int | None = None  # the count when step() last ran; None before the first call
        self.enabled = optimizer is not None
        if optimizer is not None:
            counter = weakref.ref(self)  # the hook must not keep a discarded sparsifier alive

            def count_step(opt, args, kwargs) -> None:
                alive = counter()
                if alive is not None:
                    alive.count += 1

            optimizer.register_step_post_hook(count_step)

    def check(self) -> None:
        """Raise if the optimizer has not stepped since the previous ``step()``; else note this call."""
        if self.enabled and self.at_last_step is not None and self.count == self.at_last_step:
            raise RuntimeError(
                "DynamicSparsity.step() was called again without an optimizer.step() since its previous call. The "
                "schedule counts step() calls, so calling it twice per optimizer step runs the schedule twice as "
                "fast. Call sparsity.step() once, right after each optimizer.step() (with gradient accumulation, "
                "only after the steps that update the weights)"
            )
        self.at_last_step = self.count
