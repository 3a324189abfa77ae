"""Prediction is never silently wrong about where things are: an image in another orientation is segmented in the
training data's frame and written back on its own grid, channels on different grids are refused, and the output
folder is never the input's, nor left holding a file the manifest wrongly calls complete.

Tiny data throughout: the MNI tasks at 5-6 mm and one-epoch runs of two iterations. Such a network segments badly,
but not symmetrically: predicting an image in another frame than the training data's changes a quarter of its
voxels, so agreement in world space shows the reorientation, not a blank prediction.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2enet.atomic import atomic_write
from e2enet.dataset import mni as prepare_mni
from e2enet.inference import predict
from e2enet.preprocessing import planning
from e2enet.training import train
from tests.e2enet.raw_datasets import make_dataset
from tests.e2enet.tiny_runs import exit_status, predict_args, snapshot, train_args

CASE = "mni_test_000"


def in_world(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A segmentation as (array, affine) in RAS: two segmentations of one place compare equal whatever their frames."""
    image = nib.as_closest_canonical(nib.load(path))
    return np.asanyarray(image.dataobj), image.affine


def save_reoriented(source: Path, folder: Path, ornt: np.ndarray) -> nib.Nifti1Image:
    """``source`` with its array axes permuted and flipped by ``ornt`` and its affine adjusted, every voxel in its
    place in the world, saved under the same name in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    image = nib.load(source).as_reoriented(ornt)
    nib.save(image, folder / source.name)
    return image


@pytest.fixture(scope="module")
def reference(mni, run, tmp_path_factory) -> tuple[np.ndarray, np.ndarray]:
    """The segmentation of the test case as stored (RAS, as the training data), in world space."""
    images = tmp_path_factory.mktemp("reference_images")
    shutil.copy(mni / "imagesTs" / f"{CASE}_0000.nii.gz", images)
    [segmentation] = predict.main(predict_args(run, images, tmp_path_factory.mktemp("reference")))
    return in_world(segmentation)


# --------------------------------------------------------------------------- 1. orientation


def test_the_training_orientation_is_recorded_and_several_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:6, 2:6, 3:5] = 1
    cases = {f"case_{i}": ([rng.normal(100, 10, label.shape) + 50 * label], label) for i in range(3)}
    dataset = make_dataset(tmp_path, {"0": "T1"}, {"background": 0, "lesion": 1}, cases)
    plans, _ = planning.plan_and_preprocess(dataset, tmp_path / "pre", preprocess=False, network_stride=4)
    assert plans.orientation == "RAS"
    assert json.loads((tmp_path / "pre" / planning.PLANS_FILE).read_text())["orientation"] == "RAS"
    for path in (dataset / "imagesTr" / "case_2_0000.nii.gz", dataset / "labelsTr" / "case_2.nii.gz"):
        save_reoriented(path, path.parent, np.array([[0, -1], [1, 1], [2, 1]]))  # stored as LAS
    with pytest.raises(ValueError, match=r"2 orientations \(nibabel axis codes: RAS for case_0, case_1; LAS for "):
        planning.plan_and_preprocess(dataset, tmp_path / "pre", preprocess=False, network_stride=4)


def test_an_image_in_another_orientation_is_segmented_in_the_training_frame(mni, run, reference, tmp_path, capsys):
    source = mni / "imagesTs" / f"{CASE}_0000.nii.gz"
    las = save_reoriented(source, tmp_path / "las", np.array([[0, -1], [1, 1], [2, 1]]))
    assert nib.aff2axcodes(las.affine) == ("L", "A", "S")
    capsys.readouterr()
    [segmentation] = predict.main(predict_args(run, tmp_path / "las", tmp_path / "pred"))
    written = nib.load(segmentation)
    assert written.shape == las.shape and np.allclose(written.affine, las.affine)  # on the input's own grid
    array, affine = in_world(segmentation)
    assert np.allclose(affine, reference[1]) and np.array_equal(array, reference[0])  # the same segmentation
    assert f"{CASE}: stored in LAS orientation; predicted in the training data's RAS" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "pred" / predict.MANIFEST_FILE).read_text())
    assert manifest["cases"][CASE]["reoriented_from"] == "LAS"


def test_an_affine_without_a_direction_is_named(tmp_path):
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:6, 2:6, 3:5] = 1
    dataset = make_dataset(tmp_path, {"0": "T1"}, {"background": 0, "lesion": 1}, {"case_0": ([label + 1.0], label)})
    for path in (dataset / "imagesTr" / "case_0_0000.nii.gz", dataset / "labelsTr" / "case_0.nii.gz"):
        image = nib.load(path)
        image.header.set_qform(None, code=0)
        image.header.set_sform(np.diag([0, 1, 1, 1]), code=2)  # x points nowhere: a broken header
        nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), None, image.header), path)
    with pytest.raises(ValueError, match=r"case_0_0000\.nii\.gz: its affine .* maps an array axis to no direction"):
        planning.plan_and_preprocess(dataset, tmp_path / "pre", preprocess=False, network_stride=4)


# --------------------------------------------------------------------------- 2. channels of one case


@pytest.fixture(scope="module")
def two_channel_run(tmp_path_factory) -> tuple[Path, Path]:
    """(a run on the two-channel lesions task, its test images)."""
    root = tmp_path_factory.mktemp("lesions")
    dataset = prepare_mni.build_mni_dataset(root, num_train=2, num_test=1, spacing_mm=6.0, task="lesions")
    out = root / "run"
    train.main(train_args(dataset, out, "--fold", "all"))
    return out, dataset / "imagesTs"


def shifted_and_scaled(path: Path) -> None:
    image = nib.load(path)
    affine = image.affine @ np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] += 25.0
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), affine), path)


def one_slice_less(path: Path) -> None:
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[..., :-1], image.affine), path)


@pytest.mark.parametrize("change", [shifted_and_scaled, one_slice_less], ids=["shifted-and-scaled", "other-shape"])
def test_channels_of_a_case_on_different_grids_are_refused(two_channel_run, tmp_path, capsys, change):
    run, test_images = two_channel_run
    images = Path(shutil.copytree(test_images, tmp_path / "images"))
    [second] = sorted(images.glob("*_0001.nii.gz"))
    change(second)
    status, err = exit_status(predict.main, predict_args(run, images, tmp_path / "pred"), capsys)
    case = second.name.removesuffix("_0001.nii.gz")
    assert status == 2 and "Traceback" not in err, err
    assert f"case '{case}': {second.name} (shape" in err and f"is not on the grid of {case}_0000.nii.gz" in err, err
    assert f"resample {second.name} onto channel 0" in err, err
    assert not (tmp_path / "pred").exists()


# --------------------------------------------------------------------------- 3. the output folder


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_an_output_folder_of_input_images_is_refused(mni, run, tmp_path, capsys, overwrite):
    images = Path(shutil.copytree(mni / "imagesTs", tmp_path / "images"))
    (tmp_path / "link").symlink_to(images)
    elsewhere = Path(shutil.copytree(images, tmp_path / "copy"))
    extra = ["--overwrite"] if overwrite else []
    for output, expected in [
        (images, "is the --input folder"),
        (tmp_path / "link", "is the --input folder"),
        (elsewhere, f"holds 2 of the input images (e.g. {CASE}_0000.nii.gz)"),
    ]:
        before = snapshot(output)
        status, err = exit_status(predict.main, predict_args(run, images, output, *extra), capsys)
        assert status == 2 and expected in err and "pass a folder of their own" in err, err
        assert snapshot(output) == before


def test_an_output_that_is_a_file_is_refused(mni, run, tmp_path, capsys):
    output = tmp_path / "predictions.nii.gz"
    output.write_bytes(b"not a folder")
    status, err = exit_status(predict.main, predict_args(run, mni / "imagesTs", output), capsys)
    assert status == 2 and f"--output {output} is a file, not a folder" in err, err


# --------------------------------------------------------------------------- 4. failed writes


def test_a_read_only_output_folder_is_one_line_naming_the_fix(mni, run, tmp_path, capsys, monkeypatch):
    def refused(image, path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(predict, "save_nifti", refused)
    output = tmp_path / "pred"
    status, err = exit_status(predict.main, predict_args(run, mni / "imagesTs", output), capsys)
    assert status == 2 and "Traceback" not in err, err
    assert f"cannot write {output / CASE}.nii.gz (Permission denied); make {output} writable" in err, err
    assert list(output.iterdir()) == []


def disk_full(path: Path) -> None:
    """What a full disk does to an atomic write: part of the file is written, then the write fails."""
    with atomic_write(path) as f:
        f.write(b"the first blocks")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing", ["segmentation", "probabilities", "manifest"])
def test_a_full_disk_leaves_no_case_recorded_that_was_not_written(mni, run, tmp_path, capsys, monkeypatch, failing):
    second, output = "mni_test_001", tmp_path / "pred"
    target = {
        "segmentation": output / f"{second}.nii.gz",
        "probabilities": output / f"{second}.npz",
        "manifest": output / predict.MANIFEST_FILE,
    }[failing]
    real_save_nifti, real_atomic_write, real_write_json = predict.save_nifti, predict.atomic_write, predict.write_json

    def save_nifti(image, path):
        if path == target:
            disk_full(path)
        real_save_nifti(image, path)

    def write_npz(path):
        if path == target:
            disk_full(path)
        return real_atomic_write(path)

    def write_json(path, obj):
        if path == target and (output / f"{second}.nii.gz").exists():  # the manifest that would record the second
            disk_full(path)
        real_write_json(path, obj)

    monkeypatch.setattr(predict, "save_nifti", save_nifti)
    monkeypatch.setattr(predict, "atomic_write", write_npz)
    monkeypatch.setattr(predict, "write_json", write_json)
    argv = predict_args(run, mni / "imagesTs", output, "--save-probabilities")
    status, err = exit_status(predict.main, argv, capsys)
    assert status == 2 and "Traceback" not in err, err
    assert f"cannot write {target} (No space left on device); free space on that disk" in err, err
    assert not list(output.glob(".*.tmp"))  # no half-written file left, under any name
    assert failing != "segmentation" or not target.exists()
    recorded = json.loads((output / predict.MANIFEST_FILE).read_text())["cases"]
    assert list(recorded) == [CASE]
    monkeypatch.undo()
    assert predict.main(argv) == [output / f"{second}.nii.gz"]  # the unrecorded case is predicted again


# --------------------------------------------------------------------------- 5. any axis order, any direction


@settings(max_examples=6, deadline=None)
@given(axes=st.permutations([0, 1, 2]), flips=st.tuples(st.booleans(), st.booleans(), st.booleans()))
def test_any_axis_order_and_direction_gives_the_same_segmentation_in_world_space(mni, run, reference, axes, flips):
    ornt = np.array([[axis, -1 if flip else 1] for axis, flip in zip(axes, flips, strict=True)])
    with tempfile.TemporaryDirectory() as folder:
        image = save_reoriented(mni / "imagesTs" / f"{CASE}_0000.nii.gz", Path(folder) / "images", ornt)
        [segmentation] = predict.main(predict_args(run, Path(folder) / "images", Path(folder) / "pred"))
        assert nib.load(segmentation).shape == image.shape
        array, affine = in_world(segmentation)
    assert np.allclose(affine, reference[1]) and np.array_equal(array, reference[0])
