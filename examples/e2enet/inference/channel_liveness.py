"""Channel liveness for :mod:`compaction`: which channels every layer of an E2ENet reads and computes, planned
from the output back to the input over the weight masks (the rules are in compaction's docstring).

    masks = weight_masks(model, sparsity)
    liveness = ChannelLiveness(model, masks)  # liveness.encoder, .nodes, .need, .image_read, .head_read
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from e2enet.nets.e2enet import E2ENet
from sparsefuse.nn import ChannelsLastInstanceNorm3d, DepthShiftConv3d
from sparsefuse.protocol import target_weight_masks

__all__ = ["ChannelLiveness", "NodePlan", "UnitPlan", "active_pairs", "weight_masks"]


@dataclass
class UnitPlan:
    """One conv unit of the source model while planning: its (out, in) connectivity, then what it keeps."""

    name: str
    module: nn.Module  # the ConvUnit
    pairs: Tensor  # (out, in) bool: an active weight connects the two
    out_keep: Tensor | None = None  # (out,) bool: output channels computed
    in_read: Tensor | None = None  # (in,) bool: input channels read


@dataclass
class NodePlan:
    """What fusion node x(i, j) reads from each of its three sources, and its conv units' plans."""

    units: list[UnitPlan]
    same: Tensor  # (c_i,) bool: channels of x(i, j-1) the first conv reads
    up: Tensor  # (c_i,) bool: upsampled channels it reads, i.e. those ``up`` computes
    down: Tensor  # (c_{i-1},) bool: pooled channels it reads (empty at level 0)
    up_read: Tensor | None  # (c_{i+1},) bool: channels of x(i+1, j-1) ``up`` reads; None when up computes none


def active_pairs(mask: Tensor) -> Tensor:
    """(out, in) bool on the CPU: output channel o and input channel i share an active weight; ``mask`` is a conv
    weight's mask (out, in, *kernel), or already (out, in)."""
    return (mask.flatten(2).any(2) if mask.dim() > 2 else mask).cpu()


def _reads(pairs: Tensor, outputs: Tensor) -> Tensor:
    """Input channels (dim 1 of ``pairs``) the selected outputs (dim 0) have an active weight for. At least one
    when any output is computed, so the layer has an input (its weights there are zero: the output is the bias,
    as in the masked model)."""
    read = pairs[outputs].any(0)
    if outputs.any() and not read.any():
        read[0] = True
    return read


def weight_masks(model: E2ENet, sparsity) -> dict[str, Tensor]:
    """Weight-shaped masks of every conv weight: the sparsifier's for its targets and all-True elsewhere; with no
    sparsifier, the nonzero weights (a zero weight adds nothing, so leaving it out is exact)."""
    params = dict(model.named_parameters())
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    if sparsity is None:
        return {name: params[name].detach() != 0 for name in names}
    masks = target_weight_masks(model, sparsity)
    return {name: masks[name] if name in masks else torch.ones_like(params[name], dtype=torch.bool) for name in names}


def _check_unit(name: str, unit: nn.Module) -> None:
    conv = unit.conv
    if type(conv) not in (nn.Conv3d, DepthShiftConv3d) or conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError(
            f"{name}.conv is {conv!r}; compact_e2enet handles E2ENet's own ungrouped, zero-padded Conv3d and "
            f"DepthShiftConv3d units; use sparsefuse.compact for other layers"
        )
    if type(unit.act) is not nn.LeakyReLU or type(unit.norm) not in (nn.InstanceNorm3d, ChannelsLastInstanceNorm3d):
        raise ValueError(f"{name} is not E2ENet's conv -> InstanceNorm3d -> LeakyReLU unit: {unit!r}")


class ChannelLiveness:
    """Which channels every layer of an E2ENet reads and computes: one pass from the output back to the input.

    Attributes (channel sets are (C,) bool masks of a tensor's full width):
        levels: the encoder's levels.
        need: {(i, j): channels of x(i, j) something reads}; a tensor nothing reads has no entry (or an empty set).
        encoder: {level: its units' plans}, for the levels whose output is read.
        nodes: {"i_j": the node's plan}, for the fusion nodes whose output is read.
        image_read: the image channels the first encoder unit reads.
        head_read: the channels of x(0, L-1) the output head reads.
    """

    def __init__(self, model: E2ENet, masks: dict[str, Tensor]):
        self.model, self.masks = model, masks
        self.levels = len(model.encoder)
        self.need: dict[tuple[int, int], Tensor] = {}  # (i, j) -> (c_i,) bool: channels of x(i, j) read
        self.encoder: dict[int, list[UnitPlan]] = {}
        self.nodes: dict[str, NodePlan] = {}
        head_pairs = active_pairs(masks["heads.0.weight"])
        self.head_read = _reads(head_pairs, torch.ones(head_pairs.shape[0], dtype=torch.bool))
        self._mark((0, self.levels - 1), self.head_read)
        # The forward's order reversed: a tensor's consumers are all planned before its producer.
        for level in reversed(range(self.levels)):
            for j in reversed(range(1, level + 1)):
                self._plan_node(level - j, j)
            self._plan_encoder(level)

    def _mark(self, key: tuple[int, int], channels: Tensor) -> None:
        self.need[key] = self.need[key] | channels if key in self.need else channels.clone()

    def _units(self, prefix: str, block: nn.Sequential, outputs: Tensor) -> tuple[list[UnitPlan], Tensor]:
        """Plan a chain of conv units from the channels of its output that are read; returns the units and the
        channels of the chain's input they read."""
        units = []
        for u, unit in enumerate(block):
            _check_unit(f"{prefix}.{u}", unit)
            units.append(UnitPlan(f"{prefix}.{u}.conv", unit, active_pairs(self.masks[f"{prefix}.{u}.conv.weight"])))
        for unit in reversed(units):
            unit.out_keep = outputs
            unit.in_read = _reads(unit.pairs, outputs)
            outputs = unit.in_read
        return units, outputs

    def _plan_encoder(self, level: int) -> None:
        outputs = self.need.get((level, 0))
        if outputs is None or not outputs.any():
            return
        units, read = self._units(f"encoder.{level}", self.model.encoder[level], outputs)
        self.encoder[level] = units
        if level > 0:
            self._mark((level - 1, 0), read)
        else:
            self.image_read = read

    def _plan_node(self, i: int, j: int) -> None:
        outputs = self.need.get((i, j))
        if outputs is None or not outputs.any():
            return
        key = f"{i}_{j}"
        units, read = self._units(f"fusion.{key}.convs", self.model.fusion[key].convs, outputs)
        c = self.model.channels[i]
        plan = NodePlan(units, read[:c], read[c : 2 * c], read[2 * c :], None)
        self._mark((i, j - 1), plan.same)
        if plan.up.any():
            up_pairs = active_pairs(self.masks[f"fusion.{key}.up.weight"]).t()  # (out, in), as a conv's
            plan.up_read = _reads(up_pairs, plan.up)
            self._mark((i + 1, j - 1), plan.up_read)
        if plan.down.any():
            self._mark((i - 1, j - 1), plan.down)
        self.nodes[key] = plan
