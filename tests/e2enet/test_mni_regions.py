"""The harder embedded task (prepare_mni.py --task regions): a refinement of the tissue task, cut by position."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from e2enet.dataset import mni as prepare_mni

TISSUE_OF_REGION = {  # region label -> tissue label
    0: 0,
    **{
        prepare_mni.REGION_LABELS[f"grey_matter_{side}_{half}"]: 1
        for side in ("left", "right")
        for half in ("front", "back")
    },
    prepare_mni.REGION_LABELS["white_matter_left"]: 2,
    prepare_mni.REGION_LABELS["white_matter_right"]: 2,
    prepare_mni.REGION_LABELS["csf_other"]: 3,
}


@pytest.fixture(scope="module")
def both_tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("mni")
    tissue = prepare_mni.build_mni_dataset(root, num_train=1, num_test=1, spacing_mm=6.0, task="tissue")
    regions = prepare_mni.build_mni_dataset(root, num_train=1, num_test=1, spacing_mm=6.0, task="regions")
    return tissue, regions


def test_regions_refine_the_tissue_labels_of_the_same_cases(both_tasks):
    tissue_dir, regions_dir = both_tasks
    assert regions_dir.name == "Dataset991_MNIRegions"
    meta = json.loads((regions_dir / "dataset.json").read_text())
    assert meta["labels"] == prepare_mni.REGION_LABELS and len(meta["labels"]) == 8
    for sub, case in (("labelsTr", "mni_train_000"), ("labelsTs", "mni_test_000")):
        tissue = np.asarray(nib.load(tissue_dir / sub / f"{case}.nii.gz").dataobj)
        regions_img = nib.load(regions_dir / sub / f"{case}.nii.gz")
        regions = np.asarray(regions_img.dataobj)
        # Same images, same geometry: only the labels differ, and each region lies inside its tissue.
        same_image = (tissue_dir / sub.replace("labels", "images") / f"{case}_0000.nii.gz").read_bytes()
        assert same_image == (regions_dir / sub.replace("labels", "images") / f"{case}_0000.nii.gz").read_bytes()
        mapped = np.vectorize(TISSUE_OF_REGION.get)(regions)
        assert np.array_equal(mapped, tissue)
        assert set(np.unique(regions)) == set(prepare_mni.REGION_LABELS.values())


def test_hemispheres_follow_the_world_x_axis(both_tasks):
    """Left labels lie at negative world x (MNI: + is right), up to the small warp and rotation of a case."""
    _, regions_dir = both_tasks
    img = nib.load(regions_dir / "labelsTs" / "mni_test_000.nii.gz")
    labels = np.asarray(img.dataobj)
    world_x = nib.affines.apply_affine(img.affine, np.argwhere(labels > 0))[:, 0]
    values = labels[labels > 0]
    left = np.isin(values, [1, 2, 5])
    right = np.isin(values, [3, 4, 6])
    assert np.median(world_x[left]) < -20 < 20 < np.median(world_x[right])


def test_unknown_task_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'lobes'; choose one of"):
        prepare_mni.build_mni_dataset(tmp_path, task="lobes")
