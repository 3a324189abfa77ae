"""Tests of the E2ENet example's evaluator (examples/e2enet/evaluate.py): metric values on hand-made
masks, the empty-class rules, folder evaluation through NIfTI files, and bad-input errors."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from e2enet import atomic
from e2enet.evaluation import evaluate

SHAPE = (24, 24, 24)


def cube(start: tuple[int, int, int], size: int = 8, value: int = 1, shape=SHAPE) -> np.ndarray:
    array = np.zeros(shape, dtype=np.uint8)
    array[tuple(slice(s, s + size) for s in start)] = value
    return array


def scores(ref, pred, spacing=(1.0, 1.0, 1.0), labels=(1,), tolerance=1.0) -> dict:
    return evaluate.evaluate_arrays(ref, pred, spacing, list(labels), tolerance)["classes"]["1"]


def affine_for(spacing) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 2.5]  # a non-trivial origin, as real scans have
    return affine


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.uint8), affine), path)


# --------------------------------------------------------------------------- metrics on arrays


def test_dice_of_overlapping_cubes_is_exact():
    ref = cube((8, 8, 8), size=10)
    pred = cube((10, 8, 8), size=10)  # shifted 2 voxels: overlap 8 x 10 x 10 = 800 of 1000 + 1000
    assert scores(ref, pred)["dice"] == pytest.approx(0.8, abs=1e-12)
    assert scores(ref, ref)["dice"] == 1.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5)])
def test_nsd_identical_and_shift_within_tolerance_is_one(spacing):
    ref = cube((8, 8, 8))
    assert scores(ref, ref, spacing, tolerance=0.0)["nsd"] == pytest.approx(1.0)
    shifted = cube((9, 8, 8))  # one voxel along axis 0 = spacing[0] mm
    assert scores(ref, shifted, spacing, tolerance=spacing[0])["nsd"] == pytest.approx(1.0)


def test_nsd_below_one_when_shift_exceeds_tolerance_in_mm():
    ref, shifted = cube((8, 8, 8)), cube((9, 8, 8))
    spacing = (2.0, 1.0, 0.5)
    # the same one-voxel shift is 2 mm: beyond 1.9 mm, within 2 mm; so the tolerance is read in mm
    assert scores(ref, shifted, spacing, tolerance=1.9)["nsd"] < 0.9
    assert scores(ref, cube((11, 8, 8)), spacing, tolerance=2.0)["nsd"] < 0.9


@pytest.mark.parametrize("axis, voxels", [(0, 1), (1, 2), (2, 3)])
def test_hd95_of_shifted_cube_is_shift_in_mm(axis, voxels):
    spacing = (0.8, 2.5, 1.0)
    start = [8, 8, 8]
    start[axis] += voxels
    result = scores(cube((8, 8, 8)), cube(tuple(start)), spacing)
    assert result["hd95"] == pytest.approx(voxels * spacing[axis], rel=1e-6)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI-internal deprecation
def test_matches_monai_on_the_full_volume():
    """The evaluator crops to the masks before calling MONAI; the values must not change, including
    for masks touching the image border."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(0)
    ref = (rng.random(SHAPE) < 0.5).astype(np.uint8)
    ref[:, :, 12:] = 0  # ragged masks touching five of the six image faces
    pred = np.roll(ref, 2, axis=0) * (rng.random(SHAPE) < 0.9)
    spacing, tolerance = [0.8, 2.5, 1.0], 1.5
    result = scores(ref, pred, spacing, tolerance=tolerance)
    ref_t, pred_t = (torch.from_numpy(a.astype(bool))[None, None] for a in (ref, pred))
    nsd = compute_surface_dice(pred_t, ref_t, [tolerance], include_background=True, spacing=spacing, use_subvoxels=True)
    hd95 = compute_hausdorff_distance(pred_t, ref_t, include_background=True, percentile=95, spacing=spacing)
    assert result["nsd"] == pytest.approx(nsd.item(), rel=1e-6)
    assert result["hd95"] == pytest.approx(hd95.item(), rel=1e-6)


def test_region_label_is_union_of_values():
    ref = cube((4, 4, 4), value=1) + cube((14, 14, 14), value=2)
    pred = cube((4, 4, 4), value=2) + cube((14, 14, 14), value=1)  # values swapped: region still identical
    result = evaluate.evaluate_arrays(ref, pred, (1, 1, 1), {"whole": [1, 2], "one": 1}, 1.0)["classes"]
    assert result["whole"]["dice"] == 1.0
    assert result["one"]["dice"] == 0.0


def test_empty_class_rules():
    ref = cube((2, 2, 2), value=1) + cube((14, 2, 2), value=2)  # 2 only in the reference
    pred = cube((2, 2, 2), value=1) + cube((2, 14, 14), value=3)  # 3 only in the prediction, 4 nowhere
    result = evaluate.evaluate_arrays(ref, pred, (1, 1, 1), [1, 2, 3, 4], 1.0)
    classes = result["classes"]
    assert classes["1"]["status"] == "scored" and classes["1"]["hd95"] == 0.0
    assert {k: classes["2"][k] for k in ("dice", "nsd", "hd95", "status")} == {
        "dice": 0.0,
        "nsd": 0.0,
        "hd95": None,
        "status": "empty_prediction",
    }
    assert {k: classes["3"][k] for k in ("dice", "nsd", "hd95", "status")} == {
        "dice": 0.0,
        "nsd": 0.0,
        "hd95": None,
        "status": "empty_reference",
    }
    assert {k: classes["4"][k] for k in ("dice", "nsd", "hd95", "status")} == {
        "dice": None,
        "nsd": None,
        "hd95": None,
        "status": "both_empty",
    }
    # case mean: Dice over classes 1-3 (the failures count), HD95 over class 1 only
    assert result["mean"]["dice"] == pytest.approx(1 / 3)
    assert result["mean"]["hd95"] == 0.0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="background"):
        evaluate.evaluate_arrays(cube((2, 2, 2)), cube((2, 2, 2)), (1, 1, 1), [0, 1], 1.0)
    with pytest.raises(ValueError, match="spacing"):
        evaluate.evaluate_arrays(cube((2, 2, 2)), cube((2, 2, 2)), (1, 1), [1], 1.0)


# --------------------------------------------------------------------------- folders


@pytest.fixture
def dataset(tmp_path):
    """Two cases on an anisotropic grid; 'liver' shifted one voxel along axis 1 (2.5 mm), 'spleen'
    perfect in case a and missed in case b, 'tumour' absent everywhere but predicted in case b."""
    spacing = (0.8, 2.5, 1.0)
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    for case, spleen_predicted in (("case_a", True), ("case_b", False)):
        ref = cube((2, 2, 2), value=1) + cube((14, 14, 14), value=2)
        spleen_or_false_tumour = cube((14, 14, 14), value=2) if spleen_predicted else cube((14, 2, 14), value=3)
        pred = cube((2, 3, 2), value=1) + spleen_or_false_tumour
        write_nifti(ref_dir / f"{case}.nii.gz", ref, affine_for(spacing))
        write_nifti(pred_dir / f"{case}.nii.gz", pred, affine_for(spacing))
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, "liver": 1, "spleen": 2, "tumour": 3},
                "numTraining": 2,
                "file_ending": ".nii.gz",
            }
        )
    )
    return ref_dir, pred_dir, dataset_json


def test_folder_evaluation_cli_writes_json_and_table(dataset, tmp_path, capsys):
    ref_dir, pred_dir, dataset_json = dataset
    out = tmp_path / "out" / "summary.json"
    argv = ["--ref", str(ref_dir), "--pred", str(pred_dir), "--dataset-json", str(dataset_json), "--json", str(out)]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("liver", "spleen", "tumour", "case_a", "case_b", "Dice", "NSD", "HD95"):
        assert name in printed

    summary = json.loads(out.read_text())
    assert set(summary) >= {"per_case", "per_class_mean", "mean", "labels", "settings"}
    assert summary["labels"] == {"liver": 1, "spleen": 2, "tumour": 3}
    case_a = summary["per_case"][0]
    assert case_a["case"] == "case_a" and case_a["spacing"] == pytest.approx([0.8, 2.5, 1.0])
    # spacing from the header: a one-voxel shift along axis 1 is 2.5 mm
    assert case_a["classes"]["liver"]["hd95"] == pytest.approx(2.5)

    liver, spleen, tumour = (summary["per_class_mean"][n] for n in ("liver", "spleen", "tumour"))
    assert spleen["dice"] == pytest.approx(0.5)  # 1 in case a, 0 (missed) in case b
    assert spleen["hd95"] == 0.0 and spleen["n_scored"] == {"dice": 2, "nsd": 2, "hd95": 1}
    assert spleen["counts"]["empty_prediction"] == 1
    assert tumour["dice"] == 0.0 and tumour["hd95"] is None  # false positive in b; both empty in a
    assert tumour["counts"] == {"scored": 0, "both_empty": 1, "empty_reference": 1, "empty_prediction": 0}
    assert tumour["n_scored"] == {"dice": 1, "nsd": 1, "hd95": 0}
    # overall = mean of per-class means; a class without any HD95 does not count towards it
    assert summary["mean"]["dice"] == pytest.approx((liver["dice"] + 0.5 + 0.0) / 3)
    assert summary["mean"]["hd95"] == pytest.approx((liver["hd95"] + spleen["hd95"]) / 2)
    assert summary["mean"]["counts"]["both_empty"] == 1


def test_labels_default_to_values_in_references(dataset):
    ref_dir, pred_dir, _ = dataset
    with pytest.warns(UserWarning, match=r"case_b: predicted label\(s\) \[3\] are none of the scored classes"):
        summary = evaluate.evaluate_folders(ref_dir, pred_dir)
    assert summary["labels"] == {"1": 1, "2": 2}  # 3 appears only in a prediction
    assert summary["unscored_prediction_labels"] == {"case_b": [3]}
    with pytest.warns(UserWarning, match="not scored"):
        assert evaluate.evaluate_folders(ref_dir, pred_dir, labels=[2])["labels"] == {"2": 2}


def test_missing_prediction_names_case_or_scores_empty(dataset, capsys):
    ref_dir, pred_dir, dataset_json = dataset
    (pred_dir / "case_b.nii.gz").rename(pred_dir / "case_b_0000.nii.gz")
    with pytest.raises(ValueError, match=r"case_b.*naming mismatch.*--allow-missing"):
        evaluate.evaluate_folders(ref_dir, pred_dir, dataset_json=dataset_json)
    assert evaluate.main(["--ref", str(ref_dir), "--pred", str(pred_dir)]) == 2
    assert "case_b" in capsys.readouterr().err

    summary = evaluate.evaluate_folders(ref_dir, pred_dir, dataset_json=dataset_json, allow_missing=True)
    case_b = summary["per_case"][1]
    assert case_b["missing_prediction"] and case_b["classes"]["liver"]["status"] == "empty_prediction"
    assert summary["missing_predictions"] == ["case_b"] and summary["unmatched_predictions"] == ["case_b_0000"]
    assert "case_b" in evaluate.format_table(summary)


def test_shape_mismatch_names_case(dataset):
    ref_dir, pred_dir, _ = dataset
    write_nifti(pred_dir / "case_a.nii.gz", np.zeros((24, 24, 20)), affine_for((0.8, 2.5, 1.0)))
    with pytest.raises(ValueError, match=r"case case_a: prediction shape .* original image grid"):
        evaluate.evaluate_folders(ref_dir, pred_dir)


def test_affine_mismatch_names_case(dataset):
    ref_dir, pred_dir, _ = dataset
    write_nifti(pred_dir / "case_b.nii.gz", cube((2, 2, 2)), np.eye(4))  # the usual bug: identity affine
    with pytest.raises(ValueError, match=r"case case_b: prediction affine differs .* reference\.affine"):
        evaluate.evaluate_folders(ref_dir, pred_dir)


def test_non_integer_prediction_is_rejected(dataset):
    ref_dir, pred_dir, _ = dataset
    probabilities = cube((2, 2, 2)).astype(np.float32) * 0.7
    nib.save(nib.Nifti1Image(probabilities, affine_for((0.8, 2.5, 1.0))), pred_dir / "case_a.nii.gz")
    with pytest.raises(ValueError, match="case case_a: prediction holds non-integer values"):
        evaluate.evaluate_folders(ref_dir, pred_dir)


def set_dataset_labels(dataset_json: Path, labels: dict) -> None:
    meta = json.loads(dataset_json.read_text())
    dataset_json.write_text(json.dumps({**meta, "labels": labels}))


def test_a_reference_value_the_dataset_json_does_not_declare_is_refused(dataset, capsys):
    """Spleen (2) is in the references but not declared: it would be scored as background."""
    ref_dir, pred_dir, dataset_json = dataset
    set_dataset_labels(dataset_json, {"background": 0, "liver": 1})
    assert evaluate.main(["--ref", str(ref_dir), "--pred", str(pred_dir), "--dataset-json", str(dataset_json)]) == 2
    err = capsys.readouterr().err
    assert f"reference {ref_dir / 'case_a.nii.gz'} holds label value(s) [2]" in err and "does not declare" in err, err
    # --labels chooses the classes to score: the others are warned about and recorded, not refused
    with pytest.warns(UserWarning, match=r"case_a: reference label\(s\) \[2\] are none of the scored classes"):
        summary = evaluate.evaluate_folders(ref_dir, pred_dir, labels=[1])
    assert summary["unscored_reference_labels"] == {"case_a": [2], "case_b": [2]}


def test_a_class_named_background_at_another_value_is_refused(dataset):
    ref_dir, pred_dir, dataset_json = dataset
    set_dataset_labels(dataset_json, {"spleen": 0, "liver": 1, "background": 2})
    with pytest.raises(ValueError, match=r"gives 'background' the value 2, but background is 0"):
        evaluate.evaluate_folders(ref_dir, pred_dir, dataset_json=dataset_json)


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        ("read-only", "error: cannot access {summary} (Permission denied); give this user the permission"),
        ("full-disk", "error: cannot write {summary} (No space left on device); free space on that disk"),
    ],
)
def test_a_summary_that_cannot_be_written_is_one_line_and_leaves_no_file(
    dataset, monkeypatch, capsys, failure, message
):
    ref_dir, pred_dir, dataset_json = dataset
    summary = ref_dir.parent / "out" / "summary.json"
    if failure == "read-only":

        def refused(path, mode):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

        monkeypatch.setattr(atomic, "open", refused, raising=False)  # the temporary file of the atomic write
    else:

        def full(descriptor):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
    argv = ["--ref", str(ref_dir), "--pred", str(pred_dir), "--dataset-json", str(dataset_json), "--json", str(summary)]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(summary=summary)) and err.count("\n") == 1, err
    assert list(summary.parent.iterdir()) == []  # neither the summary nor its temporary file
