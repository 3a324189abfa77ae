"""nnU-Net-style data pipeline for the E2ENet example: verify, convert, plan, preprocess, split, sample.

Input is the nnU-Net v2 raw layout::

    DatasetXXX_Name/dataset.json      {"channel_names": {"0": "T1"}, "labels": {"background": 0, ...},
                                       "numTraining": N, "file_ending": ".nii.gz"}
    DatasetXXX_Name/imagesTr/{case}_{XXXX}.nii.gz    one 3D file per channel, XXXX = channel index
    DatasetXXX_Name/labelsTr/{case}.nii.gz           integer labels, same geometry as the images
    DatasetXXX_Name/imagesTs/ (optional)             [labelsTs/ optional, e.g. the MNI test labels]

A Medical Segmentation Decathlon task (4D images, v1 dataset.json) is converted with
:func:`convert_msd_dataset` (CLI ``convert-msd``).

Steps, as nnU-Net v2 does them but lighter:

1. :func:`verify_dataset` collects every problem (missing or extra files, numTraining, shapes,
   affines, undeclared labels, NaN/inf voxels) and raises one ValueError listing them.
2. :func:`extract_fingerprint`: spacings, shapes after cropping to the non-zero region, and
   foreground intensity statistics per channel (mean, std, 0.5/99.5 percentiles) from up to
   10,000 sampled foreground voxels per case.
3. :func:`plan_experiment`: target spacing = median spacing; normalisation by channel name (``CT``:
   clip to the dataset foreground 0.5/99.5 percentiles, then z-score with the dataset foreground
   mean/std; anything else: per-image z-score, inside the non-zero mask when cropping removed
   more than a quarter of the median image); patch = median shape rounded up to the network's
   total stride, shrunk one stride at a time until it fits the voxel budget; batch size from a
   batch voxel budget (at least 2, at most 5 % of the dataset's voxels, as nnU-Net). Saved as
   ``plans.json``.
4. :func:`preprocess_dataset`: crop -> normalise -> resample (MONAI ``Spacing``: bilinear images,
   nearest labels), one ``{case}.npz`` + ``{case}.json`` per case in ``data_<hash>/``, where the
   hash covers only what changes the arrays (spacing, normalisation, channels, labels). A case is
   recomputed when its plan hash or its source files (size, mtime) change, otherwise reused.
5. :func:`get_splits`: 5-fold ``KFold(shuffle=True, random_state=12345)`` over the sorted case
   ids, saved as ``splits_final.json`` and reused when present.
6. :class:`TrainLoader`: endless batches of patches with 33 % foreground oversampling (the last
   ``B - round(0.67 B)`` samples of each batch are centred on a foreground voxel) and the
   nnU-Net "moreDA" augmentation of the E2ENet trainer, seeded by one numpy Generator whose state
   is checkpointed with ``state_dict()``.

Patches larger than an image: images smaller than the patch are zero-padded (label background),
as nnU-Net does; the automatic plan produces this whenever the median shape is not a multiple
of the stride. A patch given explicitly must be a multiple of the stride and no larger than the
largest case (rounded up to the stride) along any axis: beyond that every patch would be padding
along that axis, which is a configuration mistake, so it raises.

Differences from nnU-Net, chosen for a CPU demo: no anisotropic target-spacing rule, no 2D or
cascade configurations, images resampled bilinearly (nnU-Net: cubic spline), augmentation with
bilinear interpolation and per-sample (not per-channel) probabilities, and a single process.

CLI::

    python examples/e2enet/data.py verify --data DATASET_DIR
    python examples/e2enet/data.py convert-msd --task Task04_Hippocampus --out RAW_ROOT [--id 4]
    python examples/e2enet/data.py plan --data DATASET_DIR [--out PREPROCESSED_DIR] [--stride 32]
        [--patch-budget 262144] [--patch-size X Y Z] [--batch-size B] [--plan-only] [--no-verify]
    python examples/e2enet/data.py sample --preprocessed PREPROCESSED_DIR [--fold 0] [--batches 20]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor, get_track_meta, set_track_meta
from monai.transforms import (
    Affine,
    Compose,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    Spacing,
    SpatialResample,
)
from scipy import ndimage

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
SUPPORTED_ENDINGS = (".nii.gz", ".nii")
PLANS_FILE = "plans.json"
SPLITS_FILE = "splits_final.json"
PREPROCESSING_VERSION = 1  # bump when preprocess_case changes what it writes, to invalidate caches

FOREGROUND_SAMPLES_PER_CASE = 10_000  # fingerprint intensity samples per case (nnU-Net: far more)
FOREGROUND_LOCATIONS_PER_CLASS = 10_000  # stored voxel positions per class for foreground oversampling
FINGERPRINT_SEED = 1234  # as nnU-Net
SPLIT_SEED = 12345  # as nnU-Net's generate_crossval_split
USE_MASK_BELOW_RELATIVE_SIZE = 0.75  # nnU-Net: z-score inside the non-zero mask if cropping kept < 3/4
DEFAULT_NETWORK_STRIDE = 32  # E2ENet/nnU-Net 3d_fullres: 5 stride-2 downsamplings
DEFAULT_PATCH_VOXEL_BUDGET = 64**3  # CPU-sized; nnU-Net on a GPU would allow ~128^3
DEFAULT_BATCH_VOXEL_BUDGET = 2 * 64**3

# Augmentation of the E2ENet trainer (spec section 4, nnU-Net moreDA).
ROTATION_DEG = 30.0
P_ROTATION = 0.2
SCALE_RANGE = (0.7, 1.4)
P_SCALE = 0.2
OVERSAMPLE_FOREGROUND = 0.33


# --------------------------------------------------------------------------- raw layout


@dataclass(frozen=True)
class RawCase:
    """One case of a raw dataset: its channel files in channel order and its label (if any)."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


def _problem_list(problems: Sequence[str]) -> str:
    return "\n".join(f"  - {p}" for p in problems)


def read_dataset_json(dataset_dir: Path | str) -> dict:
    """Read and sanity-check ``dataset.json`` (v2 keys); raise ValueError naming what to fix."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / "dataset.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: a dataset folder needs dataset.json (nnU-Net v2 layout)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix the file") from error
    if "modality" in meta and "channel_names" not in meta:
        raise ValueError(
            f"{path} is a Medical Segmentation Decathlon / nnU-Net v1 file ('modality', labels int -> name); "
            f"convert it first: python examples/e2enet/data.py convert-msd --task {dataset_dir} --out RAW_ROOT"
        )
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{path} lacks {missing}; nnU-Net v2 needs {list(REQUIRED_KEYS)}")
    if meta["file_ending"] not in SUPPORTED_ENDINGS:
        raise ValueError(
            f"{path}: file_ending {meta['file_ending']!r} is not supported; convert the images to NIfTI (.nii.gz)"
        )
    labels = meta["labels"]
    if any(not isinstance(value, int) for value in labels.values()):
        raise ValueError(
            f"{path}: labels must map names to single ints (region-based labels are not supported), got {labels}"
        )
    if sorted(labels.values()) != list(range(len(labels))):
        raise ValueError(
            f"{path}: label values must be consecutive ints from 0 (background), got {sorted(labels.values())}"
        )
    return meta


def find_cases(dataset_dir: Path | str, meta: dict, subset: str = "Tr") -> tuple[list[RawCase], list[str]]:
    """Group ``images{subset}`` files into cases; return the cases and the layout problems found.

    A case is listed even when a channel or its label is missing, so that the caller can report
    every problem at once instead of stopping at the first.
    """
    dataset_dir = Path(dataset_dir)
    ending = meta["file_ending"]
    num_channels = len(meta["channel_names"])
    image_dir, label_dir = dataset_dir / f"images{subset}", dataset_dir / f"labels{subset}"
    problems: list[str] = []
    channels: dict[str, dict[int, Path]] = {}
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(ending)}$")
    for path in sorted(image_dir.iterdir()) if image_dir.is_dir() else []:
        if path.name.startswith("."):  # macOS resource forks in MSD archives
            continue
        match = pattern.match(path.name)
        if match is None:
            problems.append(f"{path.name}: not named CASE_XXXX{ending}; rename it (XXXX = channel index, e.g. _0000)")
            continue
        channel = int(match["channel"])
        if channel >= num_channels:
            problems.append(
                f"{match['case']}: file {path.name} is channel {channel} but dataset.json declares "
                f"{num_channels} channel(s); add it to channel_names or remove the file"
            )
            continue
        channels.setdefault(match["case"], {})[channel] = path

    has_labels = label_dir.is_dir()
    cases = []
    for case_id in sorted(channels):
        missing = [f"{case_id}_{c:04d}{ending}" for c in range(num_channels) if c not in channels[case_id]]
        if missing:
            problems.append(
                f"{case_id}: missing channel file(s) {missing} in {image_dir.name}; add them or remove the case"
            )
        label = label_dir / f"{case_id}{ending}"
        if not label.is_file():
            label = None
            if subset == "Tr" or has_labels:
                problems.append(
                    f"{case_id}: no label {case_id}{ending} in {label_dir.name}; add it or remove the case's images"
                )
        images = tuple(channels[case_id][c] for c in range(num_channels) if c in channels[case_id])
        cases.append(RawCase(case_id, images, label))
    if has_labels:
        for path in sorted(label_dir.glob(f"*{ending}")):
            case_id = path.name[: -len(ending)]
            if not path.name.startswith(".") and case_id not in channels:
                problems.append(
                    f"{case_id}: label {path.name} has no images in {image_dir.name}; add them or remove the label"
                )
    return cases, problems


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def _load_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load one 3D NIfTI as (float32 array, affine); a trailing singleton 4th axis is dropped."""
    img = nib.load(path)
    shape = img.shape[:3] if len(img.shape) == 4 and img.shape[3] == 1 else img.shape
    if len(shape) != 3:
        raise ValueError(
            f"{path.name} has shape {img.shape}; expected one 3D volume per file. "
            "A 4D multi-channel file (MSD) must be split: python examples/e2enet/data.py convert-msd"
        )
    return img.get_fdata(dtype=np.float32).reshape(shape), img.affine


def _same_affine(a: np.ndarray, b: np.ndarray) -> bool:
    return np.allclose(a, b, rtol=1e-4, atol=1e-3)  # header round-off, far below any real misregistration


def _check_case(case: RawCase, declared_labels: set[int]) -> list[str]:
    """Geometry, NaN and label-value problems of one case (layout problems are found earlier)."""
    problems = []
    reference_shape = reference_affine = None
    readable = (ValueError, OSError, nib.filebasedimages.ImageFileError)
    for path in case.images:
        try:
            image, affine = _load_volume(path)
        except readable as error:
            problems.append(f"{case.case_id}: cannot read {path.name} ({error})")
            continue
        if not np.isfinite(image).all():
            problems.append(
                f"{case.case_id}: {path.name} has {int((~np.isfinite(image)).sum())} NaN/inf voxel(s); "
                "fix or replace the image (e.g. set them to 0)"
            )
        if reference_shape is None:
            reference_shape, reference_affine = image.shape, affine
        elif image.shape != reference_shape or not _same_affine(affine, reference_affine):
            problems.append(
                f"{case.case_id}: {path.name} (shape {image.shape}) is not on the grid of {case.images[0].name} "
                f"(shape {reference_shape}); all channels of a case must share shape and affine "
                "(resample them onto the first channel)"
            )
    if case.label is None:
        return problems
    try:
        label, affine = _load_volume(case.label)
    except readable as error:
        return problems + [f"{case.case_id}: cannot read label {case.label.name} ({error})"]
    if reference_shape is not None:
        if label.shape != reference_shape:
            problems.append(
                f"{case.case_id}: label shape {label.shape} != image shape {reference_shape}; "
                "the label must be on the image grid"
            )
        elif not _same_affine(affine, reference_affine):
            problems.append(
                f"{case.case_id}: label affine differs from the image affine (max difference "
                f"{np.abs(affine - reference_affine).max():.4g}); resample the label onto the image grid "
                "or fix its header"
            )
    if not np.isfinite(label).all() or not np.array_equal(label, np.round(label)):
        problems.append(
            f"{case.case_id}: label {case.label.name} has non-integer or NaN values; labels must be integers"
        )
    else:
        undeclared = sorted(set(np.unique(label).astype(int).tolist()) - declared_labels)
        if undeclared:
            problems.append(
                f"{case.case_id}: label values {undeclared} are not declared in dataset.json labels "
                f"{sorted(declared_labels)}; fix the label file or declare the classes"
            )
    return problems


def verify_dataset(dataset_dir: Path | str) -> list[RawCase]:
    """Check a raw dataset; return its training cases or raise one ValueError listing every problem.

    Checks: dataset.json keys and labels; every case has all channels and a label; no stray
    files; numTraining matches; channels and label share shape and affine; images are finite;
    label values are declared. ``imagesTs`` (and ``labelsTs`` if present) get the same checks.
    """
    dataset_dir = Path(dataset_dir)
    meta = read_dataset_json(dataset_dir)
    declared = set(meta["labels"].values())
    train_cases, problems = find_cases(dataset_dir, meta, "Tr")
    if len(train_cases) != meta["numTraining"]:
        problems.append(
            f"dataset.json numTraining is {meta['numTraining']} but imagesTr holds {len(train_cases)} case(s); "
            "fix numTraining or add the missing cases"
        )
    test_cases: list[RawCase] = []
    if (dataset_dir / "imagesTs").is_dir():
        test_cases, test_problems = find_cases(dataset_dir, meta, "Ts")
        problems += test_problems
    for case in train_cases + test_cases:
        problems += _check_case(case, declared)
    if problems:
        raise ValueError(f"dataset {dataset_dir} has {len(problems)} problem(s):\n{_problem_list(problems)}")
    return train_cases


def _find_valid_cases(dataset_dir: Path, meta: dict) -> list[RawCase]:
    """Training cases, stopping on layout problems (for callers that skipped verify_dataset)."""
    cases, problems = find_cases(dataset_dir, meta, "Tr")
    if problems:
        raise ValueError(f"dataset layout problems (run verify for the full list):\n{_problem_list(problems)}")
    return cases


# --------------------------------------------------------------------------- MSD conversion


def convert_msd_dataset(task_dir: Path | str, output_root: Path | str, dataset_id: int | None = None) -> Path:
    """Convert a Medical Segmentation Decathlon task folder to the nnU-Net v2 layout; return the new folder.

    4D images are split into one ``{case}_{XXXX}.nii.gz`` per channel; labels are copied;
    ``labels`` is inverted to name -> int and ``modality`` becomes ``channel_names``. The id
    defaults to the task number (``Task04_Hippocampus`` -> ``Dataset004_Hippocampus``).
    """
    task_dir = Path(task_dir)
    meta_path = task_dir / "dataset.json"
    if not meta_path.is_file():
        raise ValueError(f"{meta_path} not found; pass the MSD task folder (e.g. Task04_Hippocampus)")
    meta = json.loads(meta_path.read_text())
    if "modality" not in meta or "training" not in meta:
        raise ValueError(f"{meta_path} has no 'modality'/'training': not an MSD (v1) dataset.json")
    match = re.match(r"^Task(\d+)_(.+)$", task_dir.name)
    if dataset_id is None and match is None:
        raise ValueError(f"cannot infer a dataset id from {task_dir.name!r} (expected TaskNN_Name); pass dataset_id")
    dataset_id = int(match[1]) if dataset_id is None else dataset_id
    name = match[2] if match else task_dir.name
    out_dir = Path(output_root) / f"Dataset{dataset_id:03d}_{name}"
    if out_dir.exists():
        raise ValueError(f"{out_dir} already exists; remove it or choose another dataset id")
    num_channels = len(meta["modality"])

    def split_channels(source: Path, target_dir: Path) -> None:
        img = nib.load(source)
        case_id = source.name[: -len(".nii.gz")] if source.name.endswith(".nii.gz") else source.stem
        volumes = img.shape[3] if img.ndim == 4 else 1
        if volumes != num_channels:
            raise ValueError(
                f"{case_id}: {source.name} has {volumes} volume(s) but dataset.json declares {num_channels} modalities"
            )
        for channel in range(num_channels):
            data = np.asarray(img.dataobj[..., channel] if img.ndim == 4 else img.dataobj)
            nib.save(nib.Nifti1Image(data, img.affine, img.header), target_dir / f"{case_id}_{channel:04d}.nii.gz")

    (out_dir / "labelsTr").mkdir(parents=True)
    (out_dir / "imagesTr").mkdir()
    try:
        for entry in meta["training"]:
            split_channels(task_dir / entry["image"], out_dir / "imagesTr")
            shutil.copy(task_dir / entry["label"], out_dir / "labelsTr" / Path(entry["label"]).name)
        if meta.get("test"):
            (out_dir / "imagesTs").mkdir()
            for entry in meta["test"]:
                image = entry if isinstance(entry, str) else entry["image"]
                split_channels(task_dir / image, out_dir / "imagesTs")
    except Exception:
        shutil.rmtree(out_dir)  # a half-converted folder would later fail verification confusingly
        raise
    new_meta = {key: meta[key] for key in ("name", "description", "reference", "licence", "release") if key in meta}
    new_meta.update(
        channel_names={str(k): v for k, v in meta["modality"].items()},
        labels={v: int(k) for k, v in sorted(meta["labels"].items(), key=lambda kv: int(kv[0]))},
        numTraining=len(meta["training"]),
        file_ending=".nii.gz",
    )
    (out_dir / "dataset.json").write_text(json.dumps(new_meta, indent=2) + "\n")
    return out_dir


# --------------------------------------------------------------------------- fingerprint and plan


def _load_case(case: RawCase) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(channels float32 (C, X, Y, Z), label int16 (X, Y, Z) or None, affine of the first channel)."""
    volumes = [_load_volume(path) for path in case.images]
    data = np.stack([v for v, _ in volumes])
    for path, volume in zip(case.images, data):
        if not np.isfinite(volume).all():
            raise ValueError(
                f"{case.case_id}: {path.name} has NaN/inf voxels; fix the image (run verify to list every problem)"
            )
    label = None
    if case.label is not None:
        label = _load_volume(case.label)[0]
        if label.shape != data.shape[1:]:
            raise ValueError(f"{case.case_id}: label shape {label.shape} != image shape {data.shape[1:]} (run verify)")
        label = np.round(label).astype(np.int16)
    return data, label, volumes[0][1]


def _nonzero_bbox(data: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    """Bounding box of the non-zero region over all channels, and the hole-filled mask inside it.

    Holes are filled (as nnU-Net does) so that zero-valued voxels inside the anatomy, such as
    dark CSF, count as inside for mask-based normalisation.
    """
    mask = ndimage.binary_fill_holes((data != 0).any(axis=0))
    if not mask.any():  # an all-zero image: keep everything rather than crop to nothing
        return tuple(slice(0, n) for n in mask.shape), np.ones_like(mask)
    nonzero = np.argwhere(mask)
    lo, hi = nonzero.min(axis=0), nonzero.max(axis=0) + 1
    bbox = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return bbox, mask[bbox]


def _intensity_statistics(values: np.ndarray) -> dict[str, float]:
    keys = ("mean", "median", "std", "min", "max", "percentile_00_5", "percentile_99_5")
    if values.size == 0:  # no foreground anywhere: CT normalisation would be undefined
        return {key: float("nan") for key in keys}
    p005, median, p995 = np.percentile(values, [0.5, 50.0, 99.5])
    stats = (values.mean(), median, values.std(), values.min(), values.max(), p005, p995)
    return {key: float(value) for key, value in zip(keys, stats)}


def extract_fingerprint(dataset_dir: Path | str, cases: Sequence[RawCase] | None = None) -> dict:
    """Dataset fingerprint: spacings, shapes (before/after crop) and foreground intensity statistics.

    Up to ``FOREGROUND_SAMPLES_PER_CASE`` foreground voxels (label > 0) per case are sampled with
    a fixed seed, so every case weighs the same and the result is reproducible.
    """
    dataset_dir = Path(dataset_dir)
    meta = read_dataset_json(dataset_dir)
    cases = _find_valid_cases(dataset_dir, meta) if cases is None else cases
    rng = np.random.default_rng(FINGERPRINT_SEED)
    num_channels = len(meta["channel_names"])
    samples: list[list[np.ndarray]] = [[] for _ in range(num_channels)]
    spacings, shapes, shapes_after_crop, relative_sizes = [], [], [], []
    for case in cases:
        data, label, affine = _load_case(case)
        bbox, _ = _nonzero_bbox(data)
        cropped, cropped_label = data[(slice(None), *bbox)], label[bbox]
        spacings.append(_spacing(affine).tolist())
        shapes.append(list(data.shape[1:]))
        shapes_after_crop.append(list(cropped.shape[1:]))
        relative_sizes.append(cropped[0].size / data[0].size)
        foreground = np.flatnonzero(cropped_label > 0)
        if foreground.size > FOREGROUND_SAMPLES_PER_CASE:
            foreground = rng.choice(foreground, FOREGROUND_SAMPLES_PER_CASE, replace=False)
        for channel in range(num_channels):
            samples[channel].append(cropped[channel].ravel()[foreground])
    return {
        "case_ids": [case.case_id for case in cases],
        "spacings": spacings,
        "shapes_before_crop": shapes,
        "shapes_after_crop": shapes_after_crop,
        "median_relative_size_after_cropping": float(np.median(relative_sizes)),
        "foreground_intensity_properties_per_channel": {
            str(c): _intensity_statistics(np.concatenate(samples[c])) for c in range(num_channels)
        },
    }


def _as_triple(value: int | Sequence[int], name: str) -> list[int]:
    triple = [int(value)] * 3 if np.isscalar(value) else [int(v) for v in value]
    if len(triple) != 3 or min(triple) < 1:
        raise ValueError(f"{name} must be a positive int or three positive ints, got {value}")
    return triple


def _round_up(shape: Sequence[float], stride: Sequence[int]) -> list[int]:
    return [int(math.ceil(s / k) * k) for s, k in zip(shape, stride)]


def check_patch_size(
    patch: Sequence[int], stride: Sequence[int], shapes: Sequence[Sequence[int]], case_ids: Sequence[str]
) -> None:
    """Raise unless an explicitly requested patch suits the network and the (preprocessed) case shapes.

    It must be a multiple of the network stride, and no larger than the largest case rounded up
    to the stride on any axis: beyond that every patch would be padding along that axis.
    """
    shapes = np.asarray(shapes)
    allowed = _round_up(shapes.max(axis=0), stride)
    for axis, (p, k, a) in enumerate(zip(patch, stride, allowed)):
        if p % k:
            raise ValueError(
                f"patch_size {list(patch)} is not a multiple of the network stride {list(stride)} on axis {axis}; "
                f"use {_round_up(patch, stride)}"
            )
        if p > a:
            largest = int(np.argmax(shapes[:, axis]))
            raise ValueError(
                f"patch_size {list(patch)} exceeds the largest case ({case_ids[largest]}, {shapes[largest, axis]} "
                f"voxels on axis {axis} after preprocessing) rounded up to the stride ({a}): every patch would be "
                f"padding there; use at most {allowed}"
            )


def plan_experiment(
    fingerprint: dict,
    meta: dict,
    *,
    network_stride: int | Sequence[int] = DEFAULT_NETWORK_STRIDE,
    patch_voxel_budget: int = DEFAULT_PATCH_VOXEL_BUDGET,
    batch_voxel_budget: int = DEFAULT_BATCH_VOXEL_BUDGET,
    patch_size: Sequence[int] | None = None,
    batch_size: int | None = None,
    dataset_name: str = "",
) -> dict:
    """Turn a fingerprint into plans (target spacing, normalisation, patch and batch size).

    ``network_stride`` is the network's total downsampling per axis; the patch must be a multiple
    of it. An explicit ``patch_size`` is validated by :func:`check_patch_size`; an explicit
    ``batch_size`` is used as given.
    """
    stride = _as_triple(network_stride, "network_stride")
    spacings = np.asarray(fingerprint["spacings"])
    target_spacing = np.median(spacings, axis=0)
    # Shapes the cases will have after resampling to the target spacing (nnU-Net's rule).
    resampled = np.round(np.asarray(fingerprint["shapes_after_crop"]) * spacings / target_spacing).astype(int)
    median_shape = np.median(resampled, axis=0)

    if patch_size is None:
        patch = _round_up(median_shape, stride)
        while np.prod(patch) > patch_voxel_budget:
            axis = int(np.argmax(patch))  # shrink the longest side first, keeping the patch compact
            if patch[axis] == stride[axis]:
                raise ValueError(
                    f"patch voxel budget {patch_voxel_budget} is below one stride cube {stride}; "
                    "raise the budget or lower the stride"
                )
            patch[axis] -= stride[axis]
    else:
        patch = _as_triple(patch_size, "patch_size")
        check_patch_size(patch, stride, resampled, fingerprint["case_ids"])
    if batch_size is None:
        patch_voxels = int(np.prod(patch))
        five_percent = int(round(0.05 * float(np.prod(resampled, axis=1).sum()) / patch_voxels))
        batch_size = max(2, min(batch_voxel_budget // patch_voxels, five_percent))

    normalization = []
    for index, channel in sorted(meta["channel_names"].items(), key=lambda kv: int(kv[0])):
        stats = fingerprint["foreground_intensity_properties_per_channel"][str(index)]
        if channel.upper() == "CT":
            if math.isnan(stats["mean"]):
                raise ValueError(
                    f"channel {index} ({channel}) uses CT normalisation, which needs foreground intensity statistics, "
                    "but no training case has a foreground label; check the labels or rename the channel"
                )
            normalization.append(
                {
                    "channel": channel,
                    "scheme": "CT",
                    "use_nonzero_mask": False,
                    "clip": [stats["percentile_00_5"], stats["percentile_99_5"]],
                    "mean": stats["mean"],
                    "std": stats["std"],
                }
            )
        else:
            use_mask = fingerprint["median_relative_size_after_cropping"] < USE_MASK_BELOW_RELATIVE_SIZE
            normalization.append({"channel": channel, "scheme": "zscore", "use_nonzero_mask": bool(use_mask)})
    plans = {
        "dataset_name": dataset_name,
        "channel_names": meta["channel_names"],
        "labels": meta["labels"],
        "num_classes": len(meta["labels"]),
        "target_spacing": target_spacing.tolist(),
        "median_shape": median_shape.tolist(),
        "network_stride": stride,
        "patch_size": [int(p) for p in patch],
        "batch_size": int(batch_size),
        "normalization": normalization,
        "fingerprint": fingerprint,
    }
    plans["preprocessing_hash"] = preprocessing_hash(plans)
    return plans


def preprocessing_hash(plans: dict) -> str:
    """Hash of the plan fields that change preprocessed arrays (not patch or batch size)."""
    relevant = {
        "version": PREPROCESSING_VERSION,
        "target_spacing": plans["target_spacing"],
        "normalization": plans["normalization"],
        "channel_names": plans["channel_names"],
        "labels": plans["labels"],
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def _write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # readers never see a half-written file, even after a crash


def save_plans(plans: dict, preprocessed_dir: Path | str) -> Path:
    path = Path(preprocessed_dir) / PLANS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, plans)
    return path


def load_plans(preprocessed_dir: Path | str) -> dict:
    path = Path(preprocessed_dir) / PLANS_FILE
    if not path.is_file():
        raise ValueError(
            f"{path} not found; run: python examples/e2enet/data.py plan --data DATASET_DIR --out {preprocessed_dir}"
        )
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- preprocessing


def _normalize(data: np.ndarray, mask: np.ndarray, plans: dict) -> np.ndarray:
    """Normalise each channel in place according to its plan entry (see the module docstring)."""
    for channel, scheme in enumerate(plans["normalization"]):
        image = data[channel]
        if scheme["scheme"] == "CT":
            np.clip(image, *scheme["clip"], out=image)
            image -= scheme["mean"]
            image /= max(scheme["std"], 1e-8)
        elif scheme["use_nonzero_mask"]:
            inside = image[mask]
            image[mask] = (inside - inside.mean()) / max(float(inside.std()), 1e-8)
            image[~mask] = 0.0  # outside the anatomy carries no signal; the loader keeps it at 0
        else:
            image -= image.mean()
            image /= max(float(image.std()), 1e-8)
    return data


def preprocess_case(
    image_files: Sequence[Path], label_file: Path | None, plans: dict, case_id: str = ""
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, dict]:
    """Crop, normalise and resample one case as the plans say (nnU-Net v2's order).

    Returns ``(data float32 (C, X, Y, Z), seg int8 (X, Y, Z) or None, non-zero mask bool (X, Y, Z),
    properties)``. ``properties`` holds what :func:`revert_preprocessing` needs to map a
    prediction back onto the original grid. Used for training cases and, without a label, for
    inference inputs.
    """
    label_path = Path(label_file) if label_file else None
    case = RawCase(case_id or Path(image_files[0]).name, tuple(Path(p) for p in image_files), label_path)
    data, label, affine = _load_case(case)
    original_shape = data.shape[1:]
    bbox, mask = _nonzero_bbox(data)
    data = np.ascontiguousarray(data[(slice(None), *bbox)])
    label = label[bbox] if label is not None else None
    crop_affine = affine.copy()
    crop_affine[:3, 3] = nib.affines.apply_affine(affine, [s.start for s in bbox])
    data = _normalize(data, mask, plans)

    target = np.asarray(plans["target_spacing"])
    resampled = not np.allclose(_spacing(affine), target, rtol=1e-3)  # skip a pointless blur
    out_affine = crop_affine
    if resampled:
        def resample(array: np.ndarray, mode: str) -> MetaTensor:
            source = MetaTensor(torch.from_numpy(array), affine=torch.from_numpy(crop_affine))
            return Spacing(pixdim=target, mode=mode, padding_mode="border")(source)

        out = resample(data, "bilinear")
        out_affine = out.affine.numpy()
        data = out.numpy().astype(np.float32)
        mask = resample(mask[None].astype(np.float32), "nearest").numpy()[0] > 0.5
        label = resample(label[None].astype(np.float32), "nearest").numpy()[0] if label is not None else None
        # Bilinear interpolation bleeds normalised values across the mask edge; keep outside at 0.
        for channel, scheme in enumerate(plans["normalization"]):
            if scheme["use_nonzero_mask"]:
                data[channel][~mask] = 0.0
    seg = None
    if label is not None:
        seg = np.round(label).astype(np.int8 if plans["num_classes"] <= 127 else np.int16)
    properties = {
        "case_id": case.case_id,
        "original_shape": list(original_shape),
        "original_affine": affine.tolist(),
        "crop_bbox": [[s.start, s.stop] for s in bbox],
        "cropped_affine": crop_affine.tolist(),
        "resampled": resampled,
        "preprocessed_shape": list(data.shape[1:]),
        "preprocessed_affine": np.asarray(out_affine).tolist(),
    }
    return data.astype(np.float32, copy=False), seg, mask, properties


def revert_preprocessing(array: np.ndarray, properties: dict, is_label: bool = True) -> np.ndarray:
    """Map a prediction on the preprocessed grid back to the original image grid.

    ``array`` is a label map (X, Y, Z) when ``is_label``, else class probabilities (C, X, Y, Z).
    Outside the crop the result is background (label 0, or probability 1 for class 0).
    """
    values = np.asarray(array, dtype=np.float32)
    values = values[None] if is_label else values
    (x0, x1), (y0, y1), (z0, z1) = properties["crop_bbox"]
    if properties["resampled"]:
        source = MetaTensor(torch.from_numpy(values), affine=torch.tensor(properties["preprocessed_affine"]))
        resample = SpatialResample(mode="nearest" if is_label else "bilinear", padding_mode="border")
        target_affine = torch.tensor(properties["cropped_affine"])
        values = resample(source, dst_affine=target_affine, spatial_size=(x1 - x0, y1 - y0, z1 - z0)).numpy()
    out = np.zeros((values.shape[0], *properties["original_shape"]), np.float32)
    if not is_label:
        out[0] = 1.0
    out[:, x0:x1, y0:y1, z0:z1] = values
    return np.round(out[0]).astype(np.int16) if is_label else out


def _source_stamp(case: RawCase) -> dict[str, list[int]]:
    """Size and mtime of the raw files: a cheap way to notice an edited case without reading it."""
    files = [*case.images, *([case.label] if case.label else [])]
    return {path.name: [path.stat().st_size, path.stat().st_mtime_ns] for path in files}


def preprocessed_data_dir(preprocessed_dir: Path | str, plans: dict) -> Path:
    """Folder holding the cases preprocessed under ``plans`` (keyed by the preprocessing hash)."""
    return Path(preprocessed_dir) / f"data_{plans['preprocessing_hash']}"


@dataclass
class PreprocessReport:
    directory: Path
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


def preprocess_dataset(dataset_dir: Path | str, preprocessed_dir: Path | str, plans: dict) -> PreprocessReport:
    """Preprocess every training case into ``data_<hash>/``, reusing cached cases that are still valid."""
    dataset_dir = Path(dataset_dir)
    cases = _find_valid_cases(dataset_dir, read_dataset_json(dataset_dir))
    report = PreprocessReport(preprocessed_data_dir(preprocessed_dir, plans))
    report.directory.mkdir(parents=True, exist_ok=True)
    keep_mask = any(n["use_nonzero_mask"] for n in plans["normalization"])
    labels = sorted(v for v in plans["labels"].values() if v > 0)
    for case in cases:
        npz, sidecar = report.directory / f"{case.case_id}.npz", report.directory / f"{case.case_id}.json"
        stamp = _source_stamp(case)
        if npz.is_file() and sidecar.is_file():
            cached = json.loads(sidecar.read_text())
            if cached.get("source") == stamp and cached.get("preprocessing_hash") == plans["preprocessing_hash"]:
                report.reused.append(case.case_id)
                continue
        data, seg, mask, properties = preprocess_case(case.images, case.label, plans, case.case_id)
        # Foreground positions per class, sampled once here so the loader's oversampling is O(1).
        rng = np.random.default_rng(FINGERPRINT_SEED)
        arrays = {"data": data, "seg": seg}
        if keep_mask:
            arrays["nonzero_mask"] = mask
        for label in labels:
            where = np.argwhere(seg == label)
            if len(where) > FOREGROUND_LOCATIONS_PER_CLASS:
                where = where[rng.choice(len(where), FOREGROUND_LOCATIONS_PER_CLASS, replace=False)]
            arrays[f"locations_{label}"] = where.astype(np.int32)
        tmp = npz.with_name(npz.name + ".tmp")
        with open(tmp, "wb") as handle:  # a file object keeps np.savez from appending ".npz"
            np.savez(handle, **arrays)
        os.replace(tmp, npz)
        _write_json_atomic(sidecar, {**properties, "source": stamp, "preprocessing_hash": plans["preprocessing_hash"]})
        report.computed.append(case.case_id)
    return report


@dataclass
class PreprocessedCase:
    case_id: str
    data: np.ndarray  # float32 (C, X, Y, Z)
    seg: np.ndarray  # int (X, Y, Z), values 0..num_classes-1
    nonzero_mask: np.ndarray | None  # bool (X, Y, Z), only when a channel is normalised inside it
    locations: dict[int, np.ndarray]  # class -> (N, 3) sampled voxel positions
    properties: dict


def load_preprocessed_case(data_dir: Path | str, case_id: str) -> PreprocessedCase:
    """Load one preprocessed case written by :func:`preprocess_dataset`."""
    data_dir = Path(data_dir)
    npz, sidecar = data_dir / f"{case_id}.npz", data_dir / f"{case_id}.json"
    if not npz.is_file():
        raise ValueError(f"{case_id}: {npz} not found; run: python examples/e2enet/data.py plan --data DATASET_DIR")
    with np.load(npz) as arrays:
        locations = {int(k.split("_")[1]): arrays[k] for k in arrays.files if k.startswith("locations_")}
        mask = arrays["nonzero_mask"] if "nonzero_mask" in arrays.files else None
        properties = json.loads(sidecar.read_text())
        return PreprocessedCase(case_id, arrays["data"], arrays["seg"], mask, locations, properties)


# --------------------------------------------------------------------------- splits


def get_splits(
    preprocessed_dir: Path | str, case_ids: Sequence[str], num_folds: int = 5, seed: int = SPLIT_SEED
) -> list[dict]:
    """Cross-validation splits as nnU-Net makes them, saved to and reused from splits_final.json."""
    from sklearn.model_selection import KFold  # imported lazily: only this function needs scikit-learn

    path = Path(preprocessed_dir) / SPLITS_FILE
    ids = sorted(case_ids)
    if path.is_file():
        splits = json.loads(path.read_text())
        saved = set(splits[0]["train"]) | set(splits[0]["val"]) if splits else set()
        if saved != set(ids):
            raise ValueError(
                f"{path} does not match the dataset (cases not in the dataset: {sorted(saved - set(ids))}; "
                f"cases in no split: {sorted(set(ids) - saved)}); delete the file to regenerate the splits"
            )
        return splits
    if len(ids) < num_folds:
        raise ValueError(
            f"{num_folds}-fold cross-validation needs at least {num_folds} cases, the dataset has {len(ids)}; "
            "train on fold 'all'"
        )
    splits = []
    for train, val in KFold(n_splits=num_folds, shuffle=True, random_state=seed).split(ids):
        splits.append({"train": [ids[i] for i in train], "val": [ids[i] for i in val]})
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, splits)
    return splits


def fold_cases(preprocessed_dir: Path | str, case_ids: Sequence[str], fold: int | str) -> tuple[list[str], list[str]]:
    """(train ids, val ids) of ``fold`` (0-4), or all cases for both with ``fold='all'`` as nnU-Net does."""
    if str(fold) == "all":
        return sorted(case_ids), sorted(case_ids)
    splits = get_splits(preprocessed_dir, case_ids)
    if not 0 <= int(fold) < len(splits):
        raise ValueError(f"fold {fold} does not exist; choose 0-{len(splits) - 1} or 'all'")
    return splits[int(fold)]["train"], splits[int(fold)]["val"]


def plan_and_preprocess(
    dataset_dir: Path | str,
    preprocessed_dir: Path | str | None = None,
    *,
    verify: bool = True,
    preprocess: bool = True,
    **plan_options,
) -> tuple[dict, PreprocessReport | None]:
    """Verify, fingerprint, plan (saved to plans.json), then preprocess (cached) and split a raw dataset.

    ``plan_options`` go to :func:`plan_experiment`. With ``preprocess=False`` only plans.json is
    written and the report is None. Splits are made when there are at least 5 cases.
    """
    dataset_dir = Path(dataset_dir)
    preprocessed_dir = Path(preprocessed_dir) if preprocessed_dir else default_preprocessed_dir(dataset_dir)
    cases = verify_dataset(dataset_dir) if verify else None
    fingerprint = extract_fingerprint(dataset_dir, cases)
    plans = plan_experiment(fingerprint, read_dataset_json(dataset_dir), dataset_name=dataset_dir.name, **plan_options)
    save_plans(plans, preprocessed_dir)
    if not preprocess:
        return plans, None
    report = preprocess_dataset(dataset_dir, preprocessed_dir, plans)
    if len(fingerprint["case_ids"]) >= 5:
        get_splits(preprocessed_dir, fingerprint["case_ids"])
    return plans, report


def default_preprocessed_dir(dataset_dir: Path) -> Path:
    """``$nnUNet_preprocessed/<DatasetName>`` if set, else ``<raw root>/preprocessed/<DatasetName>``."""
    root = os.environ.get("nnUNet_preprocessed")
    return (Path(root) if root else dataset_dir.parent / "preprocessed") / dataset_dir.name


# --------------------------------------------------------------------------- training batches


def to_network_layout(x: torch.Tensor) -> torch.Tensor:
    """(B, C, X, Y, Z) as nibabel reads NIfTI <-> (B, C, Z, Y, X), the order nnU-Net (SimpleITK) feeds networks.

    E2ENet's depth axis (dim 2: where it shifts, and where its kernels are 1 wide) must be the slice axis Z, as in
    the authors' nnU-Net pipeline. Reversing the spatial axes is its own inverse.
    """
    return x.permute(0, 1, 4, 3, 2)



def _rotation_matrix(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _intensity_and_mirror_transforms() -> Compose:
    """MONAI dictionary transforms for spec section 4, items 2-9, in the trainer's order."""
    image = ["image"]
    both = ["image", "label"]
    sigma = (0.5, 1.0)
    return Compose(
        [
            # nnU-Net draws the noise variance from U(0, 0.1); MONAI draws the std from U(0, std).
            RandGaussianNoised(image, prob=0.1, std=0.1**0.5),
            RandGaussianSmoothd(image, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=0.2),
            RandScaleIntensityd(image, factors=0.25, prob=0.15),  # brightness x U(0.75, 1.25)
            # contrast: (x - mean) * U(0.75, 1.25) + mean, clipped to the original range
            RandScaleIntensityFixedMeand(image, factors=0.25, fixed_mean=True, preserve_range=True, prob=0.15),
            RandSimulateLowResolutiond(image, zoom_range=(0.5, 1.0), prob=0.25),
            RandAdjustContrastd(image, gamma=(0.7, 1.5), invert_image=True, retain_stats=True, prob=0.1),
            RandAdjustContrastd(image, gamma=(0.7, 1.5), invert_image=False, retain_stats=True, prob=0.3),
            RandFlipd(both, spatial_axis=0, prob=0.5),
            RandFlipd(both, spatial_axis=1, prob=0.5),
            RandFlipd(both, spatial_axis=2, prob=0.5),
        ]
    )


class TrainLoader:
    """Endless, reproducible batches of augmented training patches (nnU-Net recipe, single process).

    Every random choice (case, patch position, augmentation) comes from one ``numpy`` Generator:
    each batch draws a seed for the MONAI transforms from it. So ``state_dict()`` (the
    generator's state and the batch count, JSON-serialisable) is all a checkpoint needs, and
    after ``load_state_dict`` the loader continues with exactly the batches it would have produced.

    Each batch is a dict: ``image`` float32 (B, C, *patch), ``label`` int64 (B, 1, *patch),
    ``case_ids`` and ``forced_foreground`` (which samples were centred on foreground). Cases are
    held in memory (the CPU demo datasets are a few MB each).

    Measured on the MNI dataset at 2.5 mm, B = 2, 64^3, one channel, 2 AMD EPYC cores: 20-30 ms
    per batch with augmentation and 5 ms without when the machine is quiet, about 50 ms (12 ms)
    when other jobs leave us half a core. The model step it feeds takes seconds on a CPU, so a
    single process is enough.
    """

    def __init__(
        self,
        data_dir: Path | str,
        case_ids: Sequence[str],
        plans: dict,
        *,
        seed: int,
        batch_size: int | None = None,
        patch_size: Sequence[int] | None = None,
        oversample_foreground: float = OVERSAMPLE_FOREGROUND,
        augment: bool = True,
    ):
        if not case_ids:
            raise ValueError("TrainLoader needs at least one case id")
        self.cases = [load_preprocessed_case(data_dir, case_id) for case_id in case_ids]
        self.batch_size = int(batch_size or plans["batch_size"])
        if patch_size is None:
            self.patch_size = np.asarray(plans["patch_size"])
        else:
            self.patch_size = np.asarray(_as_triple(patch_size, "patch_size"))
            shapes = [case.data.shape[1:] for case in self.cases]
            check_patch_size(self.patch_size.tolist(), plans["network_stride"], shapes, list(case_ids))
        # nnU-Net: sample b is forced to foreground unless b < round(B * (1 - p)).
        self.num_random = int(round(self.batch_size * (1 - oversample_foreground)))
        self.augment = augment
        self.masked_channels = [i for i, n in enumerate(plans["normalization"]) if n["use_nonzero_mask"]]
        # Background outside the non-zero mask is marked -1, as nnU-Net does, so that one
        # nearest-neighbour resampling carries both the label and the mask through rotations.
        self._labels = [
            np.where(case.nonzero_mask | (case.seg > 0), case.seg, -1).astype(case.seg.dtype)
            if self.masked_channels and case.nonzero_mask is not None
            else case.seg
            for case in self.cases
        ]
        self._transforms = _intensity_and_mirror_transforms()
        self._rng = np.random.default_rng(seed)
        self.batches_drawn = 0

    def state_dict(self) -> dict:
        return {"bit_generator": self._rng.bit_generator.state, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["bit_generator"]
        self.batches_drawn = state["batches_drawn"]

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        # Augmenting a patch is hundreds of small tensor ops. A second intra-op thread gains
        # little on a quiet machine (~20 vs ~25 ms per batch) but costs 20x when other jobs share
        # the cores (~1 s vs ~50 ms: threads wait for each other), and MONAI's MetaTensor
        # bookkeeping is pure overhead for random patches. Both switches are process-wide, so
        # they are restored for the caller's model.
        threads, tracking = torch.get_num_threads(), get_track_meta()
        torch.set_num_threads(1)
        set_track_meta(False)
        try:
            return self._next_batch()
        finally:
            torch.set_num_threads(threads)
            set_track_meta(tracking)

    def _next_batch(self) -> dict:
        rng = self._rng
        self._transforms.set_random_state(seed=int(rng.integers(2**32)))
        images, labels, case_ids, forced = [], [], [], []
        for sample in range(self.batch_size):
            index = int(rng.integers(len(self.cases)))
            force = sample >= self.num_random
            image, label = self._sample_patch(index, force, rng)
            if self.augment:
                out = self._transforms({"image": image, "label": label})
                image, label = out["image"], out["label"]
            if self.masked_channels:  # nnU-Net's mask transform: keep outside-the-anatomy at 0
                outside = label[0] < 0
                image[self.masked_channels] = image[self.masked_channels].masked_fill(outside, 0.0)
                label = label.clamp_min(0)
            images.append(image)
            labels.append(label)
            case_ids.append(self.cases[index].case_id)
            forced.append(force)
        self.batches_drawn += 1
        return {
            "image": torch.stack(images).float(),
            "label": torch.stack(labels).long(),
            "case_ids": case_ids,
            "forced_foreground": forced,
        }

    def _sample_patch(
        self, index: int, force_foreground: bool, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop (or rotate/scale and resample) one patch; returns image (C, *P) and label (1, *P)."""
        case, label = self.cases[index], self._labels[index]
        shape, patch = np.asarray(case.data.shape[1:]), self.patch_size
        # Range of the patch's lower corner that keeps it inside the image, or centred when
        # the image is smaller than the patch (nnU-Net's get_bbox with the final patch size).
        need = np.maximum(patch - shape, 0)
        lower_lo = -(need // 2)
        lower_hi = shape + need // 2 + need % 2 - patch
        classes = [k for k, where in case.locations.items() if len(where)]
        if force_foreground and classes:
            cls = classes[int(rng.integers(len(classes)))]
            centre = case.locations[cls][int(rng.integers(len(case.locations[cls])))]
        else:  # a case without any foreground falls back to a random patch
            centre = np.array([rng.integers(lo, hi + 1) for lo, hi in zip(lower_lo, lower_hi)]) + patch // 2
        rotate = self.augment and rng.random() < P_ROTATION
        scale = self.augment and rng.random() < P_SCALE
        if rotate or scale:
            angles = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, 3)) if rotate else np.zeros(3)
            factor = rng.uniform(*SCALE_RANGE) if scale else 1.0
            return self._resample_patch(case.data, label, centre, _rotation_matrix(angles) * factor)
        lower = np.clip(centre - patch // 2, lower_lo, lower_hi)
        return self._crop_patch(case.data, label, lower)

    def _crop_patch(self, data: np.ndarray, label: np.ndarray, lower: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Slice the patch starting at ``lower``, zero-padding where it leaves the image."""
        shape, upper = np.asarray(data.shape[1:]), lower + self.patch_size
        src = tuple(slice(max(lo, 0), min(hi, n)) for lo, hi, n in zip(lower, upper, shape))
        pad = [(max(-lo, 0), max(hi - n, 0)) for lo, hi, n in zip(lower, upper, shape)]
        image = np.pad(data[(slice(None), *src)], [(0, 0), *pad])  # a copy: augmentation may work in place
        label = np.pad(label[src], pad)[None]
        return torch.from_numpy(image), torch.from_numpy(label.astype(np.int16))

    def _resample_patch(
        self, data: np.ndarray, label: np.ndarray, centre: np.ndarray, linear: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate/scale about ``centre`` with MONAI ``Affine``; patch voxel P // 2 samples exactly ``centre``.

        Anchoring the output voxel P // 2 (not the half-voxel patch centre) on ``centre`` means a
        foreground-forced sample keeps its foreground voxel under any rotation or scaling.
        """
        patch = self.patch_size
        in_centre, out_centre = (np.asarray(data.shape[1:]) - 1) / 2, (patch - 1) / 2
        matrix = np.eye(4)
        matrix[:3, :3] = linear  # MONAI maps centred output coordinates to centred input coordinates
        matrix[:3, 3] = centre - in_centre - linear @ (patch // 2 - out_centre)
        matrix = torch.from_numpy(matrix).float()
        size = patch.tolist()
        image = Affine(affine=matrix, spatial_size=size, mode="bilinear", padding_mode="zeros", image_only=True)(
            torch.from_numpy(data)
        )
        label = Affine(affine=matrix, spatial_size=size, mode="nearest", padding_mode="zeros", image_only=True)(
            torch.from_numpy(label[None].astype(np.float32))
        )
        return image, label.round().to(torch.int16)


# --------------------------------------------------------------------------- CLI


def _print_plan(plans: dict, preprocessed_dir: Path, report: PreprocessReport | None) -> None:
    fingerprint = plans["fingerprint"]
    print(f"dataset        {plans['dataset_name']} ({len(fingerprint['case_ids'])} training cases)")
    print(f"plans          {preprocessed_dir / PLANS_FILE}")
    print(f"target spacing {[round(s, 4) for s in plans['target_spacing']]} mm (median)")
    print(f"median shape   {plans['median_shape']} voxels after crop and resampling")
    print(f"patch size     {plans['patch_size']} (network stride {plans['network_stride']})")
    print(f"batch size     {plans['batch_size']}")
    for norm in plans["normalization"]:
        if norm["scheme"] == "CT":
            detail = f"clip {[round(c, 3) for c in norm['clip']]}, mean {norm['mean']:.3f}, std {norm['std']:.3f}"
        else:
            detail = "per image, inside the non-zero mask" if norm["use_nonzero_mask"] else "per image"
        print(f"normalisation  {norm['channel']}: {norm['scheme']} ({detail})")
    print(f"cropping kept  {fingerprint['median_relative_size_after_cropping']:.2f} of the median image")
    if report is not None:
        print(f"preprocessed   {report.directory}: {len(report.computed)} computed, {len(report.reused)} reused")
        if (preprocessed_dir / SPLITS_FILE).is_file():
            print(f"splits         {preprocessed_dir / SPLITS_FILE}")


def _sample_command(args: argparse.Namespace) -> None:
    plans = load_plans(args.preprocessed)
    train_ids, _ = fold_cases(args.preprocessed, plans["fingerprint"]["case_ids"], args.fold)
    loader = TrainLoader(preprocessed_data_dir(args.preprocessed, plans), train_ids, plans, seed=args.seed)
    next(loader)  # the first batch pays one-off costs (MONAI kernels, allocations)
    start, forced_with_foreground, forced_total = time.perf_counter(), 0, 0
    for _ in range(args.batches):
        batch = next(loader)
        for label, forced in zip(batch["label"], batch["forced_foreground"]):
            forced_total += forced
            forced_with_foreground += bool(forced and (label > 0).any())
    ms = (time.perf_counter() - start) / args.batches * 1000
    print(f"{args.batches} batches of {loader.batch_size} x {list(batch['image'].shape[1:])}: {ms:.0f} ms per batch")
    print(f"foreground-forced samples containing foreground: {forced_with_foreground}/{forced_total}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="nnU-Net-style data pipeline of the E2ENet example")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check a raw dataset and list every problem")
    verify.add_argument("--data", type=Path, required=True, help="DatasetXXX_Name folder")
    convert = sub.add_parser("convert-msd", help="convert an MSD task folder to the nnU-Net v2 layout")
    convert.add_argument("--task", type=Path, required=True, help="TaskNN_Name folder")
    convert.add_argument("--out", type=Path, required=True, help="raw root that receives DatasetNNN_Name")
    convert.add_argument("--id", type=int, default=None, help="dataset id (default: the task number)")
    plan = sub.add_parser("plan", help="fingerprint, plan, preprocess (cached) and split a raw dataset")
    plan.add_argument("--data", type=Path, required=True, help="DatasetXXX_Name folder")
    plan.add_argument(
        "--out", type=Path, default=None,
        help="preprocessed folder (default $nnUNet_preprocessed/NAME, else RAW_ROOT/preprocessed/NAME)",
    )
    plan.add_argument("--stride", type=int, nargs="+", default=[DEFAULT_NETWORK_STRIDE],
                      help="network total stride, 1 or 3 ints (default 32)")
    plan.add_argument("--patch-budget", type=int, default=DEFAULT_PATCH_VOXEL_BUDGET, help="max voxels per patch")
    plan.add_argument("--batch-budget", type=int, default=DEFAULT_BATCH_VOXEL_BUDGET,
                      help="voxels per batch that set the batch size")
    plan.add_argument("--patch-size", type=int, nargs=3, default=None, help="explicit patch size (validated)")
    plan.add_argument("--batch-size", type=int, default=None)
    plan.add_argument("--plan-only", action="store_true", help="write plans.json without preprocessing")
    plan.add_argument("--no-verify", action="store_true", help="skip the full dataset check (large datasets)")
    sample = sub.add_parser("sample", help="draw training batches and report ms per batch")
    sample.add_argument("--preprocessed", type=Path, required=True)
    sample.add_argument("--fold", default="0")
    sample.add_argument("--batches", type=int, default=20)
    sample.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        if args.command == "verify":
            cases = verify_dataset(args.data)
            print(f"{args.data}: OK, {len(cases)} training cases")
        elif args.command == "convert-msd":
            print(f"wrote {convert_msd_dataset(args.task, args.out, args.id)}")
        elif args.command == "plan":
            out = args.out or default_preprocessed_dir(args.data)
            plans, report = plan_and_preprocess(
                args.data,
                out,
                verify=not args.no_verify,
                preprocess=not args.plan_only,
                network_stride=args.stride[0] if len(args.stride) == 1 else args.stride,
                patch_voxel_budget=args.patch_budget,
                batch_voxel_budget=args.batch_budget,
                patch_size=args.patch_size,
                batch_size=args.batch_size,
            )
            _print_plan(plans, out, report)
        else:
            _sample_command(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
