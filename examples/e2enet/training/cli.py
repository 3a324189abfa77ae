"""Train E2ENet with dynamic sparse feature fusion on an nnU-Net-layout dataset.

    python examples/e2enet/train.py --data DATASET_DIR --out RUN_DIR --fold 0 --density 0.2 --preset cpu-demo
        [--epochs E] [--iters-per-epoch N] [--update-every K] [--resume | --overwrite] [--static] [--no-progress]
        [--arch e2enet|dynunet] [--no-amp]
    torchrun --nproc_per_node N examples/e2enet/train.py ...   (same flags; DDP, nccl on GPUs, gloo on CPU)

The authors' recipe, corrected (see docs/e2enet.md): SGD lr 0.01 (``--lr``; the cpu-demo preset: 0.04), momentum
0.99, Nesterov, weight decay 3e-5, poly(0.9) learning rate set once per epoch, Dice + CE with deep supervision
(8/15, 4/15, 2/15, 1/15), gradient norm clipped to 12, and DSFF: the fusion conv and transposed-conv weights keep a
fraction ``density`` of their kernels; every ``update_every`` iterations the lowest-L1 kernels are dropped and as
many regrown at random, the number following a cosine decay. The authors' `--fix` flag bug made their README run
static; here the run is dynamic unless ``--static`` asks for the static ablation. ``--arch dynunet`` trains the
dense baseline (MONAI DynUNet configured like nnU-Net 3d_fullres) with the same recipe.

Settings live in one typed :class:`~e2enet.training.config.RunConfig`; this command line only fills it (the
flags are its field names), and Python code builds one with ``make_config`` and calls :func:`train`. The update
interval and the cosine horizon follow the run's length unless set: the paper makes about 208 updates
in 250,000 iterations (every 1200); a run of N iterations updates every ``min(1200, max(1, N // 50))`` iterations,
so a short demo still makes real updates, and the cosine decays over all N iterations.

Under torchrun (``WORLD_SIZE`` > 1) every rank draws its own batches from its own loader (seeded ``seed + 1000 *
rank``), so the global batch, and the effective batch size, is N x the planned batch, as in nnU-Net's DDP. Rank 0
alone prints and writes; its checkpoint holds every rank's loader and RNG state, so ``--resume`` continues exactly
under the same number of processes (and refuses another). On CUDA the forward pass runs in float16 autocast with a
GradScaler (``--no-amp``: float32); on CPU the run is float32. See docs/distributed.md.

Writes, into ``RUN_DIR``: ``plans.json`` and ``config.json`` (what predict.py needs), and into
``RUN_DIR/fold_F``: ``checkpoint_latest.pth`` (every epoch, atomically: model, optimizer, sparsity, loader and
RNG state, log), ``checkpoint_final.pth``, ``log.csv``, ``progress.png``, ``fusion_connections.png``. A fold that
already holds a run is continued with ``--resume`` or replaced with ``--overwrite``, never silently; the checks
(run_folder.py) come before anything in RUN_DIR is written, so a refused run leaves it as it was. While it runs, a
training holds ``RUN_DIR/fold_F/train.lock`` (its process id, host and start time): a second training into the same
fold is refused, ``--overwrite`` included, and the lock of a training killed on the same host is taken over. A
problem with the data or the run folder, a read-only folder and a full disk included, is one ``error: ...`` line and
exit status 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from e2enet.problems import Problem
from e2enet.training import config as settings
from e2enet.training.config import RunConfig, make_config


def model_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with a JSON value (``stem=full``, ``base_channels=12``, ``shift=false``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. base_channels=12), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare word such as stem=full


def build_parser() -> argparse.ArgumentParser:
    """The flags are RunConfig's settings; a flag left out (None) keeps the preset's value."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add_flags in (add_run_flags, add_budget_flags, add_model_flags, add_sparsity_flags, add_process_flags):
        add_flags(p)
    return p


def add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="nnU-Net raw dataset folder (DatasetXXX_Name)")
    p.add_argument("--out", type=Path, required=True, help="run folder; fold results go to RUN_DIR/fold_F")
    p.add_argument("--fold", choices=settings.FOLDS, help="0-4, or 'all' to train on every case (default 0)")
    p.add_argument(
        "--density",
        type=float,
        help=f"fraction of fusion kernels kept (1.0 = dense; default {settings.DEFAULT_DENSITY}, dense for dynunet)",
    )
    p.add_argument("--preset", choices=sorted(settings.PRESETS), default="cpu-demo")
    p.add_argument(
        "--arch",
        choices=settings.ARCHITECTURES,
        help="e2enet (default), or dynunet: MONAI DynUNet configured like nnU-Net 3d_fullres, the dense baseline",
    )


def add_budget_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float, help="SGD's initial learning rate (default: the preset's)")
    p.add_argument("--iters-per-epoch", type=int)
    p.add_argument("--val-iters", type=int, help="validation batches per epoch (pseudo-Dice)")
    p.add_argument(
        "--patch-voxel-budget", type=int, help="most voxels in one patch when planning (paper: 128^3, cpu-demo: 48^3)"
    )
    p.add_argument(
        "--batch-voxel-budget", type=int, help="most voxels in one batch when planning (two patches by default)"
    )
    p.add_argument("--update-every", type=int, help="iterations between topology updates")
    p.add_argument(
        "--grace-updates", type=int, help="regrown kernels cannot be dropped at the next N updates (default 0)"
    )
    p.add_argument(
        "--augment",
        choices=settings.AUGMENTATIONS,
        help="training augmentation: nnunet (the authors' moreDA, the paper preset's default), light (intensity and "
        "mirroring) or none (the cpu-demo preset's default)",
    )


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mirror-axes",
        type=int,
        nargs="*",
        choices=settings.ALL_AXES,
        help="image array axes (as stored in the NIfTI) to mirror (default all); give none (a bare --mirror-axes) "
        "where left and right are different classes",
    )
    p.add_argument(
        "--model-option",
        dest="model_options",
        type=model_option,
        action="append",
        metavar="KEY=VALUE",
        help="override an E2ENet constructor argument of the preset (repeatable), e.g. stem=shift base_channels=8",
    )


def add_sparsity_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--static", action="store_true", default=None, help="fixed random mask: the static ablation")
    p.add_argument(
        "--granularity",
        choices=settings.GRANULARITIES,
        help="what one mask bit of a fusion layer switches: a (c_out, c_in) kernel (the paper), a whole input "
        "channel (structured: compaction removes it at inference), an input channel for one of 4 blocks of "
        "outputs (input_channel_blocks: between the two), or the same with the blocks drawing their inputs from a "
        "shared pool of twice one block's reads (input_channel_pool: compacts to about twice the density)",
    )
    p.add_argument(
        "--sparse-layers",
        choices=settings.SPARSE_LAYERS,
        help="which fusion layers DSFF masks: fusion (every fusion conv and transposed conv, the paper) or "
        "fusion-convs (the transposed convs stay dense; with input-channel masks, each coarser level's features "
        "reach its node whole)",
    )
    p.add_argument(
        "--distribution",
        choices=settings.DISTRIBUTIONS,
        help="how --density is spread over the fusion layers: uniform (the paper: every layer at --density) or "
        "er / erk (Erdos-Renyi(-Kernel): narrow layers keep more, wide ones less, the same total)",
    )
    p.add_argument(
        "--growth",
        choices=settings.GROWTHS,
        help="which inactive kernels a topology update regrows: random (the paper) or gradient (RigL: largest "
        "gradient magnitude)",
    )
    p.add_argument(
        "--regrow-init",
        choices=settings.REGROW_INITS,
        help="values of regrown kernels: zeros (the paper) or reinit (fresh values from torch's conv init)",
    )
    p.add_argument(
        "--drop-fraction",
        type=float,
        help="share of active kernels exchanged at the first update, decaying by a cosine to 0 (the paper's 0.5; "
        f"cpu-demo below density {settings.LOW_DENSITY}: 0.2)",
    )
    p.add_argument(
        "--update-from",
        type=float,
        help="share of the run that trains the first mask unchanged; the first update and the cosine's start follow "
        "it (default 0: updates from the start, as the paper)",
    )
    p.add_argument(
        "--update-until",
        type=float,
        help="share of the run during which the topology may change; the cosine reaches 0 there and the mask is "
        f"fixed after it (RigL's t_end; the paper: 1.0; cpu-demo below density {settings.LOW_DENSITY}: 0.75)",
    )


def add_process_flags(p: argparse.ArgumentParser) -> None:
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--resume", action="store_true", default=None, help="continue from RUN_DIR/fold_F/checkpoint_latest.pth"
    )
    again.add_argument(
        "--overwrite", action="store_true", default=None, help="replace a fold already trained in RUN_DIR"
    )
    p.add_argument("--seed", type=int, help="seed of the weights, the masks and the batches (default 0)")
    p.add_argument("--preprocessed", type=Path, help="preprocessed folder (default: beside the data)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: all cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.add_argument("--no-amp", dest="amp", action="store_false", default=None, help="float32 on CUDA too (CPU: always)")


def parse_config(argv=None) -> RunConfig:
    """The run config of a command line: the preset's settings with the flags given over them."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    given = {name: value for name, value in args.items() if value is not None}
    if "model_options" in given:
        given["model_options"] = dict(given["model_options"])
    try:
        return make_config(**given)
    except Problem as problem:
        parser.error(str(problem))
