"""What train.py does to a run folder that another training holds, that it cannot write, or whose disk fills up.

One tiny trained run (the MNI dataset at 5 mm, one epoch of two iterations), copied for every test that changes it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from e2enet.problems import Problem
from e2enet.training import checkpoint, run_folder, train
from tests.e2enet.tiny_runs import exit_status, snapshot, train_args


def write_lock(fold_dir: Path, pid: int, host: str | None = None) -> Path:
    lock = fold_dir / run_folder.LOCK_FILE
    holder = {"pid": pid, "host": host or socket.gethostname(), "since": "2026-01-02T03:04:05+00:00"}
    lock.write_text(json.dumps(holder))
    return lock


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# --------------------------------------------------------------------------- one training per fold


def test_a_fold_that_a_running_training_holds_is_refused_and_overwrite_deletes_nothing(mni, run_copy, capsys):
    holder = os.getppid()  # a process that runs for as long as this test
    write_lock(run_copy / "fold_0", holder)
    before = snapshot(run_copy)
    status, err = exit_status(train.main, train_args(mni, run_copy, "--overwrite"), capsys)
    assert status == 2, err
    assert f"process {holder} on {socket.gethostname()} since 2026-01-02T03:04:05+00:00" in err, err
    assert "wait for that training to finish or stop it" in err and err.count("\n") == 1, err
    assert snapshot(run_copy) == before  # the checkpoints, log and plot of the running training, and its lock


def test_a_lock_of_another_host_is_refused_with_how_to_remove_it(tmp_path):
    fold_dir = tmp_path / "run" / "fold_0"
    fold_dir.mkdir(parents=True)
    lock = write_lock(fold_dir, dead_pid(), host="another-node")
    refused = r"process \d+ on another-node since .*if you know that training is dead, delete"
    with pytest.raises(Problem, match=refused):
        with run_folder.fold_lock(fold_dir):
            pass
    assert json.loads(lock.read_text())["host"] == "another-node"


def test_a_lock_that_names_no_holder_is_refused(tmp_path):
    fold_dir = tmp_path / "run" / "fold_0"
    fold_dir.mkdir(parents=True)
    (fold_dir / run_folder.LOCK_FILE).write_text("")
    with pytest.raises(Problem, match="names no holder.*if no training is running into this fold, delete"):
        with run_folder.fold_lock(fold_dir):
            pass


def test_the_lock_of_a_killed_training_is_taken_over_with_a_note(mni, run_copy, capsys):
    killed = dead_pid()
    lock = write_lock(run_copy / "fold_0", killed)
    capsys.readouterr()
    train.main(train_args(mni, run_copy, "--overwrite"))
    printed = capsys.readouterr().out
    assert f"taking over {lock}: process {killed} of this host" in printed and "no longer runs" in printed
    assert not lock.exists()


def test_the_lock_is_held_while_training_and_released_on_every_way_out(mni, run_copy, monkeypatch, capsys):
    lock = run_copy / "fold_0" / run_folder.LOCK_FILE
    holders = []
    for failure, seen_as in [
        (KeyboardInterrupt(), KeyboardInterrupt),
        (RuntimeError("a bug"), RuntimeError),
        (Problem("a problem found while training"), SystemExit),
    ]:

        def failing_step(t, epoch, failure=failure):
            holders.append(json.loads(lock.read_text()))
            raise failure

        monkeypatch.setattr(train, "train_step", failing_step)
        with pytest.raises(seen_as):
            train.main(train_args(mni, run_copy, "--overwrite"))
        assert not lock.exists(), failure
    assert [(h["pid"], h["host"]) for h in holders] == [(os.getpid(), socket.gethostname())] * 3
    monkeypatch.undo()
    train.main(train_args(mni, run_copy, "--overwrite"))
    assert not lock.exists()


# --------------------------------------------------------------------------- a folder that cannot be written


def test_a_run_folder_that_cannot_be_written_is_one_line_naming_it(mni, tmp_path, monkeypatch, capsys):
    out = tmp_path / "read_only" / "run"
    real_mkdir = Path.mkdir

    def read_only(folder, *args, **kwargs):
        if out in (folder, *folder.parents):
            raise PermissionError(errno.EACCES, "Permission denied", str(folder))
        return real_mkdir(folder, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    status, err = exit_status(train.main, train_args(mni, out), capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert f"error: cannot access {out / 'fold_0'} (Permission denied)" in err and "or use another folder" in err, err


def test_a_full_disk_at_the_final_checkpoint_leaves_no_final_checkpoint_and_says_so(mni, run_copy, monkeypatch, capsys):
    """checkpoint_final.pth is what predict.py reads: a half-written one must not be left to look finished."""
    fold = run_copy / "fold_0"
    real_save = torch.save

    def full_disk_at_the_end(state, f, *args, **kwargs):
        if "checkpoint_final" not in f.name:
            return real_save(state, f, *args, **kwargs)
        f.write(b"PK\x03\x04 the first bytes of the checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk_at_the_end)
    status, err = exit_status(train.main, train_args(mni, run_copy, "--overwrite"), capsys)
    assert status == 2 and err.count("\n") == 1, err
    assert f"error: cannot write {fold / 'checkpoint_final.pth'} (No space left on device); free space" in err, err
    assert sorted(p.name for p in fold.iterdir()) == ["checkpoint_latest.pth", "log.csv", "progress.png"]
    assert checkpoint.load_checkpoint(fold / "checkpoint_latest.pth")["epoch"] == 0  # complete: --resume goes on


def test_a_figure_cut_off_by_a_full_disk_leaves_the_previous_one(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from e2enet.training import plots

    path = tmp_path / "progress.png"
    fig = plt.figure()
    plots.save_figure(fig, path)
    before = path.read_bytes()

    def disk_full(self, f, **kwargs):
        f.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(fig), "savefig", disk_full)
    with pytest.raises(OSError, match="progress.png"):
        plots.save_figure(fig, path)
    plt.close(fig)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["progress.png"]
