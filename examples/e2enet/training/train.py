"""The training loop of one fold: settings in, a trained fold (checkpoints, log, figures) out.

:func:`train` takes a :class:`~e2enet.training.config.RunConfig`; the command line (``python examples/e2enet/train.py``,
flags in :mod:`e2enet.training.cli`) only fills one. The file reads top to bottom: helpers that build the data,
network, sparsity and a small :class:`Trainer` state, then one step, the end of an epoch, and the loop.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import sparsefuse as sf
from e2enet.atomic import write_json
from e2enet.nets.e2enet import e2enet_fusion_targets, is_fusion_conv
from e2enet.nets.registry import build_model, network_stride, output_list
from e2enet.preprocessing.planning import Plans, default_preprocessed_dir, fold_cases, plan_and_preprocess
from e2enet.preprocessing.preprocess import preprocessed_data_dir
from e2enet.problems import Problem, exit_on_problem
from e2enet.training.checkpoint import load_checkpoint, save_checkpoint
from e2enet.training.cli import parse_config
from e2enet.training.config import CHANNEL_GRANULARITIES, GRAD_CLIP, MOMENTUM, POLY_EXPONENT, WEIGHT_DECAY, RunConfig
from e2enet.training.distributed import Processes, gather_rank_states, reduce_over_ranks, setup_distributed
from e2enet.training.divergence import DivergenceGuard
from e2enet.training.epoch_log import EpochResult, describe, epoch_row, validate, write_log
from e2enet.training.loader import TrainLoader, to_device
from e2enet.training.loss import deep_supervision_loss, dice_ce_loss
from e2enet.training.plots import fusion_connection_proportions, plot_fusion_connections, plot_progress
from e2enet.training.run_folder import claim_fold, fold_lock, run_record

# Which fusion layers DSFF masks: all of them (the paper), or the fusion convs alone with the transposed convs dense.
SPARSE_LAYERS = {"fusion": e2enet_fusion_targets, "fusion-convs": is_fusion_conv}


# ------------------------------------------------------------------------------------------------- helpers
def prepare_data(config: RunConfig) -> tuple[Plans, Path, list[str], list[str]]:
    """Plan (patch a multiple of the network's stride), preprocess (cached) and split: plans, data folder, ids."""
    try:  # on the meta device: only the stride is needed here, and the model options are checked before any write
        with torch.device("meta"):
            model = build_model(config.arch, config.preset, in_channels=1, num_classes=2, **config.model_options)
    except (TypeError, ValueError) as error:
        if not config.model_options:
            raise
        raise Problem(f"--model-option {config.model_options} does not build a network: {error}") from error
    stride = network_stride(model)
    preprocessed = config.preprocessed or default_preprocessed_dir(config.data)
    plans, _ = plan_and_preprocess(
        config.data,
        preprocessed,
        network_stride=list(stride),
        patch_voxel_budget=config.budget.patch_voxel_budget,
        batch_voxel_budget=config.budget.batch_voxel_budget,
    )
    train_ids, val_ids = fold_cases(preprocessed, sorted(plans.fingerprint.case_ids), config.fold)
    return plans, preprocessed_data_dir(preprocessed, plans), train_ids, val_ids


def build_network(config: RunConfig, plans: Plans, device: torch.device) -> nn.Module:
    """The network on the device, in channels_last_3d: (1,3,3) convs run up to 3x faster in this layout."""
    model = build_model(
        config.arch,
        config.preset,
        in_channels=len(plans.channel_names),
        num_classes=plans.num_classes,
        **config.model_options,
    )
    return model.to(device).to(memory_format=torch.channels_last_3d)


def data_parallel(model: nn.Module, procs: Processes) -> nn.Module:
    """The module training steps call: the network, or its DDP wrapper under torchrun (validation and saving use the
    network itself). DDP averages the gradients over the ranks."""
    if not procs.distributed:
        return model
    device_ids = [procs.device.index] if procs.device.type == "cuda" else None
    # 1x1x1 kernels in channels_last_3d: their gradients' size-1 dims carry other (meaningless) strides.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def build_sparsity(config: RunConfig, model, optimizer, scaler) -> sf.DynamicSparsity | None:
    """DSFF on the fusion layers (static with ``static``), or None for a dense run."""
    if not config.sparse:
        return None
    s, u = config.sparsity, config.sparsity.updates
    steps_before_updates, last_update = config.update_window  # check() refused a window with no update in it
    schedule = (
        None
        if s.static
        else sf.schedules.CosineDecay(
            every=config.update_every,
            drop_fraction=u.drop_fraction,
            total_steps=last_update,
            stop=last_update,
            start=steps_before_updates,
        )
    )
    return sf.DynamicSparsity(
        model,
        optimizer,
        density=s.density,
        targets=SPARSE_LAYERS[s.sparse_layers],
        granularity=s.granularity,
        scorer=sf.scorers.L1(),
        growth=u.growth,  # a name of sf.growth.GROWTHS: random (SET, the paper) or gradient (RigL)
        regrow_init=u.regrow_init,
        schedule=schedule,
        seed=config.seed,
        scaler=scaler,
        grace_updates=u.grace_updates,
        distribution=s.distribution,
    )


def trains_compacted(config: RunConfig, procs: Processes) -> bool:
    """Whether a run trains its fusion layers cut down to their live input channels (sf.CompactedTraining): a sparse
    run with input-channel masks (kernel masks leave no channel dead) in one process (DDP fixes the parameters,
    which compacted training swaps at every topology update)."""
    return config.sparse and not procs.distributed and config.sparsity.granularity in CHANNEL_GRANULARITIES


def poly_lr(initial: float, epoch: int, epochs: int) -> float:
    return initial * (1 - epoch / epochs) ** POLY_EXPONENT


@dataclass
class Trainer:
    """What a training step and an epoch's bookkeeping touch, built once by :func:`setup`."""

    config: RunConfig
    procs: Processes
    plans: Plans
    record: dict  # the run config as checkpoints and config.json record it
    model: nn.Module
    train_model: nn.Module  # the model, its DDP wrapper, or the compacted copy that compacted training runs
    optimizer: torch.optim.Optimizer
    sparsity: sf.DynamicSparsity | None
    scaler: torch.amp.GradScaler
    autocast: object
    loss_fn: nn.Module
    train_loader: TrainLoader
    val_loader: TrainLoader
    guard: DivergenceGuard
    rows: list = field(default_factory=list)
    log: object = print
    compacted: sf.CompactedTraining | None = None  # built by start_compacted_training once a checkpoint is restored

    @property
    def checkpoint_path(self) -> Path:
        return self.config.fold_dir / "checkpoint_latest.pth"

    def rank_state(self) -> dict:
        """This rank's loaders and RNG: what --resume restores on each rank."""
        device = self.procs.device
        return {
            "train_loader": self.train_loader.state_dict(),
            "val_loader": self.val_loader.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }

    def restore(self, saved: dict) -> int:
        """Put back everything a (checked) checkpoint holds; returns the epoch to continue with."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.sparsity is not None:
            self.sparsity.load_state_dict(saved["sparsity"])
        if saved.get("scaler"):  # saved by an AMP run; a disabled scaler ignores it
            self.scaler.load_state_dict(saved["scaler"])
        own = saved["ranks"][self.procs.rank]
        self.train_loader.load_state_dict(own["train_loader"])
        self.val_loader.load_state_dict(own["val_loader"])
        torch.set_rng_state(own["torch_rng"])
        if own.get("cuda_rng") is not None and self.procs.device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda_rng"], self.procs.device)
        self.rows = saved["log"]
        return saved["epoch"] + 1

    def start_compacted_training(self) -> None:
        """Train a compacted copy of the model from here on. Built after :meth:`restore`, from the masks and weights
        it loaded, so a resumed run cuts the layers as the uninterrupted one had them. The model itself keeps the
        weights masked training would hold after every step: validation and checkpoints read it as before."""
        self.compacted = sf.CompactedTraining(self.model, self.sparsity)
        self.train_model = self.compacted.model

    def save(self, path: Path, **extra) -> None:
        sparsity = self.sparsity.state_dict() if self.sparsity else None
        state = {"config": self.record, "model": self.model.state_dict(), "sparsity": sparsity, "log": self.rows}
        save_checkpoint({**state, **extra}, path)


def setup(config: RunConfig, procs: Processes) -> tuple[Trainer, dict | None]:
    """Data, model, optimizer, sparsity, loss and loaders, then the run folder: every setting has been tried before
    anything in it is written or replaced. Returns them with the checkpoint to resume from, if any."""
    amp = procs.device.type == "cuda" and config.amp  # float16 autocast + GradScaler; CPU stays float32
    if procs.distributed and not procs.is_main:
        dist.barrier()  # rank 0 preprocesses and claims the run folder first; the others then find it all ready
    plans, data_dir, train_ids, val_ids = prepare_data(config)
    torch.manual_seed(config.seed)
    model = build_network(config, plans, procs.device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.budget.lr, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY
    )
    # Disabled (a pass-through, bit-identical to plain fp32 steps) unless AMP is on.
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    rank_seed = config.seed + 1000 * procs.rank  # each rank draws its own batches, like a DistributedSampler's shards
    sparsity = build_sparsity(config, model, optimizer, scaler)
    train_loader = TrainLoader(
        data_dir, train_ids, plans, seed=rank_seed, augment=config.budget.augment, mirror_axes=config.mirror_axes
    )
    val_loader = TrainLoader(data_dir, val_ids, plans, seed=rank_seed + 1, augment="none")

    record = run_record(config, plans, {"train": train_ids, "val": val_ids}, procs.world_size, amp)
    latest = config.fold_dir / "checkpoint_latest.pth"
    if procs.is_main:
        saved = claim_fold(config, record, plans)
        if procs.distributed:
            dist.barrier()
    else:
        saved = load_checkpoint(latest) if config.resume and latest.is_file() else None
    trainer = Trainer(
        config=config,
        procs=procs,
        plans=plans,
        record=record,
        model=model,
        train_model=data_parallel(model, procs),
        optimizer=optimizer,
        sparsity=sparsity,
        scaler=scaler,
        autocast=(lambda: torch.autocast("cuda", dtype=torch.float16)) if amp else contextlib.nullcontext,
        loss_fn=dice_ce_loss(),
        train_loader=train_loader,
        val_loader=val_loader,
        guard=DivergenceGuard(amp, procs.distributed, latest),
        log=print if procs.is_main else (lambda *_, **__: None),  # rank 0 alone prints, writes and plots
    )
    return trainer, saved


def describe_run(t: Trainer) -> str:
    config, plans, procs = t.config, t.plans, t.procs
    s, u = config.sparsity, config.sparsity.updates
    if not config.sparse:
        sparse = "dense"
    elif s.static:
        sparse = f"static density {s.density}"
    else:
        sparse = (
            f"dynamic density {s.density} (topology update every {config.update_every} iterations from "
            f"{u.update_from:.0%} until {u.update_until:.0%} of the run, drop fraction {u.drop_fraction})"
        )
    processes = f"; {procs.world_size} processes (global batch {procs.world_size * plans.batch_size})"
    return (
        f"{config.arch} {config.preset}: {sum(p.numel() for p in t.model.parameters()):,} dense params, {sparse}, "
        f"fold {config.fold} ({len(t.train_loader.cases)} train / {len(t.val_loader.cases)} val cases), "
        f"patch {plans.patch_size} x batch {plans.batch_size}, {config.total_iters} iterations"
        + (processes if procs.distributed else "")
        + ("; mixed precision (float16)" if t.record["amp"] else "")
        + ("; compacted training (dead input channels not computed)" if t.compacted else "")
    )


def train_step(t: Trainer, epoch: int) -> tuple[float, sf.UpdateReport | None]:
    """One iteration: forward, deep-supervision loss, backward, clipped step, then the sparsity's step."""
    image, label = to_device(next(t.train_loader), t.procs.device)
    with t.autocast():
        loss = deep_supervision_loss(t.loss_fn, output_list(t.train_model(image)), label)
    t.guard.check_loss(loss, epoch)
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    t.scaler.unscale_(t.optimizer)  # clip the true gradients (all these scaler calls are no-ops without AMP)
    # The trained parameters: compacted layers train a block in place of the full weight (their inactive weights'
    # gradients, which a masked step discards, are not counted). DDP's parameters are the model's.
    torch.nn.utils.clip_grad_norm_(t.train_model.parameters(), GRAD_CLIP)
    t.scaler.step(t.optimizer)  # skips the step if the fp16 gradients overflowed
    t.scaler.update()
    t.guard.check_scale(t.scaler, epoch)
    # The report is None for a dense run and for a step the scaler skipped.
    if t.compacted:
        report = t.compacted.step()  # the sparsity's step, with the compacted layers kept in step with the masks
    else:
        report = t.sparsity.step() if t.sparsity is not None else None
    return loss.item(), report


def end_epoch(t: Trainer, result: EpochResult) -> None:
    """Validate, log, and (rank 0) checkpoint first, then the log and plot: the log never runs ahead of --resume."""
    result.val_loss, result.counts = validate(t)
    result.train_loss, result.val_loss, result.counts = reduce_over_ranks(
        result.train_loss, result.val_loss, result.counts, t.procs
    )
    verified = t.procs.distributed and t.sparsity is not None
    if verified:
        t.sparsity.verify()  # raises on every rank if their masks have drifted apart
    t.rows.append(epoch_row(result, t.sparsity))
    t.log(describe(t.rows[-1]) + (f", masks verified on {t.procs.world_size} ranks" if verified else ""))
    ranks = gather_rank_states(t.rank_state(), t.procs)
    if not t.procs.is_main:
        return
    extra = {"optimizer": t.optimizer.state_dict(), "scaler": t.scaler.state_dict(), "ranks": ranks}
    t.save(t.checkpoint_path, epoch=result.epoch, **extra)
    write_log(t.rows, t.config.fold_dir / "log.csv")
    updated = [r["epoch"] for r in t.rows if r["topology_updates"]]
    plot_progress(t.rows, updated, t.config.fold_dir / "progress.png")


def finish(t: Trainer) -> None:
    """The final checkpoint (what predict.py reads) and the fusion-connection figure, from rank 0."""
    if t.compacted:
        t.compacted.close()  # the optimizer gets its full weights back; the model already holds the trained ones
    if t.procs.is_main:
        t.save(t.config.fold_dir / "checkpoint_final.pth")
        proportions = fusion_connection_proportions(t.model, t.sparsity)
        if proportions:
            plot_fusion_connections(proportions, t.config.fold_dir / "fusion_connections.png")
            write_json(t.config.fold_dir / "fusion_connections.json", proportions, indent=1)
    if t.procs.distributed:
        dist.barrier()  # no rank leaves before rank 0 has written the final files
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- train
def train(config: RunConfig) -> dict:
    """Train one fold as ``config`` says; returns the fold folder, log, model, sparsity, plans and run record, and the
    (closed) sf.CompactedTraining if the run trained compacted, else None."""
    if config.threads:
        torch.set_num_threads(config.threads)
    procs = setup_distributed()
    # Rank 0 alone writes the fold, so it alone holds the lock: from before the fold is claimed to the last write.
    with fold_lock(config.fold_dir) if procs.is_main else contextlib.nullcontext():
        return train_fold(config, procs)


def train_fold(config: RunConfig, procs: Processes) -> dict:
    """:func:`train` once this process may write the fold."""
    t, saved = setup(config, procs)
    start_epoch = 0
    if saved is not None:
        start_epoch = t.restore(saved)
        t.log(f"resumed {t.checkpoint_path} at epoch {start_epoch}")
    elif config.resume:
        t.log(f"--resume: no checkpoint at {t.checkpoint_path}, starting from scratch")
    if trains_compacted(config, procs):
        t.start_compacted_training()
    t.log(describe_run(t))

    for epoch in range(start_epoch, config.budget.epochs):
        started = time.perf_counter()
        lr = poly_lr(config.budget.lr, epoch, config.budget.epochs)
        for group in t.optimizer.param_groups:
            group["lr"] = lr
        t.model.train()
        t.train_model.train()  # the compacted copy has its own train flags, which E2ENet's forward reads
        losses, reports = [], []
        hidden = not config.progress or not t.procs.is_main
        bar = tqdm(range(config.budget.iters_per_epoch), desc=f"epoch {epoch}", disable=hidden, leave=False)
        for _ in bar:
            loss, report = train_step(t, epoch)
            losses.append(loss)
            if report is not None:
                reports.append(report)
            bar.set_postfix(loss=f"{loss:.3f}")
        end_epoch(t, EpochResult(epoch, float(np.mean(losses)), lr, reports, started))

    finish(t)
    t.log(f"done: {config.fold_dir}")
    return {
        "fold_dir": config.fold_dir,
        "log": t.rows,
        "model": t.model,
        "sparsity": t.sparsity,
        "plans": t.plans,
        "config": t.record,
        "compacted": t.compacted,
    }


@exit_on_problem()  # a problem with the data or the run folder: one line, exit status 2
def main(argv=None) -> dict:
    """The command line: ``python examples/e2enet/train.py --help``."""
    return train(parse_config(argv))
