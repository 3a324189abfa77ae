"""A pipeline that never lies: every way the E2ENet example could quietly corrupt a run, train on broken
data, reuse a stale prediction or hide a problem under a traceback, each pinned by a test.

Tiny data throughout: the MNI dataset at 5 mm (about 35 x 44 x 27 voxels), one-epoch runs of two iterations, and
synthetic 6-12 voxel volumes for the file-level checks.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e2enet.dataset import cli as data
from e2enet.dataset.layout import convert_msd_dataset
from e2enet.dataset.verify import verify_dataset
from e2enet.evaluation import evaluate
from e2enet.inference import predict
from e2enet.preprocessing import planning
from e2enet.training import train
from e2enet.training.divergence import DivergenceGuard
from e2enet.training.epoch_log import pseudo_dice
from tests.e2enet.raw_datasets import write_nifti
from tests.e2enet.tiny_runs import exit_status, predict_args, snapshot, train_args

# --------------------------------------------------------------------------- helpers


def synthetic_dataset(root: Path, num_cases: int = 2, size: int = 10, meta: dict | None = None) -> Path:
    """``num_cases`` valid one-channel cases of ``size``^3 (a noisy image, a cube of foreground)."""
    dataset = root / "Dataset901_Tiny"
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(num_cases):
        label = np.zeros((size,) * 3, np.uint8)
        label[2:-2, 2:-2, 3:-3] = 1
        image = rng.normal(100, 10, label.shape).astype(np.float32) + 50 * label
        write_nifti(dataset / "imagesTr" / f"case_{i}_0000.nii.gz", image)
        write_nifti(dataset / "labelsTr" / f"case_{i}.nii.gz", label)
    default = {
        "channel_names": {"0": "T1"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
    }
    (dataset / "dataset.json").write_text(json.dumps({**default, **(meta or {})}))
    return dataset


def edit_image(path: Path, change) -> None:
    image = nib.load(path)
    array = image.get_fdata(dtype=np.float32)
    change(array)
    write_nifti(path, array, image.affine)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# --------------------------------------------------------------------------- 1. a refused --resume changes nothing


def renamed_class(mni: Path, root: Path) -> Path:
    """The MNI dataset with one class renamed: other plans (another preprocessing hash), the same images."""
    other = Path(shutil.copytree(mni, root / "Dataset990_Renamed"))
    meta = json.loads((other / "dataset.json").read_text())
    meta["labels"] = {("cortex" if k == "grey_matter" else k): v for k, v in meta["labels"].items()}
    (other / "dataset.json").write_text(json.dumps(meta))
    return other


def test_a_refused_resume_rewrites_nothing_in_the_run_folder(mni, run_copy, tmp_path, capsys):
    other = renamed_class(mni, tmp_path)
    before = snapshot(run_copy)
    status, err = exit_status(train.main, train_args(other, run_copy, "--resume"), capsys)
    assert snapshot(run_copy) == before  # plans.json and config.json included: predict.py still sees the old run
    assert status == 2 and "preprocessing_hash saved" in err, err


# --------------------------------------------------------------------------- 2. extreme values, damaged gzip


def test_verify_reads_every_file_in_full_and_reports_a_flipped_byte(tmp_path):
    dataset = synthetic_dataset(tmp_path)
    path = dataset / "imagesTr" / "case_1_0000.nii.gz"
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x10  # inside the deflate stream: decodes to other voxels unless the CRC is checked
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"case_1: .*case_1_0000\.nii\.gz is damaged"):
        verify_dataset(dataset)


@pytest.mark.parametrize(
    "change, value",
    [
        (lambda a: a.__setitem__((4, 4, 4), 1e20), "1e+20"),
        (lambda a: a.__setitem__((slice(0, 3),), -3.4e38), "-3.4e+38"),  # a float32-minimum padding slab
    ],
    ids=["one-extreme-voxel", "padding-slab"],
)
def test_verify_flags_values_that_would_collapse_normalisation(tmp_path, change, value):
    dataset = synthetic_dataset(tmp_path)
    edit_image(dataset / "imagesTr" / "case_1_0000.nii.gz", change)
    with pytest.raises(ValueError, match=r"case_1: case_1_0000\.nii\.gz has \d+ voxel\(s\) with extreme values") as e:
        verify_dataset(dataset)
    assert value in str(e.value)


@pytest.mark.parametrize("extreme", [1e20, -3.4e38], ids=["one-extreme-voxel", "padding-slab"])
def test_normalisation_stops_rather_than_produce_zeros_or_nan(tmp_path, extreme):
    dataset = synthetic_dataset(tmp_path)
    edit_image(dataset / "imagesTr" / "case_1_0000.nii.gz", lambda a: a.__setitem__((slice(0, 3),), extreme))
    with pytest.raises(ValueError, match=r"case_1: normalising case_1_0000\.nii\.gz"):
        planning.plan_and_preprocess(dataset, tmp_path / "pre", verify=False, network_stride=4)


def test_divergence_in_the_first_epoch_names_no_checkpoint(tmp_path):
    guard = DivergenceGuard(amp=False, distributed=False, checkpoint_path=tmp_path / "checkpoint_latest.pth")
    with pytest.raises(SystemExit) as e:
        guard.check_loss(torch.tensor(float("nan")), epoch=0)
    message = str(e.value)
    assert "epoch -1" not in message and "checkpoint_latest.pth" not in message and "no checkpoint" in message


# --------------------------------------------------------------------------- 3. predictions: atomic, manifest


def test_a_truncated_prediction_is_predicted_again(mni, run, tmp_path):
    output = tmp_path / "pred"
    first = predict.main(predict_args(run, mni / "imagesTs", output))
    truncate(first[0])  # what a run killed mid-write left behind
    again = predict.main(predict_args(run, mni / "imagesTs", output))
    assert again == [first[0]]
    assert nib.load(first[0]).get_fdata().shape == nib.load(next((mni / "imagesTs").glob("*.nii.gz"))).shape


def test_predictions_of_other_settings_are_refused_or_replaced(mni, run, tmp_path, capsys):
    output = tmp_path / "pred"
    predict.main(predict_args(run, mni / "imagesTs", output))
    status, err = exit_status(
        predict.main, predict_args(run, mni / "imagesTs", output, "--checkpoint", "latest"), capsys
    )
    assert status == 2 and "checkpoint" in err and "--overwrite" in err, err
    replaced = predict.main(predict_args(run, mni / "imagesTs", output, "--checkpoint", "latest", "--overwrite"))
    assert len(replaced) == 2


def test_probabilities_are_written_for_cases_predicted_before(mni, run, tmp_path):
    output = tmp_path / "pred"
    predict.main(predict_args(run, mni / "imagesTs", output))
    predict.main(predict_args(run, mni / "imagesTs", output, "--save-probabilities"))
    for case in ("mni_test_000", "mni_test_001"):
        with np.load(output / f"{case}.npz") as saved:
            assert saved["probabilities"].shape[0] == 4


def test_an_input_that_changed_is_predicted_again(mni, run, tmp_path):
    images = Path(shutil.copytree(mni / "imagesTs", tmp_path / "images"))
    output = tmp_path / "pred"
    predict.main(predict_args(run, images, output))
    edit_image(images / "mni_test_001_0000.nii.gz", lambda a: a.__imul__(0.5))
    assert predict.main(predict_args(run, images, output)) == [output / "mni_test_001.nii.gz"]


# --------------------------------------------------------------------------- 4. training into an existing run


def test_training_again_into_a_run_needs_resume_or_overwrite(mni, run_copy, capsys):
    before = snapshot(run_copy)
    status, err = exit_status(train.main, train_args(mni, run_copy), capsys)
    assert status == 2 and "--resume" in err and "--overwrite" in err, err
    assert snapshot(run_copy) == before
    result = train.main(train_args(mni, run_copy, "--overwrite"))
    assert [row["epoch"] for row in result["log"]] == [0]


def test_a_fold_of_other_plans_is_refused_in_a_run_with_trained_folds(mni, run_copy, tmp_path, capsys):
    before = snapshot(run_copy)
    status, err = exit_status(train.main, train_args(renamed_class(mni, tmp_path), run_copy, "--fold", "1"), capsys)
    assert status == 2 and "fold_0 trained with preprocessing_hash" in err and "delete those folds" in err, err
    assert snapshot(run_copy) == before


# --------------------------------------------------------------------------- 5. folds of another run


def test_predict_refuses_a_fold_trained_on_other_data(mni, run_copy, tmp_path, capsys):
    state = torch.load(run_copy / "fold_0" / "checkpoint_final.pth", weights_only=False)
    state["config"]["preprocessing_hash"] = "0123456789ab"
    (run_copy / "fold_1").mkdir()
    torch.save(state, run_copy / "fold_1" / "checkpoint_final.pth")
    status, err = exit_status(predict.main, predict_args(run_copy, mni / "imagesTs", tmp_path / "pred"), capsys)
    assert status == 2, err
    assert str(Path("fold_1") / "checkpoint_final.pth") in err and "preprocessing" in err, err
    assert str(Path("fold_0") / "checkpoint_final.pth") not in err  # fold 0 matches its run


# --------------------------------------------------------------------------- 6. truncated files, every script


def test_verify_lists_a_truncated_file_among_every_other_problem(tmp_path):
    dataset = synthetic_dataset(tmp_path, num_cases=3)
    truncate(dataset / "imagesTr" / "case_0_0000.nii.gz")
    edit_image(dataset / "imagesTr" / "case_2_0000.nii.gz", lambda a: a.__setitem__((1, 1, 1), np.nan))
    with pytest.raises(ValueError, match="2 problem") as e:
        verify_dataset(dataset)
    assert "case_0: " in str(e.value) and "truncated" in str(e.value) and "case_2: " in str(e.value)


def test_a_truncated_file_is_a_one_line_error_in_every_script(mni, run, tmp_path, capsys):
    dataset = Path(shutil.copytree(mni, tmp_path / mni.name))
    truncate(dataset / "imagesTr" / "mni_train_002_0000.nii.gz")
    status, err = exit_status(data.main, ["verify", "--data", str(dataset)], capsys)
    assert status == 2 and "mni_train_002_0000.nii.gz" in err and "truncated" in err, err
    out = tmp_path / "new_run"
    status, err = exit_status(train.main, train_args(dataset, out), capsys)
    assert status == 2 and "mni_train_002_0000.nii.gz" in err and "Traceback" not in err, err
    assert not out.exists()  # no empty fold folder left behind
    truncate(dataset / "imagesTs" / "mni_test_001_0000.nii.gz")
    status, err = exit_status(predict.main, predict_args(run, dataset / "imagesTs", tmp_path / "pred"), capsys)
    assert status == 2 and "mni_test_001_0000.nii.gz" in err, err
    truncate(dataset / "labelsTs" / "mni_test_000.nii.gz")
    status, err = exit_status(
        evaluate.main, ["--ref", str(dataset / "labelsTs"), "--pred", str(mni / "labelsTs")], capsys
    )
    assert status == 2 and "mni_test_000.nii.gz" in err, err


# --------------------------------------------------------------------------- 7. dataset.json keys


@pytest.mark.parametrize(
    "meta, expected",
    [
        ({"channel_names": {"1": "T1"}}, r"channel_names keys must be \"0\"\.\.\"0\""),
        ({"channel_names": {"0": "T1", "2": "T2"}}, r"channel_names keys must be \"0\"\.\.\"1\""),
        ({"labels": {"background": 0, "lesion": True}}, r"labels must map names to single ints"),
        ({"numTraining": "2"}, r"numTraining must be a whole number, got '2' \(a string\)"),
    ],
    ids=["channels-from-1", "channel-gap", "bool-label", "string-count"],
)
def test_dataset_json_keys_and_types_are_checked(tmp_path, meta, expected):
    with pytest.raises(ValueError, match=expected):
        verify_dataset(synthetic_dataset(tmp_path, meta=meta))


# --------------------------------------------------------------------------- 8. one-line errors, not tracebacks


def test_predict_problems_are_one_line_errors(mni, run, run_copy, tmp_path, capsys):
    images, output = mni / "imagesTs", tmp_path / "pred"
    cases = [
        (predict_args(tmp_path, images, output), "not a run folder"),
        (predict_args(run, tmp_path / "nowhere", output), "does not exist"),
    ]
    (run_copy / "fold_0" / "checkpoint_final.pth").write_bytes(b"PK\x03\x04 truncated")
    cases.append((predict_args(run_copy, images, output), "damaged"))
    for argv, expected in cases:
        status, err = exit_status(predict.main, argv, capsys)
        assert status == 2 and expected in err and "Traceback" not in err, err


def test_predict_names_a_class_count_that_does_not_match_the_run(mni, run_copy, tmp_path, capsys):
    config = json.loads((run_copy / "config.json").read_text())
    (run_copy / "config.json").write_text(json.dumps({**config, "num_classes": 5}))
    status, err = exit_status(predict.main, predict_args(run_copy, mni / "imagesTs", tmp_path / "pred"), capsys)
    assert status == 2 and "num_classes" in err and "checkpoint_final.pth" in err, err


def test_train_shows_a_dataset_problem_as_one_line_and_creates_nothing(tmp_path, capsys):
    dataset = synthetic_dataset(tmp_path, meta={"numTraining": 3})
    out = tmp_path / "run"
    status, err = exit_status(train.main, train_args(dataset, out), capsys)
    assert status == 2 and err.startswith("error: ") and "numTraining is 3" in err, err
    assert not out.exists()


def test_convert_msd_names_a_missing_file(tmp_path):
    task = tmp_path / "Task05_Missing"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    write_nifti(task / "imagesTr" / "a.nii.gz", np.zeros((4, 4, 4), np.float32))
    meta = {
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "x"},
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}],
    }
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"lists 1 file\(s\) that do not exist \(.*labelsTr/a\.nii\.gz"):
        convert_msd_dataset(task, tmp_path / "raw")
    assert not (tmp_path / "raw" / "Dataset005_Missing").exists()


def test_a_2d_image_is_told_what_is_wrong(tmp_path):
    dataset = synthetic_dataset(tmp_path)
    write_nifti(dataset / "imagesTr" / "case_1_0000.nii.gz", np.ones((10, 10), np.float32))
    with pytest.raises(ValueError, match=r"case_1_0000\.nii\.gz is 2D") as e:
        verify_dataset(dataset)
    assert "convert-msd" not in str(e.value)


# --------------------------------------------------------------------------- 9. minor, silent


def test_pseudo_dice_leaves_out_a_class_absent_from_validation():
    counts = torch.tensor([[5.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # TP, FP, FN of classes 1 and 2
    dice = pseudo_dice(counts)
    assert dice[0] == pytest.approx(10 / 13, rel=1e-6) and np.isnan(dice[1])


def test_evaluate_warns_about_predicted_labels_it_does_not_score(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:5, 2:5, 2:5] = 1
    write_nifti(ref / "a.nii.gz", label)
    label[6, 6, 6] = 4
    write_nifti(pred / "a.nii.gz", label)
    with pytest.warns(UserWarning, match=r"a: predicted label\(s\) \[4\] .* not scored"):
        evaluate.evaluate_folders(ref, pred, labels=[1])


def test_verify_flags_a_blank_image_with_a_foreground_label(tmp_path):
    dataset = synthetic_dataset(tmp_path)
    edit_image(dataset / "imagesTr" / "case_0_0000.nii.gz", lambda a: a.fill(0))
    with pytest.raises(ValueError, match=r"case_0: case_0_0000\.nii\.gz is blank \(every voxel is 0\)"):
        verify_dataset(dataset)


def test_dataset_given_as_dot_is_resolved(tmp_path, monkeypatch):
    dataset = synthetic_dataset(tmp_path)
    monkeypatch.chdir(dataset)
    assert planning.default_preprocessed_dir(Path(".")) == tmp_path / "preprocessed" / dataset.name
    plans, _ = planning.plan_and_preprocess(Path("."), preprocess=False, network_stride=4)
    assert plans.dataset_name == dataset.name and not (dataset / "preprocessed").exists()


# --------------------------------------------------------------------------- random corruption


@pytest.fixture(scope="module")
def small_case(tmp_path_factory) -> Path:
    return synthetic_dataset(tmp_path_factory.mktemp("small"), num_cases=1, size=8)  # at 6 the label cube is empty


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    file=st.sampled_from(["imagesTr/case_0_0000.nii.gz", "labelsTr/case_0.nii.gz"]),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_random_byte_damage_is_reported_or_harmless(small_case, file, flips):
    original = np.asanyarray(nib.load(small_case / file).dataobj)
    with tempfile.TemporaryDirectory() as folder:
        dataset = Path(shutil.copytree(small_case, Path(folder) / small_case.name))
        damaged = bytearray((dataset / file).read_bytes())
        for where, mask in flips:
            damaged[int(where * len(damaged))] ^= mask
        (dataset / file).write_bytes(bytes(damaged))
        try:
            verify_dataset(dataset)
        except ValueError as problem:
            assert Path(file).name in str(problem)
        else:
            assert np.array_equal(np.asanyarray(nib.load(dataset / file).dataobj), original)
            assert gzip.decompress(bytes(damaged))  # the whole stream decodes, CRC included


# --------------------------------------------------------------------------- the preprocessed cache


def test_a_damaged_preprocessed_case_is_named_or_recomputed(tmp_path):
    from e2enet.preprocessing import preprocess as preprocessing

    dataset = synthetic_dataset(tmp_path)
    plans, report = planning.plan_and_preprocess(dataset, tmp_path / "pre", network_stride=4)
    (report.directory / "case_0.json").write_text("{")  # a damaged sidecar: the case is recomputed
    truncate(report.directory / "case_1.npz")  # a damaged array file whose sidecar still matches
    _, again = planning.plan_and_preprocess(dataset, tmp_path / "pre", network_stride=4)
    assert again.computed == ["case_0"] and again.reused == ["case_1"]
    assert preprocessing.load_preprocessed_case(report.directory, "case_0").data.shape[0] == 1
    with pytest.raises(ValueError, match=r"case_1: the preprocessed .*case_1\.npz or case_1\.json is damaged"):
        preprocessing.load_preprocessed_case(report.directory, "case_1")
