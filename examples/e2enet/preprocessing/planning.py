"""Dataset fingerprint and experiment plans (nnU-Net v2's ``plan``), cross-validation splits, and the whole pipeline.

1. :func:`extract_fingerprint`: spacings, orientations (nibabel axis codes), shapes after cropping to the non-zero
   region, and foreground intensity statistics per channel (mean, std, 0.5/99.5 percentiles) from up to 10,000
   sampled foreground voxels per case.
2. :func:`plan_experiment`: orientation = the one the training cases share (cases stored in several are refused);
   target spacing = median spacing; normalisation by channel name (``CT``:
   :class:`~preprocess.CTNormalization` with the dataset's foreground statistics; anything else:
   :class:`~preprocess.ZScoreNormalization`, inside the non-zero mask when cropping removed more than a quarter of
   the median image); patch = median shape rounded up to the network's total stride, shrunk one stride at a
   time until it fits the voxel budget; batch size from a batch voxel budget (at least 2, at most 5 % of the
   dataset's voxels, as nnU-Net). The result, :class:`Plans`, is saved as ``plans.json``.
3. :func:`get_splits`: 5-fold ``KFold(shuffle=True, random_state=12345)`` over the sorted case ids, saved as
   ``splits_final.json`` and reused when present.

:func:`plan_and_preprocess` runs verify, fingerprint, plan, preprocess and split in that order.

Differences from nnU-Net, chosen for a CPU demo: no anisotropic target-spacing rule, no 2D or cascade
configurations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from e2enet.atomic import write_json
from e2enet.dataset.layout import RawCase, find_valid_cases, load_raw_case, read_dataset_json
from e2enet.dataset.verify import verify_dataset
from e2enet.preprocessing.geometry import orientation_codes
from e2enet.preprocessing.preprocess import (
    PREPROCESSING_VERSION,
    CTNormalization,
    Normalization,
    PreprocessReport,
    ZScoreNormalization,
    crop_to_nonzero,
    normalization_from_json,
    preprocess_dataset,
)
from e2enet.problems import Problem

PLANS_FILE = "plans.json"
SPLITS_FILE = "splits_final.json"
FOREGROUND_SAMPLES_PER_CASE = 10_000  # fingerprint intensity samples per case (nnU-Net: far more)
FINGERPRINT_SEED = 1234  # as nnU-Net
SPLIT_SEED = 12345  # as nnU-Net's generate_crossval_split
USE_MASK_BELOW_RELATIVE_SIZE = 0.75  # nnU-Net: z-score inside the non-zero mask if cropping kept < 3/4
DEFAULT_NETWORK_STRIDE = 32  # E2ENet/nnU-Net 3d_fullres: 5 stride-2 downsamplings
DEFAULT_PATCH_VOXEL_BUDGET = 64**3  # CPU-sized; nnU-Net on a GPU would allow ~128^3
DEFAULT_BATCH_VOXEL_BUDGET = 2 * 64**3


# --------------------------------------------------------------------------- fingerprint


@dataclass
class Fingerprint:
    """What planning needs to know about a dataset; one entry per training case, in ``case_ids`` order."""

    case_ids: list[str]
    spacings: list[list[float]]
    orientations: list[str]  # nibabel axis codes of each case's array, e.g. "RAS"
    shapes_before_crop: list[list[int]]
    shapes_after_crop: list[list[int]]
    median_relative_size_after_cropping: float
    # channel index (str) -> mean, median, std, min, max, percentile_00_5, percentile_99_5 of foreground voxels
    foreground_intensity_properties_per_channel: dict[str, dict[str, float]]


def _intensity_statistics(values: np.ndarray) -> dict[str, float]:
    keys = ("mean", "median", "std", "min", "max", "percentile_00_5", "percentile_99_5")
    if values.size == 0:  # no foreground anywhere: CT normalisation would be undefined
        return {key: float("nan") for key in keys}
    p005, median, p995 = np.percentile(values, [0.5, 50.0, 99.5])
    with np.errstate(over="ignore", invalid="ignore"):  # extreme voxels: verify reports them, normalisation stops
        stats = (values.mean(), median, values.std(), values.min(), values.max(), p005, p995)
    return {key: float(value) for key, value in zip(keys, stats, strict=True)}


def extract_fingerprint(dataset_dir: Path | str, cases: Sequence[RawCase] | None = None) -> Fingerprint:
    """Spacings, shapes (before/after crop) and foreground intensity statistics of the training cases.

    Up to ``FOREGROUND_SAMPLES_PER_CASE`` foreground voxels (label > 0) per case are sampled with
    a fixed seed, so every case weighs the same and the result is reproducible.
    """
    dataset_dir = Path(dataset_dir)
    meta = read_dataset_json(dataset_dir)
    cases = find_valid_cases(dataset_dir, meta) if cases is None else cases
    rng = np.random.default_rng(FINGERPRINT_SEED)
    num_channels = len(meta["channel_names"])
    samples: list[list[np.ndarray]] = [[] for _ in range(num_channels)]
    spacings, orientations, shapes, shapes_after_crop, relative_sizes = [], [], [], [], []
    for case in cases:
        data, label, affine = load_raw_case(case)
        bbox, _ = crop_to_nonzero(data)
        cropped, cropped_label = data[(slice(None), *bbox)], label[bbox]
        spacings.append(nib.affines.voxel_sizes(affine).tolist())
        orientations.append(orientation_codes(affine, case.images[0]))
        shapes.append(list(data.shape[1:]))
        shapes_after_crop.append(list(cropped.shape[1:]))
        relative_sizes.append(cropped[0].size / data[0].size)
        foreground = np.flatnonzero(cropped_label > 0)
        if foreground.size > FOREGROUND_SAMPLES_PER_CASE:
            foreground = rng.choice(foreground, FOREGROUND_SAMPLES_PER_CASE, replace=False)
        for channel in range(num_channels):
            samples[channel].append(cropped[channel].ravel()[foreground])
    return Fingerprint(
        case_ids=[case.case_id for case in cases],
        spacings=spacings,
        orientations=orientations,
        shapes_before_crop=shapes,
        shapes_after_crop=shapes_after_crop,
        median_relative_size_after_cropping=float(np.median(relative_sizes)),
        foreground_intensity_properties_per_channel={
            str(c): _intensity_statistics(np.concatenate(samples[c])) for c in range(num_channels)
        },
    )


# --------------------------------------------------------------------------- plans


@dataclass
class Plans:
    """How to preprocess a dataset and train on it; saved as ``plans.json`` (:meth:`save`, :meth:`load`)."""

    dataset_name: str
    channel_names: dict[str, str]  # channel index (str) -> name, as in dataset.json
    labels: dict[str, int]  # class name -> value, as in dataset.json
    num_classes: int
    # Axis codes of the training arrays: predict.py reorients every input to them, and its output back.
    orientation: str
    target_spacing: list[float]  # mm per axis
    median_shape: list[float]  # voxels after cropping and resampling
    network_stride: list[int]
    patch_size: list[int]
    batch_size: int
    normalization: list[Normalization]  # one per channel, in channel order
    fingerprint: Fingerprint

    @property
    def preprocessing_hash(self) -> str:
        """Hash of the fields that change preprocessed arrays (not patch or batch size): names the cache folder."""
        relevant = {
            "version": PREPROCESSING_VERSION,
            "target_spacing": self.target_spacing,
            "normalization": [n.to_json() for n in self.normalization],
            "channel_names": self.channel_names,
            "labels": self.labels,
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]

    def to_json(self) -> dict:
        """The plans as plain JSON, with the preprocessing hash for whoever reads the file."""
        entries = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        entries.update(
            normalization=[n.to_json() for n in self.normalization],
            fingerprint=dataclasses.asdict(self.fingerprint),
            preprocessing_hash=self.preprocessing_hash,
        )
        return entries

    @classmethod
    def from_json(cls, entries: dict) -> Plans:
        """Inverse of :meth:`to_json`; the stored hash is recomputed, so an edited file gets its own cache."""
        fields = {f.name: entries[f.name] for f in dataclasses.fields(cls)}
        fields.update(
            normalization=[normalization_from_json(n) for n in entries["normalization"]],
            fingerprint=Fingerprint(**entries["fingerprint"]),
        )
        return cls(**fields)

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: Path | str) -> Plans:
        path = Path(path)
        if not path.is_file():
            raise Problem(
                f"{path} not found: plans are written by `python examples/e2enet/data.py plan --data DATASET_DIR "
                "--out PREPROCESSED_DIR` (and copied into a run folder by train.py); run that first"
            )
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise Problem(
                f"{path} is not a plans file of this example ({type(error).__name__}: {error}): plan again with "
                "data.py plan, or, in a run folder, rerun its train.py command with --resume, which writes it anew"
            ) from error


def as_triple(value: int | Sequence[int], name: str) -> list[int]:
    triple = [int(value)] * 3 if np.isscalar(value) else [int(v) for v in value]
    if len(triple) != 3 or min(triple) < 1:
        raise Problem(f"{name} must be a positive int or three positive ints, got {value}")
    return triple


def _round_up(shape: Sequence[float], stride: Sequence[int]) -> list[int]:
    return [int(math.ceil(s / k) * k) for s, k in zip(shape, stride, strict=True)]


def check_patch_size(
    patch: Sequence[int], stride: Sequence[int], shapes: Sequence[Sequence[int]], case_ids: Sequence[str]
) -> None:
    """Raise unless an explicitly requested patch suits the network and the (preprocessed) case shapes.

    It must be a multiple of the network stride, and no larger than the largest case rounded up
    to the stride on any axis: beyond that every patch would be padding along that axis.
    """
    shapes = np.asarray(shapes)
    allowed = _round_up(shapes.max(axis=0), stride)
    for axis, (p, k, a) in enumerate(zip(patch, stride, allowed, strict=True)):
        if p % k:
            raise Problem(
                f"patch_size {list(patch)} is not a multiple of the network stride {list(stride)} on axis {axis}; "
                f"use {_round_up(patch, stride)}"
            )
        if p > a:
            largest = int(np.argmax(shapes[:, axis]))
            raise Problem(
                f"patch_size {list(patch)} exceeds the largest case ({case_ids[largest]}, {shapes[largest, axis]} "
                f"voxels on axis {axis} after preprocessing) rounded up to the stride ({a}): every patch would be "
                f"padding there; use at most {allowed}"
            )


def training_orientation(fingerprint: Fingerprint) -> str:
    """The orientation every training case is stored in; a Problem naming the cases of each if they differ.

    Cases in several orientations would show the network one anatomy in several array frames (left and right
    swapped, or axes exchanged, with their spacings), and leave no frame to reorient test images to.
    """
    cases_by_orientation: dict[str, list[str]] = {}
    for case_id, codes in zip(fingerprint.case_ids, fingerprint.orientations, strict=True):
        cases_by_orientation.setdefault(codes, []).append(case_id)
    if len(cases_by_orientation) > 1:
        listing = "; ".join(
            f"{codes} for {', '.join(cases[:3])}{f' and {len(cases) - 3} more' if len(cases) > 3 else ''}"
            for codes, cases in sorted(cases_by_orientation.items(), key=lambda item: -len(item[1]))
        )
        raise Problem(
            f"the training cases are stored in {len(cases_by_orientation)} orientations (nibabel axis codes: "
            f"{listing}), so the network would see one anatomy in several array frames; reorient them to one, "
            "e.g. RAS with nibabel.as_closest_canonical, and plan again"
        )
    return next(iter(cases_by_orientation))


def _plan_normalization(index: str, channel: str, fingerprint: Fingerprint) -> Normalization:
    if channel.upper() == "CT":
        stats = fingerprint.foreground_intensity_properties_per_channel[str(index)]
        if math.isnan(stats["mean"]):
            raise Problem(
                f"channel {index} ({channel}) uses CT normalisation, which needs foreground intensity statistics, "
                "but no training case has a foreground label; check the labels or rename the channel"
            )
        clip = (stats["percentile_00_5"], stats["percentile_99_5"])
        return CTNormalization(channel, clip, stats["mean"], stats["std"])
    use_mask = fingerprint.median_relative_size_after_cropping < USE_MASK_BELOW_RELATIVE_SIZE
    return ZScoreNormalization(channel, bool(use_mask))


def plan_experiment(
    fingerprint: Fingerprint,
    meta: dict,
    *,
    network_stride: int | Sequence[int] = DEFAULT_NETWORK_STRIDE,
    patch_voxel_budget: int = DEFAULT_PATCH_VOXEL_BUDGET,
    batch_voxel_budget: int = DEFAULT_BATCH_VOXEL_BUDGET,
    patch_size: Sequence[int] | None = None,
    batch_size: int | None = None,
    dataset_name: str = "",
) -> Plans:
    """Turn a fingerprint and ``dataset.json`` into plans (target spacing, normalisation, patch and batch size).

    ``network_stride`` is the network's total downsampling per axis; the patch must be a multiple
    of it. An explicit ``patch_size`` is validated by :func:`check_patch_size`; an explicit
    ``batch_size`` is used as given.
    """
    stride = as_triple(network_stride, "network_stride")
    spacings = np.asarray(fingerprint.spacings)
    target_spacing = np.median(spacings, axis=0)
    # Shapes the cases will have after resampling to the target spacing (nnU-Net's rule).
    resampled = np.round(np.asarray(fingerprint.shapes_after_crop) * spacings / target_spacing).astype(int)
    median_shape = np.median(resampled, axis=0)

    if patch_size is None:
        patch = _round_up(median_shape, stride)
        while np.prod(patch) > patch_voxel_budget:
            axis = int(np.argmax(patch))  # shrink the longest side first, keeping the patch compact
            if patch[axis] == stride[axis]:
                raise Problem(
                    f"patch voxel budget {patch_voxel_budget} is below one stride cube {stride}; "
                    "raise the budget or lower the stride"
                )
            patch[axis] -= stride[axis]
    else:
        patch = as_triple(patch_size, "patch_size")
        check_patch_size(patch, stride, resampled, fingerprint.case_ids)
    if batch_size is None:
        patch_voxels = int(np.prod(patch))
        five_percent = int(round(0.05 * float(np.prod(resampled, axis=1).sum()) / patch_voxels))
        batch_size = max(2, min(batch_voxel_budget // patch_voxels, five_percent))

    channels = sorted(meta["channel_names"].items(), key=lambda kv: int(kv[0]))
    return Plans(
        dataset_name=dataset_name,
        channel_names=meta["channel_names"],
        labels=meta["labels"],
        num_classes=len(meta["labels"]),
        orientation=training_orientation(fingerprint),
        target_spacing=target_spacing.tolist(),
        median_shape=median_shape.tolist(),
        network_stride=stride,
        patch_size=[int(p) for p in patch],
        batch_size=int(batch_size),
        normalization=[_plan_normalization(index, channel, fingerprint) for index, channel in channels],
        fingerprint=fingerprint,
    )


# --------------------------------------------------------------------------- splits


def get_splits(
    preprocessed_dir: Path | str, case_ids: Sequence[str], num_folds: int = 5, seed: int = SPLIT_SEED
) -> list[dict]:
    """Cross-validation splits as nnU-Net makes them, saved to and reused from splits_final.json."""
    from sklearn.model_selection import KFold  # imported lazily: only this function needs scikit-learn

    path = Path(preprocessed_dir) / SPLITS_FILE
    ids = sorted(case_ids)
    if path.is_file():
        try:
            splits = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise Problem(f"{path} is damaged ({error}); delete it to regenerate the splits") from error
        saved = set(splits[0]["train"]) | set(splits[0]["val"]) if splits else set()
        if saved != set(ids):
            raise Problem(
                f"{path} does not match the dataset (cases not in the dataset: {sorted(saved - set(ids))}; "
                f"cases in no split: {sorted(set(ids) - saved)}); delete the file to regenerate the splits"
            )
        return splits
    if len(ids) < num_folds:
        raise Problem(
            f"{num_folds}-fold cross-validation needs at least {num_folds} cases, the dataset has {len(ids)}; "
            "train on fold 'all'"
        )
    splits = []
    for train, val in KFold(n_splits=num_folds, shuffle=True, random_state=seed).split(ids):
        splits.append({"train": [ids[i] for i in train], "val": [ids[i] for i in val]})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, splits)
    return splits


def fold_cases(preprocessed_dir: Path | str, case_ids: Sequence[str], fold: int | str) -> tuple[list[str], list[str]]:
    """(train ids, val ids) of ``fold`` (0-4), or all cases for both with ``fold='all'`` as nnU-Net does."""
    if str(fold) == "all":
        return sorted(case_ids), sorted(case_ids)
    splits = get_splits(preprocessed_dir, case_ids)
    if not 0 <= int(fold) < len(splits):
        raise Problem(f"fold {fold} does not exist; choose 0-{len(splits) - 1} or 'all'")
    return splits[int(fold)]["train"], splits[int(fold)]["val"]


# --------------------------------------------------------------------------- the pipeline


def default_preprocessed_dir(dataset_dir: Path | str) -> Path:
    """``$nnUNet_preprocessed/<DatasetName>`` if set, else ``<raw root>/preprocessed/<DatasetName>``."""
    dataset_dir = Path(dataset_dir).resolve()  # "." has neither a parent nor a name until resolved
    root = os.environ.get("nnUNet_preprocessed")
    return (Path(root) if root else dataset_dir.parent / "preprocessed") / dataset_dir.name


def plan_and_preprocess(
    dataset_dir: Path | str,
    preprocessed_dir: Path | str | None = None,
    *,
    verify: bool = True,
    preprocess: bool = True,
    **plan_options,
) -> tuple[Plans, PreprocessReport | None]:
    """Verify, fingerprint, plan (saved to plans.json), then preprocess (cached) and split a raw dataset.

    ``plan_options`` go to :func:`plan_experiment`. With ``preprocess=False`` only plans.json is
    written and the report is None. Splits are made when there are at least 5 cases.
    """
    dataset_dir = Path(dataset_dir).resolve()  # the plans name the dataset after its folder, "." included
    preprocessed_dir = Path(preprocessed_dir) if preprocessed_dir else default_preprocessed_dir(dataset_dir)
    cases = verify_dataset(dataset_dir) if verify else None
    fingerprint = extract_fingerprint(dataset_dir, cases)
    plans = plan_experiment(fingerprint, read_dataset_json(dataset_dir), dataset_name=dataset_dir.name, **plan_options)
    plans.save(preprocessed_dir / PLANS_FILE)
    if not preprocess:
        return plans, None
    report = preprocess_dataset(dataset_dir, preprocessed_dir, plans)
    if len(fingerprint.case_ids) >= 5:
        get_splits(preprocessed_dir, fingerprint.case_ids)
    return plans, report
