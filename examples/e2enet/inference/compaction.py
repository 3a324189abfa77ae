"""E2ENet-wide compaction: an inference copy of a sparse E2ENet that computes only the channels something reads.

:func:`sparsefuse.compact` works one layer at a time, so it keeps every tensor at full width: an ``up`` transposed
conv computes all its output channels even when the fusion conv after it reads two of them, and outputs are
scattered back to full width. :func:`compact_e2enet` knows the network's wiring and follows each channel from the
output back to the input:

* the head reads every channel of x(0, L-1) that it has an active weight for;
* a conv unit computes the output channels its consumers read, and reads only the input channels those outputs
  have an active weight for;
* the first conv of fusion node x(i, j) reads ``concat[same, up(below), down(above)]``, so the channels it reads
  split into the three sources. Its ``up`` transposed conv computes only the channels read from it (its weight
  sliced along dim 1) from only the channels of x(i+1, j-1) those have weights for, its max-pool pools only the
  read channels of x(i-1, j-1), and the read channels of x(i, j-1) are copied straight in: no full-width
  concatenation, no scatter;
* a tensor x(i, j) is computed with the union of what its consumers read (the node on its level, the upsampling
  of the level above, the pooling of the level below); a node whose output nobody reads is not computed at all.

Every tensor holds its computed channels only, in channel order. A conv unit copies the channels it reads, each
with the depth shift it has in the full-width input, into its conv's input in one pass, the pass the dense
model's shift alone costs. The result equals the masked model in eval mode to float rounding.

    compacted = compact_e2enet(model, sparsity)  # or compact_e2enet(model): the zero weights are the masks
    logits = compacted(x)                        # (B, num_classes, D, H, W), what model.eval()(x) returns
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from e2enet.inference.channel_liveness import ChannelLiveness, UnitPlan, active_pairs, weight_masks
from e2enet.inference.compact_layers import (
    CompactNode,
    CompactUnit,
    Gather,
    Upsample,
    onednn_conv,
    to_memory_format,
)
from e2enet.nets.e2enet import E2ENet
from sparsefuse.compaction import LayerCompaction
from sparsefuse.distributed import unwrap_model
from sparsefuse.nn import DepthShiftConv3d
from sparsefuse.nn.shift import shift_plan

__all__ = [
    "CompactE2ENet",
    "CompactNode",
    "CompactUnit",
    "Gather",
    "Upsample",
    "compact_e2enet",
    "e2enet_compaction_plan",
]


class CompactE2ENet(nn.Module):
    """An E2ENet for inference holding only the channels its output depends on; built by :func:`compact_e2enet`.

    ``forward`` returns the full-resolution logits (B, num_classes, D, H, W) in train and eval mode alike: the
    deep-supervision heads are not kept. The input checks, ``in_channels``, ``num_classes``, ``strides``,
    ``channels`` and ``total_stride`` are the E2ENet's. ``encoder[l]`` is empty and ``fusion`` has no node
    ``"i_j"`` when nothing reads its output.
    """

    total_stride = E2ENet.total_stride
    check_input = E2ENet.check_input

    def __init__(
        self,
        source: E2ENet,
        encoder: list[list[CompactUnit]],
        fusion: dict[str, CompactNode],
        image_gather: Gather,
        head: nn.Conv3d,
        head_gather: Gather,
        memory_format: torch.memory_format,
    ):
        super().__init__()
        self.in_channels, self.num_classes = source.in_channels, source.num_classes
        self.strides, self.channels = source.strides, source.channels
        self.memory_format = memory_format
        self.image_gather = image_gather
        self.encoder = nn.ModuleList(nn.ModuleList(units) for units in encoder)
        self.fusion = nn.ModuleDict(fusion)
        self.head_gather, self.head = head_gather, head

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        levels = len(self.encoder)
        grid: list[list[Tensor | None]] = [[] for _ in range(levels)]
        h = to_memory_format(self.image_gather(x), self.memory_format)
        for level, units in enumerate(self.encoder):
            for unit in units:
                h = unit(h)
            grid[level].append(h if len(units) else None)
            for j in range(1, level + 1):
                i = level - j
                key = f"{i}_{j}"
                above = grid[i - 1][j - 1] if i > 0 else None
                node = self.fusion[key] if key in self.fusion else None
                grid[i].append(None if node is None else node(grid[i][j - 1], grid[i + 1][j - 1], above))
        return onednn_conv(self.head, self.head_gather(grid[0][levels - 1]))


# ------------------------------------------------------------------------------------------------------- building
def _index(channels: Tensor) -> Tensor:
    return channels.nonzero().flatten()


def _positions(read: Tensor, kept: Tensor) -> Tensor:
    """Where the channels ``read`` sit in a tensor holding the channels ``kept`` ((C,) bool masks, read in kept)."""
    return torch.searchsorted(_index(kept), _index(read))


def _gather(read: Tensor, kept: Tensor, device: torch.device) -> Gather:
    return Gather(None if torch.equal(read, kept) else _positions(read, kept).to(device))


def channel_assembly(layout: list[tuple[int, int, int]], part_widths: list[int]):
    """(runs, fills, whole) for per-destination-channel (part, source channel, shift)."""
    runs: list[list[int]] = []
    for dst, (part, src, shift) in enumerate(layout):
        last = runs[-1] if runs else None
        if last and last[0] == part and last[4] == shift and last[1] + last[2] == src:
            last[2] += 1
        else:
            runs.append([part, src, 1, dst, shift])
    # Destination channels keep the full input's order, so each shift group is one destination range.
    fills: list[list[int]] = []
    for _, _, count, dst, shift in runs:
        if shift and fills and fills[-1][2] == shift and fills[-1][0] + fills[-1][1] == dst:
            fills[-1][1] += count
        elif shift:
            fills.append([dst, count, shift])
    part, src, count, _, shift = runs[0]
    whole = part if len(runs) == 1 and src == 0 and count == part_widths[part] and shift == 0 else None
    return tuple(map(tuple, runs)), tuple(map(tuple, fills)), whole


@torch.no_grad()
def _conv_like(conv: nn.Conv3d, weight: Tensor, bias: Tensor | None, memory_format: torch.memory_format) -> nn.Conv3d:
    """A Conv3d with ``conv``'s kernel, stride, padding and dilation holding ``weight`` (out, in, *kernel), its
    layout ``memory_format``, and ``bias``."""
    small = nn.Conv3d(
        weight.shape[1],
        weight.shape[0],
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    small.weight.copy_(weight)
    small.weight.data = small.weight.data.contiguous(memory_format=memory_format)
    if bias is not None:
        small.bias.copy_(bias)
    return small


@torch.no_grad()
def _build_unit(
    unit: UnitPlan,
    weight_mask: Tensor,
    layout: list[tuple[int, int, int]],
    part_widths: list[int],
    memory_format: torch.memory_format,
) -> CompactUnit:
    """``layout``: per read input channel, in order, (part, channel within the part, channel of the full input)."""
    conv, norm = unit.module.conv, unit.module.norm
    device = conv.weight.device
    out_index = _index(unit.out_keep).to(device)
    in_full = torch.tensor([full for _, _, full in layout], dtype=torch.long)
    weight = (conv.weight * weight_mask.to(device))[out_index][:, in_full.to(device)]
    small = _conv_like(conv, weight, None if conv.bias is None else conv.bias[out_index], memory_format)
    kept_norm = nn.InstanceNorm3d(
        len(out_index),
        eps=norm.eps,
        momentum=norm.momentum,
        affine=norm.affine,
        track_running_stats=norm.track_running_stats,
        device=device,
        dtype=weight.dtype,
    )
    for name, tensor in [*norm.named_parameters(), *norm.named_buffers()]:
        if tensor.dim() == 1:  # weight, bias, running_mean, running_var (num_batches_tracked is a scalar)
            getattr(kept_norm, name).copy_(tensor[out_index])
    shifts = torch.zeros(conv.in_channels, dtype=torch.long)
    if isinstance(conv, DepthShiftConv3d):
        for start, count, shift in shift_plan(conv.in_channels, conv.shift_groups):
            shifts[start : start + count] = shift
    runs, fills, whole = channel_assembly([(part, src, int(shifts[full])) for part, src, full in layout], part_widths)
    act = nn.LeakyReLU(unit.module.act.negative_slope, inplace=True)
    return CompactUnit(small, kept_norm, act, runs, fills, getattr(conv, "shift_dim", 2), whole, memory_format)


def _chain(units: list[UnitPlan], masks, first_layout, first_widths, memory_format) -> list[CompactUnit]:
    built = []
    for u, unit in enumerate(units):
        layout, widths = first_layout, first_widths
        if u > 0:  # the previous unit computed exactly the channels this one reads, in order
            layout = [(0, k, int(c)) for k, c in enumerate(_index(unit.in_read))]
            widths = [len(layout)]
        built.append(_build_unit(unit, masks[f"{unit.name}.weight"], layout, widths, memory_format))
    return built


@torch.no_grad()
def _build_up(name: str, up: nn.ConvTranspose3d, mask: Tensor, read_in: Tensor, computed: Tensor) -> Upsample:
    """The upsampling from the ``read_in`` input channels to the ``computed`` output channels only."""
    unpadded = not any(up.padding) and not any(up.output_padding) and up.dilation == (1, 1, 1)
    if up.kernel_size != up.stride or not unpadded or up.groups != 1:
        raise ValueError(
            f"{name} is {up!r}; compact_e2enet handles E2ENet's ungrouped, unpadded transposed convs with "
            f"kernel == stride"
        )
    device = up.weight.device
    rows, cols = _index(read_in).to(device), _index(computed).to(device)
    weight = (up.weight * mask.to(device))[rows][:, cols]
    return Upsample(weight.contiguous(), None if up.bias is None else up.bias.detach()[cols].clone())


@torch.no_grad()
def _build_head(head: nn.Conv3d, mask: Tensor, read: Tensor, memory_format: torch.memory_format) -> nn.Conv3d:
    device = head.weight.device
    weight = (head.weight * mask.to(device))[:, _index(read).to(device)]
    return _conv_like(head, weight, head.bias, memory_format)


def _plan_and_masks(model: nn.Module, sparsity) -> tuple[E2ENet, dict[str, Tensor], ChannelLiveness]:
    model = unwrap_model(model)
    if not isinstance(model, E2ENet):
        raise TypeError(
            f"compact_e2enet takes an E2ENet (model.build_e2enet), got {type(model).__name__}; "
            f"use sparsefuse.compact for other models"
        )
    masks = weight_masks(model, sparsity)
    return model, masks, ChannelLiveness(model, masks)


def compact_e2enet(
    model: E2ENet, sparsity=None, memory_format: torch.memory_format = torch.channels_last_3d
) -> CompactE2ENet:
    """An inference copy of ``model`` that computes, reads and stores only the channels its output depends on.

    Args:
        model: an :class:`E2ENet` (DDP / DataParallel wrappers are unwrapped); not modified.
        sparsity: a :class:`sparsefuse.DynamicSparsity` (any granularity; ``"input_channel"`` masks on
            :func:`model.e2enet_fusion_targets` make whole channels dead), or any object with ``target_names``
            and ``weight_mask(name)``. None takes every zero weight as inactive, which is exact: for a model
            whose sparsifier zeroed its masked weights (any checkpoint of one) it gives the same network.
        memory_format: the layout the copy computes in. channels_last_3d (the default) measured 1.3x faster than
            contiguous on CPU for this copy (docs/compaction.md); inputs in either layout work.

    Returns:
        A :class:`CompactE2ENet` in eval mode, equal to the masked model in eval mode to float rounding: within
        ``1e-5 * max(1, max |output|)`` in float32 (``tests/e2enet/test_compaction.py``). It traces with
        ``torch.export`` and runs under ``torch.compile``.

    Saving: the structure follows from the masks alone. Save ``compacted.state_dict()`` with the masks (the
    sparsifier's ``state_dict()``, or `sparsefuse.sparse_state_dict`). To load: build the E2ENet
    with the same arguments, give a sparsifier on it the saved masks (``DynamicSparsity(fresh, None, targets=...,
    granularity=...)``, then ``load_state_dict``), call ``compact_e2enet(fresh, that_sparsifier)`` and load the
    saved state dict into the result.
    """
    model, masks, liveness = _plan_and_masks(model, sparsity)
    device = model.heads[0].weight.device
    encoder = []
    for level in range(liveness.levels):
        units = liveness.encoder.get(level)
        if units is None:
            encoder.append([])
            continue
        source = liveness.image_read if level == 0 else liveness.need[(level - 1, 0)]
        read = units[0].in_read
        layout = [(0, int(p), int(c)) for p, c in zip(_positions(read, source), _index(read), strict=True)]
        encoder.append(_chain(units, masks, layout, [int(source.sum())], memory_format))
    image_gather = Gather(None if liveness.image_read.all() else _index(liveness.image_read).to(device))

    fusion = {}
    for key, plan in liveness.nodes.items():
        i, j = map(int, key.split("_"))
        node = model.fusion[key]
        c = model.channels[i]
        same_at = _positions(plan.same, liveness.need[(i, j - 1)])
        layout = [(0, int(p), int(ch)) for p, ch in zip(same_at, _index(plan.same), strict=True)]
        layout += [(1, k, c + int(ch)) for k, ch in enumerate(_index(plan.up))]
        layout += [(2, k, 2 * c + int(ch)) for k, ch in enumerate(_index(plan.down))]
        widths = [int(liveness.need[(i, j - 1)].sum()), int(plan.up.sum()), int(plan.down.sum())]
        up_gather = up = down_gather = down = None
        if plan.up_read is not None:
            up_gather = _gather(plan.up_read, liveness.need[(i + 1, j - 1)], device)
            up = _build_up(f"fusion.{key}.up", node.up, masks[f"fusion.{key}.up.weight"], plan.up_read, plan.up)
        if plan.down.any():
            down_gather = _gather(plan.down, liveness.need[(i - 1, j - 1)], device)
            pool = node.down
            down = nn.MaxPool3d(pool.kernel_size, pool.stride, pool.padding, pool.dilation, ceil_mode=pool.ceil_mode)
        units = _chain(plan.units, masks, layout, widths, memory_format)
        fusion[key] = CompactNode(up_gather, up, down_gather, down, units)

    head = _build_head(model.heads[0], masks["heads.0.weight"], liveness.head_read, memory_format)
    head_gather = _gather(liveness.head_read, liveness.need[(0, liveness.levels - 1)], device)
    return CompactE2ENet(model, encoder, fusion, image_gather, head, head_gather, memory_format).eval()


def e2enet_compaction_plan(model: E2ENet, sparsity=None) -> dict[str, LayerCompaction]:
    """What :func:`compact_e2enet` keeps of each conv and transposed conv, without building anything.

    Returns {module name: :class:`sparsefuse.LayerCompaction`}: ``live_in`` / ``live_out`` count the channels with
    an active weight (the layer on its own, as :func:`sparsefuse.compaction_plan` sees it), ``kept_in`` /
    ``kept_out`` the channels the compacted network reads and computes. A layer nothing reads has ``kept_in ==
    kept_out == 0`` and a note saying so; so do the deep-supervision heads, which inference does not run.
    """
    model, masks, liveness = _plan_and_masks(model, sparsity)
    plan = {}

    def add(name: str, pairs: Tensor, kept: tuple[Tensor, Tensor] | None, note: str | None = None) -> None:
        """``kept``: (input channels read, output channels computed); None when the layer is not run."""
        c_out, c_in = pairs.shape
        kept_in, kept_out = (0, 0) if kept is None else (int(kept[0].sum()), int(kept[1].sum()))
        live_in, live_out = int(pairs.any(0).sum()), int(pairs.any(1).sum())
        if note is None:
            note = "not computed: nothing reads its output" if kept is None else ""
        plan[name] = LayerCompaction(name, c_in, c_out, live_in, live_out, kept_in, kept_out, note)

    def add_unit(name: str, unit: UnitPlan | None) -> None:
        add(name, active_pairs(masks[f"{name}.weight"]), None if unit is None else (unit.in_read, unit.out_keep))

    for level, block in enumerate(model.encoder):
        for u, unit in enumerate(liveness.encoder.get(level, [None] * len(block))):
            add_unit(f"encoder.{level}.{u}.conv", unit)
    for key, node in model.fusion.items():
        node_plan = liveness.nodes.get(key)
        up_pairs = active_pairs(masks[f"fusion.{key}.up.weight"]).t()
        up_kept = None if node_plan is None or node_plan.up_read is None else (node_plan.up_read, node_plan.up)
        add(f"fusion.{key}.up", up_pairs, up_kept)
        for u in range(len(node.convs)):
            add_unit(f"fusion.{key}.convs.{u}.conv", None if node_plan is None else node_plan.units[u])
    for k, head in enumerate(model.heads):
        pairs = active_pairs(masks[f"heads.{k}.weight"])
        if k == 0:
            add("heads.0", pairs, (liveness.head_read, torch.ones(head.out_channels, dtype=torch.bool)))
        else:
            add(f"heads.{k}", pairs, None, "deep-supervision head: not run at inference")
    return plan
