"""Update schedules: when the topology changes and what fraction of the active groups is replaced.

Steps count calls to ``sparsity.step()``: the first call is step 1; step t is an update step when
``t % every == 0``, ``t > start`` and (if ``stop`` is set) ``t <= stop``.

Schedules have no names (`DynamicSparsity(schedule=...)` takes an object): each one needs at least ``every`` and
``drop_fraction``, which a name cannot carry.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

from .deprecation import renamed_kwarg
from .registry import resolve_policy
from .validation import positive_int

__all__ = ["Schedule", "Decay", "CosineDecay", "Constant", "Linear", "get_schedule"]


def _in_unit_interval(value) -> bool:
    """Whether ``value`` is a real number (not a bool or a string that float() would parse) in (0, 1]."""
    if isinstance(value, bool | str):
        return False
    try:
        return 0.0 < float(value) <= 1.0  # NaN compares false, so it is refused too
    except (TypeError, ValueError):
        return False


class Schedule(ABC):
    """Base class of schedules: subclasses define ``fraction(step)``.

    Args:
        every: steps between topology updates (update steps are its multiples).
        drop_fraction: the largest fraction of active groups an update replaces, in (0, 1]; the paper's death rate
            alpha (0.5). ``alpha=`` is its deprecated name. An update regrows only groups that were inactive, so it
            replaces at most as many as are: 1 replaces every active group of a layer at density 0.5 or below
            (bar those ``grace_updates`` protects), leaving nothing of the topology it trained, and every inactive
            group above that density.
        stop: the last step that may change the topology, or None for no limit.
        start: the steps that train the first mask unchanged: the first update is the first multiple of ``every``
            after ``start`` (0: from the first multiple). A network that has not yet learnt much loses most of what
            it learnt to a large early exchange.
    """

    @renamed_kwarg("alpha", "drop_fraction")
    def __init__(self, every: int, drop_fraction: float, stop: int | None = None, start: int = 0):
        positive_int("every", every, "it is the number of steps between topology updates (e.g. every=100)")
        if not _in_unit_interval(drop_fraction):
            raise ValueError(
                f"drop_fraction must be a number in (0, 1], got {drop_fraction!r}; it is the fraction of active "
                f"groups an update replaces (the paper uses 0.5), where 1 replaces every one it can"
            )
        if stop is not None:
            positive_int("stop", stop, "it is the last step that may change the topology, or None for no limit")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(
                f"start must be an int >= 0, got {start!r}; it is the number of steps before the first update"
            )
        if stop is not None and start >= stop:
            raise ValueError(f"start={start} is not before stop={stop}: no step could change the topology")
        self.every, self.drop_fraction, self.stop, self.start = every, float(drop_fraction), stop, start

    def is_update(self, step: int) -> bool:
        """Whether a step changes the topology.

        Args:
            step: the ``sparsity.step()`` call, counted from 1.
        """
        return step % self.every == 0 and step > self.start and (self.stop is None or step <= self.stop)

    @abstractmethod
    def fraction(self, step: int) -> float:
        """Fraction of the active groups replaced at an update step.

        Args:
            step: the ``sparsity.step()`` call, counted from 1.
        """

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Constant(Schedule):
    """The same fraction ``drop_fraction`` at every update.

    Args:
        every: steps between topology updates.
        drop_fraction: the fraction of active groups replaced at each update, in (0, 1].
        stop: the last step that may change the topology, or None for no limit.
        start: the steps before the first update.
    """

    def fraction(self, step):
        return self.drop_fraction


class Decay(Schedule):
    """Base class of schedules whose fraction falls from ``drop_fraction`` at ``start`` to 0 at ``total_steps``.

    Args:
        every: steps between topology updates.
        drop_fraction: the fraction at ``start``, in (0, 1].
        total_steps: the horizon T of the decay, usually the run's length; the fraction is 0 from T on.
        stop: the last step that may change the topology, or None for no limit.
        start: the steps before the first update; the decay begins there.
    """

    @renamed_kwarg("alpha", "drop_fraction")
    def __init__(self, every: int, drop_fraction: float, total_steps: int, stop: int | None = None, start: int = 0):
        super().__init__(every, drop_fraction, stop, start)
        positive_int("total_steps", total_steps, "it is the horizon T of the decay, usually the run's length")
        if start >= total_steps:
            raise ValueError(f"start={start} is not before total_steps={total_steps}: the decay would have no length")
        self.total_steps = total_steps

    def _progress(self, step: int) -> float:
        elapsed = min(max(step - self.start, 0), self.total_steps - self.start)
        return elapsed / (self.total_steps - self.start)


class CosineDecay(Decay):
    """``drop_fraction / 2 * (1 + cos(pi * t / total_steps))``: paper Algorithm 1 and RigL; 0 from ``total_steps``.

    With a ``start``, t counts from it and the horizon is ``total_steps - start``.

    Args:
        every: steps between topology updates (the paper's delta T).
        drop_fraction: the fraction at ``start`` (step 0 by default), in (0, 1] (the paper's alpha, 0.5).
        total_steps: the horizon T of the decay, usually the run's length.
        stop: the last step that may change the topology, or None for no limit.
        start: the steps before the first update.
    """

    def fraction(self, step):
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * self._progress(step)))


class Linear(Decay):
    """``drop_fraction * (1 - t / total_steps)``; 0 from ``total_steps`` on (t counted from ``start``, as in
    [`CosineDecay`][sparsefuse.schedules.CosineDecay]).

    Args:
        every: steps between topology updates.
        drop_fraction: the fraction at ``start``, in (0, 1].
        total_steps: the horizon T of the decay, usually the run's length.
        stop: the last step that may change the topology, or None for no limit.
        start: the steps before the first update.
    """

    def fraction(self, step):
        return self.drop_fraction * (1 - self._progress(step))


def get_schedule(spec: Schedule | None) -> Schedule | None:
    """``spec``, checked.

    Args:
        spec: a [`Schedule`][sparsefuse.schedules.Schedule], or None for static sparse training.
    """
    if spec is None:
        return None
    return resolve_policy(
        "schedule",
        spec,
        {},
        lambda s: isinstance(s, Schedule),
        "a sparsefuse.schedules.Schedule such as CosineDecay(every=100, drop_fraction=0.5, total_steps=T), or None "
        "for static sparse training (schedules take no names: each needs `every` and `drop_fraction`)",
    )
