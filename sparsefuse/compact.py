"""Compaction: turn masked-off channels into layers that are really smaller, so sparsity saves time.

Masked weights are zeros inside dense tensors: a masked model costs what the dense one costs. When masks leave an
input channel of a layer entirely dead (no active weight reads it), that channel can be cut out of the layer, and
when they leave an output channel dead it need not be computed. :func:`compact` builds a copy of the model in which
every such layer is a :class:`CompactLayer`: a gather of the live input channels, a smaller dense layer holding
only the live weights, and a scatter of the live output channels back to full width. The copy computes what the
masked model computes (to float rounding) with the same input and output shapes, so it drops into any model.

Any granularity works; ``"input_channel"`` (:class:`sparsefuse.masks.InputChannel`) and ``"channel"`` make whole
channels dead by construction, while with ``"kernel"`` or ``"element"`` masks an input channel is dead only if
every filter's kernel (every weight) for it is inactive.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import unwrap_model
from .nn.shift import DepthShiftConv3d

if TYPE_CHECKING:  # only for annotations: sparsity.py does not depend on this module, nor this one on it at run time
    from .sparsity import DynamicSparsity

__all__ = [
    "compact",
    "compaction_plan",
    "LayerCompaction",
    "CompactLayer",
    "sparse_state_dict",
    "load_sparse_state_dict",
    "target_weight_masks",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# Below these fractions of dead channels a smaller layer saves less than the gather (inputs) or the scatter back
# to full width (outputs) costs, measured on CPU in bench/bench_compact.py; oneDNN computes output channels in
# blocks of 16, so removing fewer than about a third of them often saves nothing at all.
MIN_DEAD_INPUTS = 0.2
MIN_DEAD_OUTPUTS = 1 / 3


@dataclass(frozen=True)
class LayerCompaction:
    """What :func:`compact` does to one target layer.

    Attributes:
        module: the layer's module name.
        in_channels, out_channels: the layer's full widths.
        live_in, live_out: channels with at least one active weight.
        kept_in, kept_out: channels the compacted layer reads and computes: the live ones, plus dead ones where a
            grouped conv needs the same count in every group; the full width where that side is not compacted.
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
        return self.kept_in < self.in_channels or self.kept_out < self.out_channels


class CompactLayer(nn.Module):
    """Gather live input channels -> smaller dense layer -> scatter live outputs back to full width.

    Built by :func:`compact`; equal, to float rounding, to the masked layer it replaces.

    Args:
        layer: the smaller ``Linear``/``ConvNd``/``ConvTransposeNd`` (``kept_in`` inputs, ``kept_out`` outputs).
        channel_dim: the channel dim counted from the end (-1 for Linear, -(spatial dims + 1) for convs), so
            batched and unbatched inputs both work.
        in_index: (kept_in,) int64 input channels to read, or None to read all of them.
        out_index: (kept_out,) int64 output channels computed, or None when all are.
        out_fill: (out_channels,) what the channels not computed hold (the layer's bias there, else 0); needed
            only with ``out_index``.
        shift_plan: for a compacted :class:`sparsefuse.nn.DepthShiftConv3d`, ((start, count, shift), ...) runs of
            gathered channels and their depth shift, applied between the gather and the conv; else None.
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
        if self.out_index is None:
            return y
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


def _layer_kind(module: nn.Module) -> type | None:
    """The torch layer class whose forward ``module`` runs (subclasses that only add attributes count), or None."""
    if type(module) is DepthShiftConv3d:
        return DepthShiftConv3d
    for base in (nn.Linear, *_CONVS, *_CONV_TRANSPOSES):
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


def target_weight_masks(model: nn.Module, sparsity) -> dict[str, Tensor]:
    """{parameter name: weight-shaped bool mask} for every target of ``sparsity``, checked against ``model``."""
    missing = [m for m in ("target_names", "weight_mask") if not hasattr(sparsity, m)]
    if missing:
        raise TypeError(
            f"sparsity must provide target_names and weight_mask(name) (e.g. sparsefuse.DynamicSparsity);"
            f" {type(sparsity).__name__} lacks {', '.join(missing)}"
        )
    params = dict(model.named_parameters())
    unknown = [name for name in sparsity.target_names if name not in params]
    if unknown:
        raise ValueError(
            f"sparsity targets {unknown}, which are not parameters of this model; pass the model the sparsifier "
            f"was built on (for a torch.compile'd model, its `_orig_mod`)"
        )
    return {name: sparsity.weight_mask(name) for name in sparsity.target_names}


def _layers(model: nn.Module, masks: dict[str, Tensor]) -> dict[str, tuple[nn.Module, Tensor]]:
    """{module name: (module, mask)} for every target that is a module's ``weight``."""
    layers = {}
    for name, mask in masks.items():
        owner, _, leaf = name.rpartition(".")
        if leaf == "weight":
            layers[owner] = (model.get_submodule(owner), mask)
    return layers


def _widths(module: nn.Module, weight: Tensor) -> tuple[int, int, int]:
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


def _plan_layer(
    name: str,
    module: nn.Module,
    mask: Tensor,
    parent: nn.Module | None,
    min_dead_inputs: float,
    min_dead_outputs: float,
):
    """(LayerCompaction, input selection, output selection) for one layer; selections are (groups, kept) channel
    positions within each group, both None when the layer is left as it is."""
    kind = _layer_kind(module)
    if kind is None or isinstance(parent, nn.MultiheadAttention):
        why = (
            "its parent nn.MultiheadAttention reads the weight directly instead of calling the layer"
            if kind
            else f"{type(module).__name__}.forward is not that of Linear, ConvNd, ConvTransposeNd or "
            f"DepthShiftConv3d, so what the layer computes is unknown"
        )
        c_in, c_out, _ = _widths(module, mask)
        return LayerCompaction(name, c_in, c_out, c_in, c_out, c_in, c_out, f"left masked: {why}"), None, None
    c_in, c_out, groups = _widths(module, mask)
    # Weight-shaped mask -> (dim0, dim1) "any weight active"; a grouped weight's dim 1 is per group of dim 0.
    pairs = (mask.flatten(2).any(2) if mask.dim() > 2 else mask).cpu()
    across_groups = pairs.reshape(groups, pairs.shape[0] // groups, pairs.shape[1]).any(1).reshape(-1)
    within = pairs.any(1)
    live_in, live_out = (within, across_groups) if kind in _CONV_TRANSPOSES else (across_groups, within)
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


def _parents(model: nn.Module) -> dict[str, nn.Module]:
    return {
        f"{name}.{child}" if name else child: module
        for name, module in model.named_modules(remove_duplicate=False)
        for child, _ in module.named_children()
    }


def compaction_plan(
    model: nn.Module,
    sparsity: DynamicSparsity,
    min_dead_inputs: float = MIN_DEAD_INPUTS,
    min_dead_outputs: float = MIN_DEAD_OUTPUTS,
) -> dict[str, LayerCompaction]:
    """What :func:`compact` would do to each target layer, without building anything.

    Args:
        model: the model the sparsifier masks (DDP / DataParallel wrappers are unwrapped).
        sparsity: a :class:`sparsefuse.DynamicSparsity`, or any object with ``target_names`` and
            ``weight_mask(name)`` (a bool tensor shaped like that weight, True where active).
        min_dead_inputs: as for :func:`compact`.
        min_dead_outputs: as for :func:`compact`.

    Returns:
        {module name: :class:`LayerCompaction`}, in target order.
    """
    model = unwrap_model(model)
    parents = _parents(model)
    return {
        name: _plan_layer(name, module, mask, parents.get(name), min_dead_inputs, min_dead_outputs)[0]
        for name, (module, mask) in _layers(model, target_weight_masks(model, sparsity)).items()
    }


def _channels(selection: Tensor, width: int) -> Tensor:
    """(groups, kept) positions within groups -> (groups * kept,) channel indices of the full width."""
    groups = selection.shape[0]
    return (selection + torch.arange(groups)[:, None] * (width // groups)).reshape(-1)


@torch.no_grad()
def _build(module: nn.Module, in_sel: Tensor, out_sel: Tensor) -> CompactLayer:
    """The CompactLayer for ``module``, whose weight is already masked."""
    kind = _layer_kind(module)
    weight = module.weight.detach()
    c_in, c_out, groups = _widths(module, weight)
    transposed = kind in _CONV_TRANSPOSES
    device = weight.device
    # Weight as (groups, dim0 per group, dim1, *k); pick each group's kept dim0 rows and kept dim1 columns.
    rows, cols = (in_sel, out_sel) if transposed else (out_sel, in_sel)
    per_group = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
    picked = per_group[
        torch.arange(groups, device=device)[:, None, None], rows.to(device)[:, :, None], cols.to(device)[:, None, :]
    ]

    has_bias = module.bias is not None
    factory = dict(device=device, dtype=weight.dtype)
    if kind is nn.Linear:
        layer = nn.Linear(in_sel.numel(), out_sel.numel(), bias=has_bias, **factory)
        channel_dim = -1
    else:
        options = dict(
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=groups,
            bias=has_bias,
            padding_mode=module.padding_mode,
            **factory,
        )
        if transposed:
            options["output_padding"] = module.output_padding
        base = nn.Conv3d if kind is DepthShiftConv3d else kind  # the shift runs in CompactLayer, on kept channels
        layer = base(in_sel.numel(), out_sel.numel(), module.kernel_size, **options)
        channel_dim = -(len(module.kernel_size) + 1)
    layer.weight.copy_(picked.reshape(-1, *picked.shape[2:]))
    layer.weight.requires_grad_(module.weight.requires_grad)

    kept_in, kept_out = _channels(in_sel, c_in), _channels(out_sel, c_out)
    in_index = kept_in.to(device) if len(kept_in) < c_in else None
    out_index = kept_out.to(device) if len(kept_out) < c_out else None
    if has_bias:
        layer.bias.copy_(module.bias if out_index is None else module.bias[out_index])
        layer.bias.requires_grad_(module.bias.requires_grad)
    out_fill = None
    if out_index is not None:
        out_fill = module.bias.detach().clone() if has_bias else torch.zeros(c_out, **factory)
    shift_plan, shift_dim = None, 2
    if kind is DepthShiftConv3d:
        shift_plan, shift_dim = _gathered_shift_plan(kept_in, c_in, module.shift_groups), module.shift_dim
    return CompactLayer(layer, channel_dim, in_index, out_index, out_fill, shift_plan, shift_dim)


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
    sparsity: DynamicSparsity,
    min_dead_inputs: float = MIN_DEAD_INPUTS,
    min_dead_outputs: float = MIN_DEAD_OUTPUTS,
) -> nn.Module:
    """A copy of ``model`` in which every target layer with dead channels is a smaller :class:`CompactLayer`.

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
    :func:`compaction_plan` lists each layer with what was done and why.

    Saving: the structure depends only on the masks, so ``compacted.state_dict()`` loads into
    ``compact(model2, sparsity2)`` for any model of the same architecture whose sparsifier holds the same masks,
    e.g. ``sparsity2 = DynamicSparsity(model2, None, granularity=...)`` followed by
    ``sparsity2.load_state_dict(saved_sparsity_state)``.

    Args:
        model: the model the sparsifier masks (DDP / DataParallel wrappers are unwrapped); not modified.
        sparsity: a :class:`sparsefuse.DynamicSparsity`, or any object with ``target_names`` and
            ``weight_mask(name)`` (a bool tensor shaped like that weight, True where active).
        min_dead_inputs: the fraction of dead input channels from which a layer reads only its live ones;
            below it the gather costs more than the smaller layer saves. 0 removes every dead input, above 1 none.
        min_dead_outputs: the same for output channels and the scatter back to full width.

    Returns:
        A new module with the same inputs and outputs as ``model``; it traces with ``torch.export`` and runs
        under ``torch.compile``. Its topology is fixed: fine-tune it, if at all, without a sparsifier.
    """
    model = unwrap_model(model)
    masks = target_weight_masks(model, sparsity)
    parents = _parents(model)
    copied = copy.deepcopy(model)
    copied_params = dict(copied.named_parameters())
    with torch.no_grad():  # every target, first: a weight tied to another module is masked there too
        for name, mask in masks.items():
            copied_params[name].mul_(mask.to(copied_params[name].device))
    copies = dict(copied.named_modules(remove_duplicate=False))
    replacements: dict[int, CompactLayer] = {}
    for name, (module, mask) in _layers(model, masks).items():
        plan, in_sel, out_sel = _plan_layer(name, module, mask, parents.get(name), min_dead_inputs, min_dead_outputs)
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


SPARSE_FORMAT = "sparsefuse.sparse_state_dict/1"


def _pack_bits(mask: Tensor) -> Tensor:
    """Bool tensor -> uint8 tensor of its bits in row-major order, 8 to a byte (the last byte zero-padded)."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, -len(flat) % 8)).reshape(-1, 8)
    return (flat << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    count = 1
    for n in shape:
        count *= n
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[:count].bool().reshape(shape)


def sparse_state_dict(model: nn.Module, sparsity: DynamicSparsity) -> dict:
    """A checkpoint of ``model`` that stores each masked weight as its group mask (one bit per group) and its
    active values only, in the order ``weight[weight_mask]`` reads them; everything else as ``state_dict()`` does.

    For a density-d target with groups of g weights that is about ``d * 4`` bytes per float32 weight plus
    ``1 / (8 g)`` for the mask, instead of 4 bytes: kernel masks on E2ENet's (1, 3, 3) fusion convs cost one bit
    per 9 weights, input-channel masks one bit per input channel.

    Args:
        model: the masked model (DDP / DataParallel wrappers are unwrapped).
        sparsity: its :class:`sparsefuse.DynamicSparsity` (group masks come from ``sparsity.masks``).

    Returns:
        A dict of tensors and plain values (``torch.save`` it; ``torch.load(..., weights_only=True)`` reads it):
        ``format``, ``dense`` (the state dict without the target weights), ``masks`` (packed bits),
        ``mask_shapes``, ``granularity`` (the repr of each bound granularity, checked on load) and ``values``.
        Load it with :func:`load_sparse_state_dict`. It is a checkpoint for inference or a fresh start: the
        sparsifier's schedule position and update history are not in it.
    """
    model = unwrap_model(model)
    missing = [m for m in ("masks", "target_names", "weight_mask") if not hasattr(sparsity, m)]
    if missing:
        raise TypeError(
            f"sparse_state_dict needs the sparsifier's group masks (a sparsefuse.DynamicSparsity); "
            f"{type(sparsity).__name__} lacks {', '.join(missing)}"
        )
    masks = target_weight_masks(model, sparsity)
    state = model.state_dict()
    groups = sparsity.masks
    return {
        "format": SPARSE_FORMAT,
        "dense": {k: v for k, v in state.items() if k not in masks},
        "masks": {name: _pack_bits(groups[name].cpu()) for name in masks},
        "mask_shapes": {name: list(groups[name].shape) for name in masks},
        "granularity": {name: repr(sparsity.granularity_of(name)) for name in masks},
        "values": {name: state[name][mask.to(state[name].device)] for name, mask in masks.items()},
    }


@torch.no_grad()
def load_sparse_state_dict(model: nn.Module, sparsity: DynamicSparsity, state: dict) -> None:
    """Load a :func:`sparse_state_dict` into ``model`` and its masks into ``sparsity``.

    Args:
        model: a model of the saved architecture (DDP / DataParallel wrappers are unwrapped).
        sparsity: a :class:`sparsefuse.DynamicSparsity` on ``model`` with the saved targets and granularity, e.g.
            ``DynamicSparsity(model, None, targets=..., granularity=...)``; its step and history restart at 0.
        state: what :func:`sparse_state_dict` returned.

    Afterwards ``model`` holds the saved weights exactly (zeros off the masks) and ``sparsity`` the saved masks.
    """
    if not isinstance(state, dict) or state.get("format") != SPARSE_FORMAT:
        raise ValueError(
            f"not a sparse state dict (expected format {SPARSE_FORMAT!r}); save one with "
            f"sparsefuse.compact.sparse_state_dict(model, sparsity)"
        )
    model = unwrap_model(model)
    # Checked before anything is loaded, so that a state dict of another model leaves this one untouched.
    expected, saved = set(model.state_dict()), set(state["dense"]) | set(state["values"])
    if expected != saved:
        raise ValueError(
            f"sparse state dict does not fit this model: {sorted(expected ^ saved)} missing or unexpected; build "
            f"the model with the arguments of the one that was saved"
        )
    targets, saved_targets = set(sparsity.granularities()), set(state["masks"])
    if targets != saved_targets:
        raise ValueError(
            f"sparse state dict masks {sorted(saved_targets - targets)} are not targets of this sparsifier and "
            f"{sorted(targets - saved_targets)} were not saved; build DynamicSparsity with the targets of the run "
            f"that saved it"
        )
    sparsity.check_granularities(state.get("granularity"))
    groups = {name: _unpack_bits(packed, tuple(state["mask_shapes"][name])) for name, packed in state["masks"].items()}
    params = dict(model.named_parameters())
    for name, values in state["values"].items():
        granularity, shape = sparsity.granularity_of(name), params[name].shape
        if tuple(groups[name].shape) != granularity.groups_shape(shape):
            raise ValueError(
                f"{name}: the saved mask has shape {tuple(groups[name].shape)}, this model's weight needs "
                f"{granularity.groups_shape(shape)} ({granularity!r}); the state dict comes from a different model "
                f"or granularity"
            )
        active = int(granularity.to_weight(groups[name], shape).sum())
        if active != values.numel():
            raise ValueError(
                f"{name}: the mask has {active} active weights but {values.numel()} values were saved; "
                f"the sparsifier's granularity differs from the one that saved them"
            )
    sparsity.load_state_dict({"step": 0, "seed": sparsity.seed, "masks": groups})
    model.load_state_dict(state["dense"], strict=False)
    for name, values in state["values"].items():
        weight, mask = params[name], sparsity.weight_mask(name).to(params[name].device)
        weight.zero_()
        weight[mask] = values.to(weight.device, weight.dtype)
