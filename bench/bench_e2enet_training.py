"""A training iteration as train.py runs it: E2ENet's recipes, masked and compacted, against DynUNet and dense E2ENet.

Every case is built the way train.py builds its run (``make_config`` -> ``build_model`` in channels_last_3d ->
``build_sparsity`` -> ``sf.CompactedTraining`` where the run trains compacted) and takes whole topology-update
intervals of iterations: forward, nnU-Net's Dice + CE over the deep-supervision outputs, backward, clipped SGD step
and the sparsity's step, with the preset's update interval, so the updates and, for compacted runs, putting the
weights back and cutting the layers again are in the time. No AMP (CPU). All cases run interleaved in one process
on the same batch; the table gives milliseconds per iteration and the ratios to DynUNet and to dense E2ENet.

``--profile`` also prints where a dense E2ENet iteration's forward time goes, by layer group (encoder, fusion
nodes' convs with their norms and activations, transposed convs, heads; timed by module hooks), and the rest of
the iteration (backward, optimizer step, clipping, the loss, and the concatenations and shifts between modules).

    python bench/bench_e2enet_training.py [--preset cpu-demo] [--patch 48] [--threads 2] [--repeats 3] [--profile]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_e2enet.py: spinning workers lose shared cores

import argparse
import copy
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import interleaved, machine

import sparsefuse as sf
from e2enet.nets.registry import build_model, output_list
from e2enet.training.config import GRAD_CLIP, MOMENTUM, WEIGHT_DECAY, make_config
from e2enet.training.loss import deep_supervision_loss, dice_ce_loss
from e2enet.training.train import build_sparsity

IN_CHANNELS, NUM_CLASSES = 1, 8
BLOCKS_ERK = dict(granularity="input_channel_blocks", distribution="erk", sparse_layers="fusion-convs")
POOL = dict(granularity="input_channel_pool", sparse_layers="fusion-convs")  # blocks sharing a pool of inputs
CASES = {  # row -> (run settings over the preset's, trains compacted)
    "DynUNet": (dict(arch="dynunet"), False),
    "E2ENet dense": (dict(density=1.0), False),
    "E2ENet DSFF 0.2 kernel (masked)": (dict(density=0.2), False),
    "E2ENet DSFF 0.2 blocks ERK, masked": (dict(density=0.2, **BLOCKS_ERK), False),
    "E2ENet DSFF 0.2 blocks ERK, compacted": (dict(density=0.2, **BLOCKS_ERK), True),
    "E2ENet DSFF 0.1 blocks ERK, compacted": (dict(density=0.1, **BLOCKS_ERK), True),
    "E2ENet DSFF 0.2 pool, compacted": (dict(density=0.2, **POOL), True),
    "E2ENet DSFF 0.2 pool ERK, compacted": (dict(density=0.2, **POOL, distribution="erk"), True),
    "E2ENet DSFF 0.1 input-channel, compacted": (dict(density=0.1, granularity="input_channel"), True),
}


class Run:
    """One case's model, optimizer and sparsity, stepping like train.py's train_step."""

    def __init__(self, preset: str, settings: dict, compacted: bool, batch: tuple[torch.Tensor, torch.Tensor]):
        config = make_config(data=Path("unused"), out=Path("unused"), preset=preset, **settings)
        torch.manual_seed(0)
        self.model = build_model(config.arch, preset, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES)
        self.model = self.model.to(memory_format=torch.channels_last_3d).train()
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=1e-3, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY
        )
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.sparsity = build_sparsity(config, self.model, self.optimizer, scaler)
        self.compacted = sf.CompactedTraining(self.model, self.sparsity) if compacted else None
        self.train_model = self.compacted.model if compacted else self.model
        self.update_every = config.update_every
        self.loss_fn = dice_ce_loss()
        self.image = batch[0].contiguous(memory_format=torch.channels_last_3d)
        self.label = batch[1]

    def iteration(self) -> None:
        loss = deep_supervision_loss(self.loss_fn, output_list(self.train_model(self.image)), self.label)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.train_model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        if self.compacted is not None:
            self.compacted.step()
        elif self.sparsity is not None:
            self.sparsity.step()

    def interval(self) -> None:
        for _ in range(self.update_every):
            self.iteration()


def layer_group(name: str) -> str:
    for prefix, group in (("encoder", "encoder"), ("heads", "heads")):
        if name.startswith(prefix):
            return group
    if name.startswith("fusion"):
        return "fusion transposed convs (up)" if name.endswith(".up") else "fusion convs, norms, shifts"
    return "other"


def profile_dense(run: Run, repeats: int) -> None:
    """Forward time of a dense iteration by layer group, timed by module hooks; everything else is the rest."""
    forward = defaultdict(float)
    starts = {}

    def before(name):
        def hook(module, inputs):
            starts[name] = time.perf_counter()

        return hook

    def after(name):
        def hook(module, inputs, output):
            forward[layer_group(name)] += time.perf_counter() - starts[name]

        return hook

    handles = []
    for name, module in run.model.named_children():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}"
            if name == "fusion":
                for part_name, part in child.named_children():
                    part_full = f"fusion.{child_name}.{part_name}"
                    handles += [part.register_forward_pre_hook(before(part_full))]
                    handles += [part.register_forward_hook(after(part_full))]
            else:
                handles += [child.register_forward_pre_hook(before(full)), child.register_forward_hook(after(full))]
    run.iteration()  # warm up
    forward.clear()
    start = time.perf_counter()
    for _ in range(repeats):
        run.iteration()
    total = (time.perf_counter() - start) / repeats
    for handle in handles:
        handle.remove()
    forward_total = sum(forward.values()) / repeats
    print(f"\nWhere a dense E2ENet iteration's time goes (forward by layer group, mean of {repeats}):")
    for group, seconds in sorted(forward.items(), key=lambda kv: -kv[1]):
        print(f"  {group:<32} {seconds / repeats * 1e3:8.1f} ms  ({seconds / repeats / total:5.1%} of the iteration)")
    rest = total - forward_total
    print(f"  {'the rest (backward, step, ...)':<32} {rest * 1e3:8.1f} ms  ({rest / total:5.1%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-demo", choices=["cpu-demo", "paper"])
    parser.add_argument("--patch", type=int, default=48, help="cube side of the patch (cpu-demo trains 48^3)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="update intervals timed per case")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, IN_CHANNELS, *(args.patch,) * 3)
    batch = (torch.randn(shape, generator=generator), torch.randint(0, NUM_CLASSES, (args.batch, 1, *shape[2:])))
    runs = {name: Run(args.preset, *CASES[name], batch) for name in args.cases}
    if args.profile and "E2ENet dense" in runs:
        profile_dense(copy.deepcopy(runs["E2ENet dense"]), args.repeats)
    intervals = {name: run.update_every for name, run in runs.items()}
    times = interleaved({name: run.interval for name, run in runs.items()}, args.repeats, warmup=1)
    per_iteration = {name: seconds / intervals[name] for name, seconds in times.items()}
    print(
        f"\nTraining iteration, {args.preset} preset, batch {args.batch} x {IN_CHANNELS} x {args.patch}^3, "
        f"{args.threads} threads, whole update intervals, median of {args.repeats}"
    )
    dyn, dense = per_iteration.get("DynUNet"), per_iteration.get("E2ENet dense")
    print(f"  | {'case':<44} | ms/iteration | vs DynUNet | vs dense E2ENet |")
    print(f"  |{'-' * 46}|{'-' * 14}|{'-' * 12}|{'-' * 17}|")
    for name, seconds in per_iteration.items():
        vs_dyn = f"{seconds / dyn:.2f}x" if dyn else "n/a"
        vs_dense = f"{seconds / dense:.2f}x" if dense else "n/a"
        print(f"  | {name:<44} | {seconds * 1e3:12.0f} | {vs_dyn:>10} | {vs_dense:>15} |")


if __name__ == "__main__":
    main()
