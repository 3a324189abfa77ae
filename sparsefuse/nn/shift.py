"""Depth shift and depth-shift convolution (E2ENet's restricted depth shift).

E2ENet replaces a 3x3x3 convolution with a channel-grouped shift along depth
followed by a cheap (1, 3, 3) convolution: the shift gives every output voxel a
3-slice depth receptive field at the cost of a memory copy instead of 3x the
FLOPs. Channels are split into contiguous groups exactly like
``torch.chunk(x, shift_groups, dim=1)`` (the authors' code), and group ``g`` is
moved by ``s = g - shift_groups // 2`` slices with zero fill::

    out[:, group_g, ..., d, ...] = x[:, group_g, ..., d - s, ...]   (0 if d - s is outside)

The shift is a custom ``torch.autograd.Function`` that writes one slice
copy per group into a preallocated output, so it costs about one read and one
write of the activation, keeps the input's memory format (channels_last_3d in
gives channels_last_3d out) and runs on any device, including ``meta``.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

__all__ = ["DepthShift", "DepthShiftConv3d", "depth_shift", "shift_plan"]

_DIM_NAMES = {2: "depth", 3: "height", 4: "width"}

# (first channel, number of channels, shift) for each channel group.
_Plan = tuple[tuple[int, int, int], ...]


def _check_shift_args(shift_groups: int, dim: int, dim_arg: str = "dim") -> None:
    # bool is an int subclass; True as a group count is almost surely a mistake.
    if isinstance(shift_groups, bool) or not isinstance(shift_groups, int) or shift_groups < 1:
        raise ValueError(
            f"shift_groups must be a positive int (3 gives shifts -1, 0, +1; 1 disables the shift), "
            f"got {shift_groups!r}"
        )
    if isinstance(dim, bool) or dim not in _DIM_NAMES:
        raise ValueError(f"{dim_arg} must be 2 (depth), 3 (height) or 4 (width) of an NCDHW tensor, got {dim!r}")


def shift_plan(channels: int, shift_groups: int) -> _Plan:
    """The channel groups of a depth shift, as ``(start, count, shift)`` runs: the groups that
    ``torch.chunk(x, shift_groups, dim=1)`` makes.

    Chunk size is ``ceil(C / n)``, the last chunk may be smaller and there may be
    fewer than ``n`` chunks (C=4, n=3 gives [2, 2] with shifts -1, 0). Chunk ``g``
    shifts by ``g - n // 2``, so shifts stay centred on the *requested* group count.

    Args:
        channels: C, the channel count.
        shift_groups: n, the requested number of groups.
    """
    size = max(1, -(-channels // shift_groups))  # max: C=0 gives no groups, not range(step=0)
    return tuple(
        (start, min(size, channels - start), g - shift_groups // 2) for g, start in enumerate(range(0, channels, size))
    )


def _negate(plan: _Plan) -> _Plan:
    return tuple((start, length, -shift) for start, length, shift in plan)


def _apply_plan(x: torch.Tensor, plan: _Plan, dim: int) -> torch.Tensor:
    """Shift each channel group of ``x`` (B, C, D, H, W) along ``dim``; zero fill.

    ``empty_like`` keeps x's memory format and is not zeroed: every element of the
    output is written exactly once, either by the group copy or by zeroing the
    ``|s|`` boundary slices the shift leaves empty.
    """
    out = torch.empty_like(x)
    length = x.size(dim)
    for start, channels, shift in plan:
        src = x.narrow(1, start, channels)
        dst = out.narrow(1, start, channels)
        step = abs(shift)
        if step == 0:
            dst.copy_(src)
        elif step >= length:
            dst.zero_()  # shifted entirely out of the volume
        elif shift > 0:  # out[d] = in[d - s]: data moves towards higher indices
            dst.narrow(dim, step, length - step).copy_(src.narrow(dim, 0, length - step))
            dst.narrow(dim, 0, step).zero_()
        else:
            dst.narrow(dim, 0, length - step).copy_(src.narrow(dim, step, length - step))
            dst.narrow(dim, length - step, step).zero_()
    return out


class _DepthShiftFn(torch.autograd.Function):
    """Zero-filled grouped shift. The shift is linear and its adjoint is the
    opposite shift, so backward reuses the same kernel with negated shifts
    (through ``apply``, which keeps double backward working)."""

    @staticmethod
    def forward(x: torch.Tensor, plan: _Plan, dim: int) -> torch.Tensor:
        return _apply_plan(x, plan, dim)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, plan, dim = inputs
        ctx.plan = plan
        ctx.dim = dim

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return _DepthShiftFn.apply(grad_out, _negate(ctx.plan), ctx.dim), None, None


def depth_shift(x: torch.Tensor, shift_groups: int = 3, dim: int = 2) -> torch.Tensor:
    """Shift channel groups of ``x`` (B, C, D, H, W) along ``dim`` with zero fill.

    Args:
        x: 5-D input (B, C, D, H, W), any memory format, dtype or device.
        shift_groups: number of channel groups, split like ``torch.chunk``. Group
            ``g`` moves by ``g - shift_groups // 2`` (3 gives -1, 0, +1; 5 gives
            -2..+2; 1 is the identity). Even counts are allowed (2 gives -1, 0).
        dim: 2 shifts along depth, 3 along height, 4 along width.

    Returns:
        Tensor of x's shape, dtype and memory format with
        ``out[:, group_g, ..., d, ...] = x[:, group_g, ..., d - s_g, ...]``.
    """
    _check_shift_args(shift_groups, dim)
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"input must be a 5-D (B, C, D, H, W) tensor, got {shape}")
    return _DepthShiftFn.apply(x, shift_plan(x.size(1), shift_groups), dim)


# Let torch.fx.symbolic_trace record the shift as one call instead of tracing into
# the autograd Function (which cannot take Proxy inputs).
torch.fx.wrap("depth_shift")


class DepthShift(nn.Module):
    """Parameter-free grouped shift of a (B, C, D, H, W) tensor along one axis.

    Args:
        shift_groups: channel groups (split like ``torch.chunk``); group ``g``
            shifts by ``g - shift_groups // 2`` slices, zero filled. 1 turns the
            shift off.
        dim: 2 = depth, 3 = height, 4 = width (E2ENet Table 4 ablation).

    Shape:
        input (B, C, D, H, W) -> output (B, C, D, H, W), same memory format.
    """

    def __init__(self, shift_groups: int = 3, dim: int = 2) -> None:
        super().__init__()
        _check_shift_args(shift_groups, dim)
        self.shift_groups = shift_groups
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_shift(x, self.shift_groups, self.dim)

    def extra_repr(self) -> str:
        return f"shift_groups={self.shift_groups}, dim={self.dim} ({_DIM_NAMES[self.dim]})"


def _same_padding(kernel_size, stride, dilation) -> tuple[int, int, int]:
    # timm's get_padding per axis: k // 2 for odd kernels at stride 1, so the
    # default (1, 3, 3) kernel keeps D, H and W.
    k, s, d = (nn.modules.utils._triple(v) for v in (kernel_size, stride, dilation))
    return tuple(((s[i] - 1) + d[i] * (k[i] - 1)) // 2 for i in range(3))


class DepthShiftConv3d(nn.Conv3d):
    """Grouped depth shift followed by a 3-D convolution (E2ENet's "restricted depth shift").

    A ``nn.Conv3d`` subclass, so ``.weight``/``.bias``, state dicts, sparsifiers and
    FLOP counters that look for ``nn.Conv3d`` treat it as the convolution it is;
    the shift itself has no parameters and no FLOPs. With the default (1, 3, 3)
    kernel it sees 3 depth slices like a 3x3x3 conv at 1/3 of the weights and FLOPs:
    it equals a 3x3x3 conv whose kernel keeps, for each input channel, only the
    depth tap ``1 - s`` of that channel's shift ``s``.

    Args:
        in_channels: as ``nn.Conv3d``.
        out_channels: as ``nn.Conv3d``.
        kernel_size: conv kernel, default (1, 3, 3).
        shift_groups: channel groups of the shift (see [`DepthShift`][sparsefuse.nn.DepthShift]); 1 = no shift.
        shift_dim: axis to shift, 2 = depth, 3 = height, 4 = width.
        padding: default pads ``dilation * (k - 1) // 2`` per axis (timm's
            ``get_padding``), i.e. "same" for odd kernels at stride 1.
        stride: as ``nn.Conv3d``.
        dilation: as ``nn.Conv3d``.
        groups: as ``nn.Conv3d``.
        bias: as ``nn.Conv3d``.
        padding_mode: as ``nn.Conv3d``.
        device: as ``nn.Conv3d``.
        dtype: as ``nn.Conv3d``.

    Shape:
        input (B, in_channels, D, H, W) -> output (B, out_channels, D', H', W') as
        ``nn.Conv3d`` gives for the same arguments.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int] = (1, 3, 3),
        shift_groups: int = 3,
        shift_dim: int = 2,
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] | str | None = None,
        dilation: int | tuple[int, int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_shift_args(shift_groups, shift_dim, dim_arg="shift_dim")
        if padding is None:
            padding = _same_padding(kernel_size, stride, dilation)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.shift_groups = shift_groups
        self.shift_dim = shift_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(depth_shift(x, self.shift_groups, self.shift_dim))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shift_groups={self.shift_groups}, shift_dim={self.shift_dim}"
