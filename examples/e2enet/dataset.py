"""Raw datasets in the nnU-Net v2 layout: read dataset.json, find and load cases, verify, convert MSD tasks.

The layout::

    DatasetXXX_Name/dataset.json      {"channel_names": {"0": "T1"}, "labels": {"background": 0, ...},
                                       "numTraining": N, "file_ending": ".nii.gz"}
    DatasetXXX_Name/imagesTr/{case}_{XXXX}.nii.gz    one 3D file per channel, XXXX = channel index
    DatasetXXX_Name/labelsTr/{case}.nii.gz           integer labels, same geometry as the images
    DatasetXXX_Name/imagesTs/ (optional)             [labelsTs/ optional, e.g. the MNI test labels]

:func:`verify_dataset` collects every problem (missing or extra files, numTraining, shapes, affines, undeclared
labels, NaN/inf voxels) and raises one ValueError listing them. A Medical Segmentation Decathlon task (4D
images, v1 dataset.json) is converted with :func:`convert_msd_dataset` (``data.py convert-msd``).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from atomic import write_json

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
SUPPORTED_ENDINGS = (".nii.gz", ".nii")
# An image file of one channel of a case: {case}_{XXXX}.nii.gz or .nii, XXXX the channel index.
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})(?P<ending>\.nii(?:\.gz)?)$")
# Two files are on the same grid when their affines agree this closely: header round-off (a float32 round trip)
# passes, a wrong origin or voxel size (>= 1e-3 mm) does not.
AFFINE_RTOL, AFFINE_ATOL = 1e-4, 1e-3


def same_affine(a: np.ndarray, b: np.ndarray) -> bool:
    return np.allclose(a, b, rtol=AFFINE_RTOL, atol=AFFINE_ATOL)


@dataclass(frozen=True)
class RawCase:
    """One case of a raw dataset: its channel files in channel order and its label (if any)."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


def problem_list(problems: Sequence[str]) -> str:
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
    for path in sorted(image_dir.iterdir()) if image_dir.is_dir() else []:
        if path.name.startswith("."):  # macOS resource forks in MSD archives
            continue
        match = CHANNEL_FILE.match(path.name)
        if match is None or match["ending"] != ending:
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


def load_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load one 3D NIfTI as (float32 array, affine); a trailing singleton 4th axis is dropped."""
    img = nib.load(path)
    shape = img.shape[:3] if len(img.shape) == 4 and img.shape[3] == 1 else img.shape
    if len(shape) != 3:
        raise ValueError(
            f"{path.name} has shape {img.shape}; expected one 3D volume per file. "
            "A 4D multi-channel file (MSD) must be split: python examples/e2enet/data.py convert-msd"
        )
    return img.get_fdata(dtype=np.float32).reshape(shape), img.affine


def load_raw_case(case: RawCase) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(channels float32 (C, X, Y, Z), label int16 (X, Y, Z) or None, affine of the first channel)."""
    volumes = [load_volume(path) for path in case.images]
    data = np.stack([v for v, _ in volumes])
    for path, volume in zip(case.images, data, strict=True):
        if not np.isfinite(volume).all():
            raise ValueError(
                f"{case.case_id}: {path.name} has NaN/inf voxels; fix the image (run verify to list every problem)"
            )
    label = None
    if case.label is not None:
        label = load_volume(case.label)[0]
        if label.shape != data.shape[1:]:
            raise ValueError(f"{case.case_id}: label shape {label.shape} != image shape {data.shape[1:]} (run verify)")
        label = np.round(label).astype(np.int16)
    return data, label, volumes[0][1]


def _check_case(case: RawCase, declared_labels: set[int]) -> list[str]:
    """Geometry, NaN and label-value problems of one case (layout problems are found earlier)."""
    problems = []
    reference_shape = reference_affine = None
    readable = (ValueError, OSError, nib.filebasedimages.ImageFileError)
    for path in case.images:
        try:
            image, affine = load_volume(path)
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
        elif image.shape != reference_shape or not same_affine(affine, reference_affine):
            problems.append(
                f"{case.case_id}: {path.name} (shape {image.shape}) is not on the grid of {case.images[0].name} "
                f"(shape {reference_shape}); all channels of a case must share shape and affine "
                "(resample them onto the first channel)"
            )
    if case.label is None:
        return problems
    try:
        label, affine = load_volume(case.label)
    except readable as error:
        return problems + [f"{case.case_id}: cannot read label {case.label.name} ({error})"]
    if reference_shape is not None:
        if label.shape != reference_shape:
            problems.append(
                f"{case.case_id}: label shape {label.shape} != image shape {reference_shape}; "
                "the label must be on the image grid"
            )
        elif not same_affine(affine, reference_affine):
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
        raise ValueError(f"dataset {dataset_dir} has {len(problems)} problem(s):\n{problem_list(problems)}")
    return train_cases


def find_valid_cases(dataset_dir: Path, meta: dict) -> list[RawCase]:
    """Training cases, stopping on layout problems (for callers that skipped verify_dataset)."""
    cases, problems = find_cases(dataset_dir, meta, "Tr")
    if problems:
        raise ValueError(f"dataset layout problems (run verify for the full list):\n{problem_list(problems)}")
    return cases


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
    write_json(out_dir / "dataset.json", new_meta)
    return out_dir
