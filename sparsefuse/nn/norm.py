"""Instance normalisation that keeps a channels_last_3d input channels-last."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ChannelsLastInstanceNorm3d"]


class ChannelsLastInstanceNorm3d(nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` whose output keeps a channels_last_3d input's layout on the CPU.

    torch's CPU ``instance_norm`` returns a contiguous tensor whatever the input's layout, so in a
    channels_last_3d network every conv after a norm first converts its input back; in E2ENet's cpu-demo
    training step those conversions were a third of the time. Here each sample goes through ``batch_norm``
    with its own batch statistics, which are exactly the per-sample, per-channel statistics of instance
    norm, and torch's CPU batch norm works in channels_last_3d without a copy.

    Same arguments, parameters and state dict as ``torch.nn.InstanceNorm3d``, and equal to it within
    float rounding (the channels-last kernel sums in another order). Inputs that are not channels_last_3d
    on the CPU, unbatched inputs and ``track_running_stats=True`` take the parent's path unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.track_running_stats
            or x.dim() != 5
            or x.device.type != "cpu"
            or x.is_contiguous()  # also true for C = 1 or a single voxel, where the layouts coincide
            or not x.is_contiguous(memory_format=torch.channels_last_3d)
        ):
            return super().forward(x)
        samples = [
            F.batch_norm(x[i : i + 1], None, None, self.weight, self.bias, True, 0.0, self.eps)
            for i in range(x.size(0))
        ]
        return samples[0] if len(samples) == 1 else torch.cat(samples)
