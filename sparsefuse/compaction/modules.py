"""Compacted layers: a gather of the live input channels, a smaller dense layer, a scatter of the live outputs."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import skip_init

from ..distributed import unwrap_model
from ..nn.shift import DepthShiftConv3d
from ..protocol import Sparsity, target_weight_masks
from .plan import (
    CONV_TRANSPOSES,
    MIN_DEAD_INPUTS,
    MIN_DEAD_OUTPUTS,
    layer_kind,
    layer_widths,
    module_parents,
    plan_layer,
    target_layers,
)

__all__ = ["CompactLayer", "compact"]


class CompactLayer(nn.Module):
    """Gather live input channels -> smaller dense layer -> scatter live outputs back to full width.

    Built by [`compact`][sparsefuse.compaction.compact]; equal, to float rounding, to the masked layer it replaces.

    Args:
        layer: the smaller ``Linear``/``ConvNd``/``ConvTransposeNd`` (``kept_in`` inputs, ``kept_out`` outputs).
        channel_dim: the channel dim counted from the end (-1 for Linear, -(spatial dims + 1) for convs), so
            batched and unbatched inputs both work.
        in_index: (kept_in,) int64 input channels to read, or None to read all of them.
        out_index: (kept_out,) int64 output channels computed, or None when all are.
        out_fill: (out_channels,) what the channels not computed hold (the layer's bias there, else 0); needed
            only with ``out_index``.
        shift_plan: for a compacted [`DepthShiftConv3d`][sparsefuse.nn.DepthShiftConv3d], ((start, count,
            shift), ...) runs of gathered channels and their depth shift, applied between the gather and the conv;
            else None.
        shift_dim: the axis of that shift.

    Shape:
        input (..., in_channels, *spatial) -> output (..., out_channels, *spatial_out), exactly the replaced
        layer's shapes; ``output_size`` and other arguments are passed on to the inner layer.
    """

    def __init__(
        self,
        layer: nn.Module,
        channel_dim: int,
        in_index: Tensor | None = None,
        out_index: Tensor | None = None,
        out_fill: Tensor | None = None,
        shift_plan: tuple[tuple[int, int, int], ...] | None = None,
        shift_dim: int = 2,
    ):
        super().__init__()
        self.layer, self.channel_dim = layer, channel_dim
        self.register_buffer("in_index", in_index)
        self.register_buffer("out_index", out_index)
        self.register_buffer("out_fill", None if out_index is None else out_fill)
        self.shift_plan, self.shift_dim = shift_plan, shift_dim

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.in_index is not None:
            x = x.index_select(self.channel_dim, self.in_index)
        if self.shift_plan is not None:
            x = _shift_runs(x, self.shift_plan, self.shift_dim)
        y = self.layer(x, *args, **kwargs)
        return y if self.out_index is None else self._full_width(y)

    def _full_width(self, y: Tensor) -> Tensor:
        """The computed channels ``y`` scattered into the full output width."""
        shape = list(y.shape)
        shape[self.channel_dim] = self.out_fill.shape[0]
        fill = self.out_fill.to(y.dtype).reshape(-1, *([1] * (-self.channel_dim - 1)))
        return fill.expand(shape).index_copy(self.channel_dim, self.out_index, y)

    def extra_repr(self) -> str:
        read = "all" if self.in_index is None else len(self.in_index)
        made = "all" if self.out_index is None else f"{len(self.out_index)} of {len(self.out_fill)}"
        return f"reads {read} input channels, computes {made} output channels"


def _shift_runs(x: Tensor, plan: tuple[tuple[int, int, int], ...], dim: int) -> Tensor:
    """Zero-filled shift of runs of channels of a (B, C, D, H, W) tensor: out[..., d] = x[..., d - shift]."""
    length = x.shape[dim]
    pad_at = 2 * (x.dim() - 1 - dim)  # F.pad lists (before, after) pairs from the last dim backwards
    parts = []
    for start, count, shift in plan:
        run = x.narrow(1, start, count)
        if abs(shift) >= length:
            run = torch.zeros_like(run)
        elif shift:
            pad = [0] * (pad_at + 2)
            pad[pad_at + (0 if shift > 0 else 1)] = abs(shift)
            run = F.pad(run.narrow(dim, 0 if shift > 0 else -shift, length - abs(shift)), pad)
        parts.append(run)
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _channels(selection: Tensor, width: int) -> Tensor:
    """(groups, kept) positions within groups -> (groups * kept,) channel indices of the full width."""
    groups = selection.shape[0]
    return (selection + torch.arange(groups)[:, None] * (width // groups)).reshape(-1)


class WeightBlock:
    """Where a compacted layer's weight lies inside the full weight: the rows and columns (dim 0 and dim 1) kept in
    each group, as advanced indices into the full weight viewed as (groups, dim0 per group, dim1, *k).

    ``gather`` reads the block of any weight-shaped tensor (the weight, its mask, its optimizer state) and
    ``scatter`` writes one back in place, through a view, whatever the tensor's memory format.
    """

    def __init__(self, kind: type, groups: int, in_sel: Tensor, out_sel: Tensor, device: torch.device):
        rows, cols = (in_sel, out_sel) if kind in CONV_TRANSPOSES else (out_sel, in_sel)
        self.groups = groups
        self.index = (
            torch.arange(groups, device=device)[:, None, None],
            rows.to(device)[:, :, None],
            cols.to(device)[:, None, :],
        )

    def gather(self, full: Tensor) -> Tensor:
        return full.unflatten(0, (self.groups, -1))[self.index].flatten(0, 1)

    def scatter(self, block: Tensor, into: Tensor) -> None:
        into.unflatten(0, (self.groups, -1))[self.index] = block.unflatten(0, (self.groups, -1))


class LayerCut:
    """One layer cut down to the channels its plan keeps: the weight block, the channel indices and the pieces of
    the smaller layer, shared by the inference and the training compaction.

    Attributes:
        module: the full layer.
        kind: the torch layer class whose forward the layer runs.
        kept_in: input channels the smaller layer reads.
        kept_out: output channels the smaller layer computes.
        block: where the kept weights lie in the full weight.
        in_index: (kept_in,) input channels read, or None when all are.
        out_index: (kept_out,) output channels computed, or None when all are.
        out_channels: the layer's full output width.
        channel_dim: the channel dim counted from the end.
        shift_plan: runs of gathered channels and their depth shift for a DepthShiftConv3d, else None.
        shift_dim: the axis of that shift.
    """

    def __init__(self, module: nn.Module, in_sel: Tensor, out_sel: Tensor):
        self.module, self.kind = module, layer_kind(module)
        weight = module.weight
        c_in, self.out_channels, groups = layer_widths(module, weight)
        self.kept_in, self.kept_out = in_sel.numel(), out_sel.numel()
        self.block = WeightBlock(self.kind, groups, in_sel, out_sel, weight.device)
        kept_in, kept_out = _channels(in_sel, c_in), _channels(out_sel, self.out_channels)
        self.in_index = kept_in.to(weight.device) if len(kept_in) < c_in else None
        self.out_index = kept_out.to(weight.device) if len(kept_out) < self.out_channels else None
        self.channel_dim = -1 if self.kind is nn.Linear else -(len(module.kernel_size) + 1)
        self.shift_plan, self.shift_dim = None, 2
        if self.kind is DepthShiftConv3d:
            self.shift_plan = _gathered_shift_plan(kept_in, c_in, module.shift_groups)
            self.shift_dim = module.shift_dim

    def smaller_layer(self, bias: bool) -> nn.Module:
        """The layer with the kept widths, its values left uninitialised: the caller fills them, and the global
        RNG, which an initialisation would draw from, is left alone."""
        module, weight = self.module, self.module.weight
        factory = dict(device=weight.device, dtype=weight.dtype)
        if self.kind is nn.Linear:
            return skip_init(nn.Linear, self.kept_in, self.kept_out, bias=bias, **factory)
        options = dict(
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=self.block.groups,
            bias=bias,
            padding_mode=module.padding_mode,
            **factory,
        )
        if self.kind in CONV_TRANSPOSES:
            options["output_padding"] = module.output_padding
        base = nn.Conv3d if self.kind is DepthShiftConv3d else self.kind  # the shift runs on the kept channels
        return skip_init(base, self.kept_in, self.kept_out, module.kernel_size, **options)


@torch.no_grad()
def _build(module: nn.Module, in_sel: Tensor, out_sel: Tensor) -> CompactLayer:
    """The CompactLayer for ``module``, whose weight is already masked."""
    cut = LayerCut(module, in_sel, out_sel)
    has_bias = module.bias is not None
    layer = cut.smaller_layer(bias=has_bias)
    layer.weight.copy_(cut.block.gather(module.weight))
    layer.weight.requires_grad_(module.weight.requires_grad)
    out_fill = None
    if has_bias:
        layer.bias.copy_(module.bias if cut.out_index is None else module.bias[cut.out_index])
        layer.bias.requires_grad_(module.bias.requires_grad)
    if cut.out_index is not None:
        out_fill = module.bias.detach().clone() if has_bias else module.weight.new_zeros(cut.out_channels)
    return CompactLayer(layer, cut.channel_dim, cut.in_index, cut.out_index, out_fill, cut.shift_plan, cut.shift_dim)


def _gathered_shift_plan(kept: Tensor, channels: int, shift_groups: int) -> tuple[tuple[int, int, int], ...]:
    """Runs of gathered channels sharing a depth shift. DepthShiftConv3d groups channels as
    ``torch.chunk(range(channels), shift_groups)`` does and shifts chunk g by g - shift_groups // 2."""
    chunk_of = torch.cat([torch.full((len(c),), g) for g, c in enumerate(torch.arange(channels).chunk(shift_groups))])
    gathered = chunk_of[kept]
    plan, start = [], 0
    for g, count in zip(*torch.unique_consecutive(gathered, return_counts=True), strict=True):
        plan.append((start, int(count), int(g) - shift_groups // 2))
        start += int(count)
    return tuple(plan)


def compact(
    model: nn.Module,
    sparsity: Sparsity,
    min_dead_inputs: float = MIN_DEAD_INPUTS,
    min_dead_outputs: float = MIN_DEAD_OUTPUTS,
) -> nn.Module:
    """A copy of ``model`` in which every target layer with dead channels is a smaller
    [`CompactLayer`][sparsefuse.compaction.CompactLayer].

    A channel is dead when the masks leave none of its weights active: an input channel no filter reads, an
    output channel no weight computes. A target layer (Linear, Conv1-3d, ConvTranspose1-3d, DepthShiftConv3d;
    with or without bias; grouped or not) with at least ``min_dead_inputs`` of its input channels dead becomes
    a gather of the live ones (``index_select`` on the channel dim) followed by a dense layer holding only their
    weight slices. With at least ``min_dead_outputs`` of its output channels dead, it computes only the live
    ones and scatters them back to full width, the dead ones holding their bias (or 0). Grouped convs keep the
    same channel count in every group: a group with fewer live channels keeps some dead ones, with zero
    weights. Input and output shapes never change, so the layer drops into any model; other modules are
    copied as they are.

    Every target weight is masked in the copy, compacted or not, so the copy computes what the masked model
    computes whenever it is taken (even between ``optimizer.step()`` and ``sparsity.step()``). On float32 it
    matches the masked model to within ``1e-5 * max(1, max |output|)``: both add the same nonzero terms, in a
    different order.

    Layers whose class overrides ``forward`` (other than DepthShiftConv3d) and the projections of
    ``nn.MultiheadAttention`` (which reads their weights directly) stay masked dense layers;
    [`compaction_plan`][sparsefuse.compaction.compaction_plan] lists each layer with what was done and why.

    Saving: the structure depends only on the masks, so ``compacted.state_dict()`` loads into
    ``compact(model2, sparsity2)`` for any model of the same architecture whose sparsifier holds the same masks,
    e.g. ``sparsity2 = DynamicSparsity(model2, None, granularity=...)`` followed by
    ``sparsity2.load_state_dict(saved_sparsity_state)``.

    Args:
        model: the model the sparsifier masks (DDP / DataParallel wrappers are unwrapped); not modified.
        sparsity: a [`DynamicSparsity`][sparsefuse.DynamicSparsity], or any
            [`Sparsity`][sparsefuse.protocol.Sparsity].
        min_dead_inputs: the fraction of dead input channels from which a layer reads only its live ones;
            below it the gather costs more than the smaller layer saves. 0 removes every dead input, above 1 none.
        min_dead_outputs: the same for output channels and the scatter back to full width.

    Returns:
        A new module with the same inputs and outputs as ``model``; it traces with ``torch.export`` and runs
        under ``torch.compile``. Its topology is fixed: fine-tune it, if at all, without a sparsifier.
    """
    model = unwrap_model(model)
    masks = target_weight_masks(model, sparsity)
    parents = module_parents(model)
    copied = copy.deepcopy(model)
    copied_params = dict(copied.named_parameters())
    with torch.no_grad():  # every target, first: a weight tied to another module is masked there too
        for name, mask in masks.items():
            copied_params[name].mul_(mask.to(copied_params[name].device))
    copies = dict(copied.named_modules(remove_duplicate=False))
    replacements: dict[int, CompactLayer] = {}
    for name, (module, mask) in target_layers(model, masks).items():
        plan, in_sel, out_sel = plan_layer(name, module, mask, parents.get(name), min_dead_inputs, min_dead_outputs)
        if plan.compacted:
            replacements[id(copies[name])] = _build(copies[name], in_sel, out_sel).train(copies[name].training)
    if id(copied) in replacements:  # the model is itself one layer
        return replacements[id(copied)]
    # Replace every reference to a compacted layer (a module registered under two names is one layer).
    for module in copies.values():
        for child_name, child in list(module.named_children()):
            if id(child) in replacements:
                setattr(module, child_name, replacements[id(child)])
    return copied
