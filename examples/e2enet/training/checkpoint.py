"""Checkpoints of train.py: atomic saves, a clear error for a damaged file, the resume check and the exact restore.

``checkpoint_latest.pth`` (every epoch) holds the run's record (its settings, see config.py, and what was derived
from the data), model, optimizer, sparsity, GradScaler, every rank's loader and RNG state and the log;
``checkpoint_final.pth`` holds record, model, sparsity and log, which is what predict.py needs. train.py's Trainer
puts all of it back, so a resumed run ends bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from e2enet.atomic import atomic_write
from e2enet.problems import Problem
from e2enet.training.config import RUN_ONLY, SETTINGS, identity_keys

# What a run record holds beyond the settings, derived from the data and the processes; these must match too.
DERIVED_IDENTITY = ("model_arguments", "preprocessing_hash", "patch_size", "batch_size", "split", "world_size")
RECORD_KEYS = (*(k for k in SETTINGS if k not in RUN_ONLY), *DERIVED_IDENTITY, "in_channels", "num_classes", "amp")


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save, atomically: a crash, even SIGKILL mid-save, leaves the previous checkpoint or this one."""
    with atomic_write(path) as f:
        torch.save(state, f)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by train.py, or a Problem naming the file when it is damaged, something else, or written
    by something else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated or not a torch file: say which file and what to do
        raise Problem(
            f"cannot read checkpoint {path} ({type(error).__name__}: {error}); it is damaged or not "
            f"a checkpoint of train.py. Delete it to start over, or restore a backup."
        ) from error
    if not isinstance(state, dict) or not {"config", "model"} <= set(state):
        raise Problem(f"{path} is not a checkpoint of train.py (no config and model); delete it or restore a backup")
    return state


def check_resumable(saved: dict, config: dict, path: Path) -> None:
    """Refuse to resume a checkpoint of another configuration, another split or another number of processes."""
    missing = sorted(set(RECORD_KEYS) - set(saved))
    if missing:
        raise Problem(
            f"{path} was written by an earlier version of train.py (its config lacks {', '.join(missing)}), so it "
            "cannot say what the run ran with; train the run again into another --out, or delete that run folder"
        )
    if saved["world_size"] != config["world_size"]:
        raise Problem(
            f"{path} was written by a run on {saved['world_size']} process(es), this one has "
            f"{config['world_size']}: resume with the same world size (torchrun --nproc_per_node "
            f"{saved['world_size']}, or plain python for 1), since each rank's data loader state "
            f"is restored; or use another --out to start a new run"
        )
    if saved["split"] != config["split"]:
        before, now = saved["split"], config["split"]
        moved = sorted(set(before["val"]) & set(now["train"]))
        added = sorted({*now["train"], *now["val"]} - {*before["train"], *before["val"]})
        raise Problem(
            f"{path} was trained on another split of the cases (validation cases now trained on: {moved or 'none'}; "
            f"cases new since: {added or 'none'}): resuming would mix the two. Restore the dataset and "
            "splits_final.json the run started with, or train the new split into another --out"
        )
    keys = [*identity_keys(config), *(k for k in DERIVED_IDENTITY if k not in ("world_size", "split"))]
    different = {k: (saved.get(k), config[k]) for k in keys if saved.get(k) != config[k]}
    if different:
        raise Problem(
            f"{path} was written by another configuration: "
            + ", ".join(f"{k} saved {a!r} vs now {b!r}" for k, (a, b) in different.items())
            + f"; rerun with the saved settings, use another --out to start a new run, or delete {path.parent.parent} "
            "to replace that run (demo.py and compare.py rerun it from scratch then; a preset that changed since "
            "the run was trained is such a case)"
        )
