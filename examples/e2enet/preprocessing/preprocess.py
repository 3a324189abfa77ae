"""Preprocessing as nnU-Net v2 orders it: crop to the non-zero region, normalise, resample; and its cache.

A case stored in another orientation than the training data (``Plans.orientation``) is first reoriented to it, and
:func:`revert_preprocessing` brings a prediction back to the case's own orientation and grid.

Normalisation has one class per scheme, chosen per channel by the plans (``CT``: dataset-wide clip and z-score;
anything else: per-image z-score, inside the non-zero mask when cropping removed much of the image). Resampling
is MONAI ``Spacing``: bilinear for images (nnU-Net: cubic spline), nearest for labels.

:func:`preprocess_dataset` writes one ``{case}.npz`` + ``{case}.json`` per case into ``data_<hash>/``, where the
hash covers only what changes the arrays (spacing, normalisation, channels, labels). A case is recomputed when its
plan hash or its source files (size, mtime) change, otherwise reused.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing, SpatialResample
from scipy import ndimage

from e2enet.atomic import atomic_write, write_json
from e2enet.dataset.layout import RawCase, find_valid_cases, load_raw_case, read_dataset_json
from e2enet.preprocessing.geometry import orientation_codes, reorient, reoriented_affine
from e2enet.problems import Problem

if TYPE_CHECKING:
    from e2enet.preprocessing.planning import Plans

PREPROCESSING_VERSION = 1  # bump when preprocess_case changes what it writes, to invalidate caches
FOREGROUND_LOCATIONS_PER_CLASS = 10_000  # stored voxel positions per class for foreground oversampling
FOREGROUND_LOCATIONS_SEED = 1234


# --------------------------------------------------------------------------- crop


def crop_to_nonzero(data: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    """Bounding box of the non-zero region over all channels, and the hole-filled mask inside it.

    Holes are filled (as nnU-Net does) so that zero-valued voxels inside the anatomy, such as
    dark CSF, count as inside for mask-based normalisation.
    """
    mask = ndimage.binary_fill_holes((data != 0).any(axis=0))
    if not mask.any():  # an all-zero image: keep everything rather than crop to nothing
        return tuple(slice(0, n) for n in mask.shape), np.ones_like(mask)
    nonzero = np.argwhere(mask)
    lo, hi = nonzero.min(axis=0), nonzero.max(axis=0) + 1
    bbox = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    return bbox, mask[bbox]


# --------------------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class ZScoreNormalization:
    """Per-image z-score; with ``use_nonzero_mask``, statistics and values inside the non-zero mask only, 0 outside.

    The mask is used when cropping removed much of the image (skull-stripped MRI): the background then says
    nothing about the intensities of the anatomy.
    """

    channel: str
    use_nonzero_mask: bool
    scheme: ClassVar[str] = "zscore"

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> None:
        """Normalise one channel in place."""
        if self.use_nonzero_mask:
            inside = image[mask]
            image[mask] = (inside - inside.mean()) / max(float(inside.std()), 1e-8)
            image[~mask] = 0.0  # outside the anatomy carries no signal; the loader keeps it at 0
        else:
            image -= image.mean()
            image /= max(float(image.std()), 1e-8)

    def describe(self) -> str:
        return "per image, inside the non-zero mask" if self.use_nonzero_mask else "per image"

    def to_json(self) -> dict:
        return {"channel": self.channel, "scheme": self.scheme, "use_nonzero_mask": self.use_nonzero_mask}

    @classmethod
    def from_json(cls, entry: dict) -> ZScoreNormalization:
        return cls(entry["channel"], entry["use_nonzero_mask"])


@dataclass(frozen=True)
class CTNormalization:
    """Clip to the dataset's foreground 0.5/99.5 percentiles, then z-score with its foreground mean and std.

    CT values (Hounsfield units) mean the same in every scan, so one dataset-wide mapping keeps them comparable.
    """

    channel: str
    clip: tuple[float, float]
    mean: float
    std: float
    scheme: ClassVar[str] = "CT"
    use_nonzero_mask: ClassVar[bool] = False

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> None:
        """Normalise one channel in place (``mask`` is not used)."""
        np.clip(image, *self.clip, out=image)
        image -= self.mean
        image /= max(self.std, 1e-8)

    def describe(self) -> str:
        return f"clip {[round(c, 3) for c in self.clip]}, mean {self.mean:.3f}, std {self.std:.3f}"

    def to_json(self) -> dict:
        return {
            "channel": self.channel,
            "scheme": self.scheme,
            "use_nonzero_mask": self.use_nonzero_mask,
            "clip": list(self.clip),
            "mean": self.mean,
            "std": self.std,
        }

    @classmethod
    def from_json(cls, entry: dict) -> CTNormalization:
        return cls(entry["channel"], tuple(entry["clip"]), entry["mean"], entry["std"])


Normalization = ZScoreNormalization | CTNormalization
NORMALIZATIONS = {cls.scheme: cls for cls in (ZScoreNormalization, CTNormalization)}


def normalization_from_json(entry: dict) -> Normalization:
    scheme = NORMALIZATIONS.get(entry.get("scheme"))
    if scheme is None:
        raise Problem(
            f"unknown normalisation scheme {entry.get('scheme')!r} in the plans (known: {sorted(NORMALIZATIONS)}); "
            "plan again: python examples/e2enet/data.py plan --data DATASET_DIR"
        )
    return scheme.from_json(entry)


def check_normalized(image: np.ndarray, span: tuple[float, float], what: str, normalize: Normalization) -> None:
    """Stop rather than let a normalised channel be NaN or one constant (all zeros, for a z-score).

    Extreme voxels make the statistics overflow (std = inf divides everything to 0, a mean of -inf gives NaN);
    a blank image has nothing to normalise. Either way training on the result would be training on nothing.
    """
    if np.isfinite(image).all() and image.min() < image.max():
        return
    result = "NaN/inf values" if not np.isfinite(image).all() else "all zeros" if not image.any() else "a constant"
    lo, hi = span
    source = f"every voxel is {lo:g}" if lo == hi else f"its values span {lo:.3g} to {hi:.3g}"
    raise Problem(
        f"{what} ({normalize.describe()}) gives {result} ({source}); run python examples/e2enet/data.py verify "
        "--data DATASET_DIR to see what is wrong with the image, then fix or replace it"
    )


# --------------------------------------------------------------------------- one case


def preprocess_case(
    image_files: Sequence[Path], label_file: Path | None, plans: Plans, case_id: str = ""
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, dict]:
    """Reorient to the training data's orientation, then crop, normalise and resample one case as the plans say
    (nnU-Net v2's order).

    Returns ``(data float32 (C, X, Y, Z), seg int8 (X, Y, Z) or None, non-zero mask bool (X, Y, Z),
    properties)``. ``properties`` holds what :func:`revert_preprocessing` needs to map a
    prediction back onto the original grid. Used for training cases (already in that orientation: planning
    refuses others) and, without a label, for inference inputs.
    """
    label_path = Path(label_file) if label_file else None
    case = RawCase(case_id or Path(image_files[0]).name, tuple(Path(p) for p in image_files), label_path)
    data, label, original_affine = load_raw_case(case)
    original_shape, original_orientation = data.shape[1:], orientation_codes(original_affine, case.images[0])
    affine = original_affine
    if original_orientation != plans.orientation:
        turn = (original_orientation, plans.orientation)
        affine = reoriented_affine(original_affine, original_shape, *turn)
        data = reorient(data, *turn)
        label = reorient(label[None], *turn)[0] if label is not None else None
    oriented_shape = data.shape[1:]
    bbox, mask = crop_to_nonzero(data)
    data = np.ascontiguousarray(data[(slice(None), *bbox)])
    label = label[bbox] if label is not None else None
    crop_affine = affine.copy()
    crop_affine[:3, 3] = nib.affines.apply_affine(affine, [s.start for s in bbox])
    for channel, normalize in enumerate(plans.normalization):
        span = float(data[channel].min()), float(data[channel].max())
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, with the case named
            normalize(data[channel], mask)
        check_normalized(data[channel], span, f"{case.case_id}: normalising {case.images[channel].name}", normalize)

    target = np.asarray(plans.target_spacing)
    resampled = not np.allclose(nib.affines.voxel_sizes(affine), target, rtol=1e-3)  # skip a pointless blur
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
        for channel, normalize in enumerate(plans.normalization):
            if normalize.use_nonzero_mask:
                data[channel][~mask] = 0.0
    seg = None
    if label is not None:
        seg = np.round(label).astype(np.int8 if plans.num_classes <= 127 else np.int16)
    properties = {
        "case_id": case.case_id,
        "original_shape": list(original_shape),
        "original_affine": original_affine.tolist(),
        "original_orientation": original_orientation,
        # The grid the crop, resampling and prediction lie on: the case in the training data's orientation.
        "orientation": plans.orientation,
        "oriented_shape": list(oriented_shape),
        "crop_bbox": [[s.start, s.stop] for s in bbox],
        "cropped_affine": crop_affine.tolist(),
        "resampled": resampled,
        "preprocessed_shape": list(data.shape[1:]),
        "preprocessed_affine": np.asarray(out_affine).tolist(),
    }
    return data.astype(np.float32, copy=False), seg, mask, properties


def revert_preprocessing(array: np.ndarray, properties: dict, is_label: bool = True) -> np.ndarray:
    """Map a prediction on the preprocessed grid back to the original image grid, in the image's own orientation.

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
    out = np.zeros((values.shape[0], *properties["oriented_shape"]), np.float32)
    if not is_label:
        out[0] = 1.0
    out[:, x0:x1, y0:y1, z0:z1] = values
    out = reorient(out, properties["orientation"], properties["original_orientation"])
    return np.round(out[0]).astype(np.int16) if is_label else out


# --------------------------------------------------------------------------- the cache


def _source_stamp(case: RawCase) -> dict[str, list[int]]:
    """Size and mtime of the raw files: a cheap way to notice an edited case without reading it."""
    files = [*case.images, *([case.label] if case.label else [])]
    return {path.name: [path.stat().st_size, path.stat().st_mtime_ns] for path in files}


def preprocessed_data_dir(preprocessed_dir: Path | str, plans: Plans) -> Path:
    """Folder holding the cases preprocessed under ``plans`` (keyed by the preprocessing hash)."""
    return Path(preprocessed_dir) / f"data_{plans.preprocessing_hash}"


@dataclass
class PreprocessReport:
    directory: Path
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


def preprocess_dataset(dataset_dir: Path | str, preprocessed_dir: Path | str, plans: Plans) -> PreprocessReport:
    """Preprocess every training case into ``data_<hash>/``, reusing cached cases that are still valid."""
    dataset_dir = Path(dataset_dir)
    cases = find_valid_cases(dataset_dir, read_dataset_json(dataset_dir))
    report = PreprocessReport(preprocessed_data_dir(preprocessed_dir, plans))
    report.directory.mkdir(parents=True, exist_ok=True)
    keep_mask = any(n.use_nonzero_mask for n in plans.normalization)
    labels = sorted(v for v in plans.labels.values() if v > 0)
    for case in cases:
        npz, sidecar = report.directory / f"{case.case_id}.npz", report.directory / f"{case.case_id}.json"
        stamp = _source_stamp(case)
        if npz.is_file() and sidecar.is_file():
            try:
                cached = json.loads(sidecar.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                cached = {}  # a damaged sidecar: recompute the case
            if cached.get("source") == stamp and cached.get("preprocessing_hash") == plans.preprocessing_hash:
                report.reused.append(case.case_id)
                continue
        data, seg, mask, properties = preprocess_case(case.images, case.label, plans, case.case_id)
        # Foreground positions per class, sampled once here so the loader's oversampling is O(1).
        rng = np.random.default_rng(FOREGROUND_LOCATIONS_SEED)
        arrays = {"data": data, "seg": seg}
        if keep_mask:
            arrays["nonzero_mask"] = mask
        for label in labels:
            where = np.argwhere(seg == label)
            if len(where) > FOREGROUND_LOCATIONS_PER_CLASS:
                where = where[rng.choice(len(where), FOREGROUND_LOCATIONS_PER_CLASS, replace=False)]
            arrays[f"locations_{label}"] = where.astype(np.int32)
        with atomic_write(npz) as handle:  # a file object also keeps np.savez from appending ".npz"
            np.savez(handle, **arrays)
        write_json(sidecar, {**properties, "source": stamp, "preprocessing_hash": plans.preprocessing_hash})
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
        raise Problem(f"{case_id}: {npz} not found; run: python examples/e2enet/data.py plan --data DATASET_DIR")
    try:
        with np.load(npz) as arrays:  # reading a member checks its zip CRC
            locations = {int(k.split("_")[1]): arrays[k] for k in arrays.files if k.startswith("locations_")}
            mask = arrays["nonzero_mask"] if "nonzero_mask" in arrays.files else None
            properties = json.loads(sidecar.read_text())
            return PreprocessedCase(case_id, arrays["data"], arrays["seg"], mask, locations, properties)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as error:  # JSONDecodeError: a ValueError
        raise Problem(
            f"{case_id}: the preprocessed {npz} or {sidecar.name} is damaged ({type(error).__name__}: {error}); "
            "delete both and run train.py or data.py plan again to recompute them"
        ) from error
