"""The processes of a training run: one, or one per GPU (or CPU worker) under torchrun, and what they exchange.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; train.py then runs unchanged on every rank (nccl on GPUs, gloo on
CPU). Each rank draws its own batches; the epoch's losses and validation counts are reduced over the ranks, and rank
0's checkpoint holds every rank's loader and RNG state (gathered here) so that --resume continues each rank exactly.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: the only one, or rank ``rank`` of ``world_size`` under torchrun."""

    world_size: int
    rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Processes:
    """One process, or one per GPU (or CPU worker) under torchrun, which sets WORLD_SIZE, RANK and LOCAL_RANK."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        # Long timeout: the other ranks wait at a barrier while rank 0 preprocesses a new dataset.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return Processes(world_size, rank, device)


def reduce_over_ranks(train_loss: float, val_loss: float, counts: torch.Tensor, procs: Processes):
    """Losses averaged and TP/FP/FN summed over the ranks, so the pseudo-Dice covers every rank's batches."""
    if not procs.distributed:
        return train_loss, val_loss, counts
    counts = counts.double().to(procs.device)
    dist.all_reduce(counts)
    mean_losses = torch.tensor([train_loss, val_loss], dtype=torch.float64, device=procs.device)
    dist.all_reduce(mean_losses)
    train_loss, val_loss = (mean_losses / procs.world_size).tolist()
    return train_loss, val_loss, counts.cpu()


def gather_rank_states(own: dict, procs: Processes) -> list[dict]:
    """Every rank's state (all ranks call this, each with its own), for rank 0's checkpoint."""
    if not procs.distributed:
        return [own]
    ranks = [None] * procs.world_size
    dist.all_gather_object(ranks, own)
    return ranks
