"""Train E2ENet with dynamic sparse feature fusion on an nnU-Net-layout dataset.

    python examples/e2enet/train.py --data DATASET_DIR --out RUN_DIR --fold 0 --density 0.2 --preset cpu-demo
        [--epochs E] [--iters-per-epoch N] [--update-every K] [--resume] [--static] [--no-progress]
        [--arch e2enet|dynunet] [--no-amp]
    torchrun --nproc_per_node N examples/e2enet/train.py ...   (same flags; DDP, nccl on GPUs, gloo on CPU)

The authors' recipe, corrected (see docs/e2enet.md): SGD lr 0.01, momentum 0.99, Nesterov, weight decay 3e-5,
poly(0.9) learning rate set once per epoch, Dice + CE with deep supervision (8/15, 4/15, 2/15, 1/15), gradient
norm clipped to 12, and DSFF: the fusion conv and transposed-conv weights keep a fraction ``density`` of their
kernels; every ``update_every`` iterations the lowest-L1 kernels are dropped and as many regrown at random, the
number following a cosine decay. The authors' `--fix` flag bug made their README run static; here the run is
dynamic unless ``--static`` asks for the static ablation. ``--arch dynunet`` trains the dense baseline (MONAI
DynUNet configured like nnU-Net 3d_fullres) with the same recipe.

The update interval and the cosine horizon follow the run's length unless set: the paper makes about 208 updates
in 250,000 iterations (every 1200); a run of N iterations updates every ``min(1200, max(1, N // 50))`` iterations,
so a short demo still makes real updates, and the cosine decays over all N iterations.

Under torchrun (``WORLD_SIZE`` > 1) every rank draws its own batches from its own loader (seeded ``seed + 1000 *
rank``), so the global batch, and the effective batch size, is N x the planned batch, as in nnU-Net's DDP. Rank 0
alone prints and writes; its checkpoint holds every rank's loader and RNG state, so ``--resume`` continues exactly
under the same number of processes (and refuses another). On CUDA the forward pass runs in float16 autocast with a
GradScaler (``--no-amp``: float32); on CPU the run is float32. See docs/distributed.md.

Writes, into ``RUN_DIR``: ``plans.json`` and ``config.json`` (what predict.py needs), and into
``RUN_DIR/fold_F``: ``checkpoint_latest.pth`` (every epoch, atomically: model, optimizer, sparsity, loader and
RNG state, log), ``checkpoint_final.pth``, ``log.csv``, ``progress.png``, ``fusion_connections.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from atomic import atomic_write, write_json
from loader import ALL_AXES, AUGMENTATIONS, TrainLoader, to_network_layout
from model import (
    ARCHITECTURES,
    build_model,
    deep_supervision_weights,
    e2enet_fusion_targets,
    network_stride,
    output_list,
)
from monai.losses import DiceCELoss
from planning import PLANS_FILE, Plans, default_preprocessed_dir, fold_cases, plan_and_preprocess
from plots import fusion_connection_proportions, plot_fusion_connections, plot_progress
from preprocessing import preprocessed_data_dir
from torch import nn
from tqdm import tqdm

import sparsefuse as sf

# -------------------------------------------------------------------------------------------------- settings
# Per preset: network and the run length / patch budget a preset is meant for. Flags override them.
PRESET_RUNS = {
    "paper": dict(
        epochs=1000,
        iters_per_epoch=250,
        val_iters=50,
        patch_voxel_budget=128**3,
        batch_voxel_budget=2 * 128**3,
        augment="nnunet",
        grace_updates=0,
    ),
    "cpu-demo": dict(
        epochs=8,
        iters_per_epoch=25,
        val_iters=4,
        patch_voxel_budget=48**3,
        batch_voxel_budget=2 * 48**3,
        augment="light",
        grace_updates=1,
    ),
}
LR, MOMENTUM, WEIGHT_DECAY, POLY_EXPONENT, GRAD_CLIP = 0.01, 0.99, 3e-5, 0.9, 12.0
DROP_FRACTION = 0.5  # the paper's death rate alpha
PAPER_UPDATE_EVERY = 1200
# With AMP a non-finite loss is the GradScaler's business (it skips the step and halves the scale); only a scale
# halved ~30 times from 2**16 without recovering means the run itself diverged.
MIN_LOSS_SCALE = 1e-4
# What must match for --resume to continue a run rather than silently start another experiment.
RESUME_KEYS = (
    "arch",
    "preset",
    "fold",
    "density",
    "static",
    "epochs",
    "iters_per_epoch",
    "update_every",
    "grace_updates",
    "augment",
    "mirror_axes",
    "model_options",
    "seed",
    "preprocessing_hash",
    "patch_size",
    "batch_size",
    "world_size",
)
# What predict.py needs to rebuild the network, written to RUN_DIR/config.json.
MODEL_KEYS = ("arch", "preset", "in_channels", "num_classes", "model_options")


def model_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with a JSON value (``stem=full``, ``base_channels=12``, ``shift=false``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. base_channels=12), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare word such as stem=full


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="nnU-Net raw dataset folder (DatasetXXX_Name)")
    p.add_argument("--out", type=Path, required=True, help="run folder; fold results go to RUN_DIR/fold_F")
    p.add_argument("--fold", default="0", help="0-4, or 'all' to train on every case")
    p.add_argument("--density", type=float, default=0.2, help="fraction of fusion kernels kept (1.0 = dense)")
    p.add_argument("--preset", choices=sorted(PRESET_RUNS), default="cpu-demo")
    p.add_argument(
        "--arch",
        choices=ARCHITECTURES,
        default="e2enet",
        help="dynunet: MONAI DynUNet configured like nnU-Net 3d_fullres, the dense baseline",
    )
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--iters-per-epoch", type=int, default=None)
    p.add_argument("--val-iters", type=int, default=None, help="validation batches per epoch (pseudo-Dice)")
    p.add_argument("--update-every", type=int, default=None, help="iterations between topology updates")
    p.add_argument(
        "--grace-updates",
        type=int,
        default=None,
        help="regrown kernels cannot be dropped at the next N updates (paper: 0; cpu-demo: 1)",
    )
    p.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        default=None,
        help="training augmentation: nnunet (the authors' moreDA, the paper preset's), light (intensity and "
        "mirroring, the cpu-demo preset's) or none",
    )
    p.add_argument(
        "--mirror-axes",
        type=int,
        nargs="*",
        choices=ALL_AXES,
        default=list(ALL_AXES),
        help="image array axes (as stored in the NIfTI) to mirror; give none (a bare --mirror-axes) where left "
        "and right are different classes",
    )
    p.add_argument(
        "--model-option",
        type=model_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an E2ENet constructor argument of the preset (repeatable), e.g. stem=shift base_channels=8",
    )
    p.add_argument("--static", action="store_true", help="fixed random mask: the static-sparsity ablation")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/fold_F/checkpoint_latest.pth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preprocessed", type=Path, default=None, help="preprocessed folder (default: beside the data)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-amp", action="store_true", help="float32 on CUDA too (CPU runs are always float32)")
    args = p.parse_args(argv)
    for key, value in PRESET_RUNS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if not 0.0 < args.density <= 1.0:
        p.error(f"--density must be in (0, 1], got {args.density}")
    if args.arch != "e2enet" and (args.density < 1.0 or args.static):
        p.error("--density < 1 and --static sparsify E2ENet's fusion layers; use them with --arch e2enet")
    if args.epochs < 1 or args.iters_per_epoch < 1:
        p.error("--epochs and --iters-per-epoch must be positive")
    if args.grace_updates < 0:
        p.error(f"--grace-updates must be >= 0, got {args.grace_updates}")
    args.model_options = dict(args.model_option)
    if args.model_options and args.arch != "e2enet":
        p.error("--model-option sets E2ENet arguments; use it with --arch e2enet")
    total = args.epochs * args.iters_per_epoch
    args.update_every = args.update_every or min(PAPER_UPDATE_EVERY, max(1, total // 50))
    return args


# ------------------------------------------------------------------------------------------------- helpers
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


def prepare_data(args: argparse.Namespace) -> tuple[Plans, Path, list[str], list[str]]:
    """Plan (patch a multiple of the network's stride), preprocess (cached) and split: plans, data folder, ids."""
    with torch.device("meta"):  # only the stride is needed here
        stride = network_stride(build_model(args.arch, args.preset, in_channels=1, num_classes=2))
    preprocessed = args.preprocessed or default_preprocessed_dir(args.data)
    plans, _ = plan_and_preprocess(
        args.data,
        preprocessed,
        network_stride=list(stride),
        patch_voxel_budget=args.patch_voxel_budget,
        batch_voxel_budget=args.batch_voxel_budget,
    )
    train_ids, val_ids = fold_cases(preprocessed, sorted(plans.fingerprint.case_ids), args.fold)
    return plans, preprocessed_data_dir(preprocessed, plans), train_ids, val_ids


def run_config(args: argparse.Namespace, plans: Plans, world_size: int, amp: bool) -> dict:
    """What defines the run, saved in every checkpoint (``RESUME_KEYS`` must match to resume it)."""
    return {
        "arch": args.arch,
        "preset": args.preset,
        "fold": str(args.fold),
        "density": args.density,
        "static": args.static,
        "epochs": args.epochs,
        "iters_per_epoch": args.iters_per_epoch,
        "update_every": args.update_every,
        "grace_updates": args.grace_updates,
        "augment": args.augment,
        "mirror_axes": list(args.mirror_axes),
        "model_options": args.model_options,
        "seed": args.seed,
        "in_channels": len(plans.channel_names),
        "num_classes": plans.num_classes,
        "preprocessing_hash": plans.preprocessing_hash,
        "patch_size": plans.patch_size,
        "batch_size": plans.batch_size,
        "dataset": str(args.data),
        "world_size": world_size,
        "amp": amp,
    }


def build_network(args: argparse.Namespace, plans: Plans, procs: Processes) -> tuple[nn.Module, nn.Module]:
    """The network on the device, and the module training steps call: the network, or its DDP wrapper under torchrun.

    DDP averages the gradients over the ranks; validation and saving use the network itself.
    """
    model = build_model(
        args.arch,
        args.preset,
        in_channels=len(plans.channel_names),
        num_classes=plans.num_classes,
        **args.model_options,
    )
    model = model.to(procs.device)
    model = model.to(memory_format=torch.channels_last_3d)  # (1,3,3) convs run up to 3x faster in this layout
    if not procs.distributed:
        return model, model
    device_ids = [procs.device.index] if procs.device.type == "cuda" else None
    # 1x1x1 kernels in channels_last_3d: their gradients' size-1 dims carry other (meaningless) strides.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def build_sparsity(args, model, optimizer, scaler, total_iters: int) -> sf.DynamicSparsity | None:
    """DSFF on the fusion layers (static with --static), or None for a dense run."""
    if args.density >= 1.0:
        return None
    schedule = (
        None
        if args.static
        else sf.schedules.CosineDecay(every=args.update_every, alpha=DROP_FRACTION, total_steps=total_iters)
    )
    return sf.DynamicSparsity(
        model,
        optimizer,
        density=args.density,
        targets=e2enet_fusion_targets,
        granularity="kernel",
        scorer=sf.scorers.L1(),
        growth=sf.growth.Random(),
        schedule=schedule,
        seed=args.seed,
        scaler=scaler,
        grace_updates=args.grace_updates,
    )


def poly_lr(epoch: int, epochs: int) -> float:
    return LR * (1 - epoch / epochs) ** POLY_EXPONENT


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
    """Stops the run, on every rank, once training has diverged; the message names the last good checkpoint."""

    def __init__(self, amp: bool, distributed: bool, checkpoint_path: Path):
        self.amp, self.distributed, self.checkpoint_path = amp, distributed, checkpoint_path

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
                f"epoch {epoch}; training stopped. The last good checkpoint is {self.checkpoint_path} "
                f"(epoch {epoch - 1}); lower the learning rate or check the data for extreme values"
            )

    def check_scale(self, scaler: torch.amp.GradScaler, epoch: int) -> None:
        """After the step: with AMP, a loss scale that collapsed means the gradients stay non-finite."""
        if self.amp and scaler.get_scale() < MIN_LOSS_SCALE:
            raise SystemExit(
                f"the AMP loss scale collapsed to {scaler.get_scale():.1e} at epoch {epoch}: the "
                f"gradients stay non-finite, training stopped. The last good checkpoint is "
                f"{self.checkpoint_path} (epoch {epoch - 1}); lower the learning rate, check the data "
                f"for extreme values, or try --no-amp"
            )


@torch.no_grad()
def validate(model, loader: TrainLoader, loss_fn, iters: int, num_classes: int, device, autocast):
    """Mean loss and the TP, FP, FN counts per foreground class, shape (3, K - 1), over ``iters`` batches."""
    model.eval()
    counts = torch.zeros(3, num_classes - 1)
    losses = []
    for _ in range(iters):
        image, label = to_device(next(loader), device)
        with autocast():
            logits = model(image)
        losses.append(loss_fn(logits, label).item())
        pred, ref = logits.argmax(1).cpu(), label[:, 0].cpu()
        for c in range(1, num_classes):
            counts[0, c - 1] += ((pred == c) & (ref == c)).sum()
            counts[1, c - 1] += ((pred == c) & (ref != c)).sum()
            counts[2, c - 1] += ((pred != c) & (ref == c)).sum()
    return float(np.mean(losses)), counts


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


def pseudo_dice(counts: torch.Tensor) -> list[float]:
    """nnU-Net's pseudo-Dice per foreground class: Dice of the TP/FP/FN summed over the validation batches."""
    tp, fp, fn = counts
    return (2 * tp / (2 * tp + fp + fn).clamp_min(1)).tolist()


def rank_state(train_loader: TrainLoader, val_loader: TrainLoader, device: torch.device) -> dict:
    """This rank's loaders and RNG: what --resume restores on each rank."""
    return {
        "train_loader": train_loader.state_dict(),
        "val_loader": val_loader.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def gather_rank_states(own: dict, procs: Processes) -> list[dict]:
    """Every rank's :func:`rank_state` (all ranks call this), for rank 0's checkpoint."""
    if not procs.distributed:
        return [own]
    ranks = [None] * procs.world_size
    dist.all_gather_object(ranks, own)
    return ranks


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save, atomically: a crash, even SIGKILL mid-save, leaves the previous checkpoint or this one."""
    with atomic_write(path) as f:
        torch.save(state, f)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated or not a torch file: say which file and what to do
        raise SystemExit(
            f"cannot read checkpoint {path} ({type(error).__name__}: {error}); it is damaged or not "
            f"a checkpoint of train.py. Delete it to start over, or restore a backup."
        ) from error


def check_resumable(saved: dict, config: dict, path: Path) -> None:
    """Refuse to resume a checkpoint of another configuration or another number of processes."""
    if saved["world_size"] != config["world_size"]:
        raise SystemExit(
            f"{path} was written by a run on {saved['world_size']} process(es), this one has "
            f"{config['world_size']}: resume with the same world size (torchrun --nproc_per_node "
            f"{saved['world_size']}, or plain python for 1), since each rank's data loader state "
            f"is restored; or use another --out to start a new run"
        )
    different = {k: (saved.get(k), config[k]) for k in RESUME_KEYS if saved.get(k) != config[k]}
    if different:
        raise SystemExit(
            f"{path} was written by another configuration: "
            + ", ".join(f"{k} saved {a!r} vs now {b!r}" for k, (a, b) in different.items())
            + "; rerun with the saved settings, or use another --out to start a new run"
        )


def resume(
    path: Path,
    config: dict,
    procs: Processes,
    model,
    optimizer,
    sparsity,
    scaler,
    train_loader: TrainLoader,
    val_loader: TrainLoader,
) -> tuple[list[dict], int]:
    """Restore everything a checkpoint holds; returns the log so far and the epoch to continue with."""
    ckpt = load_checkpoint(path)
    check_resumable(ckpt["config"], config, path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if sparsity is not None:
        sparsity.load_state_dict(ckpt["sparsity"])
    if ckpt.get("scaler"):  # saved by an AMP run; a disabled scaler ignores it
        scaler.load_state_dict(ckpt["scaler"])
    own = ckpt["ranks"][procs.rank]
    train_loader.load_state_dict(own["train_loader"])
    val_loader.load_state_dict(own["val_loader"])
    torch.set_rng_state(own["torch_rng"])
    if own.get("cuda_rng") is not None and procs.device.type == "cuda":
        torch.cuda.set_rng_state(own["cuda_rng"], procs.device)
    return ckpt["log"], ckpt["epoch"] + 1


def write_log(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    procs = setup_distributed()
    device, distributed = procs.device, procs.distributed
    log = print if procs.is_main else (lambda *_, **__: None)  # prints, files and plots come from rank 0 only
    amp = device.type == "cuda" and not args.no_amp  # float16 autocast + GradScaler; CPU stays float32
    fold_dir = args.out / f"fold_{args.fold}"
    checkpoint_path = fold_dir / "checkpoint_latest.pth"
    if procs.is_main:
        fold_dir.mkdir(parents=True, exist_ok=True)
    elif distributed:
        dist.barrier()  # rank 0 writes plans and preprocesses first; the others then find it all cached

    # ---- data
    plans, data_dir, train_ids, val_ids = prepare_data(args)
    config = run_config(args, plans, procs.world_size, amp)
    if procs.is_main:
        plans.save(args.out / PLANS_FILE)
        write_json(args.out / "config.json", {k: config[k] for k in MODEL_KEYS})
        if distributed:
            dist.barrier()

    # ---- model, optimizer, sparsity, loss, loaders
    torch.manual_seed(args.seed)
    model, train_model = build_network(args, plans, procs)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    total_iters = args.epochs * args.iters_per_epoch
    # Disabled (a pass-through, bit-identical to plain fp32 steps) unless AMP is on.
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if amp else contextlib.nullcontext
    sparsity = build_sparsity(args, model, optimizer, scaler, total_iters)
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5)
    # Each rank draws its own batches (like a DistributedSampler's shards): global batch = world_size x batch_size.
    train_loader = TrainLoader(
        data_dir,
        train_ids,
        plans,
        seed=args.seed + 1000 * procs.rank,
        augment=args.augment,
        mirror_axes=args.mirror_axes,
    )
    val_loader = TrainLoader(data_dir, val_ids, plans, seed=args.seed + 1 + 1000 * procs.rank, augment="none")
    guard = DivergenceGuard(amp, distributed, checkpoint_path)

    rows, start_epoch = [], 0
    if args.resume and checkpoint_path.is_file():
        rows, start_epoch = resume(
            checkpoint_path, config, procs, model, optimizer, sparsity, scaler, train_loader, val_loader
        )
        log(f"resumed {checkpoint_path} at epoch {start_epoch}")
    elif args.resume:
        log(f"--resume: no checkpoint at {checkpoint_path}, starting from scratch")
    processes = f"; {procs.world_size} processes (global batch {procs.world_size * plans.batch_size})"
    log(
        f"{args.arch} {args.preset}: {sum(p.numel() for p in model.parameters()):,} dense params, "
        f"{'static' if args.static else 'dynamic'} density {args.density}, fold {args.fold} "
        f"({len(train_ids)} train / {len(val_ids)} val cases), patch {plans.patch_size} x batch "
        f"{plans.batch_size}, {total_iters} iterations, topology update every {args.update_every}"
        + (processes if distributed else "")
        + ("; mixed precision (float16)" if amp else "")
    )

    # ---- train
    for epoch in range(start_epoch, args.epochs):
        started = time.perf_counter()
        lr = poly_lr(epoch, args.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        losses, reports = [], []
        bar = tqdm(
            range(args.iters_per_epoch),
            desc=f"epoch {epoch}",
            disable=args.no_progress or not procs.is_main,
            leave=False,
        )
        for _ in bar:
            image, label = to_device(next(train_loader), device)
            with autocast():
                loss = deep_supervision_loss(loss_fn, output_list(train_model(image)), label)
            guard.check_loss(loss, epoch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients (all these scaler calls are no-ops without AMP)
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            scaler.step(optimizer)  # skips the step if the fp16 gradients overflowed
            scaler.update()
            guard.check_scale(scaler, epoch)
            report = sparsity.step() if sparsity is not None else None  # None too for a step the scaler skipped
            if report is not None:
                reports.append(report)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")

        val_loss, counts = validate(model, val_loader, loss_fn, args.val_iters, plans.num_classes, device, autocast)
        train_loss, val_loss, counts = reduce_over_ranks(float(np.mean(losses)), val_loss, counts, procs)
        if distributed and sparsity is not None:
            sparsity.verify()  # raises on every rank if their masks have drifted apart
        dice = pseudo_dice(counts)
        survivals = [r.survival for r in reports if r.survival is not None]
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "pseudo_dice": float(np.mean(dice)),
            **{f"dice_{c + 1}": d for c, d in enumerate(dice)},
            "density": sparsity.density() if sparsity else 1.0,
            "lr": lr,
            "topology_updates": len(reports),
            # Of the kernels grown at one update, the share the next update kept; and the share of all fusion
            # kernels ever active (ITOP's exploration rate). Empty when this epoch made no update.
            "regrown_survival": float(np.mean(survivals)) if survivals else "",
            "exploration": reports[-1].exploration if reports else "",
            "seconds": time.perf_counter() - started,
        }
        rows.append(row)
        log(
            f"epoch {epoch}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, pseudo-Dice "
            f"{row['pseudo_dice']:.4f}, density {row['density']:.4f}, lr {lr:.5f}, {len(reports)} updates, "
            f"{row['seconds']:.1f} s"
            + (f", masks verified on {procs.world_size} ranks" if distributed and sparsity is not None else "")
        )

        ranks = gather_rank_states(rank_state(train_loader, val_loader, device), procs)
        if not procs.is_main:
            continue  # the rest of the epoch writes files: rank 0 only
        # Checkpoint first: the log on disk never runs ahead of what --resume restores.
        save_checkpoint(
            {
                "epoch": epoch,
                "config": config,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "sparsity": sparsity.state_dict() if sparsity else None,
                "scaler": scaler.state_dict(),
                "ranks": ranks,
                "log": rows,
            },
            checkpoint_path,
        )
        write_log(rows, fold_dir / "log.csv")
        plot_progress(rows, [r["epoch"] for r in rows if r["topology_updates"]], fold_dir / "progress.png")

    # ---- final artefacts
    if procs.is_main:
        save_checkpoint(
            {
                "config": config,
                "model": model.state_dict(),
                "sparsity": sparsity.state_dict() if sparsity else None,
                "log": rows,
            },
            fold_dir / "checkpoint_final.pth",
        )
        proportions = fusion_connection_proportions(model, sparsity)
        if proportions:
            plot_fusion_connections(proportions, fold_dir / "fusion_connections.png")
            write_json(fold_dir / "fusion_connections.json", proportions, indent=1)
    if distributed:
        dist.barrier()  # no rank leaves before rank 0 has written the final files
        dist.destroy_process_group()
    log(f"done: {fold_dir}")
    return {"fold_dir": fold_dir, "log": rows, "model": model, "sparsity": sparsity, "plans": plans, "config": config}


if __name__ == "__main__":
    main()
