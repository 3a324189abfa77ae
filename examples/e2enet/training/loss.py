"""The training loss: nnU-Net's Dice + CE, summed over the deep-supervision outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from sparsefuse.validation import positive_int


def deep_supervision_weights(num_outputs: int) -> tuple[float, ...]:
    """Loss weights of the deep-supervision outputs, full resolution first.

    nnU-Net's rule as the authors' trainer applies it: weights 1/2^k for
    k = 0..num_outputs (one scale more than there are outputs), the last zeroed,
    the rest normalised to sum 1. For the paper's 4 outputs: 8/15, 4/15, 2/15, 1/15.
    """
    positive_int("num_outputs", num_outputs)
    raw = [0.5**k for k in range(num_outputs)]  # the (num_outputs+1)-th weight is the zeroed one
    total = sum(raw)
    return tuple(w / total for w in raw)


def dice_ce_loss() -> DiceCELoss:
    """nnU-Net's Dice + CE on the foreground classes, softmax over the logits, labels as class indices."""
    return DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5)


def deep_supervision_loss(loss_fn, outputs: list[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
    """Weighted sum over the outputs (full resolution first) against nearest-downsampled labels."""
    weights = deep_supervision_weights(len(outputs))
    total = 0.0
    for weight, logits in zip(weights, outputs, strict=True):
        target = (
            label
            if logits.shape[2:] == label.shape[2:]
            else F.interpolate(label.float(), size=logits.shape[2:], mode="nearest").long()
        )
        total = total + weight * loss_fn(logits, target)
    return total
