"""What each topology update did: [`UpdateReport`][sparsefuse.UpdateReport] and its per-layer
[`LayerUpdate`][sparsefuse.LayerUpdate] counts, as ``DynamicSparsity.step()`` returns them and its history keeps
them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

__all__ = ["LayerUpdate", "UpdateReport"]


@dataclass(frozen=True)
class LayerUpdate:
    """One layer's counts at one update.

    Attributes:
        dropped: groups this update deactivated.
        grown: groups it activated (always equal to ``dropped``: the density does not change).
        regrown_before: groups grown at the previous update.
        regrown_kept: how many of those are still active after this one (their survival).
        ever_active: groups that have been active at some point since the start (the in-time
            over-parameterisation, or exploration, of ITOP).
        groups: all groups of the layer.
    """

    dropped: int
    grown: int
    regrown_before: int = 0
    regrown_kept: int = 0
    ever_active: int = 0
    groups: int = 0


@dataclass(frozen=True)
class UpdateReport:
    """What one topology update did.

    Attributes:
        step: the ``step()`` call (from 1) that made the update.
        fraction: the fraction of active groups the schedule asked to replace.
        layers: {target name: [`LayerUpdate`][sparsefuse.LayerUpdate]}.
    """

    step: int
    fraction: float
    layers: dict[str, LayerUpdate] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        """Groups deactivated, over all layers."""
        return sum(u.dropped for u in self.layers.values())

    @property
    def grown(self) -> int:
        """Groups activated, over all layers."""
        return sum(u.grown for u in self.layers.values())

    @property
    def survival(self) -> float | None:
        """Share of the groups grown at the previous update that this update kept (None: none were grown)."""
        before = sum(u.regrown_before for u in self.layers.values())
        return sum(u.regrown_kept for u in self.layers.values()) / before if before else None

    @property
    def exploration(self) -> float:
        """Share of all groups that have ever been active (ITOP's exploration rate)."""
        groups = sum(u.groups for u in self.layers.values())
        return sum(u.ever_active for u in self.layers.values()) / groups if groups else 0.0

    def to_dict(self) -> dict:
        """Plain dicts and numbers, as state dicts and JSON logs store it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> UpdateReport:
        """The report back from its [`to_dict`][sparsefuse.UpdateReport.to_dict].

        Args:
            data: what ``to_dict()`` returned (or its JSON round trip).
        """
        layers = {name: LayerUpdate(**counts) for name, counts in data["layers"].items()}
        return cls(step=int(data["step"]), fraction=float(data["fraction"]), layers=layers)
