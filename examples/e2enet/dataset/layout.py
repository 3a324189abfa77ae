"""Raw datasets in the nnU-Net v2 layout: read dataset.json, find and load cases, verify, convert MSD tasks.

The layout::

    DatasetXXX_Name/dataset.json      {"channel_names": {"0": "T1"}, "labels": {"background": 0, ...},
                                       "numTraining": N, "file_ending": ".nii.gz"}
    DatasetXXX_Name/imagesTr/{case}_{XXXX}.nii.gz    one 3D file per channel, XXXX = channel index
    DatasetXXX_Name/labelsTr/{case}.nii.gz           integer labels, same geometry as the images
    DatasetXXX_Name/imagesTs/ (optional)             [labelsTs/ optional, e.g. the MNI test labels]

Every NIfTI file is read through :func:`read_nifti`, whole: a gzip CRC mismatch, a truncated file or a broken
header is a :class:`~problems.Problem` naming the file, never a decoded volume of other voxels or a bare EOFError.
``verify.py`` checks a whole dataset. A Medical Segmentation Decathlon task (4D images, v1 dataset.json) is
converted with :func:`convert_msd_dataset` (``data.py convert-msd``).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from e2enet.atomic import atomic_write, write_json
from e2enet.problems import Problem

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
SUPPORTED_ENDINGS = (".nii.gz", ".nii")
# An image file of one channel of a case: {case}_{XXXX}.nii.gz or .nii, XXXX the channel index.
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})(?P<ending>\.nii(?:\.gz)?)$")
# Two files are on the same grid when their affines agree this closely: header round-off (a float32 round trip)
# passes, a wrong origin or voxel size (>= 1e-3 mm) does not.
AFFINE_RTOL, AFFINE_ATOL = 1e-4, 1e-3
NIFTI2_HEADER_SIZES = (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")  # sizeof_hdr = 540, either byte order


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


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise Problem(f"{path} is not valid JSON ({error}); fix the file") from error


def read_dataset_json(dataset_dir: Path | str) -> dict:
    """Read and sanity-check ``dataset.json`` (v2 keys and their types); raise a Problem naming what to fix."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / "dataset.json"
    if not path.is_file():
        raise Problem(f"{path} not found: a dataset folder needs dataset.json (nnU-Net v2 layout)")
    meta = _read_json(path)
    if not isinstance(meta, dict):
        raise Problem(f"{path} holds a {type(meta).__name__}, not an object with {list(REQUIRED_KEYS)}")
    if "modality" in meta and "channel_names" not in meta:
        raise Problem(
            f"{path} is a Medical Segmentation Decathlon / nnU-Net v1 file ('modality', labels int -> name); "
            f"convert it first: python examples/e2enet/data.py convert-msd --task {dataset_dir} --out RAW_ROOT"
        )
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise Problem(f"{path} lacks {missing}; nnU-Net v2 needs {list(REQUIRED_KEYS)}")
    if meta["file_ending"] not in SUPPORTED_ENDINGS:
        raise Problem(
            f"{path}: file_ending {meta['file_ending']!r} is not supported; convert the images to NIfTI (.nii.gz)"
        )
    channels = meta["channel_names"]
    if not isinstance(channels, dict) or not channels:
        raise Problem(f'{path}: channel_names must map channel indices to names, e.g. {{"0": "T1"}}, got {channels!r}')
    expected = [str(i) for i in range(len(channels))]
    if sorted(channels, key=lambda k: (len(k), k)) != expected:
        raise Problem(
            f'{path}: channel_names keys must be "0".."{len(channels) - 1}" (the XXXX of the _XXXX file suffix, '
            f"from 0 without gaps), got {sorted(channels)}; renumber them and the image files"
        )
    labels = meta["labels"]
    if not isinstance(labels, dict) or any(type(value) is not int for value in labels.values()):
        raise Problem(
            f"{path}: labels must map names to single ints (region-based labels are not supported), got {labels}"
        )
    if sorted(labels.values()) != list(range(len(labels))):
        raise Problem(
            f"{path}: label values must be consecutive ints from 0 (background), got {sorted(labels.values())}"
        )
    count = meta["numTraining"]
    if type(count) is not int or count < 0:
        kind = " (a string)" if isinstance(count, str) else ""
        raise Problem(f"{path}: numTraining must be a whole number, got {count!r}{kind}; write it without quotes")
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


def read_nifti(path: Path | str) -> nib.Nifti1Image:
    """The NIfTI image in ``path``, read whole and checked: a damaged or truncated file raises a Problem naming it.

    nibabel alone decompresses a .nii.gz only as far as the voxels reach and never checks its CRC, so a flipped
    byte would decode into other voxels and a truncated file surface as a bare EOFError wherever it is first read.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise Problem(f"cannot read {path} ({error.strerror}); check that it exists and is readable") from error
    try:
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)  # checks the CRC and the length stored at the end of the stream
    except EOFError as error:
        raise Problem(
            f"{path} is truncated (its compressed stream ends early); replace it with a complete copy"
        ) from error
    except (gzip.BadGzipFile, zlib.error) as error:
        raise Problem(f"{path} is damaged ({error}); replace it with an intact copy") from error
    image_class = nib.Nifti2Image if raw[:4] in NIFTI2_HEADER_SIZES else nib.Nifti1Image
    try:
        with nib.imageglobals.LoggingOutputSuppressor():  # nibabel would log its own guesses before raising
            image = image_class.from_bytes(raw)
    except Exception as error:  # any parse failure of untrusted bytes means the header is broken, not a bug here
        raise Problem(
            f"{path} is not a readable NIfTI file ({type(error).__name__}: {error}); replace it with an intact copy"
        ) from error
    proxy = image.dataobj
    if proxy.offset + int(np.prod(proxy.shape)) * proxy.dtype.itemsize > len(raw):
        raise Problem(f"{path} is truncated (its voxels end early); replace it with a complete copy")
    return image


def save_nifti(image: nib.Nifti1Image, path: Path | str) -> None:
    """Write ``image`` atomically (gzip-compressed for .nii.gz): a killed writer leaves no half-written file."""
    path = Path(path)
    raw = image.to_bytes()
    with atomic_write(path) as f:
        f.write(gzip.compress(raw, compresslevel=1, mtime=0) if path.name.endswith(".gz") else raw)


def load_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load one 3D NIfTI as (float32 array, affine); a trailing singleton 4th axis is dropped."""
    img = read_nifti(path)
    shape = img.shape[:3] if len(img.shape) == 4 and img.shape[3] == 1 else img.shape
    if len(shape) == 4:
        raise Problem(
            f"{path} has shape {img.shape}; expected one 3D volume per file. "
            "A 4D multi-channel file (MSD) must be split: python examples/e2enet/data.py convert-msd"
        )
    if len(shape) != 3:
        raise Problem(
            f"{path} is {len(shape)}D (shape {img.shape}); this pipeline segments 3D volumes: save each channel of a "
            "case as one 3D NIfTI file (a single slice as shape (X, Y, 1))"
        )
    return img.get_fdata(dtype=np.float32).reshape(shape), img.affine


def load_raw_case(case: RawCase) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(channels float32 (C, X, Y, Z), label int16 (X, Y, Z) or None, affine of the first channel)."""
    volumes = [load_volume(path) for path in case.images]
    data = np.stack([v for v, _ in volumes])
    for path, volume in zip(case.images, data, strict=True):
        if not np.isfinite(volume).all():
            raise Problem(
                f"{case.case_id}: {path.name} has NaN/inf voxels; fix the image (run verify to list every problem)"
            )
    label = None
    if case.label is not None:
        label = load_volume(case.label)[0]
        if label.shape != data.shape[1:]:
            raise Problem(f"{case.case_id}: label shape {label.shape} != image shape {data.shape[1:]} (run verify)")
        label = np.round(label).astype(np.int16)
    return data, label, volumes[0][1]


def find_valid_cases(dataset_dir: Path, meta: dict) -> list[RawCase]:
    """Training cases, stopping on layout problems (for callers that skipped verify_dataset)."""
    cases, problems = find_cases(dataset_dir, meta, "Tr")
    if problems:
        raise Problem(f"dataset layout problems (run verify for the full list):\n{problem_list(problems)}")
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
        raise Problem(f"{meta_path} not found; pass the MSD task folder (e.g. Task04_Hippocampus)")
    meta = _read_json(meta_path)
    if "modality" not in meta or "training" not in meta:
        raise Problem(f"{meta_path} has no 'modality'/'training': not an MSD (v1) dataset.json")
    match = re.match(r"^Task(\d+)_(.+)$", task_dir.name)
    if dataset_id is None and match is None:
        raise Problem(f"cannot infer a dataset id from {task_dir.name!r} (expected TaskNN_Name); pass dataset_id")
    dataset_id = int(match[1]) if dataset_id is None else dataset_id
    name = match[2] if match else task_dir.name
    out_dir = Path(output_root) / f"Dataset{dataset_id:03d}_{name}"
    if out_dir.exists():
        raise Problem(f"{out_dir} already exists; remove it or choose another dataset id")
    num_channels = len(meta["modality"])
    if any(not isinstance(entry, dict) or not {"image", "label"} <= set(entry) for entry in meta["training"]):
        raise Problem(f"{meta_path}: every 'training' entry needs an 'image' and a 'label' path")
    training = [(task_dir / entry["image"], task_dir / entry["label"]) for entry in meta["training"]]
    tests = [task_dir / (entry if isinstance(entry, str) else entry["image"]) for entry in meta.get("test") or []]
    # Checked before anything is written, so that every missing file is named at once.
    missing = [str(path) for path in [*(p for pair in training for p in pair), *tests] if not path.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise Problem(
            f"{meta_path} lists {len(missing)} file(s) that do not exist ({shown}); restore them or fix the entries"
        )

    def split_channels(source: Path, target_dir: Path) -> None:
        img = read_nifti(source)
        case_id = source.name[: -len(".nii.gz")] if source.name.endswith(".nii.gz") else source.stem
        volumes = img.shape[3] if img.ndim == 4 else 1
        if volumes != num_channels:
            raise Problem(
                f"{case_id}: {source.name} has {volumes} volume(s) but dataset.json declares {num_channels} modalities"
            )
        for channel in range(num_channels):
            data = np.asarray(img.dataobj[..., channel] if img.ndim == 4 else img.dataobj)
            save_nifti(nib.Nifti1Image(data, img.affine, img.header), target_dir / f"{case_id}_{channel:04d}.nii.gz")

    (out_dir / "labelsTr").mkdir(parents=True)
    (out_dir / "imagesTr").mkdir()
    try:
        for image, label in training:
            split_channels(image, out_dir / "imagesTr")
            shutil.copy(label, out_dir / "labelsTr" / label.name)
        if tests:
            (out_dir / "imagesTs").mkdir()
            for image in tests:
                split_channels(image, out_dir / "imagesTs")
    except BaseException:
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
