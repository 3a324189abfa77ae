"""What each training epoch measures and records: validation pseudo-Dice, the ``log.csv`` row, the printed line.

log.csv columns: epoch, train_loss, val_loss, pseudo_dice (mean over the classes seen), dice_1 .. dice_{K-1}, density,
lr, topology_updates, regrown_survival, exploration, seconds. A class neither present nor predicted in any
validation batch has no Dice (NaN) and is left out of pseudo_dice; the printed line says so.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from e2enet.atomic import atomic_write
from e2enet.training.loader import to_device


@dataclass
class EpochResult:
    """What one epoch measured; validation fills in ``val_loss`` and ``counts``."""

    epoch: int
    train_loss: float
    lr: float
    reports: list  # the topology updates' UpdateReports
    started: float  # time.perf_counter() at the epoch's start
    val_loss: float = float("nan")
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0))


@torch.no_grad()
def validate(trainer) -> tuple[float, torch.Tensor]:
    """Mean loss and the TP, FP, FN counts per foreground class, shape (3, K - 1), over the run's validation batches.

    ``trainer`` is train.py's Trainer: its model, val_loader, loss_fn, autocast, config, plans and procs are read.
    """
    model, loader, num_classes = trainer.model, trainer.val_loader, trainer.plans.num_classes
    model.eval()
    counts = torch.zeros(3, num_classes - 1)
    losses = []
    for _ in range(trainer.config.budget.val_iters):
        image, label = to_device(next(loader), trainer.procs.device)
        with trainer.autocast():
            logits = model(image)
        # Under CUDA autocast the logits are float16, and the Dice sums over a patch overflow float16 (NaN loss).
        losses.append(trainer.loss_fn(logits.float(), label).item())
        pred, ref = logits.argmax(1).cpu(), label[:, 0].cpu()
        for c in range(1, num_classes):
            counts[0, c - 1] += ((pred == c) & (ref == c)).sum()
            counts[1, c - 1] += ((pred == c) & (ref != c)).sum()
            counts[2, c - 1] += ((pred != c) & (ref == c)).sum()
    return float(np.mean(losses)), counts


def pseudo_dice(counts: torch.Tensor) -> list[float]:
    """nnU-Net's pseudo-Dice per foreground class: Dice of the TP/FP/FN summed over the validation batches.

    NaN for a class neither present nor predicted in any batch: it has no error to measure, so it is left out of
    the mean rather than counted as a Dice of 0 (evaluate.py's ``both_empty`` rule).
    """
    tp, fp, fn = counts
    denominator = 2 * tp + fp + fn
    return torch.where(denominator > 0, 2 * tp / denominator.clamp_min(1), float("nan")).tolist()


def epoch_row(result: EpochResult, sparsity) -> dict:
    """The log.csv row of one epoch."""
    reports = result.reports
    dice = pseudo_dice(result.counts)
    seen = [d for d in dice if not math.isnan(d)]
    survivals = [r.survival for r in reports if r.survival is not None]
    return {
        "epoch": result.epoch,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "pseudo_dice": float(np.mean(seen)) if seen else float("nan"),
        **{f"dice_{c + 1}": d for c, d in enumerate(dice)},
        "density": sparsity.density() if sparsity else 1.0,
        "lr": result.lr,
        "topology_updates": len(reports),
        # Of the kernels grown at one update, the share the next update kept; and the share of all fusion
        # kernels ever active (ITOP's exploration rate). Empty when this epoch made no update.
        "regrown_survival": float(np.mean(survivals)) if survivals else "",
        "exploration": reports[-1].exploration if reports else "",
        "seconds": time.perf_counter() - result.started,
    }


def describe(row: dict) -> str:
    """The printed line of an epoch's row."""
    unseen = [key.removeprefix("dice_") for key, value in row.items() if key.startswith("dice_") and math.isnan(value)]
    return (
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, pseudo-Dice "
        f"{row['pseudo_dice']:.4f}"
        + (f" (class {', '.join(unseen)} absent from the validation batches, left out)" if unseen else "")
        + f", density {row['density']:.4f}, lr {row['lr']:.5f}, {row['topology_updates']} updates, "
        f"{row['seconds']:.1f} s"
    )


def write_log(rows: list[dict], path: Path) -> None:
    """log.csv, atomically, like the checkpoint it follows."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[-1]))
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path) as f:
        f.write(text.getvalue().encode())
