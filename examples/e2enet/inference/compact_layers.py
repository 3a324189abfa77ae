"""The layers a compacted E2ENet (:mod:`compaction`) is built from, and their fast CPU kernels: direct oneDNN convs,
upsampling as a matrix product and a pixel shuffle, channel gathers, the channel-run copy that assembles a conv's
shifted input, and the compact unit and node modules (their norm: ``sparsefuse.nn.instance_norm_in_place``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparsefuse.nn import instance_norm_in_place

__all__ = [
    "CompactNode",
    "CompactUnit",
    "Fill",
    "Gather",
    "Run",
    "Upsample",
    "copy_runs",
    "onednn_conv",
    "to_memory_format",
]

# (source part, first source channel, channel count, first destination channel, shift)
Run = tuple[int, int, int, int, int]
# (first destination channel, channel count, shift): channels whose |shift| boundary slices are zero
Fill = tuple[int, int, int]


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 5 and x.stride(1) == 1 and x.shape[1] > 1


def to_memory_format(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    """``x`` laid out in ``memory_format``, with explicit channels-last strides even for one channel (which
    ``contiguous`` leaves as they are), so oneDNN gives a channels-last output for it too."""
    if memory_format == torch.channels_last_3d:
        return x if x.stride(1) == 1 else torch.empty_like(x, memory_format=memory_format).copy_(x)
    return x.contiguous(memory_format=memory_format)


def _same_source_runs(runs: tuple[Run, ...]) -> list[tuple[Run, ...]]:
    """``runs`` cut into stretches of consecutive runs from one part with one shift (they land side by side)."""
    stretches: list[list[Run]] = []
    for run in runs:
        last = stretches[-1][-1] if stretches else None
        if last and last[0] == run[0] and last[4] == run[4] and last[3] + last[2] == run[3]:
            stretches[-1].append(run)
        else:
            stretches.append([run])
    return [tuple(stretch) for stretch in stretches]


def copy_runs(
    parts: list[Tensor | None],
    runs: tuple[Run, ...],
    fills: tuple[Fill, ...],
    channels: int,
    dim: int,
    memory_format: torch.memory_format,
) -> Tensor:
    """A new (B, channels, *S) tensor of channel runs of ``parts``, each shifted along ``dim`` (out[..., d] =
    part[..., d - shift]); the ``|shift|`` slices a shift leaves uncovered are zero.

    In channels_last_3d, the scattered channels one part gives with one shift are gathered in one pass over the
    part: one copy per channel would read the whole part once per channel (each voxel's channels share a cache
    line), which measured 1.7-3.7x slower for 10-40 of 96 channels."""
    first = parts[runs[0][0]]
    out = torch.empty(
        (first.shape[0], channels, *first.shape[2:]),
        dtype=first.dtype,
        device=first.device,
        memory_format=memory_format,
    )
    length = out.shape[dim]
    channels_last = memory_format == torch.channels_last_3d
    for stretch in _same_source_runs(runs) if channels_last else [(run,) for run in runs]:
        part, _, _, dst, shift = stretch[0]
        count = sum(run[2] for run in stretch)
        step = min(abs(shift), length)
        source = parts[part].narrow(dim, 0 if shift >= 0 else step, length - step)
        target = out.narrow(1, dst, count).narrow(dim, step if shift >= 0 else 0, length - step)
        if len(stretch) == 1:
            target.copy_(source.narrow(1, stretch[0][1], count))
        else:
            index = torch.cat([torch.arange(src, src + n) for _, src, n, _, _ in stretch]).to(first.device)
            target.copy_(source.movedim(1, -1)[..., index].movedim(-1, 1))
    for dst, count, shift in fills:
        step = min(abs(shift), length)
        out.narrow(1, dst, count).narrow(dim, 0 if shift > 0 else length - step, step).zero_()
    return out


def onednn_conv(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """``conv(x)``; in eager float32 on the CPU through oneDNN directly."""
    # On CPU, torch sends thin convs (batch * channels * D * H <= 20480, e.g. 5 input channels at 64^3) and 1x1x1
    # convs on channels_last_3d input to an im2col path: 1.4x-14x slower than oneDNN here. Call oneDNN directly,
    # except while torch.export / torch.compile trace (their graphs keep the portable convolution op).
    eager = not torch.compiler.is_compiling()
    if eager and x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return torch.mkldnn_convolution(x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, 1)
    return conv(x)


class Gather(nn.Module):
    """Channels ``index`` of a (B, C, *S) tensor, in that order; the tensor itself when ``index`` is None."""

    def __init__(self, index: Tensor | None):
        super().__init__()
        self.register_buffer("index", index)

    def forward(self, x: Tensor) -> Tensor:
        if self.index is None:
            return x
        if _is_channels_last(x):  # index_select across channels_last_3d measured 17x slower than indexing the last dim
            return x.permute(0, 2, 3, 4, 1)[..., self.index].permute(0, 4, 1, 2, 3)
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return "all channels" if self.index is None else f"{len(self.index)} channels"


class Upsample(nn.Module):
    """ConvTranspose3d with kernel == stride (no padding, no overlap) as one matrix product and a pixel shuffle.

    Each input voxel becomes one output block: (voxels, C_in) @ (C_in, C_out * prod(kernel)), then one copy puts
    every block in place, in the input's memory format. On CPU this measured 1.8-2.7x faster than ``conv_transpose3d``
    for E2ENet's ``up`` layers (96 -> 48 channels, 32^3 -> 64^3: 52-61 ms against 138 ms).

    Args:
        weight: (C_in, C_out, kd, kh, kw), as a ConvTranspose3d's. bias: (C_out,) or None.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: Tensor) -> Tensor:
        batch, c_in, d, h, w = x.shape
        c_out, (kd, kh, kw) = self.weight.shape[1], self.weight.shape[2:]
        cols = x.permute(0, 2, 3, 4, 1).reshape(batch, d * h * w, c_in) @ self.weight.reshape(c_in, -1)
        blocks = cols.view(batch, d, h, w, c_out, kd, kh, kw)
        if _is_channels_last(x):
            y = blocks.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(batch, d * kd, h * kh, w * kw, c_out)
            y = y.permute(0, 4, 1, 2, 3)
        else:
            y = blocks.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(batch, c_out, d * kd, h * kh, w * kw)
        return y if self.bias is None else y + self.bias.view(-1, 1, 1, 1)

    def extra_repr(self) -> str:
        c_in, c_out, *kernel = self.weight.shape
        return f"{c_in} -> {c_out} channels, kernel = stride = {tuple(kernel)}"


class CompactUnit(nn.Module):
    """A conv unit (depth shift -> Conv3d -> InstanceNorm3d -> LeakyReLU) on the channels it needs.

    Its input is assembled from one or more parts (a fusion node's same-level, upsampled and pooled tensors, or
    the previous unit's output) by :func:`copy_runs`: each read channel lands shifted as in the full-width
    input. One part read whole and unshifted goes to the conv as it is.

    Args:
        conv: the smaller Conv3d (read channels in, computed channels out); norm, act: on the computed channels.
        runs, fills: the input's assembly (see :func:`copy_runs`).
        shift_dim: the axis of the depth shift.
        whole: the index of the part that is the input as it is, or None.
        memory_format: layout of the assembled input (the conv's output follows it).
    """

    def __init__(
        self,
        conv: nn.Conv3d,
        norm: nn.InstanceNorm3d,
        act: nn.Module,
        runs: tuple[Run, ...],
        fills: tuple[Fill, ...],
        shift_dim: int,
        whole: int | None,
        memory_format: torch.memory_format,
    ):
        super().__init__()
        self.conv, self.norm, self.act = conv, norm, act
        self.runs, self.fills, self.shift_dim, self.whole = runs, fills, shift_dim, whole
        self.memory_format = memory_format

    def forward(self, *parts: Tensor | None) -> Tensor:
        if self.whole is None:
            x = copy_runs(list(parts), self.runs, self.fills, self.conv.in_channels, self.shift_dim, self.memory_format)
        else:
            x = parts[self.whole]
        return self.act(instance_norm_in_place(self.norm, onednn_conv(self.conv, x)))

    def extra_repr(self) -> str:
        how = f"part {self.whole} as it is" if self.whole is not None else f"{len(self.runs)} channel runs copied"
        return f"input: {how}, shift_dim={self.shift_dim}"


class CompactNode(nn.Module):
    """Fusion node x(i, j) computing only what is read: ``up`` makes only the upsampled channels the first conv
    reads, ``down`` pools only the read channels of the finer level, and the conv units take them without a
    full-width concatenation. ``up`` / ``down`` are None when the node reads nothing from that source.

    Shapes: ``same`` (B, kept channels of x(i, j-1), S), ``below`` (B, kept of x(i+1, j-1), S / up_stride),
    ``above`` (B, kept of x(i-1, j-1), S * down_stride) -> (B, kept of x(i, j), S).
    """

    def __init__(
        self,
        up_gather: Gather | None,
        up: Upsample | None,
        down_gather: Gather | None,
        down: nn.MaxPool3d | None,
        units: list[CompactUnit],
    ):
        super().__init__()
        self.up_gather, self.up, self.down_gather, self.down = up_gather, up, down_gather, down
        self.units = nn.ModuleList(units)

    def forward(self, same: Tensor | None, below: Tensor | None, above: Tensor | None) -> Tensor:
        upsampled = None if self.up is None else self.up(self.up_gather(below))
        pooled = None if self.down is None else self.down(self.down_gather(above))
        x = self.units[0](same, upsampled, pooled)
        for unit in self.units[1:]:
            x = unit(x)
        return x
