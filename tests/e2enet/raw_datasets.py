"""Raw nnU-Net v2 datasets written from arrays, and the size of the small MNI task, for the data pipeline tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

# Training and test cases of the small MNI task the data tests share (conftest.py builds it).
NUM_TRAIN, NUM_TEST = 5, 2


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), path)


def make_dataset(
    root: Path,
    channel_names: dict[str, str],
    labels: dict[str, int],
    cases: dict[str, tuple[list[np.ndarray], np.ndarray]],
    affine: np.ndarray | None = None,
    name: str = "Dataset900_Synthetic",
) -> Path:
    """Write a raw nnU-Net v2 dataset from arrays: cases maps id -> (channel arrays, label array)."""
    dataset = root / name
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    for case_id, (channels, label) in cases.items():
        for index, channel in enumerate(channels):
            write_nifti(dataset / "imagesTr" / f"{case_id}_{index:04d}.nii.gz", channel.astype(np.float32), affine)
        write_nifti(dataset / "labelsTr" / f"{case_id}.nii.gz", label.astype(np.uint8), affine)
    meta = {"channel_names": channel_names, "labels": labels, "numTraining": len(cases), "file_ending": ".nii.gz"}
    (dataset / "dataset.json").write_text(json.dumps(meta))
    return dataset
