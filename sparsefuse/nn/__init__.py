"""Layers: depth-shift convolutions (E2ENet's restricted depth shift) and a layout-keeping instance norm."""

from .norm import ChannelsLastInstanceNorm3d, instance_norm_in_place
from .shift import DepthShift, DepthShiftConv3d

__all__ = ["ChannelsLastInstanceNorm3d", "DepthShift", "DepthShiftConv3d", "instance_norm_in_place"]
