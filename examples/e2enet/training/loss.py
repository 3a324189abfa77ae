"""The training loss: batches onto the device, Dice + CE with deep supervision, and stopping once it diverges."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.losses import DiceCELoss

from e2enet.training.loader import to_network_layout
from sparsefuse.validation import positive_int

# With AMP a non-finite loss is the GradScaler's business (it skips the step and halves the scale); only a scale
# halved ~30 times from 2**16 without recovering means the run itself diverged.
MIN_LOSS_SCALE = 1e-4


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


def to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch as the network takes it: (image, label) in its axis order, the image channels-last."""
    image = to_network_layout(batch["image"]).to(device, memory_format=torch.channels_last_3d)
    return image, to_network_layout(batch["label"]).to(device)


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


class DivergenceGuard:
    """Stops the run, on every rank, once training has diverged; the message says where to go back to, if anywhere."""

    def __init__(self, amp: bool, distributed: bool, checkpoint_path: Path):
        self.amp, self.distributed, self.checkpoint_path = amp, distributed, checkpoint_path

    def last_good(self, epoch: int) -> str:
        """Every epoch ends with a checkpoint, so one exists exactly when this is not the run's first epoch."""
        if epoch == 0:
            return "It diverged in its first epoch, so there is no checkpoint to go back to"
        return f"The last good checkpoint is {self.checkpoint_path} (epoch {epoch - 1})"

    def check_loss(self, loss: torch.Tensor, epoch: int) -> None:
        """Before the backward pass: in float32 a non-finite loss (on any rank) means divergence."""
        if self.amp:
            return
        finite = torch.isfinite(loss.detach()).float()
        if self.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite:
            raise SystemExit(
                f"non-finite loss ({loss.item()}{' on some rank' if self.distributed else ''}) at "
                f"epoch {epoch}; training stopped. {self.last_good(epoch)}; lower the learning rate or check the "
                "data for extreme values (python examples/e2enet/data.py verify --data DATASET_DIR)"
            )

    def check_scale(self, scaler: torch.amp.GradScaler, epoch: int) -> None:
        """After the step: with AMP, a loss scale that collapsed means the gradients stay non-finite."""
        if self.amp and scaler.get_scale() < MIN_LOSS_SCALE:
            raise SystemExit(
                f"the AMP loss scale collapsed to {scaler.get_scale():.1e} at epoch {epoch}: the "
                f"gradients stay non-finite, training stopped. {self.last_good(epoch)}; lower the learning rate, "
                "check the data for extreme values, or try --no-amp"
            )
