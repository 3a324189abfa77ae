"""What compaction does to each layer: the live channels of every target layer, and which of them it keeps.

A layer's plan is read off its weight-shaped mask alone: an input channel is live when some active weight reads
it, an output channel when some active weight computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..distributed import unwrap_model
from ..nn.shift import DepthShiftConv3d
from ..protocol import Sparsity, target_weight_masks

# The layer helpers below without an underscore are shared with .modules, which builds what this module plans;
# they are internal to the compaction package, hence not in __all__.
__all__ = ["LayerCompaction", "compaction_plan", "MIN_DEAD_INPUTS", "MIN_DEAD_OUTPUTS"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# Below these fractions of dead channels a smaller layer saves less than the gather (inputs) or the scatter back
# to full width (outputs) costs, measured on CPU in bench/bench_compact.py; oneDNN computes output channels in
# blocks of 16, so removing fewer than about a third of them often saves nothing at all.
MIN_DEAD_INPUTS = 0.2
MIN_DEAD_OUTPUTS = 1 / 3


@dataclass(frozen=True)
class LayerCompaction:
    """What [`compact`][sparsefuse.compaction.compact] does to one target layer.

    Attributes:
        module: the layer's module name.
        in_channels: the layer's full input width.
        out_channels: the layer's full output width.
        live_in: input channels at least one active weight reads.
        live_out: output channels at least one active weight computes.
        kept_in: input channels the compacted layer reads: the live ones, plus dead ones where a grouped conv
            needs the same count in every group; the full width where that side is not compacted.
        kept_out: output channels the compacted layer computes, chosen the same way.
        note: why the layer, or one side of it, is left as it is ("" when nothing is).
    """

    module: str
    in_channels: int
    out_channels: int
    live_in: int
    live_out: int
    kept_in: int
    kept_out: int
    note: str = ""

    @property
    def compacted(self) -> bool:
        """Whether the layer reads or computes fewer channels than its full widths."""
        return self.kept_in < self.in_channels or self.kept_out < self.out_channels


def layer_kind(module: nn.Module) -> type | None:
    """The torch layer class whose forward ``module`` runs (subclasses that only add attributes count), or None."""
    if type(module) is DepthShiftConv3d:
        return DepthShiftConv3d
    for base in (nn.Linear, *_CONVS, *CONV_TRANSPOSES):
        same_forward = all(
            getattr(type(module), f, None) is getattr(base, f, None) for f in ("forward", "_conv_forward")
        )
        if isinstance(module, base) and same_forward:
            return base
    return None


def _select(live: Tensor, groups: int) -> Tensor:
    """(groups, kept) channel positions within each group: its live channels, then its first dead ones, so every
    group keeps the same count (a grouped conv needs that) and at least one (a layer needs one channel)."""
    per_group = live.reshape(groups, -1)
    kept = max(1, int(per_group.sum(1).max()))
    # A stable sort on "dead" puts live channels first, each part in channel order.
    order = torch.sort((~per_group).to(torch.int8), dim=1, stable=True).indices[:, :kept]
    return order.sort(dim=1).values


def target_layers(model: nn.Module, masks: dict[str, Tensor]) -> dict[str, tuple[nn.Module, Tensor]]:
    """{module name: (module, mask)} for every target that is a module's ``weight``."""
    layers = {}
    for name, mask in masks.items():
        owner, _, leaf = name.rpartition(".")
        if leaf == "weight":
            layers[owner] = (model.get_submodule(owner), mask)
    return layers


def layer_widths(module: nn.Module, weight: Tensor) -> tuple[int, int, int]:
    """(in channels, out channels, groups) of a layer; the weight's (dim1, dim0) for other modules."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, 1
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels, module.groups
    return weight.shape[1], weight.shape[0], 1


def _worth_it(selection: Tensor, width: int, threshold: float, side: str) -> tuple[Tensor, str]:
    """``selection``, or every channel with a note when fewer than ``threshold`` of them would be removed."""
    removed = width - selection.numel()
    if 0 < removed < threshold * width:
        note = f"all {side} kept: removing {removed} of {width} is under min_dead_{side}={threshold:.2g}"
        groups = selection.shape[0]
        return torch.arange(width // groups).expand(groups, -1), note
    return selection, ""


def plan_layer(
    name: str,
    module: nn.Module,
    mask: Tensor,
    parent: nn.Module | None,
    min_dead_inputs: float,
    min_dead_outputs: float,
):
    """(LayerCompaction, input selection, output selection) for one layer; selections are (groups, kept) channel
    positions within each group, both None when the layer is left as it is."""
    kind = layer_kind(module)
    if kind is None or isinstance(parent, nn.MultiheadAttention):
        why = (
            "its parent nn.MultiheadAttention reads the weight directly instead of calling the layer"
            if kind
            else f"{type(module).__name__}.forward is not that of Linear, ConvNd, ConvTransposeNd or "
            f"DepthShiftConv3d, so what the layer computes is unknown"
        )
        c_in, c_out, _ = layer_widths(module, mask)
        return LayerCompaction(name, c_in, c_out, c_in, c_out, c_in, c_out, f"left masked: {why}"), None, None
    c_in, c_out, groups = layer_widths(module, mask)
    # Weight-shaped mask -> (dim0, dim1) "any weight active"; a grouped weight's dim 1 is per group of dim 0.
    pairs = (mask.flatten(2).any(2) if mask.dim() > 2 else mask).cpu()
    across_groups = pairs.reshape(groups, pairs.shape[0] // groups, pairs.shape[1]).any(1).reshape(-1)
    within = pairs.any(1)
    live_in, live_out = (within, across_groups) if kind in CONV_TRANSPOSES else (across_groups, within)
    in_sel, in_note = _worth_it(_select(live_in, groups), c_in, min_dead_inputs, "inputs")
    out_sel, out_note = _worth_it(_select(live_out, groups), c_out, min_dead_outputs, "outputs")
    plan = LayerCompaction(
        name,
        c_in,
        c_out,
        int(live_in.sum()),
        int(live_out.sum()),
        in_sel.numel(),
        out_sel.numel(),
        "; ".join(n for n in (in_note, out_note) if n),
    )
    return plan, in_sel, out_sel


def module_parents(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: the module that holds it as a child}, for every name a shared module goes by."""
    return {
        f"{name}.{child}" if name else child: module
        for name, module in model.named_modules(remove_duplicate=False)
        for child, _ in module.named_children()
    }


def compaction_plan(
    model: nn.Module,
    sparsity: Sparsity,
    min_dead_inputs: float = MIN_DEAD_INPUTS,
    min_dead_outputs: float = MIN_DEAD_OUTPUTS,
) -> dict[str, LayerCompaction]:
    """What [`compact`][sparsefuse.compaction.compact] would do to each target layer, without building anything.

    Args:
        model: the model the sparsifier masks (DDP / DataParallel wrappers are unwrapped).
        sparsity: a [`DynamicSparsity`][sparsefuse.DynamicSparsity], or any
            [`Sparsity`][sparsefuse.protocol.Sparsity].
        min_dead_inputs: as for [`compact`][sparsefuse.compaction.compact].
        min_dead_outputs: as for [`compact`][sparsefuse.compaction.compact].

    Returns:
        {module name: [`LayerCompaction`][sparsefuse.compaction.LayerCompaction]}, in target order.
    """
    model = unwrap_model(model)
    parents = module_parents(model)
    return {
        name: plan_layer(name, module, mask, parents.get(name), min_dead_inputs, min_dead_outputs)[0]
        for name, (module, mask) in target_layers(model, target_weight_masks(model, sparsity)).items()
    }
