"""A run folder (``train.py --out RUN_DIR``): what makes it one experiment, and the checks that keep it so.

``RUN_DIR/plans.json`` and ``RUN_DIR/config.json`` say how to preprocess an input and rebuild the network; predict.py
ensembles the folds ``RUN_DIR/fold_F/checkpoint_*.pth`` with them. So every fold of a run must share the keys of
``RUN_KEYS``: train.py refuses a fold that would break that (:func:`claim_fold`) and predict.py a checkpoint that
does (:func:`fold_problems`). A refused train.py run changes nothing: every check comes before the first write.

One training at a time writes a fold: it holds ``RUN_DIR/fold_F/train.lock`` (:func:`fold_lock`) from before it
claims the fold until it exits. The lock is the fold's, not the run's, because the folds of one run may train at
once (one per GPU, as nnU-Net's are): they share only plans.json and config.json, written atomically and checked
against the trained folds here and by predict.py.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from e2enet.atomic import error_about, write_json
from e2enet.nets.registry import model_arguments
from e2enet.preprocessing.planning import PLANS_FILE, Plans
from e2enet.problems import Problem
from e2enet.training.checkpoint import check_resumable, load_checkpoint
from e2enet.training.config import RUN_ONLY, RunConfig, settings_of

CONFIG_FILE = "config.json"
LOCK_FILE = "train.lock"
CHECKPOINTS = ("checkpoint_latest.pth", "checkpoint_final.pth")
# What train.py writes into RUN_DIR/fold_F: what --overwrite replaces and what makes a fold "already trained".
FOLD_OUTPUTS = (*CHECKPOINTS, "log.csv", "progress.png", "fusion_connections.png", "fusion_connections.json")
# What predict.py needs to rebuild the network (MODEL_KEYS) and to feed it what it was trained on.
MODEL_KEYS = ("arch", "preset", "in_channels", "num_classes", "model_options", "granularity")
# augment and mirror_axes: which mirrorings predict.py's TTA may average (those the network saw in training).
RUN_KEYS = (*MODEL_KEYS, "model_arguments", "preprocessing_hash", "patch_size", "augment", "mirror_axes")


def run_record(config: RunConfig, plans: Plans, split: dict, world_size: int, amp: bool) -> dict:
    """What defines the run, saved in every checkpoint: its settings, and what was derived from data and processes
    (``split``: the fold's case ids, ``{"train": [...], "val": [...]}``)."""
    settings = {k: v for k, v in settings_of(config).items() if k not in RUN_ONLY}
    return {
        **settings,
        "update_every": config.update_every,  # the interval the run used, also where it follows the run's length
        "model_arguments": model_arguments(config.arch, config.preset, config.model_options),
        "in_channels": len(plans.channel_names),
        "num_classes": plans.num_classes,
        "preprocessing_hash": plans.preprocessing_hash,
        "patch_size": plans.patch_size,
        "batch_size": plans.batch_size,
        "split": split,
        "dataset": str(config.data.resolve()),
        "world_size": world_size,
        "amp": amp,
    }


def read_config(run_dir: Path) -> dict | None:
    """RUN_DIR/config.json, or None where there is none yet."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise Problem(f"{path} is damaged ({error}); delete it (train.py rewrites it) or restore a backup") from error


def trained_folds(run_dir: Path) -> list[str]:
    """Names of the fold folders that hold a checkpoint."""
    return sorted(p.name for p in run_dir.glob("fold_*") if any((p / name).is_file() for name in CHECKPOINTS))


def claim_fold(run: RunConfig, config: dict, plans: Plans) -> dict | None:
    """Check that this training may write RUN_DIR/fold_F, then claim it; return the checkpoint to resume, or None.

    --resume continues only a checkpoint of the same configuration; without it an existing fold is replaced only
    with --overwrite; and a fold whose plans or network would differ from the run's other trained folds is refused.
    ``config`` is the run's record (:func:`run_record`).
    """
    run_dir, fold_dir, resume, overwrite = run.out, run.fold_dir, run.resume, run.overwrite
    latest = fold_dir / CHECKPOINTS[0]
    existing = [name for name in FOLD_OUTPUTS if (fold_dir / name).is_file()]
    saved = None
    if resume and latest.is_file():
        saved = load_checkpoint(latest)
        check_resumable(saved["config"], config, latest)
    elif resume and existing:
        raise Problem(
            f"{fold_dir} holds {', '.join(existing)} but no {latest.name} to resume from; pass --overwrite instead "
            "of --resume to train it again from scratch, or use another --out"
        )
    elif existing and not overwrite:
        raise Problem(
            f"{fold_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it, --overwrite to "
            "replace it, or use another --out"
        )
    recorded = read_config(run_dir) or {}
    different = [k for k in RUN_KEYS if k in recorded and recorded[k] != config[k]]
    others = [name for name in trained_folds(run_dir) if name != fold_dir.name]
    if different and others:
        raise Problem(
            f"{run_dir} holds {', '.join(others)} trained with "
            + ", ".join(f"{k} {recorded[k]!r} (this fold: {config[k]!r})" for k in different)
            + "; predict.py ensembles a run's folds with its one plans.json, so they must agree: use another --out, "
            "or delete those folds"
        )
    for name in existing if overwrite else ():
        (fold_dir / name).unlink()
    fold_dir.mkdir(parents=True, exist_ok=True)
    plans.save(run_dir / PLANS_FILE)
    write_json(run_dir / CONFIG_FILE, {k: config[k] for k in RUN_KEYS})
    return saved


def load_run(run_dir: Path) -> tuple[Plans, dict]:
    """The plans and config of a run folder, or a Problem saying why ``run_dir`` is not one."""
    config = read_config(run_dir) if run_dir.is_dir() else None
    if config is None or not (run_dir / PLANS_FILE).is_file():
        raise Problem(
            f"{run_dir} is not a run folder of train.py (it has no {CONFIG_FILE} and {PLANS_FILE}); pass the "
            "RUN_DIR given to train.py --out"
        )
    missing = [k for k in MODEL_KEYS if k not in config]
    if missing:
        raise Problem(f"{run_dir / CONFIG_FILE} lacks {missing}; train the run again or restore the file")
    return Plans.load(run_dir / PLANS_FILE), config


def fold_problems(path: Path, saved: dict, plans: Plans, config: dict) -> list[str]:
    """One sentence per way the checkpoint config ``saved`` (of ``path``) does not fit the run it is found in."""
    expected = [(key, config[key], CONFIG_FILE) for key in (*MODEL_KEYS, "model_arguments")] + [
        ("in_channels", len(plans.channel_names), PLANS_FILE),
        ("num_classes", plans.num_classes, PLANS_FILE),
        ("preprocessing_hash", plans.preprocessing_hash, PLANS_FILE),
        ("patch_size", plans.patch_size, PLANS_FILE),
    ]
    return [
        f"{path} was trained with {key} {saved.get(key)!r} but the run's {source} says {value!r}: it belongs to "
        "another dataset or run; train this fold in this run, or leave it out of --folds"
        for key, value, source in expected
        if saved.get(key) != value
    ]


# ------------------------------------------------------------------------------------------------ the fold lock
def _read_lock(path: Path) -> dict | None:
    """The holder a lock file names ({} when it names none), or None when there is no lock."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # cut short by a crash as it was written, or not a lock of train.py
        return {}
    named = isinstance(holder, dict) and type(holder.get("pid")) is int and isinstance(holder.get("host"), str)
    return holder if named and "since" in holder else {}


def _process_runs(pid: int) -> bool:
    if os.name == "nt":  # os.kill would send the process Ctrl-C there: a dead training's lock is removed by hand
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def _is_stale(holder: dict) -> bool:
    """A lock of this host whose process is gone; a pid equal to ours was reused (a restarted container)."""
    return holder["host"] == socket.gethostname() and (holder["pid"] == os.getpid() or not _process_runs(holder["pid"]))


def _refusal(path: Path, holder: dict) -> Problem:
    fold_dir = path.parent
    if not holder:
        return Problem(
            f"{fold_dir} is locked by {path}, which names no holder (written by a training that crashed as it "
            f"started, or by something else): if no training is running into this fold, delete {path} and train again"
        )
    who = f"process {holder['pid']} on {holder['host']} since {holder['since']}"
    if holder["host"] == socket.gethostname():
        return Problem(
            f"{fold_dir} is being trained by {who} (its lock {path}); wait for that training to finish or stop it, "
            "or train into another --out"
        )
    return Problem(
        f"{fold_dir} is being trained by {who} (its lock {path}), and {socket.gethostname()} cannot check whether "
        f"that process still runs: wait for it, or, if you know that training is dead, delete {path} and train again"
    )


def _create_lock(path: Path, holder: dict) -> bool:
    """Create the lock naming ``holder``, atomically (O_EXCL, also on NFS v3+); False where one exists."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(descriptor, "w") as f:
            f.write(json.dumps(holder) + "\n")
    except OSError as error:  # a full disk: leave no lock that names nobody
        path.unlink(missing_ok=True)
        raise error_about(error, path) from error
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True


def _take_lock(path: Path) -> dict:
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if _create_lock(path, holder):
        return holder
    other = _read_lock(path)
    if other is not None:
        if not other or not _is_stale(other):
            raise _refusal(path, other)
        print(
            f"note: taking over {path}: process {other['pid']} of this host, which took it on {other['since']}, "
            "no longer runs (a training that was killed)"
        )
        path.unlink(missing_ok=True)
    if _create_lock(path, holder):
        return holder
    raise _refusal(path, _read_lock(path) or {})  # another training took it in between


@contextlib.contextmanager
def fold_lock(fold_dir: Path) -> Iterator[None]:
    """Hold ``fold_dir/train.lock`` inside, naming this process, its host and start time; a Problem naming the holder
    where another training holds it. It is released on every way out; one left by a killed process of this host is
    taken over, one of another host is refused (its process cannot be checked from here). The folders it creates are
    removed on the way out when they are still empty, so a refused run leaves nothing behind."""
    created = []
    folder = fold_dir
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    fold_dir.mkdir(parents=True, exist_ok=True)
    path = fold_dir / LOCK_FILE
    try:
        holder = _take_lock(path)
        try:
            yield
        finally:
            if _read_lock(path) == holder:  # never another training's lock
                path.unlink()
    finally:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote into it
                break
