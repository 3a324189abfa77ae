"""End to end on a tiny MNI dataset: train.py (dynamic DSFF, logs, checkpoints, exact resume), predict.py, evaluate.py.

The MNI dataset at 6 mm is about 25-30 voxels a side, so every run here takes seconds.
"""

from __future__ import annotations

import contextlib
import csv
import json
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from e2enet.dataset import mni as prepare_mni
from e2enet.evaluation import evaluate
from e2enet.experiments import compare, demo
from e2enet.inference import predict
from e2enet.problems import Problem
from e2enet.training import checkpoint, cli, train
from e2enet.training import config as run_settings
from e2enet.training.config import make_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "e2enet"  # the scripts users run
EPOCHS, ITERS = 3, 3
KILL_SEED = 20261207


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    return prepare_mni.build_mni_dataset(root, num_train=5, num_test=1, spacing_mm=6.0)


def run_args(dataset, out, *extra, density=0.2, epochs=EPOCHS, iters=ITERS):
    return [
        "--data",
        str(dataset),
        "--out",
        str(out),
        "--fold",
        "0",
        "--density",
        str(density),
        "--preset",
        "cpu-demo",
        "--epochs",
        str(epochs),
        "--iters-per-epoch",
        str(iters),
        "--val-iters",
        "1",
        "--no-progress",
        "--preprocessed",
        str(out.parent / "pre"),
        *extra,
    ]


def run_config(dataset, out, *, density=0.2, epochs=EPOCHS, iters=ITERS, **settings):
    """What run_args asks for, as a config built in Python."""
    return make_config(
        data=dataset,
        out=out,
        preset="cpu-demo",
        density=density,
        epochs=epochs,
        iters_per_epoch=iters,
        val_iters=1,
        progress=False,
        preprocessed=out.parent / "pre",
        **settings,
    )


def assert_scores_are_the_dice_of_the_files(summary, references, predictions, labels):
    """The summary's Dice per class is the overlap of what predict.py wrote with the reference, counted here from the
    files (one test case, so the class means are that case's values): evaluation scored the right voxels and labels.
    """
    case = next(references.glob("*.nii.gz")).name
    ref = np.asarray(nib.load(references / case).dataobj)
    pred = np.asarray(nib.load(predictions / case).dataobj)
    for name, value in labels.items():
        a, b = ref == value, pred == value
        size = int(a.sum() + b.sum())
        dice = 2 * int((a & b).sum()) / size if size else None
        assert summary["per_class_mean"][name]["dice"] == pytest.approx(dice), name


@pytest.fixture(scope="module")
def finished_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    return out, train.train(run_config(dataset, out))


def test_training_makes_real_topology_updates_at_fixed_density(finished_run):
    out, result = finished_run
    fold = out / "fold_0"
    rows = list(csv.DictReader(open(fold / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    sparsity = result["sparsity"]
    # 9 iterations: the interval follows the run's length (max(1, 9 // 50) = 1), so at density 0.2 (the paper's
    # rules) every iteration updates.
    assert result["config"]["update_every"] == 1 and result["config"]["update_until"] == 1.0
    assert len(sparsity.history) == 9
    assert all(r.dropped == r.grown > 0 for r in sparsity.history[:3])
    assert sum(int(r["topology_updates"]) for r in rows) == 9
    assert all(abs(float(r["density"]) - 0.2) < 0.01 for r in rows)
    # The masks are live: fusion weights outside them are exactly zero in the saved final model.
    final = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    for name in sparsity.target_names:
        assert torch.all(final["model"][name][~sparsity.weight_mask(name)] == 0)
    assert (fold / "progress.png").stat().st_size > 0
    proportions = json.loads((fold / "fusion_connections.json").read_text())
    assert proportions and all(abs(sum(p.values()) - 1) < 1e-6 for p in proportions.values())
    assert (out / "plans.json").is_file() and (out / "config.json").is_file()


def test_crash_then_resume_ends_bit_identical(dataset, finished_run, tmp_path, monkeypatch, capsys):
    _, reference = finished_run
    out = tmp_path / "run"
    real_save = train.save_checkpoint

    def crash_after_epoch_1(state, path):
        real_save(state, path)
        if state.get("epoch") == 1:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(train, "save_checkpoint", crash_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train.train(run_config(dataset, out))
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    capsys.readouterr()
    resumed = train.train(run_config(dataset, out, resume=True))
    printed = capsys.readouterr().out
    assert "at epoch 2" in printed and "epoch 0:" not in printed  # it continued; it did not start over

    for (name, a), b in zip(
        reference["model"].state_dict().items(), resumed["model"].state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert reference["sparsity"].history == resumed["sparsity"].history
    assert [r["train_loss"] for r in reference["log"]] == [r["train_loss"] for r in resumed["log"]]


def test_input_channel_runs_train_compacted_as_masked_training_does_and_resume_identically(
    dataset, tmp_path, monkeypatch, capsys
):
    """An input-channel run trains its fusion layers cut down to their live channels (sf.CompactedTraining): the
    final weights and masks are those of the same run trained masked, to float rounding, and a resume from the first
    epoch's checkpoint (compacted training rebuilt from it) ends bit-identical to the uninterrupted run."""
    settings = dict(granularity="input_channel", density=0.1, epochs=2, iters=2)
    compacted = train.train(run_config(dataset, tmp_path / "compacted", **settings))
    assert "compacted training" in capsys.readouterr().out
    assert any(layer.compacted for layer in compacted["compacted"].plan.values())

    with monkeypatch.context() as m:
        m.setattr(train, "trains_compacted", lambda config, procs: False)
        masked = train.train(run_config(dataset, tmp_path / "masked", **settings))
    assert masked["compacted"] is None and "compacted training" not in capsys.readouterr().out
    for (name, a), b in zip(
        compacted["model"].state_dict().items(), masked["model"].state_dict().values(), strict=True
    ):
        # Rounding only (about 5e-5 here, grown by momentum 0.99); a wrong block or state is off by orders more.
        assert torch.allclose(a, b, atol=5e-4), name
    for name in masked["sparsity"].target_names:
        assert torch.equal(compacted["sparsity"].weight_mask(name), masked["sparsity"].weight_mask(name)), name

    out, real_save = tmp_path / "resumed", train.save_checkpoint

    def crash_after_epoch_0(state, path):
        real_save(state, path)
        if state.get("epoch") == 0:
            raise KeyboardInterrupt("simulated crash")

    with monkeypatch.context() as m:
        m.setattr(train, "save_checkpoint", crash_after_epoch_0)
        with pytest.raises(KeyboardInterrupt):
            train.train(run_config(dataset, out, **settings))
    resumed = train.train(run_config(dataset, out, resume=True, **settings))
    assert "at epoch 1" in capsys.readouterr().out and resumed["compacted"] is not None
    for (name, a), b in zip(
        compacted["model"].state_dict().items(), resumed["model"].state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert compacted["sparsity"].history == resumed["sparsity"].history


def test_resume_with_another_configuration_is_refused(dataset, finished_run, capsys):
    out, _ = finished_run
    with pytest.raises(SystemExit) as refused:
        train.main(run_args(dataset, out, "--resume", density=0.3))
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "another configuration: density saved 0.2 vs now 0.3" in err
    assert f"or delete {out} to replace that run" in err  # the way out where --out cannot be passed (demo.py)


def test_resume_ignores_settings_that_do_not_act_on_the_run(tmp_path):
    """A dense run has no masks and a static one no topology updates: when a preset's default for those changes
    (cpu-demo's update rules follow the density), their runs still resume; a sparse dynamic run does not."""
    path = tmp_path / "checkpoint_latest.pth"

    def record(density, **settings):
        config = make_config(data=tmp_path, out=tmp_path, density=density, **settings)
        return dict.fromkeys(checkpoint.RECORD_KEYS, 0) | run_settings.settings_of(config)

    for density, settings, blocked in [(1.0, {}, False), (0.1, {"static": True}, False), (0.1, {}, True)]:
        saved = record(density, **settings) | {"drop_fraction": 0.2, "update_until": 0.75}
        now = saved | {"drop_fraction": 0.5, "update_until": 1.0}
        if blocked:
            with pytest.raises(checkpoint.Problem, match="drop_fraction saved 0.2 vs now 0.5"):
                checkpoint.check_resumable(saved, now, path)
        else:
            checkpoint.check_resumable(saved, now, path)
    with pytest.raises(checkpoint.Problem, match="density saved 1.0 vs now 0.2"):
        checkpoint.check_resumable(record(1.0), record(0.2), path)


def test_resume_on_another_split_of_the_cases_is_refused(finished_run, tmp_path):
    """Cases added and splits_final.json deleted: the new split may train on what the run validated on."""
    out, _ = finished_run
    saved = checkpoint.load_checkpoint(out / "fold_0" / "checkpoint_final.pth")["config"]
    train_ids, val_ids = saved["split"]["train"], saved["split"]["val"]
    now = saved | {"split": {"train": [*train_ids[1:], *val_ids], "val": [train_ids[0], "new_case"]}}
    with pytest.raises(checkpoint.Problem, match=rf"validation cases now trained on: \['{val_ids[0]}'.*new_case"):
        checkpoint.check_resumable(saved, now, tmp_path / "latest.pth")


def test_a_mistyped_model_option_with_overwrite_deletes_nothing(dataset, finished_run, capsys):
    out, _ = finished_run
    before = sorted(p.name for p in (out / "fold_0").iterdir())
    with pytest.raises(SystemExit) as refused:
        train.main(run_args(dataset, out, "--overwrite", "--model-option", "base_chanels=8"))
    assert refused.value.code == 2 and "base_chanels" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "fold_0").iterdir()) == before


def test_a_density_that_keeps_no_kernel_with_overwrite_deletes_nothing(dataset, finished_run):
    """The sparsity, like every setting, is built before the fold is claimed: a refusal leaves the trained fold."""
    out, _ = finished_run
    before = {p.name: p.stat().st_mtime_ns for p in (out / "fold_0").iterdir()}
    with pytest.raises(ValueError, match="keeps no group"):
        train.train(run_config(dataset, out, density=0.001, overwrite=True))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "fold_0").iterdir()} == before


@pytest.mark.parametrize("name", list(compare.SETTINGS))
def test_the_printed_command_line_rebuilds_the_same_config(tmp_path, name):
    """compare.py and demo.py print each run's train.py command: it must parse back to the run's config."""
    budget = dict(epochs=4, iters_per_epoch=3, lr=0.02, seed=1, resume=True, progress=False)
    config = make_config(data=tmp_path / "raw", out=tmp_path / "run", **compare.SETTINGS[name], **budget)
    assert cli.parse_config(run_settings.as_flags(config)) == config


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(mirror_axes=(0,)), "--mirror-axes only acts with augmentation"),  # cpu-demo trains without
        (dict(augment="light", mirror_axes=(1, 1)), "--mirror-axes must be distinct axes"),
        (dict(threads=0), "--threads must be a positive number"),
        (dict(seed=-1), "--seed must be >= 0"),
    ],
)
def test_settings_that_would_be_ignored_or_crash_later_are_refused_by_the_config(tmp_path, settings, message):
    with pytest.raises(run_settings.Problem, match=message):
        make_config(data=tmp_path, out=tmp_path, **settings)


def test_the_baseline_is_dense_unless_told_otherwise_and_defaults_given_explicitly_are_accepted(tmp_path):
    assert not make_config(data=tmp_path, out=tmp_path, arch="dynunet").sparse
    assert not make_config(data=tmp_path, out=tmp_path, density=1.0, static=False, growth="random").sparse


def test_a_checkpoint_of_an_earlier_version_is_refused_with_a_way_out(finished_run, tmp_path):
    """A run config written before a setting existed cannot say what the run ran with: refused, never guessed."""
    out, _ = finished_run
    current = checkpoint.load_checkpoint(out / "fold_0" / "checkpoint_final.pth")["config"]
    checkpoint.check_resumable(current, current, tmp_path / "same.pth")
    older = {k: v for k, v in current.items() if k not in ("val_iters", "split")}
    checkpoint.save_checkpoint({"config": older, "model": {}}, tmp_path / "old.pth")
    loaded = checkpoint.load_checkpoint(tmp_path / "old.pth")["config"]  # predict.py still reads it
    with pytest.raises(checkpoint.Problem, match="earlier version of train.py.*lacks split, val_iters"):
        checkpoint.check_resumable(loaded, current, tmp_path / "old.pth")


def test_every_setting_is_a_flag_and_part_of_the_run_identity_unless_declared_otherwise():
    """The config is the one list of settings: the parser offers each, and resume compares each that defines the
    run, so a new setting cannot be forgotten in either place."""
    parser_dests = {action.dest for action in cli.build_parser()._actions}
    assert set(run_settings.SETTINGS) <= parser_dests
    record = run_settings.settings_of(make_config(data=Path("d"), out=Path("o"), density=0.1))
    assert set(run_settings.identity_keys(record)) == set(run_settings.SETTINGS) - set(run_settings.RUN_ONLY)


def test_damaged_checkpoint_gives_a_clear_error(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "fold_0").mkdir(parents=True)
    (out / "fold_0" / "checkpoint_latest.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SystemExit) as refused:
        train.main(run_args(dataset, out, "--resume"))
    assert refused.value.code == 2 and "damaged or not a checkpoint" in capsys.readouterr().err


def test_predict_writes_input_geometry_and_evaluates(dataset, finished_run, tmp_path):
    out, _ = finished_run
    images = dataset / "imagesTs"
    written = predict.main(
        ["--model", str(out), "--input", str(images), "--output", str(tmp_path / "pred"), "--no-progress", "--tta"]
    )
    assert len(written) == 1
    source = nib.load(next(images.glob("*_0000.nii.gz")))
    pred = nib.load(written[0])
    assert pred.shape == source.shape and np.allclose(pred.affine, source.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}
    # Cases already predicted by this model with these settings are skipped.
    again = ["--model", str(out), "--input", str(images), "--output", str(tmp_path / "pred"), "--no-progress", "--tta"]
    assert predict.main(again) == []
    summary = evaluate.evaluate_folders(dataset / "labelsTs", tmp_path / "pred", dataset_json=dataset / "dataset.json")
    labels = {"grey_matter": 1, "white_matter": 2, "csf_other": 3}
    assert set(summary["per_class_mean"]) == set(labels)
    assert_scores_are_the_dice_of_the_files(summary, dataset / "labelsTs", tmp_path / "pred", labels)


def test_tta_mirrors_only_the_axes_the_run_trained_with(dataset, finished_run, tmp_path, capsys):
    """A run trained without mirroring gets no mirrored passes from --tta (mirroring every axis halved the Dice of
    a left/right task); a run trained mirroring X alone gets X, and the manifest says which axes were used."""
    out, _ = finished_run  # cpu-demo: no augmentation
    images = dataset / "imagesTs"

    def run_predict(model, target, *flags):
        argv = ["--model", str(model), "--input", str(images), "--output", str(target), "--no-progress", *flags]
        written = predict.main(argv)
        manifest = json.loads((target / predict.MANIFEST_FILE).read_text())
        return np.asarray(nib.load(written[0]).dataobj), manifest["settings"]["tta_axes"], capsys.readouterr().out

    plain, axes, _ = run_predict(out, tmp_path / "plain")
    with_tta, tta_axes, printed = run_predict(out, tmp_path / "tta", "--tta")
    assert np.array_equal(plain, with_tta) and axes == tta_axes == []
    assert "nothing to average" in printed
    mirrored = tmp_path / "mirrored"
    train.train(run_config(dataset, mirrored, epochs=1, augment="light", mirror_axes=(0,)))
    _, axes, printed = run_predict(mirrored, tmp_path / "mirrored_pred", "--tta")
    assert axes == [0] and "array axes X" in printed and "2 passes" in printed


def test_predict_refuses_inputs_with_the_wrong_channels(finished_run, tmp_path, capsys):
    out, _ = finished_run
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), tmp_path / "in" / "case_0001.nii.gz")
    with pytest.raises(SystemExit) as refused:
        predict.main(["--model", str(out), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")])
    assert refused.value.code == 2 and "case 'case' has channel files [1]" in capsys.readouterr().err


def test_dynunet_baseline_trains_and_predicts_with_the_same_pipeline(dataset, tmp_path):
    out = tmp_path / "dynunet"
    result = train.train(run_config(dataset, out, arch="dynunet", density=1.0, epochs=1))
    assert result["sparsity"] is None and type(result["model"]).__name__ == "DynUNet"
    assert json.loads((out / "config.json").read_text())["arch"] == "dynunet"
    written = predict.main(
        ["--model", str(out), "--input", str(dataset / "imagesTs"), "--output", str(tmp_path / "pred"), "--no-progress"]
    )
    assert len(written) == 1


def test_erk_distribution_keeps_more_of_the_narrow_fusion_layers_at_the_same_total(dataset, tmp_path):
    out = tmp_path / "erk"
    result = train.train(run_config(dataset, out, distribution="erk", granularity="input_channel", epochs=1))
    sparsity = result["sparsity"]
    assert result["config"]["distribution"] == "erk"
    per_layer = {name: sparsity.density(name) for name in sparsity.target_names}
    weights = {name: sparsity.weight_mask(name).numel() for name in per_layer}
    narrowest, widest = min(weights, key=weights.get), max(weights, key=weights.get)
    assert per_layer[narrowest] > 0.2 > per_layer[widest]
    # The same total budget as uniform 0.2, up to one rounded group per layer.
    kept = sum(per_layer[n] * weights[n] for n in per_layer) / sum(weights.values())
    assert kept == pytest.approx(0.2, abs=0.02)


def test_rigl_growth_and_reinitialised_regrowth_are_recorded_and_keep_the_density(dataset, tmp_path):
    out = tmp_path / "rigl"
    flags = dict(growth="gradient", regrow_init="reinit", drop_fraction=0.3, update_every=2)
    result = train.train(run_config(dataset, out, **flags, epochs=2))
    config, sparsity = result["config"], result["sparsity"]
    assert (config["growth"], config["regrow_init"], config["drop_fraction"]) == ("gradient", "reinit", 0.3)
    assert type(sparsity.growth).__name__ == "Gradient" and sparsity.regrow_init == "reinit"
    assert sum(row["topology_updates"] for row in result["log"]) >= 2
    assert sparsity.density() == pytest.approx(0.2, abs=0.01)


def test_updates_stop_at_the_share_of_the_run_given_by_update_until(dataset, tmp_path):
    result = train.train(run_config(dataset, tmp_path / "until", update_every=1, update_until=0.5, epochs=4, iters=2))
    assert result["config"]["update_until"] == 0.5
    updates = [row["topology_updates"] for row in result["log"]]
    # Iterations 1-4 may change the topology (the last one at a zero cosine), 5-8 train under a fixed mask.
    assert updates[0] > 0 and updates[2:] == [0, 0]
    assert result["sparsity"].schedule.fraction(4) == 0.0  # the cosine ends where the updates stop
    assert result["sparsity"].density() == pytest.approx(0.2, abs=0.01)


def test_the_first_mask_trains_unchanged_until_update_from(dataset, tmp_path):
    result = train.train(run_config(dataset, tmp_path / "from", update_every=1, update_from=0.5, epochs=4, iters=2))
    assert result["config"]["update_from"] == 0.5
    updates = [row["topology_updates"] for row in result["log"]]
    # Iterations 1-4 keep the first mask, 5-8 may change it; the cosine starts at iteration 4.
    assert updates[:2] == [0, 0] and updates[2] > 0
    assert result["sparsity"].schedule.start == 4


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--arch", "dynunet"], "--density < 1 sparsify E2ENet's fusion layers"),  # run_args asks for density 0.2
        (["--arch", "dynunet", "--density", "1", "--growth", "gradient"], "--growth sparsify E2ENet's fusion"),
        (["--density", "1", "--update-until", "0.75"], "--update-until only act on a sparse run"),
        (["--density", "1", "--static"], "--static only act on a sparse run"),
        (["--static", "--drop-fraction", "0.3"], "--static keeps the first mask, so --drop-fraction would change"),
        (["--val-iters", "0"], "--val-iters must be positive"),  # a NaN validation loss otherwise
        (["--val-iters", "-1"], "--val-iters must be positive"),
        (["--update-every", "0"], "--update-every must be a positive number of iterations"),  # was replaced silently
        (["--update-from", "0.8", "--update-until", "0.75"], "--update-from must be in [0, --update-until)"),
        (["--update-from", "0.5", "--update-every", "50"], "no topology update falls between --update-from 0.5"),
    ],
)
def test_sparse_flags_that_would_be_ignored_are_refused(dataset, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as refused:
        train.main(run_args(dataset, tmp_path / "x", *flags))
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sigkill_at_a_random_point_then_resume_loses_at_most_an_epoch_and_ends_identical(
    dataset, finished_run, tmp_path
):
    import random
    import signal
    import subprocess
    import sys
    import time

    _, reference = finished_run
    out = tmp_path / "run"
    script = EXAMPLE / "train.py"
    # One thread, like the in-process reference run (conftest), so the arithmetic is identical.
    cmd = [sys.executable, str(script), *run_args(dataset, out), "--threads", "1"]
    checkpoint = out / "fold_0" / "checkpoint_latest.pth"
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    delay = random.Random(KILL_SEED).uniform(0.0, 1.5)  # seeded: a failure can be rerun at the same point
    time.sleep(delay)  # somewhere in a later epoch, possibly mid-save
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(checkpoint, weights_only=False)  # the file on disk is always a whole checkpoint
    log = (out / "fold_0" / "log.csv").read_text().splitlines()
    assert saved["epoch"] >= len(log) - 2  # header + logged epochs: the log never runs ahead of the checkpoint
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, f"killed after {delay:.3f} s: " + resumed.stderr[-2000:]
    final = torch.load(out / "fold_0" / "checkpoint_final.pth", weights_only=False)
    for name, value in reference["model"].state_dict().items():
        assert torch.equal(value, final["model"][name]), f"{name}, killed after {delay:.3f} s"


def test_whole_pipeline_on_an_msd_task_it_has_never_seen(tmp_path):
    """A two-channel (CT + T2), anisotropic MSD-style task: convert, train, predict, evaluate.

    Four iterations check that the pieces fit on data of another shape, not that the network learns: that is
    tests/test_e2enet_learns.py, which asserts a Dice floor per class."""
    from e2enet.dataset.layout import convert_msd_dataset

    task = tmp_path / "Task09_Blobs"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (task / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.5, 4.0, 1.0])
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in (28, 26, 10)), indexing="ij"), -1)

    def case(name: str, folder: str) -> np.ndarray:
        centre = rng.uniform([9, 9, 3], [19, 17, 7])
        radius = np.linalg.norm((grid - centre) * [1.5, 1.5, 4.0], axis=-1)
        label = np.where(radius < 6, 2, np.where(radius < 11, 1, 0)).astype(np.uint8)
        ct = (-100.0 + 80 * label + rng.normal(0, 10, label.shape)).astype(np.float32)
        t2 = (300.0 - 90 * label + rng.normal(0, 20, label.shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(np.stack([ct, t2], -1), affine), task / folder / f"{name}.nii.gz")
        return label

    names = [f"blob_{i:02d}" for i in range(6)]
    for name in names:
        nib.save(nib.Nifti1Image(case(name, "imagesTr"), affine), task / "labelsTr" / f"{name}.nii.gz")
    test_label = case("blob_99", "imagesTs")
    (task / "dataset.json").write_text(
        json.dumps(
            {
                "name": "Blobs",
                "modality": {"0": "CT", "1": "T2"},
                "labels": {"0": "background", "1": "shell", "2": "core"},
                "numTraining": 6,
                "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names],
                "test": ["./imagesTs/blob_99.nii.gz"],
            }
        )
    )

    dataset = convert_msd_dataset(task, tmp_path / "raw")
    out = tmp_path / "run"
    train.train(run_config(dataset, out, density=0.3, epochs=2, iters=2))
    assert json.loads((out / "plans.json").read_text())["normalization"][0]["scheme"] == "CT"
    written = predict.main(
        ["--model", str(out), "--input", str(dataset / "imagesTs"), "--output", str(tmp_path / "pred"), "--no-progress"]
    )
    source = nib.load(dataset / "imagesTs" / "blob_99_0000.nii.gz")
    assert nib.load(written[0]).shape == source.shape and np.allclose(nib.load(written[0]).affine, source.affine)
    (tmp_path / "ref").mkdir()
    nib.save(nib.Nifti1Image(test_label, affine), tmp_path / "ref" / "blob_99.nii.gz")
    summary = evaluate.evaluate_folders(tmp_path / "ref", tmp_path / "pred", dataset_json=dataset / "dataset.json")
    assert set(summary["per_class_mean"]) == {"shell", "core"}  # the MSD labels, inverted to name -> value
    assert_scores_are_the_dice_of_the_files(summary, tmp_path / "ref", tmp_path / "pred", {"shell": 1, "core": 2})


def test_torchrun_two_gloo_ranks_train_checkpoint_every_rank_and_refuse_another_world_size(dataset, tmp_path):
    """train.py unchanged under torchrun (2 CPU ranks, gloo): DDP, per-rank loaders, rank-0 checkpoint holding every
    rank's loader state, masks verified across ranks every epoch, resume on another world size refused."""
    import subprocess
    import sys

    out = tmp_path / "run"
    args = run_args(dataset, out, "--threads", "1", epochs=2, iters=2)
    script = str(EXAMPLE / "train.py")
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-3000:]
    # Rank 0 alone prints; verify() ran (and passed) at the end of every epoch on both ranks.
    assert ddp.stdout.count("epoch 0:") == 1 and ddp.stdout.count("done:") == 1, ddp.stdout
    assert ddp.stdout.count("masks verified on 2 ranks") == 2, ddp.stdout
    assert "2 processes (global batch" in ddp.stdout
    fold = out / "fold_0"
    rows = list(csv.DictReader(open(fold / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    # update_every = max(1, 4 // 50) = 1, and at density 0.2 the updates run to the end of the run: 4 of them.
    assert sum(int(r["topology_updates"]) for r in rows) == 4
    final = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    masks = final["sparsity"]["masks"]
    assert masks and all(int(m.sum()) == round(0.2 * m.numel()) for m in masks.values())
    assert len(final["sparsity"]["history"]) == 4
    latest = torch.load(fold / "checkpoint_latest.pth", weights_only=False)
    assert latest["config"]["world_size"] == 2 and latest["epoch"] == 1
    assert [r["train_loader"]["batches_drawn"] for r in latest["ranks"]] == [4, 4]
    # Each rank drew its own batches (seed + 1000 * rank).
    assert latest["ranks"][0]["train_loader"]["bit_generator"] != latest["ranks"][1]["train_loader"]["bit_generator"]
    assert not any(k.startswith("module.") for k in latest["model"])  # saved unwrapped: predict.py loads it

    single = subprocess.run([sys.executable, script, *args, "--resume"], capture_output=True, text=True, timeout=120)
    assert single.returncode == 2
    assert "written by a run on 2 process(es), this one has 1" in single.stderr, single.stderr[-2000:]


@pytest.mark.parametrize(
    ("granularity", "sparse_layers"),
    [
        ("input_channel", "fusion"),
        ("input_channel", "fusion-convs"),
        ("input_channel_blocks", "fusion-convs"),
        ("input_channel_pool", "fusion-convs"),
    ],
)
def test_predict_compacts_an_input_channel_sparse_run_to_the_same_segmentation(
    dataset, tmp_path, granularity, sparse_layers
):
    """predict.py runs a sparse E2ENet compacted (dead channels not computed); --no-compact runs it masked. Both
    give the same softmax to float rounding, so the same labels. With --sparse-layers fusion-convs the transposed
    convs are not masked: every coarse channel reaches them, and compaction still matches."""
    out = tmp_path / "run"
    flags = dict(granularity=granularity, sparse_layers=sparse_layers)
    result = train.train(run_config(dataset, out, **flags, density=0.1, epochs=1))
    masked_ups = [name for name in result["sparsity"].target_names if ".up." in name]
    assert bool(masked_ups) == (sparse_layers == "fusion")
    assert all(".convs." in name for name in result["sparsity"].target_names if name not in masked_ups)
    fold = torch.load(out / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert (fold["config"]["granularity"], fold["config"]["sparse_layers"]) == (granularity, sparse_layers)
    models, *_ = predict.load_folds(out, None, "final", torch.device("cpu"))
    assert type(models[0]).__name__ == "CompactE2ENet"
    outputs = {}
    for flag in ([], ["--no-compact"]):
        target = tmp_path / f"pred{''.join(flag)}"
        predict.main(
            ["--model", str(out), "--input", str(dataset / "imagesTs"), "--output", str(target)]
            + ["--save-probabilities", "--no-progress", *flag]
        )
        outputs[bool(flag)] = target
    case = next(outputs[False].glob("*.nii.gz")).name
    labels = [np.asarray(nib.load(outputs[k] / case).dataobj) for k in (False, True)]
    assert np.array_equal(labels[0], labels[1])
    probs = [np.load(outputs[k] / case.replace(".nii.gz", ".npz"))["probabilities"] for k in (False, True)]
    assert np.abs(probs[0].astype(np.float32) - probs[1].astype(np.float32)).max() < 1e-3


def test_compare_reports_mean_and_spread_over_seeds_under_one_recipe(dataset, tmp_path):
    workdir = tmp_path / "compare"
    settings = ["E2ENet dense", "DynUNet (nnU-Net)"]
    rows = compare.main(
        ["--data", str(dataset), "--workdir", str(workdir), "--seeds", "2", "--settings", *settings]
        + ["--epochs", "1", "--iters-per-epoch", "2", "--lr", "0.02", "--json", str(workdir / "rows.json")]
    )
    assert [r["name"] for r in rows] == settings
    for row in rows:
        dice = [run["mdice"] for run in row["runs"]]
        assert row["seeds"] == [0, 1] and row["iterations"] == 2
        assert row["mdice"] == pytest.approx(np.mean(dice)) and row["mdice_std"] == pytest.approx(np.std(dice, ddof=1))
        for seed in (0, 1):  # every run trained with the recipe asked for
            run = workdir / compare.folder_name(row["name"]) / f"seed_{seed}"
            config = checkpoint.load_checkpoint(run / "fold_0" / "checkpoint_final.pth")["config"]
            assert config["lr"] == 0.02 and config["seed"] == seed
    assert json.loads((workdir / "rows.json").read_text())["rows"][0]["name"] == settings[0]
    assert (workdir / "learning_curves.png").stat().st_size > 0
    assert (workdir / "dice_over_time.png").stat().st_size > 0


def test_validation_loss_is_finite_when_autocast_gives_float16_logits():
    """CUDA autocast hands validation float16 logits; a loss summed over a 48^3 patch in float16 overflowed to NaN."""
    from e2enet.training.epoch_log import validate
    from e2enet.training.loss import dice_ce_loss

    class Float16Logits(torch.nn.Module):
        def forward(self, image):
            return torch.cat([image, -image, 0 * image], dim=1).half()

    generator = torch.Generator().manual_seed(0)
    shape = (2, 1, 48, 48, 48)
    batches = iter([{"image": torch.randn(shape, generator=generator), "label": torch.randint(0, 3, shape)}])
    trainer = types.SimpleNamespace(
        model=Float16Logits(),
        val_loader=batches,
        loss_fn=dice_ce_loss(),
        autocast=contextlib.nullcontext,
        config=types.SimpleNamespace(budget=types.SimpleNamespace(val_iters=1)),
        plans=types.SimpleNamespace(num_classes=3),
        procs=types.SimpleNamespace(device=torch.device("cpu")),
    )
    loss, counts = validate(trainer)
    assert np.isfinite(loss)
    assert counts.sum() > 0


@pytest.mark.parametrize(
    ("preset", "density", "flags", "rules"),
    [
        ("cpu-demo", "0.1", [], (0.2, 0.75)),  # measured better at CPU budgets below density 0.2
        ("cpu-demo", "0.19", [], (0.2, 0.75)),
        ("cpu-demo", "0.2", [], (0.5, 1.0)),  # from 0.2 up the paper's rules measured as good or better
        ("paper", "0.1", [], (0.5, 1.0)),  # the authors' rules at every density
        ("cpu-demo", "0.1", ["--drop-fraction", "0.5", "--update-until", "1.0"], (0.5, 1.0)),  # given flags win
        ("cpu-demo", "0.5", ["--update-until", "0.75"], (0.5, 0.75)),
    ],
)
def test_topology_update_rules_follow_the_preset_and_density_unless_given(tmp_path, preset, density, flags, rules):
    argv = ["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--preset", preset, "--density", density]
    updates = cli.parse_config([*argv, *flags]).sparsity.updates
    assert (updates.drop_fraction, updates.update_until) == rules


def test_the_demo_gives_each_e2enet_rows_cost_as_a_multiple_of_dynunets():
    rows = [
        {"name": "E2ENet dense", "seconds_per_iteration": 0.6, "inference_seconds_per_case": 1.0},
        {"name": "E2ENet DSFF 0.2", "seconds_per_iteration": 0.45, "inference_seconds_per_case": 3.0},
        {"name": "DynUNet (nnU-Net)", "seconds_per_iteration": 0.3, "inference_seconds_per_case": 2.0},
    ]
    lines = demo.cost_against_baseline(rows).strip().splitlines()
    assert lines[1:] == [
        "  E2ENet dense: 2.00x its time per training iteration, 0.50x its inference time",
        "  E2ENet DSFF 0.2: 1.50x its time per training iteration, 1.50x its inference time",
    ]


def test_a_suite_run_that_train_refuses_fails_with_the_reason_in_one_line(tmp_path, monkeypatch, capsys):
    def refuse(name, config):
        raise Problem("fold_0/checkpoint_latest.pth was written by an earlier version of train.py")

    monkeypatch.setattr(compare, "run_setting", refuse)
    config = make_config(data=tmp_path / "data", out=tmp_path / "run", density=1.0)
    with pytest.raises(SystemExit) as exited:
        compare.run_in_child("E2ENet dense", config)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and "written by an earlier version" in err
    assert "written by an earlier version" in (tmp_path / "run" / "compare.log").read_text()
    assert not (tmp_path / "run" / compare.RESULT_FILE).exists()
