"""The small MNI task (4 mm) and its preprocessed form, built once per test module that asks for them."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2enet.dataset import mni as prepare_mni
from e2enet.preprocessing import planning
from e2enet.preprocessing import preprocess as preprocessing
from tests.e2enet.raw_datasets import NUM_TEST, NUM_TRAIN


@pytest.fixture(scope="module")
def mni_dataset(tmp_path_factory) -> Path:
    return prepare_mni.build_mni_dataset(tmp_path_factory.mktemp("raw"), NUM_TRAIN, NUM_TEST, seed=3, spacing_mm=4.0)


@pytest.fixture(scope="module")
def mni_preprocessed(mni_dataset, tmp_path_factory) -> tuple[Path, planning.Plans, preprocessing.PreprocessReport]:
    out = tmp_path_factory.mktemp("preprocessed") / mni_dataset.name
    plans, report = planning.plan_and_preprocess(mni_dataset, out, network_stride=16, patch_voxel_budget=32**3)
    return out, plans, report
