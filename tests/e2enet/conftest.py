"""Built once per test module that asks for them: the small MNI task (4 mm) and its preprocessed form, and a tiny
trained run (the task at 5 mm, one epoch of two iterations) with a copy of it that a test may damage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from e2enet.dataset import mni as prepare_mni
from e2enet.preprocessing import planning
from e2enet.preprocessing import preprocess as preprocessing
from e2enet.training import train
from tests.e2enet.raw_datasets import NUM_TEST, NUM_TRAIN
from tests.e2enet.tiny_runs import train_args


@pytest.fixture(scope="module")
def mni_dataset(tmp_path_factory) -> Path:
    return prepare_mni.build_mni_dataset(tmp_path_factory.mktemp("raw"), NUM_TRAIN, NUM_TEST, seed=3, spacing_mm=4.0)


@pytest.fixture(scope="module")
def mni_preprocessed(mni_dataset, tmp_path_factory) -> tuple[Path, planning.Plans, preprocessing.PreprocessReport]:
    out = tmp_path_factory.mktemp("preprocessed") / mni_dataset.name
    plans, report = planning.plan_and_preprocess(mni_dataset, out, network_stride=16, patch_voxel_budget=32**3)
    return out, plans, report


@pytest.fixture(scope="module")
def mni(tmp_path_factory) -> Path:
    return prepare_mni.build_mni_dataset(tmp_path_factory.mktemp("raw"), num_train=5, num_test=2, spacing_mm=5.0)


@pytest.fixture(scope="module")
def run(mni, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    train.main(train_args(mni, out))
    return out


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    """A copy of the trained run that a test may damage."""
    return Path(shutil.copytree(run, tmp_path / "run"))
