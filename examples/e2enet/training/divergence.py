"""Stopping a run, on every rank, once training has diverged, with a message that says where to go back to."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

# With AMP a non-finite loss is the GradScaler's business (it skips the step and halves the scale); only a scale
# halved ~30 times from 2**16 without recovering means the run itself diverged.
MIN_LOSS_SCALE = 1e-4


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
