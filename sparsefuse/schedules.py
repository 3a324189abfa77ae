"""Update schedules: when the topology changes and what fraction of the active groups is replaced.

Steps count calls to ``sparsity.step()``: the first call is step 1; step t is an update step when
``t % every == 0`` and (if ``stop`` is set) ``t <= stop``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

from .validation import positive_int

__all__ = ["Schedule", "CosineDecay", "Constant", "Linear"]


class Schedule(ABC):
    """Base class: subclasses define ``fraction(step)``; `every`, `alpha` and `stop` are shared."""

    def __init__(self, every: int, alpha: float, stop: int | None = None):
        positive_int("every", every, "it is the number of steps between topology updates (e.g. every=100)")
        if not 0.0 < float(alpha) <= 1.0:
            raise ValueError(
                f"alpha must be in (0, 1], got {alpha!r}; it is the fraction of active groups "
                f"replaced at the first update (the paper uses 0.5)"
            )
        if stop is not None:
            positive_int("stop", stop, "it is the last step that may change the topology, or None for no limit")
        self.every, self.alpha, self.stop = every, float(alpha), stop

    def is_update(self, step: int) -> bool:
        return step % self.every == 0 and (self.stop is None or step <= self.stop)

    @abstractmethod
    def fraction(self, step: int) -> float:
        """Fraction of the active groups replaced at update step ``step``."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Constant(Schedule):
    """The same fraction ``alpha`` at every update."""

    def fraction(self, step):
        return self.alpha


class _Decay(Schedule):
    def __init__(self, every: int, alpha: float, total_steps: int, stop: int | None = None):
        super().__init__(every, alpha, stop)
        positive_int("total_steps", total_steps, "it is the horizon T of the decay, usually the run's length")
        self.total_steps = total_steps

    def _progress(self, step: int) -> float:
        return min(step, self.total_steps) / self.total_steps


class CosineDecay(_Decay):
    """``alpha/2 * (1 + cos(pi * t / total_steps))``: paper Algorithm 1 and RigL. Zero from ``total_steps`` on."""

    def fraction(self, step):
        return self.alpha / 2 * (1 + math.cos(math.pi * self._progress(step)))


class Linear(_Decay):
    """``alpha * (1 - t / total_steps)``."""

    def fraction(self, step):
        return self.alpha * (1 - self._progress(step))
