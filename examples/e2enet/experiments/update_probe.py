"""What each topology update does to a training run: the loss around it and the trained weight mass it drops.

    python -m e2enet.experiments.update_probe --data raw/Dataset991_MNIRegions --out runs/probe \\
        [--density 0.2] [--drop-fraction 0.5] [--update-from 0.0] [--update-until 1.0] [--regrow-init zeros]
        [--epochs E ...]

Trains one fold as train.py would (the same setup, step and learning rate; no validation or checkpoints) and writes
``update_probe.json`` in ``--out``: the training loss of every iteration and, for every update, its iteration, the
fraction it asked to exchange, and per fusion layer the share of the layer's active L1 weight mass that it dropped.
It prints the mean of both per tenth of the run. A gap between DSFF and dense that opens at updates shows as a loss
that rises after each update; mass dropped near the asked fraction means the drop falls on trained weights, near
zero that it falls on groups that never grew.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from e2enet.atomic import write_json
from e2enet.training.config import make_config
from e2enet.training.distributed import setup_distributed
from e2enet.training.train import poly_lr, setup, train_step

AROUND = 5  # iterations before and after an update whose mean losses are compared


def dropped_mass(sparsity, before: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Per target: L1 mass of the weights an update deactivated / L1 mass of all weights active before it."""
    shares = {}
    for name, (weight, mask) in before.items():
        dropped = mask & ~sparsity.weight_mask(name)
        total = weight[mask].abs().sum().item()
        shares[name] = weight[dropped].abs().sum().item() / total if total else 0.0
    return shares


def probe(config) -> dict:
    t, _ = setup(config, setup_distributed())
    losses, updates = [], []
    step = t.sparsity.step if t.sparsity is not None else None

    def observed_step():
        upcoming = t.sparsity.step_count + 1
        if t.sparsity.schedule is None or not t.sparsity.schedule.is_update(upcoming):
            return step()  # no update: nothing to snapshot on this hot path
        before = {
            n: (p.detach().clone(), t.sparsity.weight_mask(n).clone())
            for n, p in t.model.named_parameters()
            if n in t.sparsity.target_names
        }
        report = step()
        if report is not None:
            updates.append(
                {"iteration": len(losses), "fraction": report.fraction, "mass": dropped_mass(t.sparsity, before)}
            )
        return report

    if t.sparsity is not None:
        t.sparsity.step = observed_step
    for epoch in range(config.budget.epochs):
        for group in t.optimizer.param_groups:
            group["lr"] = poly_lr(config.budget.lr, epoch, config.budget.epochs)
        t.model.train()
        for _ in range(config.budget.iters_per_epoch):
            losses.append(train_step(t, epoch)[0])
    return {"losses": losses, "updates": updates}


def summary(result: dict, tenths: int = 10) -> list[str]:
    losses, updates = np.array(result["losses"]), result["updates"]
    n = len(losses)
    lines = ["tenth  mean loss  updates  asked  mass dropped  loss after - before"]
    for k in range(tenths):
        lo, hi = k * n // tenths, (k + 1) * n // tenths
        inside = [u for u in updates if lo < u["iteration"] <= hi]
        asked = np.mean([u["fraction"] for u in inside]) if inside else float("nan")
        mass = np.mean([np.mean(list(u["mass"].values())) for u in inside]) if inside else float("nan")
        at = [u["iteration"] for u in inside if AROUND <= u["iteration"] <= n - AROUND]
        jumps = [losses[i : i + AROUND].mean() - losses[i - AROUND : i].mean() for i in at]
        jump = np.mean(jumps) if jumps else float("nan")
        lines.append(f"{k:>5}  {losses[lo:hi].mean():9.3f}  {len(inside):7d}  {asked:5.2f}  {mass:12.3f}  {jump:+.3f}")
    return lines


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--density", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    for name, kind in (
        ("epochs", int),
        ("iters_per_epoch", int),
        ("drop_fraction", float),
        ("update_from", float),
        ("update_until", float),
        ("update_every", int),
        ("regrow_init", str),
        ("growth", str),
        ("granularity", str),
        ("distribution", str),
        ("sparse_layers", str),
    ):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None)
    args = vars(p.parse_args(argv))
    data, out, density, threads = args.pop("data"), args.pop("out"), args.pop("density"), args.pop("threads")
    if threads:
        torch.set_num_threads(threads)
    settings = {k: v for k, v in args.items() if v is not None}
    config = make_config(data=data, out=out, density=density, overwrite=True, progress=False, **settings)
    result = probe(config)
    write_json(out / "update_probe.json", result)
    print("\n".join(summary(result)))
    return result


if __name__ == "__main__":
    main()
