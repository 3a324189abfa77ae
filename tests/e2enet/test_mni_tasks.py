"""The embedded MNI tasks (prepare_mni.py --task NAME) and compare.py's suite mode over them."""

from __future__ import annotations

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from e2enet.dataset import mni as prepare_mni
from e2enet.dataset import mni_tasks
from e2enet.experiments import compare
from e2enet.preprocessing import planning

COARSE_MM = 4.0  # every task builds in about a second at this spacing
EXPECTED = {  # task -> (foreground classes, channel names)
    "tissue": (3, ["T1"]),
    "regions": (7, ["T1"]),
    "deep": (3, ["T1"]),
    "parcels": (13, ["T1"]),
    "lesions": (4, ["T1", "T2"]),
    "ct": (3, ["CT"]),
}
TISSUE_OF_REGION = {  # region label -> tissue label
    0: 0,
    **{
        mni_tasks.REGION_LABELS[f"grey_matter_{side}_{half}"]: 1
        for side in ("left", "right")
        for half in ("front", "back")
    },
    mni_tasks.REGION_LABELS["white_matter_left"]: 2,
    mni_tasks.REGION_LABELS["white_matter_right"]: 2,
    mni_tasks.REGION_LABELS["csf_other"]: 3,
}


def _labels(dataset, split: str) -> list[np.ndarray]:
    return [np.asarray(nib.load(f).dataobj) for f in sorted((dataset / f"labels{split}").glob("*.nii.gz"))]


def _images(dataset, split: str, case: str) -> list[nib.Nifti1Image]:
    return [nib.load(f) for f in sorted((dataset / f"images{split}").glob(f"{case}_*.nii.gz"))]


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("suite")
    return {
        task: prepare_mni.build_mni_dataset(root, num_train=2, num_test=1, spacing_mm=COARSE_MM, task=task)
        for task in prepare_mni.SUITE
    }


@pytest.fixture(scope="module")
def deep_full_size(tmp_path_factory):
    return prepare_mni.build_mni_dataset(tmp_path_factory.mktemp("deep"), num_train=1, num_test=1, task="deep")


def test_the_suite_lists_registered_tasks_of_different_character():
    assert set(prepare_mni.SUITE) == set(EXPECTED) and set(prepare_mni.SUITE) <= set(prepare_mni.TASKS)
    ids = [task.dataset_id for task in prepare_mni.TASKS.values()]
    assert len(set(ids)) == len(ids)
    assert prepare_mni.TASKS["tissue"].folder_name == "Dataset990_MNITissue"


@pytest.mark.parametrize("task", list(EXPECTED))
def test_every_task_declares_its_classes_and_channels_and_uses_all_of_them(suite, task):
    classes, channels = EXPECTED[task]
    meta = json.loads((suite[task] / "dataset.json").read_text())
    assert len(meta["labels"]) - 1 == classes
    assert list(meta["channel_names"].values()) == channels
    assert meta["licence"] and meta["reference"]
    train_labels = _labels(suite[task], "Tr")
    assert set(np.unique(np.concatenate([lab.ravel() for lab in train_labels]))) == set(meta["labels"].values())
    for split in ("Tr", "Ts"):
        images = _images(suite[task], split, f"mni_{'train' if split == 'Tr' else 'test'}_000")
        assert len(images) == len(channels)
        assert all(img.shape == images[0].shape and np.allclose(img.affine, images[0].affine) for img in images)


@pytest.mark.parametrize("task", list(EXPECTED))
def test_every_task_is_deterministic_and_its_cases_differ(suite, task, tmp_path):
    again = prepare_mni.build_mni_dataset(tmp_path, num_train=2, num_test=1, spacing_mm=COARSE_MM, task=task)
    files = sorted(p.relative_to(suite[task]) for p in suite[task].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((suite[task] / f).read_bytes() == (again / f).read_bytes() for f in files)
    train = _images(suite[task], "Tr", "mni_train_000")[0]
    for other in (_images(suite[task], "Tr", "mni_train_001")[0], _images(suite[task], "Ts", "mni_test_000")[0]):
        assert not np.allclose(other.affine, train.affine)


def test_deep_structures_are_small_ellipsoids(deep_full_size):
    provenance = json.loads((deep_full_size / prepare_mni.PROVENANCE_FILE).read_text())
    assert provenance["held_out"] is None and provenance["spacing_mm"] == 1.5
    ellipsoid_mm3 = np.array(
        [4 / 3 * np.pi * np.prod(mni_tasks.DEEP_SEMI_AXES_MM[n]) for n in mni_tasks.DEEP_STRUCTURES]
    )
    for label_img in (deep_full_size / "labelsTr").glob("*.nii.gz"):
        img = nib.load(label_img)
        counts = np.bincount(np.asarray(img.dataobj).ravel(), minlength=4)[1:]
        voxels = 2 * ellipsoid_mm3 / np.prod(img.header.get_zooms())  # left and right
        # A few hundred voxels each, about what the ellipsoid holds (the warp stretches it a little).
        assert np.all((counts > 0.7 * voxels) & (counts < 1.3 * voxels)), (counts, voxels)
        assert counts.sum() < 0.03 * np.prod(img.shape)


@pytest.mark.parametrize("structure", mni_tasks.DEEP_STRUCTURES)
def test_every_kind_of_deep_structure_is_darker_in_t1_with_a_soft_edge(structure):
    # A line along x through the left structure, out to twice its semi-axis: no other structure comes within reach.
    centre = mni_tasks.deep_structure_centres()[2 * list(mni_tasks.DEEP_STRUCTURES).index(structure)]  # left
    semi_axis = mni_tasks.DEEP_SEMI_AXES_MM[structure][0]
    offsets = np.linspace(-2 * semi_axis, 2 * semi_axis, 81)
    points = (centre[:, None] + np.outer([1.0, 0.0, 0.0], offsets)).reshape(3, -1, 1, 1).astype(np.float32)
    shape = points.shape[1:]
    maps = mni_tasks.CaseMaps(
        points, points, np.ones(3), np.full(shape, 0.5), np.zeros(shape), np.zeros(shape), np.zeros(3, np.float32)
    )
    gain = mni_tasks.contrast_deep_structures(maps, np.random.default_rng(0))["deep_t1_gain"]
    assert mni_tasks.DEEP_T1_GAIN[0] <= gain <= mni_tasks.DEEP_T1_GAIN[1]
    factor, radius = maps.t1_factor.ravel(), np.abs(offsets) / semi_axis
    np.testing.assert_allclose(factor[radius <= 1 - mni_tasks.DEEP_EDGE], 1 - gain, rtol=1e-6)
    np.testing.assert_allclose(factor[radius >= 1 + mni_tasks.DEEP_EDGE], 1.0, rtol=1e-6)
    assert np.all(np.diff(factor[offsets >= 0]) >= -1e-7)  # fades outward
    labels = mni_tasks.deep_rule(replace(maps, t1=np.ones(shape))).ravel()  # a brain everywhere
    assert set(labels[radius <= 0.95]) == {mni_tasks.DEEP_LABELS[structure]} and set(labels[radius > 1.05]) == {0}


def test_deep_structure_centres_lie_well_inside_the_field_of_view():
    lo, hi = (np.array(corner) for corner in mni_tasks.DEEP_FOV_MM)
    centres = mni_tasks.deep_structure_centres()
    margin = max(max(axes) for axes in mni_tasks.DEEP_SEMI_AXES_MM.values()) + prepare_mni.MAX_SHIFT_MM + 10
    assert np.all(centres - margin > lo) and np.all(centres + margin < hi)
    left, right = centres[0::2], centres[1::2]
    assert np.all(left[:, 0] < 0) and np.all(right[:, 0] > 0)


def test_ct_has_thick_slices_hounsfield_units_and_ct_normalisation(suite, tmp_path):
    dataset = suite["ct"]
    image = _images(dataset, "Ts", "mni_test_000")[0]
    zooms = image.header.get_zooms()
    assert zooms[2] / max(zooms[:2]) > 2.8  # 8 / 2.4 nominal, each axis jittered by up to 8 %
    values = image.get_fdata()
    label = np.asarray(nib.load(dataset / "labelsTs" / "mni_test_000.nii.gz").dataobj)
    assert np.median(values[label == 0]) < -900  # air around the head
    assert 20 < np.median(values[label == 1]) < 50 and np.median(values[label == 1]) > np.median(values[label == 2])
    assert values.max() > 700  # bone
    plans, _ = planning.plan_and_preprocess(dataset, tmp_path / "pre", preprocess=False, network_stride=8)
    assert plans.normalization[0].scheme == "CT"
    assert json.loads((dataset / prepare_mni.PROVENANCE_FILE).read_text())["spacing_mm"][2] > COARSE_MM * 3


def test_lesions_are_bright_in_t2_where_t1_is_inverted(suite):
    dataset = suite["lesions"]
    t1, t2 = (img.get_fdata() for img in _images(dataset, "Tr", "mni_train_000"))
    label = np.asarray(nib.load(dataset / "labelsTr" / "mni_train_000.nii.gz").dataobj)
    csf, grey, white, lesion = (label == v for v in (3, 1, 2, 4))
    assert np.median(t1[white]) > np.median(t1[grey]) > np.median(t1[csf])
    assert np.median(t2[white]) < np.median(t2[grey]) < np.median(t2[csf])
    assert np.median(t2[lesion]) > 1.5 * np.median(t2[white])
    cases = json.loads((dataset / prepare_mni.PROVENANCE_FILE).read_text())["cases"]
    assert cases[0]["drawn"]["lesions"] != cases[1]["drawn"]["lesions"]


def test_parcels_split_the_grey_matter_of_the_tissue_task_into_twelve(suite):
    white = mni_tasks.PARCEL_LABELS["white_matter"]
    for parcels, tissue in zip(_labels(suite["parcels"], "Tr"), _labels(suite["tissue"], "Tr"), strict=True):
        assert np.array_equal((parcels >= 1) & (parcels < white), tissue == mni_tasks.LABELS["grey_matter"])
        assert np.array_equal(parcels == white, tissue == mni_tasks.LABELS["white_matter"])
        assert np.all(np.bincount(parcels.ravel(), minlength=white + 1)[1:white] > 0)


def test_regions_refine_the_tissue_labels_of_the_same_cases(suite):
    tissue_dir, regions_dir = suite["tissue"], suite["regions"]
    assert regions_dir.name == "Dataset991_MNIRegions"
    meta = json.loads((regions_dir / "dataset.json").read_text())
    assert meta["labels"] == mni_tasks.REGION_LABELS and len(meta["labels"]) == 8
    for sub, case in (("labelsTr", "mni_train_000"), ("labelsTs", "mni_test_000")):
        tissue = np.asarray(nib.load(tissue_dir / sub / f"{case}.nii.gz").dataobj)
        regions = np.asarray(nib.load(regions_dir / sub / f"{case}.nii.gz").dataobj)
        # Same images, same geometry: only the labels differ, and each region lies inside its tissue.
        same_image = (tissue_dir / sub.replace("labels", "images") / f"{case}_0000.nii.gz").read_bytes()
        assert same_image == (regions_dir / sub.replace("labels", "images") / f"{case}_0000.nii.gz").read_bytes()
        assert np.array_equal(np.vectorize(TISSUE_OF_REGION.get)(regions), tissue)


def test_hemispheres_follow_the_world_x_axis(suite):
    """Left labels lie at negative world x (MNI: + is right), up to the small warp and rotation of a case."""
    img = nib.load(suite["regions"] / "labelsTs" / "mni_test_000.nii.gz")
    labels = np.asarray(img.dataobj)
    world_x = nib.affines.apply_affine(img.affine, np.argwhere(labels > 0))[:, 0]
    values = labels[labels > 0]
    left = np.isin(values, [1, 2, 5])
    right = np.isin(values, [3, 4, 6])
    assert np.median(world_x[left]) < -20 < 20 < np.median(world_x[right])


def test_bad_task_or_spacing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'lobes'; choose one of"):
        prepare_mni.build_mni_dataset(tmp_path, task="lobes")
    with pytest.raises(ValueError, match="--spacing 12.0 mm is outside 0.5-8 mm"):
        prepare_mni.build_mni_dataset(tmp_path, spacing_mm=12.0, task="ct")


def test_compare_suite_prints_one_table_and_writes_the_json_and_the_figure(tmp_path, capsys):
    for task in ("tissue", "ct"):
        prepare_mni.build_mni_dataset(tmp_path / "raw", num_train=5, num_test=1, spacing_mm=6.0, task=task)
    argv = ["--tasks", "tissue", "ct", "--seeds", "1", "--epochs", "1", "--iters-per-epoch", "2"]
    argv += ["--settings", "E2ENet dense", "--jobs", "2", "--workdir", str(tmp_path)]
    entries = compare.main(argv)
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| model | tissue | ct | mean over tasks | worst class")
    assert [line.split(" | ")[0] for line in table[2:]] == ["| E2ENet dense"]
    saved = json.loads((tmp_path / "suite_results.json").read_text())
    assert saved["tasks"] == ["tissue", "ct"] and set(saved["rows"]) == {"tissue", "ct"}
    for entry in entries:
        assert entry["mdice_over_tasks"] == pytest.approx(np.mean(list(entry["mdice_per_task"].values())))
        assert entry["worst_class"]["dice"] <= min(entry["mdice_per_task"].values())
    assert (tmp_path / "suite_dice_over_time.png").stat().st_size > 0

    again = compare.main(argv[:-4] + ["--jobs", "1", "--workdir", str(tmp_path)])  # finished runs are reused
    assert "2 runs: 2 finished before, 0 to run" in capsys.readouterr().out
    assert [e["mdice_over_tasks"] for e in again] == [e["mdice_over_tasks"] for e in entries]


def test_compare_refuses_mixing_a_suite_with_one_dataset(capsys):
    with pytest.raises(SystemExit):
        compare.main(["--suite", "--task", "tissue"])
    assert "give one kind" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--jobs", "2"])
    assert "use it with --suite or --tasks" in capsys.readouterr().err
