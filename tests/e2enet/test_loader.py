"""Tests of the E2ENet example's training loader (training/loader.py): foreground oversampling, augmentation,
determinism and exact resumption, patch checks. On the small MNI task of conftest.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from e2enet.preprocessing import planning
from e2enet.training import loader
from tests.e2enet.raw_datasets import make_dataset


def test_foreground_oversampling_forces_the_last_samples(mni_preprocessed):
    out, plans, report = mni_preprocessed
    train_ids, _ = planning.fold_cases(out, plans.fingerprint.case_ids, 0)
    for batch_size, expected in ((2, [False, True]), (3, [False, False, True]), (4, [False, False, False, True])):
        batches = loader.TrainLoader(report.directory, train_ids, plans, seed=batch_size, batch_size=batch_size)
        for _ in range(12):
            batch = next(batches)
            assert batch["image"].shape == (batch_size, 1, *plans.patch_size)
            assert batch["image"].dtype == torch.float32
            assert batch["label"].dtype == torch.int64 and batch["label"].min() >= 0 and batch["label"].max() <= 3
            assert batch["forced_foreground"] == expected  # B - round(0.67 B) forced, at the end as in nnU-Net
            for label, forced in zip(batch["label"], batch["forced_foreground"], strict=True):
                assert not forced or (label > 0).any()


def test_forced_sample_keeps_a_single_foreground_voxel_through_augmentation(tmp_path, monkeypatch):
    """Exact guarantee: rotation/scaling is anchored on the chosen voxel. The 10^3 case is padded to 16^3."""
    label = np.zeros((10, 10, 10), np.uint8)
    label[7, 2, 5] = 1
    image = np.random.default_rng(2).normal(5, 1, label.shape)
    dataset = make_dataset(tmp_path, {"0": "MR"}, {"background": 0, "dot": 1}, {"dot": ([image], label)})
    plans, report = planning.plan_and_preprocess(dataset, tmp_path / "pre", network_stride=16)
    assert plans.patch_size == [16, 16, 16]  # larger than the image: padded
    batches = loader.TrainLoader(report.directory, ["dot"], plans, seed=0, batch_size=2)
    rotated_or_scaled = []
    resample_patch = batches._resample_patch
    monkeypatch.setattr(batches, "_resample_patch", lambda *args: rotated_or_scaled.append(1) or resample_patch(*args))
    for _ in range(150):
        batch = next(batches)
        assert batch["forced_foreground"] == [False, True]
        assert (batch["label"][1] == 1).any()
    assert len(rotated_or_scaled) > 40  # p = 1 - 0.8^2 per sample, so the spatial path was well exercised


def test_loader_is_deterministic_and_resumes_exactly(mni_preprocessed):
    out, plans, report = mni_preprocessed
    ids = plans.fingerprint.case_ids

    def draw(batches, n):
        return [next(batches) for _ in range(n)]

    def same(a, b):
        return all(
            torch.equal(x["image"], y["image"])
            and torch.equal(x["label"], y["label"])
            and x["case_ids"] == y["case_ids"]
            for x, y in zip(a, b, strict=True)
        )

    original = loader.TrainLoader(report.directory, ids, plans, seed=7)
    threads = torch.get_num_threads()
    head = draw(original, 4)
    assert torch.get_num_threads() == threads  # the loader runs single-threaded but restores the setting
    state = json.loads(json.dumps(original.state_dict()))  # checkpoints may store it as JSON
    tail = draw(original, 4)

    assert same(head, draw(loader.TrainLoader(report.directory, ids, plans, seed=7), 4))
    resumed = loader.TrainLoader(report.directory, ids, plans, seed=12345)
    resumed.load_state_dict(state)
    assert resumed.batches_drawn == 4
    assert same(tail, draw(resumed, 4))
    assert not same(head, draw(loader.TrainLoader(report.directory, ids, plans, seed=8), 4))


def test_augmentation_recipes_do_what_they_say(mni_preprocessed):
    """Same seed, same patches: "light" changes intensities only and never resamples, so without mirroring its
    labels are exactly those of "none"; with mirror_axes=(0,) each label patch is the same or flipped along x."""
    _, plans, report = mni_preprocessed
    ids = plans.fingerprint.case_ids

    def batches(**kwargs):
        source = loader.TrainLoader(report.directory, ids, plans, seed=3, **kwargs)
        return [next(source) for _ in range(6)]

    plain = batches(augment="none")
    unmirrored = batches(augment="light", mirror_axes=())
    mirrored = batches(augment="light", mirror_axes=(0,))
    assert all(torch.equal(a["label"], b["label"]) for a, b in zip(plain, unmirrored, strict=True))
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(plain, unmirrored, strict=True))
    flips = 0
    for a, b in zip(plain, mirrored, strict=True):
        for x, y in zip(a["label"], b["label"], strict=True):  # (1, X, Y, Z) each
            flipped = torch.equal(x.flip(1), y)
            assert torch.equal(x, y) or flipped
            flips += flipped and not torch.equal(x, y)
    assert flips > 0
    with pytest.raises(ValueError, match="augment must be one of"):
        loader.TrainLoader(report.directory, ids, plans, seed=0, augment="strong")
    with pytest.raises(ValueError, match="mirror_axes must be distinct axes"):
        loader.TrainLoader(report.directory, ids, plans, seed=0, augment="light", mirror_axes=(3,))


def test_explicit_patch_larger_than_the_data_is_refused(mni_preprocessed):
    out, plans, report = mni_preprocessed
    meta = {"channel_names": plans.channel_names, "labels": plans.labels}
    with pytest.raises(ValueError, match=r"exceeds the largest case \(mni_train_\d+"):
        planning.plan_experiment(plans.fingerprint, meta, network_stride=16, patch_size=[256, 32, 32])
    with pytest.raises(ValueError, match="not a multiple of the network stride"):
        planning.plan_experiment(plans.fingerprint, meta, network_stride=16, patch_size=[40, 32, 32])
    with pytest.raises(ValueError, match=r"exceeds the largest case \(mni_train_\d+"):
        loader.TrainLoader(report.directory, ["mni_train_000"], plans, seed=0, patch_size=[32, 32, 256])
