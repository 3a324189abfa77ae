"""Tests of the E2ENet example's data pipeline (dataset, planning, preprocessing, the data.py CLI), its atomic
writes and the MNI dataset builder; the training loader's are in test_loader.py.

Small sizes throughout (MNI at 4 mm, 32^3 patches) so the module runs in well under two minutes
on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from e2enet.atomic import atomic_write, write_json
from e2enet.dataset import cli as data
from e2enet.dataset import mni as prepare_mni
from e2enet.dataset.layout import convert_msd_dataset, read_dataset_json
from e2enet.dataset.verify import verify_dataset
from e2enet.preprocessing import planning
from e2enet.preprocessing import preprocess as preprocessing
from tests.e2enet.raw_datasets import NUM_TEST, NUM_TRAIN, make_dataset, write_nifti

# --------------------------------------------------------------------------- helpers


def world_z(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(volume, world z in mm of every voxel) of a NIfTI file."""
    img = nib.load(path)
    ijk = np.indices(img.shape).reshape(3, -1)
    z = (img.affine[2, :3] @ ijk + img.affine[2, 3]).reshape(img.shape)
    return np.asanyarray(img.dataobj), z


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def ct_dataset(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """Three 12^3 cases with a CT channel (air -1000, tissue ~ N(40, 20) with outliers) and a T2 channel."""
    rng = np.random.default_rng(0)
    cases, ct_volumes = {}, {}
    for i in range(3):
        label = np.zeros((12, 12, 12), np.uint8)
        label[3:9, 2:10, 4:10] = 1
        ct = np.full(label.shape, -1000.0) + rng.normal(0, 5, label.shape)
        ct[label == 1] = rng.normal(40, 20, int(label.sum()))
        ct[3, 2, 4 + i] = 3000.0  # a metal-like outlier that the 99.5 percentile clip removes
        t2 = rng.normal(200 + 50 * i, 30, label.shape)
        cases[f"ct_{i}"] = ([ct, t2], label)
        ct_volumes[f"ct_{i}"] = ct.astype(np.float32)
    dataset = make_dataset(tmp_path, {"0": "CT", "1": "T2"}, {"background": 0, "organ": 1}, cases)
    return dataset, ct_volumes


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """Two valid 10^3 two-channel cases, the starting point of every bad-input test."""
    rng = np.random.default_rng(1)
    cases = {}
    for case_id in ("case_a", "case_b"):
        label = np.zeros((10, 10, 10), np.uint8)
        label[2:6, 3:7, 4:8] = 1
        cases[case_id] = ([rng.normal(100, 10, label.shape), rng.normal(50, 5, label.shape)], label)
    return make_dataset(tmp_path, {"0": "T1", "1": "T2"}, {"background": 0, "lesion": 1}, cases)


# --------------------------------------------------------------------------- prepare_mni


def test_prepare_mni_writes_a_valid_four_class_dataset(mni_dataset):
    cases = verify_dataset(mni_dataset)
    assert [c.case_id for c in cases] == [f"mni_train_{i:03d}" for i in range(NUM_TRAIN)]
    meta = json.loads((mni_dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1"}
    assert meta["labels"] == {"background": 0, "grey_matter": 1, "white_matter": 2, "csf_other": 3}
    label_files = sorted(mni_dataset.glob("labelsT[rs]/*.nii.gz"))
    assert len(label_files) == NUM_TRAIN + NUM_TEST
    for path in label_files:
        label = np.asanyarray(nib.load(path).dataobj)
        counts = np.bincount(label.ravel(), minlength=4)
        assert len(counts) == 4 and (counts > 0).all(), f"{path.name}: class counts {counts}"
        # grey matter is the largest tissue class and CSF/other the smallest, as in the template
        assert counts[1] > counts[2] > counts[3], f"{path.name}: class counts {counts}"


def test_prepare_mni_is_deterministic_per_case(mni_dataset, tmp_path):
    single = prepare_mni.build_mni_dataset(tmp_path, num_train=1, num_test=0, seed=3, spacing_mm=4.0)
    for sub in ("imagesTr/mni_train_000_0000.nii.gz", "labelsTr/mni_train_000.nii.gz"):
        a, b = nib.load(mni_dataset / sub), nib.load(single / sub)
        np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
        np.testing.assert_array_equal(a.affine, b.affine)


def test_held_out_region_is_absent_from_training_and_present_in_test(mni_dataset):
    """Checked from the files alone: world z of the headers is template z up to a bounded deformation."""
    held_out = json.loads((mni_dataset / prepare_mni.PROVENANCE_FILE).read_text())["held_out"]
    limit = held_out["z_cut_mm"] + held_out["world_margin_mm"]
    for path in sorted((mni_dataset / "imagesTr").glob("*.nii.gz")):
        image, z = world_z(path)
        assert z[image > 0].max() <= limit, f"{path.name} shows anatomy above z = {limit:.1f} mm"
    for path in sorted((mni_dataset / "labelsTs").glob("*.nii.gz")):
        label, z = world_z(path)
        brain = label > 0
        above = brain & (z > limit)
        # the top 20 % of the brain minus the margin: several percent of the brain's voxels
        assert above.sum() > 0.03 * brain.sum(), f"{path.name}: only {above.sum()} brain voxels above {limit:.1f} mm"
        assert set(np.unique(label[above])) >= {1, 2}, "the held-out region holds grey and white matter"


def test_prepare_mni_refuses_to_overwrite_foreign_folders(tmp_path):
    foreign = tmp_path / f"Dataset{prepare_mni.DATASET_ID}_{prepare_mni.DATASET_NAME}"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_mni.build_mni_dataset(tmp_path, num_train=1, num_test=0, spacing_mm=6.0)
    with pytest.raises(FileExistsError, match="not written by prepare_mni"):
        prepare_mni.build_mni_dataset(tmp_path, num_train=1, num_test=0, spacing_mm=6.0, overwrite=True)
    assert (foreign / "precious.txt").exists()


# --------------------------------------------------------------------------- plan and preprocess


def test_mri_plan_and_preprocessed_cases(mni_dataset, mni_preprocessed):
    out, plans, report = mni_preprocessed
    images = sorted((mni_dataset / "imagesTr").glob("*.nii.gz"))
    spacings = np.array([nib.affines.voxel_sizes(nib.load(p).affine) for p in images])
    np.testing.assert_allclose(plans.target_spacing, np.median(spacings, axis=0))
    assert plans.normalization == [preprocessing.ZScoreNormalization("T1", use_nonzero_mask=True)]
    assert plans.fingerprint.median_relative_size_after_cropping < 0.75  # skull-stripped: the crop removes much
    assert all(p % 16 == 0 for p in plans.patch_size) and np.prod(plans.patch_size) <= 32**3
    assert plans.batch_size >= 2
    assert planning.Plans.load(out / planning.PLANS_FILE) == plans
    saved = json.loads((out / planning.PLANS_FILE).read_text())  # a readable file: plain keys, the hash included
    assert saved["normalization"] == [{"channel": "T1", "scheme": "zscore", "use_nonzero_mask": True}]
    assert saved["preprocessing_hash"] == plans.preprocessing_hash
    assert sorted(report.computed) == plans.fingerprint.case_ids and report.reused == []

    case = preprocessing.load_preprocessed_case(report.directory, "mni_train_000")
    preprocessed_spacing = nib.affines.voxel_sizes(np.array(case.properties["preprocessed_affine"]))
    np.testing.assert_allclose(preprocessed_spacing, plans.target_spacing, rtol=1e-4)
    inside = case.data[0][case.nonzero_mask]
    # z-scored before resampling (as nnU-Net), and bilinear resampling averages away some of the
    # voxel noise, so the std lands a little under 1
    assert abs(inside.mean()) < 0.05 and 0.8 < inside.std() <= 1.0
    assert (case.data[0][~case.nonzero_mask] == 0).all()
    assert set(np.unique(case.seg)) == {0, 1, 2, 3}
    for cls, where in case.locations.items():
        assert (case.seg[tuple(where.T)] == cls).all()


def test_revert_preprocessing_restores_the_original_grid(mni_dataset, mni_preprocessed):
    _, plans, _ = mni_preprocessed
    image = mni_dataset / "imagesTr" / "mni_train_001_0000.nii.gz"
    label_file = mni_dataset / "labelsTr" / "mni_train_001.nii.gz"
    _, seg, _, properties = preprocessing.preprocess_case([image], label_file, plans)
    assert properties["resampled"]
    restored = preprocessing.revert_preprocessing(seg, properties)
    original = np.asanyarray(nib.load(label_file).dataobj)
    assert restored.shape == original.shape
    assert (restored == original).mean() > 0.95  # two nearest-neighbour resamplings by a few percent
    one_hot = np.eye(4, dtype=np.float32)[seg].transpose(3, 0, 1, 2)
    probabilities = preprocessing.revert_preprocessing(one_hot, properties, is_label=False)
    assert probabilities.shape == (4, *original.shape)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)


def test_ct_channel_is_clipped_and_z_scored_with_dataset_statistics(ct_dataset, tmp_path):
    dataset, ct_volumes = ct_dataset
    plans, report = planning.plan_and_preprocess(dataset, tmp_path / "pre", network_stride=4)
    ct_norm, t2_norm = plans.normalization
    assert ct_norm.scheme == "CT" and t2_norm == preprocessing.ZScoreNormalization("T2", use_nonzero_mask=False)

    labels = {cid: np.asanyarray(nib.load(dataset / "labelsTr" / f"{cid}.nii.gz").dataobj) for cid in ct_volumes}
    foreground = np.concatenate([ct_volumes[cid][labels[cid] > 0] for cid in ct_volumes])  # < 10,000: all sampled
    lo, hi = np.percentile(foreground, [0.5, 99.5])
    np.testing.assert_allclose(ct_norm.clip, [lo, hi], rtol=1e-6)
    np.testing.assert_allclose([ct_norm.mean, ct_norm.std], [foreground.mean(), foreground.std()], rtol=1e-5)
    assert hi < 3000  # the outliers are clipped away

    for cid, raw in ct_volumes.items():
        case = preprocessing.load_preprocessed_case(report.directory, cid)
        expected = (np.clip(raw, lo, hi) - foreground.mean()) / foreground.std()
        np.testing.assert_allclose(case.data[0], expected, rtol=1e-4, atol=1e-4)
        # T2 is z-scored per image, so every case has mean 0 and std 1 whatever its raw level
        assert abs(case.data[1].mean()) < 1e-4 and abs(case.data[1].std() - 1) < 1e-4


def test_preprocessing_cache_is_reused_and_invalidated(ct_dataset, tmp_path):
    dataset, _ = ct_dataset
    out = tmp_path / "pre"
    plans, first = planning.plan_and_preprocess(dataset, out, network_stride=4)
    assert sorted(first.computed) == ["ct_0", "ct_1", "ct_2"]
    stamps = {p.name: p.stat().st_mtime_ns for p in first.directory.iterdir()}

    again = preprocessing.preprocess_dataset(dataset, out, plans)
    assert again.computed == [] and sorted(again.reused) == ["ct_0", "ct_1", "ct_2"]
    assert {p.name: p.stat().st_mtime_ns for p in again.directory.iterdir()} == stamps

    bigger_patch = dataclasses.replace(plans, patch_size=[16, 16, 16])  # does not change preprocessed arrays
    assert bigger_patch.preprocessing_hash == plans.preprocessing_hash

    coarser = dataclasses.replace(plans, target_spacing=[2.0, 2.0, 2.0])
    changed = preprocessing.preprocess_dataset(dataset, out, coarser)
    assert changed.directory != first.directory and sorted(changed.computed) == ["ct_0", "ct_1", "ct_2"]
    assert preprocessing.load_preprocessed_case(changed.directory, "ct_0").data.shape[1:] == (6, 6, 6)

    edited = dataset / "imagesTr" / "ct_1_0000.nii.gz"
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 10**9))
    after_edit = preprocessing.preprocess_dataset(dataset, out, plans)
    assert after_edit.computed == ["ct_1"] and sorted(after_edit.reused) == ["ct_0", "ct_2"]


def test_plans_file_format_and_preprocessing_hash_are_stable(tmp_path):
    """plans.json keeps its plain keys, and the hash naming the cache folder its value, so caches stay valid."""
    entries = {
        "dataset_name": "Dataset900_Synthetic",
        "channel_names": {"0": "CT", "1": "T2"},
        "labels": {"background": 0, "organ": 1},
        "num_classes": 2,
        "orientation": "RAS",
        "target_spacing": [1.0, 1.25, 2.5],
        "median_shape": [12.0, 10.0, 6.0],
        "network_stride": [4, 4, 4],
        "patch_size": [12, 12, 8],
        "batch_size": 2,
        "normalization": [
            {
                "channel": "CT",
                "scheme": "CT",
                "use_nonzero_mask": False,
                "clip": [-12.5, 95.25],
                "mean": 40.5,
                "std": 19.75,
            },
            {"channel": "T2", "scheme": "zscore", "use_nonzero_mask": True},
        ],
        "fingerprint": {
            "case_ids": ["a", "b"],
            "spacings": [[1.0, 1.25, 2.5], [1.0, 1.25, 2.5]],
            "orientations": ["RAS", "RAS"],
            "shapes_before_crop": [[12, 10, 6], [12, 10, 6]],
            "shapes_after_crop": [[12, 10, 6], [12, 10, 6]],
            "median_relative_size_after_cropping": 1.0,
            "foreground_intensity_properties_per_channel": {"0": {"mean": 40.5}, "1": {"mean": 200.0}},
        },
        "preprocessing_hash": "cc870cd8fbe0",  # written by every version of the example since the cache began
    }
    plans = planning.Plans.from_json(entries)
    assert plans.preprocessing_hash == "cc870cd8fbe0"
    assert plans.to_json() == entries
    assert planning.Plans.load(plans.save(tmp_path / planning.PLANS_FILE)) == plans
    with pytest.raises(ValueError, match="unknown normalisation scheme 'minmax'"):
        planning.Plans.from_json({**entries, "normalization": [{"channel": "T2", "scheme": "minmax"}]})


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"epoch": 1})
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b'{"epoch": 2, "half')
        raise RuntimeError("crash while writing")
    assert json.loads(path.read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left behind


def test_atomic_writes_of_one_file_by_two_writers_at_once_do_not_collide(tmp_path):
    path = tmp_path / "case.npz"
    with atomic_write(path) as first:
        first.write(b"first, ")
        with atomic_write(path) as second:  # another process preprocessing the same dataset
            second.write(b"second")
        assert path.read_bytes() == b"second"
        first.write(b"complete")
    assert path.read_bytes() == b"first, complete"  # the last complete write wins; nothing half-written
    assert [p.name for p in tmp_path.iterdir()] == ["case.npz"]
    (tmp_path / "plain").write_bytes(b"")
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode  # the mode of any file written with open()


def test_splits_follow_nnunet_and_are_reused(tmp_path):
    from sklearn.model_selection import KFold

    ids = [f"case_{i:02d}" for i in range(11)]
    splits = planning.get_splits(tmp_path, list(reversed(ids)))
    assert len(splits) == 5
    for split, (train, val) in zip(splits, KFold(5, shuffle=True, random_state=12345).split(ids), strict=True):
        assert split == {"train": [ids[i] for i in train], "val": [ids[i] for i in val]}
    assert sorted(sum((s["val"] for s in splits), [])) == ids
    custom = [{"train": ids[:-1], "val": ids[-1:]}]
    (tmp_path / planning.SPLITS_FILE).write_text(json.dumps(custom))
    assert planning.get_splits(tmp_path, ids) == custom  # an existing file wins, as in nnU-Net
    assert planning.fold_cases(tmp_path, ids, "all") == (ids, ids)
    with pytest.raises(ValueError, match="case_99"):
        planning.get_splits(tmp_path, ids + ["case_99"])


# --------------------------------------------------------------------------- MSD conversion


def test_msd_task_is_converted_to_the_v2_layout(tmp_path):
    task = tmp_path / "Task05_Prostate"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    (task / "imagesTs").mkdir()
    rng = np.random.default_rng(3)
    affine = np.diag([0.6, 0.6, 3.6, 1.0])
    volumes = {}
    for case_id in ("prostate_00", "prostate_01", "prostate_02"):
        volumes[case_id] = rng.normal(100, 10, (8, 8, 6, 2)).astype(np.float32)
        folder = "imagesTs" if case_id == "prostate_02" else "imagesTr"
        write_nifti(task / folder / f"{case_id}.nii.gz", volumes[case_id], affine)
    for case_id in ("prostate_00", "prostate_01"):
        write_nifti(task / "labelsTr" / f"{case_id}.nii.gz", rng.integers(0, 3, (8, 8, 6)).astype(np.uint8), affine)
    (task / "imagesTr" / "._prostate_00.nii.gz").write_bytes(b"macOS resource fork")  # present in real MSD archives
    meta = {
        "name": "PROSTATE",
        "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "numTraining": 2,
        "training": [
            {"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
            for c in ("prostate_00", "prostate_01")
        ],
        "test": ["./imagesTs/prostate_02.nii.gz"],
    }
    (task / "dataset.json").write_text(json.dumps(meta))

    with pytest.raises(ValueError, match="convert-msd"):
        read_dataset_json(task)
    converted = convert_msd_dataset(task, tmp_path / "raw")
    assert converted.name == "Dataset005_Prostate"
    new_meta = json.loads((converted / "dataset.json").read_text())
    assert new_meta["channel_names"] == {"0": "T2", "1": "ADC"}
    assert new_meta["labels"] == {"background": 0, "PZ": 1, "TZ": 2}
    assert new_meta["numTraining"] == 2 and new_meta["file_ending"] == ".nii.gz"
    assert len(verify_dataset(converted)) == 2
    for channel in (0, 1):
        img = nib.load(converted / "imagesTr" / f"prostate_01_{channel:04d}.nii.gz")
        np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), volumes["prostate_01"][..., channel])
        np.testing.assert_allclose(img.affine, affine)
    assert (converted / "imagesTs" / "prostate_02_0001.nii.gz").is_file()
    with pytest.raises(ValueError, match="already exists"):
        convert_msd_dataset(task, tmp_path / "raw")


# --------------------------------------------------------------------------- bad input


def _drop_channel(dataset: Path) -> None:
    (dataset / "imagesTr" / "case_b_0001.nii.gz").unlink()


def _drop_label(dataset: Path) -> None:
    (dataset / "labelsTr" / "case_b.nii.gz").unlink()


def _wrong_count(dataset: Path) -> None:
    meta = json.loads((dataset / "dataset.json").read_text())
    (dataset / "dataset.json").write_text(json.dumps(dict(meta, numTraining=3)))


def _label_shape(dataset: Path) -> None:
    write_nifti(dataset / "labelsTr" / "case_b.nii.gz", np.zeros((10, 10, 9), np.uint8))


def _label_affine(dataset: Path) -> None:
    label = np.asanyarray(nib.load(dataset / "labelsTr" / "case_b.nii.gz").dataobj)
    write_nifti(dataset / "labelsTr" / "case_b.nii.gz", label, np.diag([1.0, 1.0, 2.0, 1.0]))


def _undeclared_label(dataset: Path) -> None:
    label = np.asanyarray(nib.load(dataset / "labelsTr" / "case_b.nii.gz").dataobj).copy()
    label[0, 0, 0] = 5
    write_nifti(dataset / "labelsTr" / "case_b.nii.gz", label)


def _no_foreground(dataset: Path) -> None:
    for path in (dataset / "labelsTr").glob("*.nii.gz"):
        write_nifti(path, np.zeros((10, 10, 10), np.uint8))


def _class_in_no_training_label(dataset: Path) -> None:
    meta = json.loads((dataset / "dataset.json").read_text())
    (dataset / "dataset.json").write_text(json.dumps(dict(meta, labels={**meta["labels"], "edema": 2})))


def _nan_voxel(dataset: Path) -> None:
    path = dataset / "imagesTr" / "case_b_0000.nii.gz"
    image = nib.load(path).get_fdata(dtype=np.float32)
    image[4, 4, 4] = np.nan
    write_nifti(path, image)


def _extra_channel(dataset: Path) -> None:
    shutil.copy(dataset / "imagesTr" / "case_b_0000.nii.gz", dataset / "imagesTr" / "case_b_0002.nii.gz")


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (_drop_channel, r"case_b: missing channel file\(s\) \['case_b_0001.nii.gz'\]"),
        (_drop_label, r"case_b: no label case_b.nii.gz"),
        (_wrong_count, r"numTraining is 3 but imagesTr holds 2 case"),
        (_label_shape, r"case_b: label shape \(10, 10, 9\) != image shape \(10, 10, 10\)"),
        (_label_affine, r"case_b: label affine differs from the image affine"),
        (_undeclared_label, r"case_b: label values \[5\] are not declared"),
        (_no_foreground, r"no training label holds any foreground.*'lesion' \(1\).*put the segmentations in labelsTr"),
        (_class_in_no_training_label, r"class 'edema' \(value 2\) is declared .* occurs in no training label"),
        (_nan_voxel, r"case_b: case_b_0000.nii.gz has 1 NaN/inf voxel"),
        (_extra_channel, r"case_b: file case_b_0002.nii.gz is channel 2 but dataset.json declares 2 channel"),
    ],
    ids=[
        "missing-channel",
        "missing-label",
        "numTraining",
        "shape",
        "affine",
        "undeclared",
        "no-foreground",
        "absent-class",
        "nan",
        "extra-channel",
    ],
)
def test_bad_input_is_reported_with_case_and_problem(tiny_dataset, corrupt, expected):
    verify_dataset(tiny_dataset)  # valid before corruption
    corrupt(tiny_dataset)
    with pytest.raises(ValueError, match=expected):
        verify_dataset(tiny_dataset)


def test_verify_lists_every_problem_at_once(tiny_dataset):
    _drop_label(tiny_dataset)
    _nan_voxel(tiny_dataset)
    label_a = np.asanyarray(nib.load(tiny_dataset / "labelsTr" / "case_a.nii.gz").dataobj).copy()
    label_a[0, 0, 0] = 7
    write_nifti(tiny_dataset / "labelsTr" / "case_a.nii.gz", label_a)
    with pytest.raises(ValueError, match="3 problem") as info:
        verify_dataset(tiny_dataset)
    message = str(info.value)
    assert "case_b: no label" in message and "NaN" in message and "case_a: label values [7]" in message


def test_ct_plan_without_any_foreground_is_refused(tmp_path):
    empty = np.zeros((8, 8, 8), np.uint8)
    air = np.random.default_rng(0).normal(-1000.0, 5.0, (2, *empty.shape))  # not blank: verify would refuse that
    cases = {f"ct_{i}": ([air[i]], empty) for i in range(2)}
    dataset = make_dataset(tmp_path, {"0": "CT"}, {"background": 0, "organ": 1}, cases)
    with pytest.raises(ValueError, match=r"channel 0 \(CT\) uses CT normalisation.*no training case has a foreground"):
        planning.plan_and_preprocess(dataset, tmp_path / "pre", verify=False, network_stride=4)  # verify refuses it


def test_plan_stops_before_preprocessing_bad_data(tiny_dataset, tmp_path, capsys):
    _nan_voxel(tiny_dataset)
    assert data.main(["plan", "--data", str(tiny_dataset), "--out", str(tmp_path / "pre")]) == 2
    assert "case_b: case_b_0000.nii.gz has 1 NaN/inf voxel" in capsys.readouterr().err
    assert not (tmp_path / "pre").exists()


def test_plan_cli_prints_the_plan(ct_dataset, tmp_path, capsys):
    dataset, _ = ct_dataset
    assert data.main(["plan", "--data", str(dataset), "--out", str(tmp_path / "pre"), "--stride", "4"]) == 0
    printed = capsys.readouterr().out
    assert "patch size     [12, 12, 12]" in printed and "CT: CT (clip" in printed and "3 computed" in printed
