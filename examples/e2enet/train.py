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
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.losses import DiceCELoss
from tqdm import tqdm

import sparsefuse as sf
from loader import TrainLoader, to_network_layout
from model import ARCHITECTURES, build_model, deep_supervision_weights, e2enet_fusion_targets, network_stride, output_list
from planning import default_preprocessed_dir, fold_cases, plan_and_preprocess
from preprocessing import preprocessed_data_dir

# -------------------------------------------------------------------------------------------------- settings
# Per preset: network and the run length / patch budget a preset is meant for. Flags override them.
PRESET_RUNS = {
    "paper": dict(epochs=1000, iters_per_epoch=250, val_iters=50, patch_voxel_budget=128**3,
                  batch_voxel_budget=2 * 128**3),
    "cpu-demo": dict(epochs=8, iters_per_epoch=25, val_iters=4, patch_voxel_budget=48**3,
                     batch_voxel_budget=2 * 48**3),
}
LR, MOMENTUM, WEIGHT_DECAY, POLY_EXPONENT, GRAD_CLIP = 0.01, 0.99, 3e-5, 0.9, 12.0
DROP_FRACTION = 0.5  # the paper's death rate alpha
PAPER_UPDATE_EVERY = 1200
# With AMP a non-finite loss is the GradScaler's business (it skips the step and halves the scale); only a scale
# halved ~30 times from 2**16 without recovering means the run itself diverged.
MIN_LOSS_SCALE = 1e-4
# What must match for --resume to continue a run rather than silently start another experiment.
RESUME_KEYS = ("arch", "preset", "fold", "density", "static", "epochs", "iters_per_epoch", "update_every", "seed",
               "preprocessing_hash", "patch_size", "batch_size", "world_size")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="nnU-Net raw dataset folder (DatasetXXX_Name)")
    p.add_argument("--out", type=Path, required=True, help="run folder; fold results go to RUN_DIR/fold_F")
    p.add_argument("--fold", default="0", help="0-4, or 'all' to train on every case")
    p.add_argument("--density", type=float, default=0.2, help="fraction of fusion kernels kept (1.0 = dense)")
    p.add_argument("--preset", choices=sorted(PRESET_RUNS), default="cpu-demo")
    p.add_argument("--arch", choices=ARCHITECTURES, default="e2enet",
                   help="dynunet: MONAI DynUNet configured like nnU-Net 3d_fullres, the dense baseline")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--iters-per-epoch", type=int, default=None)
    p.add_argument("--val-iters", type=int, default=None, help="validation batches per epoch (pseudo-Dice)")
    p.add_argument("--update-every", type=int, default=None, help="iterations between topology updates")
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
    total = args.epochs * args.iters_per_epoch
    args.update_every = args.update_every or min(PAPER_UPDATE_EVERY, max(1, total // 50))
    return args


# ------------------------------------------------------------------------------------------------- helpers
def poly_lr(epoch: int, epochs: int) -> float:
    return LR * (1 - epoch / epochs) ** POLY_EXPONENT


def deep_supervision_loss(loss_fn, outputs: list[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
    """Weighted sum over the outputs (full resolution first) against nearest-downsampled labels."""
    weights = deep_supervision_weights(len(outputs))
    total = 0.0
    for weight, logits in zip(weights, outputs):
        target = label if logits.shape[2:] == label.shape[2:] else \
            F.interpolate(label.float(), size=logits.shape[2:], mode="nearest").long()
        total = total + weight * loss_fn(logits, target)
    return total


def save_atomic(obj, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, rename: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated or not a torch file: say which file and what to do
        raise SystemExit(f"cannot read checkpoint {path} ({type(error).__name__}: {error}); it is damaged or not "
                         f"a checkpoint of train.py. Delete it to start over, or restore a backup.") from error


def fusion_connection_proportions(model, sparsity) -> dict[str, dict[str, float]]:
    """Share of active kernels of each node's first fusion conv fed by the forward, up and down inputs.

    The first conv of node x(i, j) reads concat[forward (c_i), up (c_i), down (c_{i-1}, levels i >= 1)].
    """
    proportions = {}
    if sparsity is None:
        return proportions
    masks = sparsity.masks  # a copy of every mask: take it once
    for key, node in model.fusion.items():
        name = f"fusion.{key}.convs.0.conv.weight"
        if name not in masks:
            continue
        per_input = masks[name].sum(0)  # active kernels per input channel
        c = node.up.out_channels
        flows = {"forward": per_input[:c].sum(), "up": per_input[c:2 * c].sum(), "down": per_input[2 * c:].sum()}
        total = float(per_input.sum())
        proportions[key] = {flow: float(v) / total for flow, v in flows.items()}
    return proportions


def plot_progress(rows: list[dict], update_epochs: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[2, 1])
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train loss", color="tab:blue")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], label="val loss", color="tab:red")
    ax_loss.set_ylabel("loss")
    ax_dice = ax_loss.twinx()
    ax_dice.plot(epochs, [r["pseudo_dice"] for r in rows], label="pseudo Dice", color="tab:green", ls="--")
    ax_dice.set_ylabel("pseudo Dice")
    ax_dice.set_ylim(0, 1)
    for e in update_epochs:
        ax_loss.axvline(e, color="grey", alpha=0.15, lw=1)
    handles = ax_loss.get_legend_handles_labels()[0] + ax_dice.get_legend_handles_labels()[0]
    ax_loss.legend(handles, [h.get_label() for h in handles], loc="upper right")
    ax_loss.set_title("E2ENet training (grey lines: epochs with a topology update)")
    ax_lr.plot(epochs, [r["lr"] for r in rows], color="black")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_fusion_connections(proportions: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = sorted(proportions, key=lambda k: (int(k.split("_")[1]), int(k.split("_")[0])))
    fig, ax = plt.subplots(figsize=(max(7, 0.7 * len(nodes) + 2), 4))
    bottom = np.zeros(len(nodes))
    for flow, color in (("up", "tab:orange"), ("forward", "tab:blue"), ("down", "tab:green")):
        values = np.array([proportions[n][flow] for n in nodes])
        ax.bar(nodes, values, bottom=bottom, label=flow, color=color)
        bottom += values
    ax.set_xlabel("fusion node x(level, stage)")
    ax.set_ylabel("share of active kernels")
    ax.set_title("Active fusion kernels by input flow (first conv of each node)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # ---- processes: one, or one per GPU (or CPU worker) under torchrun, which sets WORLD_SIZE, RANK, LOCAL_RANK
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    distributed = world_size > 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        # Long timeout: the other ranks wait at a barrier while rank 0 preprocesses a new dataset.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    is_main = rank == 0
    log = print if is_main else (lambda *_, **__: None)  # prints, files and plots come from rank 0 only
    amp = device.type == "cuda" and not args.no_amp  # float16 autocast + GradScaler; CPU stays float32
    fold_dir = args.out / f"fold_{args.fold}"
    checkpoint_path = fold_dir / "checkpoint_latest.pth"
    if is_main:
        fold_dir.mkdir(parents=True, exist_ok=True)
    elif distributed:
        dist.barrier()  # rank 0 writes plans and preprocesses first; the others then find it all cached

    # ---- data: plan (patch a multiple of the network's stride), preprocess (cached), split
    with torch.device("meta"):  # only the stride is needed here
        stride = network_stride(build_model(args.arch, args.preset, in_channels=1, num_classes=2))
    preprocessed = args.preprocessed or default_preprocessed_dir(args.data)
    plans, _ = plan_and_preprocess(args.data, preprocessed, network_stride=list(stride),
                                   patch_voxel_budget=args.patch_voxel_budget,
                                   batch_voxel_budget=args.batch_voxel_budget)
    data_dir = preprocessed_data_dir(preprocessed, plans)
    case_ids = sorted(plans.fingerprint.case_ids)
    train_ids, val_ids = fold_cases(preprocessed, case_ids, args.fold)
    in_channels, num_classes = len(plans.channel_names), plans.num_classes
    config = {
        "arch": args.arch, "preset": args.preset, "fold": str(args.fold), "density": args.density, "static": args.static,
        "epochs": args.epochs, "iters_per_epoch": args.iters_per_epoch, "update_every": args.update_every,
        "seed": args.seed, "in_channels": in_channels, "num_classes": num_classes,
        "preprocessing_hash": plans.preprocessing_hash, "patch_size": plans.patch_size,
        "batch_size": plans.batch_size, "dataset": str(args.data), "world_size": world_size, "amp": amp,
    }
    if is_main:
        (args.out / "plans.json").write_text(json.dumps(plans.to_json(), indent=1))
        (args.out / "config.json").write_text(
            json.dumps({k: config[k] for k in ("arch", "preset", "in_channels", "num_classes")}))
        if distributed:
            dist.barrier()

    # ---- model, optimizer, sparsity, loss
    torch.manual_seed(args.seed)
    model = build_model(args.arch, args.preset, in_channels=in_channels, num_classes=num_classes).to(device)
    model = model.to(memory_format=torch.channels_last_3d)  # (1,3,3) convs run up to 3x faster in this layout
    # Training steps go through DDP (it averages the gradients over ranks); validation and saving use the model.
    train_model = model
    if distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        # 1x1x1 kernels in channels_last_3d: their gradients' size-1 dims carry other (meaningless) strides.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True,
                                weight_decay=WEIGHT_DECAY)
    total_iters = args.epochs * args.iters_per_epoch
    # Disabled (a pass-through, bit-identical to plain fp32 steps) unless AMP is on.
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if amp else contextlib.nullcontext
    sparsity = None
    if args.density < 1.0:
        schedule = None if args.static else sf.schedules.CosineDecay(
            every=args.update_every, alpha=DROP_FRACTION, total_steps=total_iters)
        sparsity = sf.DynamicSparsity(model, optimizer, density=args.density, targets=e2enet_fusion_targets,
                                      granularity="kernel", scorer=sf.scorers.L1(), growth=sf.growth.Random(),
                                      schedule=schedule, seed=args.seed, scaler=scaler)
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1e-5, smooth_dr=1e-5)
    # Each rank draws its own batches (like a DistributedSampler's shards): global batch = world_size x batch_size.
    train_loader = TrainLoader(data_dir, train_ids, plans, seed=args.seed + 1000 * rank)
    val_loader = TrainLoader(data_dir, val_ids, plans, seed=args.seed + 1 + 1000 * rank, augment=False)

    # ---- resume
    rows: list[dict] = []
    start_epoch = 0
    if args.resume and checkpoint_path.is_file():
        ckpt = load_checkpoint(checkpoint_path)
        saved = ckpt["config"]
        if saved["world_size"] != world_size:
            raise SystemExit(f"{checkpoint_path} was written by a run on {saved['world_size']} process(es), this one "
                             f"has {world_size}: resume with the same world size (torchrun --nproc_per_node "
                             f"{saved['world_size']}, or plain python for 1), since each rank's data loader state "
                             f"is restored; or use another --out to start a new run")
        different = {k: (saved.get(k), config[k]) for k in RESUME_KEYS if saved.get(k) != config[k]}
        if different:
            raise SystemExit(f"{checkpoint_path} was written by another configuration: "
                             + ", ".join(f"{k} saved {a!r} vs now {b!r}" for k, (a, b) in different.items())
                             + "; rerun with the saved settings, or use another --out to start a new run")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if sparsity is not None:
            sparsity.load_state_dict(ckpt["sparsity"])
        if ckpt.get("scaler"):  # saved by an AMP run; a disabled scaler ignores it
            scaler.load_state_dict(ckpt["scaler"])
        own = ckpt["ranks"][rank]  # this rank's loaders and RNG
        train_loader.load_state_dict(own["train_loader"])
        val_loader.load_state_dict(own["val_loader"])
        torch.set_rng_state(own["torch_rng"])
        if own.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda_rng"], device)
        rows, start_epoch = ckpt["log"], ckpt["epoch"] + 1
        log(f"resumed {checkpoint_path} at epoch {start_epoch}")
    elif args.resume:
        log(f"--resume: no checkpoint at {checkpoint_path}, starting from scratch")

    log(f"{args.arch} {args.preset}: {sum(p.numel() for p in model.parameters()):,} dense params, "
          f"{'static' if args.static else 'dynamic'} density {args.density}, fold {args.fold} "
          f"({len(train_ids)} train / {len(val_ids)} val cases), patch {plans.patch_size} x batch "
          f"{plans.batch_size}, {total_iters} iterations, topology update every {args.update_every}"
        + (f"; {world_size} processes (global batch {world_size * plans.batch_size})" if distributed else "")
        + ("; mixed precision (float16)" if amp else ""))

    # ---- train
    for epoch in range(start_epoch, args.epochs):
        started = time.perf_counter()
        lr = poly_lr(epoch, args.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        losses, updates = [], 0
        bar = tqdm(range(args.iters_per_epoch), desc=f"epoch {epoch}", disable=args.no_progress or not is_main,
                   leave=False)
        for _ in bar:
            batch = next(train_loader)
            image = to_network_layout(batch["image"]).to(device, memory_format=torch.channels_last_3d)
            label = to_network_layout(batch["label"]).to(device)
            with autocast():
                loss = deep_supervision_loss(loss_fn, output_list(train_model(image)), label)
            if not amp:  # in fp32 a non-finite loss means divergence; every rank stops together
                finite = torch.isfinite(loss.detach()).float()
                if distributed:
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if not finite:
                    raise SystemExit(f"non-finite loss ({loss.item()}{' on some rank' if distributed else ''}) at "
                                     f"epoch {epoch}; training stopped. The last good checkpoint is {checkpoint_path} "
                                     f"(epoch {epoch - 1}); lower the learning rate or check the data for extreme "
                                     f"values")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients (all these scaler calls are no-ops without AMP)
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            scaler.step(optimizer)  # skips the step if the fp16 gradients overflowed
            scaler.update()
            if amp and scaler.get_scale() < MIN_LOSS_SCALE:
                raise SystemExit(f"the AMP loss scale collapsed to {scaler.get_scale():.1e} at epoch {epoch}: the "
                                 f"gradients stay non-finite, training stopped. The last good checkpoint is "
                                 f"{checkpoint_path} (epoch {epoch - 1}); lower the learning rate, check the data for "
                                 f"extreme values, or try --no-amp")
            if sparsity is not None and sparsity.step() is not None:  # a step the scaler skipped does not count
                updates += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")

        # pseudo-Dice as nnU-Net: TP/FP/FN summed over the validation batches, then Dice per class
        model.eval()
        tp = torch.zeros(num_classes - 1)
        fp, fn, val_losses = tp.clone(), tp.clone(), []
        with torch.no_grad():
            for _ in range(args.val_iters):
                batch = next(val_loader)
                image = to_network_layout(batch["image"]).to(device, memory_format=torch.channels_last_3d)
                label = to_network_layout(batch["label"]).to(device)
                with autocast():
                    logits = model(image)
                val_losses.append(loss_fn(logits, label).item())
                pred = logits.argmax(1).cpu()
                ref = label[:, 0].cpu()
                for c in range(1, num_classes):
                    tp[c - 1] += ((pred == c) & (ref == c)).sum()
                    fp[c - 1] += ((pred == c) & (ref != c)).sum()
                    fn[c - 1] += ((pred != c) & (ref == c)).sum()
        train_loss, val_loss = float(np.mean(losses)), float(np.mean(val_losses))
        if distributed:  # pseudo-Dice from the TP/FP/FN summed over ranks; losses averaged over ranks
            counts = torch.stack([tp, fp, fn]).double().to(device)
            dist.all_reduce(counts)
            tp, fp, fn = counts.cpu()
            mean_losses = torch.tensor([train_loss, val_loss], dtype=torch.float64, device=device)
            dist.all_reduce(mean_losses)
            train_loss, val_loss = (mean_losses / world_size).tolist()
            if sparsity is not None:
                sparsity.verify()  # raises on every rank if their masks have drifted apart
        dice = (2 * tp / (2 * tp + fp + fn).clamp_min(1)).tolist()
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
               "pseudo_dice": float(np.mean(dice)), **{f"dice_{c + 1}": d for c, d in enumerate(dice)},
               "density": sparsity.density() if sparsity else 1.0, "lr": lr, "topology_updates": updates,
               "seconds": time.perf_counter() - started}
        rows.append(row)
        log(f"epoch {epoch}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, pseudo-Dice "
            f"{row['pseudo_dice']:.4f}, density {row['density']:.4f}, lr {lr:.5f}, {updates} updates, "
            f"{row['seconds']:.1f} s"
            + (f", masks verified on {world_size} ranks" if distributed and sparsity is not None else ""))

        # Every rank's loader and RNG state goes into rank 0's checkpoint, so --resume continues each rank exactly.
        own = {"train_loader": train_loader.state_dict(), "val_loader": val_loader.state_dict(),
               "torch_rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        ranks = [own]
        if distributed:
            ranks = [None] * world_size
            dist.all_gather_object(ranks, own)
        if not is_main:
            continue  # the rest of the epoch writes files: rank 0 only
        # Checkpoint first: the log on disk never runs ahead of what --resume restores.
        save_atomic({"epoch": epoch, "config": config, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "sparsity": sparsity.state_dict() if sparsity else None,
                     "scaler": scaler.state_dict(), "ranks": ranks, "log": rows}, checkpoint_path)
        with open(fold_dir / "log.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
            writer.writeheader()
            writer.writerows(rows)
        plot_progress(rows, [r["epoch"] for r in rows if r["topology_updates"]], fold_dir / "progress.png")

    # ---- final artefacts
    if is_main:
        save_atomic({"config": config, "model": model.state_dict(),
                     "sparsity": sparsity.state_dict() if sparsity else None, "log": rows},
                    fold_dir / "checkpoint_final.pth")
        proportions = fusion_connection_proportions(model, sparsity)
        if proportions:
            plot_fusion_connections(proportions, fold_dir / "fusion_connections.png")
            (fold_dir / "fusion_connections.json").write_text(json.dumps(proportions, indent=1))
    if distributed:
        dist.barrier()  # no rank leaves before rank 0 has written the final files
        dist.destroy_process_group()
    log(f"done: {fold_dir}")
    return {"fold_dir": fold_dir, "log": rows, "model": model, "sparsity": sparsity, "plans": plans,
            "config": config}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
