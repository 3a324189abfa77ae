"""Layers: depth-shift convolutions (E2ENet's restricted depth shift)."""

from .shift import DepthShift, DepthShiftConv3d

__all__ = ["DepthShift", "DepthShiftConv3d"]
