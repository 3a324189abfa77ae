"""Checkpoints of train.py: atomic saves, a clear error for a damaged file, the resume check and the exact restore.

``checkpoint_latest.pth`` (every epoch) holds the run's config, model, optimizer, sparsity, GradScaler, every rank's
loader and RNG state (:func:`rank_state`) and the log; ``checkpoint_final.pth`` holds config, model, sparsity and
log, which is what predict.py needs. :func:`restore` puts all of it back, so a resumed run ends bit-identical to an
uninterrupted one on CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from e2enet.atomic import atomic_write
from e2enet.nets.registry import with_model_arguments
from e2enet.problems import Problem

# What must match for --resume to continue a run rather than silently start another experiment.
RESUME_KEYS = (
    "arch",
    "preset",
    "fold",
    "density",
    "static",
    "granularity",
    "sparse_layers",
    "epochs",
    "iters_per_epoch",
    "lr",
    "update_every",
    "grace_updates",
    "distribution",
    "growth",
    "regrow_init",
    "drop_fraction",
    "update_until",
    "augment",
    "mirror_axes",
    "model_options",
    "model_arguments",
    "seed",
    "preprocessing_hash",
    "patch_size",
    "batch_size",
    "world_size",
)
# Keys that change nothing for some runs, so a difference there must not block a resume: a dense run has no masks,
# a static one no topology updates (and a preset's defaults for them may change between versions).
MASK_KEYS = ("static", "granularity", "sparse_layers", "distribution")
TOPOLOGY_UPDATE_KEYS = ("update_every", "grace_updates", "growth", "regrow_init", "drop_fraction", "update_until")
# What a checkpoint written before a key was recorded ran with (network arguments: networks.py), filled in on load.
UNRECORDED_DEFAULTS = {
    "lr": 0.01,
    "distribution": "uniform",
    "growth": "random",
    "regrow_init": "zeros",
    "drop_fraction": 0.5,
    "update_until": 1.0,
    "sparse_layers": "fusion",
}


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save, atomically: a crash, even SIGKILL mid-save, leaves the previous checkpoint or this one."""
    with atomic_write(path) as f:
        torch.save(state, f)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by train.py, or a Problem naming the file when it is damaged or something else. Keys its
    config was written without are filled in with what the run ran with."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated or not a torch file: say which file and what to do
        raise Problem(
            f"cannot read checkpoint {path} ({type(error).__name__}: {error}); it is damaged or not "
            f"a checkpoint of train.py. Delete it to start over, or restore a backup."
        ) from error
    if not isinstance(state, dict) or not {"config", "model"} <= set(state):
        raise Problem(f"{path} is not a checkpoint of train.py (no config and model); delete it or restore a backup")
    state["config"] = with_model_arguments({**UNRECORDED_DEFAULTS, **state["config"]})
    return state


def check_resumable(saved: dict, config: dict, path: Path) -> None:
    """Refuse to resume a checkpoint of another configuration or another number of processes."""
    if saved["world_size"] != config["world_size"]:
        raise Problem(
            f"{path} was written by a run on {saved['world_size']} process(es), this one has "
            f"{config['world_size']}: resume with the same world size (torchrun --nproc_per_node "
            f"{saved['world_size']}, or plain python for 1), since each rank's data loader state "
            f"is restored; or use another --out to start a new run"
        )
    inert = set()
    if config["density"] >= 1.0:
        inert = {*MASK_KEYS, *TOPOLOGY_UPDATE_KEYS}
    elif config["static"]:
        inert = set(TOPOLOGY_UPDATE_KEYS)
    different = {k: (saved.get(k), config[k]) for k in RESUME_KEYS if k not in inert and saved.get(k) != config[k]}
    if different:
        raise Problem(
            f"{path} was written by another configuration: "
            + ", ".join(f"{k} saved {a!r} vs now {b!r}" for k, (a, b) in different.items())
            + f"; rerun with the saved settings, use another --out to start a new run, or delete {path.parent.parent} "
            "to replace that run (demo.py and compare.py rerun it from scratch then; a preset that changed since "
            "the run was trained is such a case)"
        )


def rank_state(train_loader, val_loader, device: torch.device) -> dict:
    """This rank's loaders and RNG: what --resume restores on each rank."""
    return {
        "train_loader": train_loader.state_dict(),
        "val_loader": val_loader.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore(
    saved: dict, rank: int, device: torch.device, model, optimizer, sparsity, scaler, train_loader, val_loader
) -> tuple[list[dict], int]:
    """Put back everything a (checked) checkpoint holds; returns the log so far and the epoch to continue with."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if sparsity is not None:
        sparsity.load_state_dict(saved["sparsity"])
    if saved.get("scaler"):  # saved by an AMP run; a disabled scaler ignores it
        scaler.load_state_dict(saved["scaler"])
    own = saved["ranks"][rank]
    train_loader.load_state_dict(own["train_loader"])
    val_loader.load_state_dict(own["val_loader"])
    torch.set_rng_state(own["torch_rng"])
    if own.get("cuda_rng") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(own["cuda_rng"], device)
    return saved["log"], saved["epoch"] + 1
