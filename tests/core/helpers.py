"""Test doubles and checks shared by the core and E2ENet tests: sparsities from elsewhere (the
sparsefuse.Sparsity protocol), a conv subclass, and the compaction tolerance."""

from __future__ import annotations

import torch
from torch import nn

import sparsefuse as sf

# Compacted and masked layers add the same nonzero terms, only in another order (and with other conv algorithms),
# so float32 outputs agree to this fraction of the largest masked output (or of 1).
RELATIVE_TOLERANCE = 1e-5


def assert_matches(compacted: torch.Tensor, masked: torch.Tensor) -> None:
    assert compacted.shape == masked.shape
    scale = max(1.0, masked.abs().max().item())
    assert (compacted - masked).abs().max().item() <= RELATIVE_TOLERANCE * scale


class FixedMasks:
    """A sparsity from elsewhere: any weight-shaped masks (element groups), so dead inputs, dead outputs and
    scattered zeros mix."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks
        self.target_names = tuple(masks)

    def weight_mask(self, name: str) -> torch.Tensor:
        return self.masks[name]

    def granularity_of(self, name: str) -> sf.masks.Granularity:
        return sf.masks.Element()


class FakeSparsity:
    """A sparsity from elsewhere: kernel masks given per weight."""

    def __init__(self, model: nn.Module, kernel_masks: dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        self.masks = {n: m.bool() for n, m in kernel_masks.items()}
        self._shapes = {n: params[n].shape for n in kernel_masks}

    @property
    def target_names(self):
        return tuple(self.masks)

    def weight_mask(self, name):
        shape = self._shapes[name]
        return self.masks[name].view(*self.masks[name].shape, *([1] * (len(shape) - 2))).expand(shape)

    def granularity_of(self, name):
        return sf.masks.Kernel()


def first_k(rows: int, cols: int, k: int) -> torch.Tensor:
    """A (rows, cols) mask whose first ``k`` entries, in row-major order, are active."""
    return (torch.arange(rows * cols) < k).view(rows, cols)


class ShiftLikeConv3d(nn.Conv3d):
    """A Conv3d subclass (like DepthShiftConv3d): must be hooked and counted as a conv."""

    def forward(self, x):
        return super().forward(x.flip(2))
