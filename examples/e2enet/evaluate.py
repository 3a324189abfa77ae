"""Score predicted segmentations against references: Dice, NSD and HD95 per case and per class.

    python examples/e2enet/evaluate.py --ref LABELS_DIR --pred PREDICTIONS_DIR \\
        [--labels 1 2 3 | --dataset-json DATASET_DIR/dataset.json] [--nsd-tolerance 1.0] \\
        [--allow-missing] [--json summary.json]

Files are NIfTI label maps named ``{case}.nii.gz`` (nnU-Net naming, no ``_0000`` channel suffix),
matched by file name. Every reference needs a prediction on the same voxel grid (same shape, and
affines equal within rtol 1e-4 / atol 1e-3, the tolerance of ``dataset.verify_dataset``); anything
else raises ValueError naming the case and the fix. Predictions without a reference are listed in
the summary (``unmatched_predictions``) and not scored.

Classes
    ``--dataset-json``: the nnU-Net v2 ``labels`` (name -> int, or name -> list of ints for a
    region such as BraTS "whole tumor"; ``background`` = 0 is not scored). ``--labels``: those
    values, named by their number. Neither: every non-zero value found in the references.

Metrics, for each case and class (voxel spacing from the reference NIfTI header, in mm)
    * Dice = 2 |R & P| / (|R| + |P|), counted exactly on the voxels.
    * NSD: MONAI ``compute_surface_dice(use_subvoxels=True)``, the surface-area-weighted fraction
      of both boundaries lying within ``nsd_tolerance_mm`` of the other (DeepMind's definition).
    * HD95: MONAI ``compute_hausdorff_distance(percentile=95)`` in mm, the larger of the two
      directed 95th percentiles of edge-voxel distances.

Empty classes (rules follow nnU-Net's for Dice; every ``null`` comes with a ``status``)
    =====================  ======  ======  ======  ==================================================
    status                 Dice    NSD     HD95    in the means
    =====================  ======  ======  ======  ==================================================
    ``scored``             value   value   value   all three
    ``both_empty``         null    null    null    none: nothing to find and nothing predicted, so
                                                   there is no error to measure (nnU-Net: NaN)
    ``empty_reference``    0       0       null    Dice and NSD (a false positive is a failure);
                                                   HD95 excluded (no reference surface: infinite)
    ``empty_prediction``   0       0       null    Dice and NSD (a miss is a failure); HD95
                                                   excluded (no predicted surface: infinite)
    =====================  ======  ======  ======  ==================================================

    So an HD95 mean covers only cases where both masks are non-empty; ``n_scored`` says how many
    cases each mean covers and ``counts`` how many fell under each rule, so a low HD95 mean with
    many ``empty_prediction`` cases is visible as such. A missing prediction is an error, or with
    ``--allow-missing`` an all-background prediction (``missing_prediction: true`` on the case).

Means
    Per class: the mean over cases of the non-null values. Per case: the mean over its classes'
    non-null values. Overall (``mean``, the foreground mean): the mean of the per-class means, as
    nnU-Net's ``foreground_mean``, so each class weighs the same however often it is empty.

Summary (``evaluate_folders``; written by ``--json``, with ``null`` for undefined values)
    * ``per_case``: one entry per reference: ``case``, ``reference``, ``prediction``,
      ``missing_prediction``, ``shape``, ``spacing`` (mm), ``classes`` {name: {``dice``, ``nsd``,
      ``hd95``, ``status``, ``ref_voxels``, ``pred_voxels``}} and ``mean`` {metric: value}.
    * ``per_class_mean``: {name: {``dice``, ``nsd``, ``hd95``, ``n_scored`` {metric: cases
      averaged}, ``counts`` {status: cases}}}.
    * ``mean``: {``dice``, ``nsd``, ``hd95``, ``counts`` {status: case/class pairs}}.
    * ``labels`` {name: value or [values]}, ``settings`` (folders, tolerance, percentile),
      ``missing_predictions`` and ``unmatched_predictions`` (case names).

In-process use (the demo and comparison scripts)::

    from evaluate import  # with examples/e2enet on sys.path, as the scripts run evaluate_folders, format_table
    summary = evaluate_folders(ref_dir, pred_dir, labels={"liver": 1}, nsd_tolerance_mm=1.0)
    print(format_table(summary))

Without ``labels`` the references are read twice (once to collect their labels): pass
``labels`` or ``dataset_json`` on large datasets.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from dataset import same_affine
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

__all__ = [
    "FILE_ENDING",
    "METRICS",
    "STATUSES",
    "evaluate_arrays",
    "evaluate_folders",
    "format_table",
    "labels_from_dataset_json",
    "main",
]

FILE_ENDING = ".nii.gz"
METRICS = ("dice", "nsd", "hd95")
STATUSES = ("scored", "both_empty", "empty_reference", "empty_prediction")
HD_PERCENTILE = 95.0

LabelSpec = Mapping[str, "int | Sequence[int]"] | Sequence[int]


# --------------------------------------------------------------------------- labels


def _normalise_labels(labels: LabelSpec) -> dict[str, int | list[int]]:
    """Return ``{name: value or [values]}`` from a name mapping or a plain sequence of values."""
    if isinstance(labels, Mapping):
        named = dict(labels)
    else:
        named = {str(int(value)): int(value) for value in labels}
    if not named:
        raise ValueError("no classes to score; pass --labels, --dataset-json, or references with non-zero labels")
    normalised: dict[str, int | list[int]] = {}
    for name, value in named.items():
        is_region = isinstance(value, (list, tuple))  # nnU-Net region: the union of several labels
        values = [int(v) for v in value] if is_region else [int(value)]
        if not values or 0 in values:
            raise ValueError(
                f"class {name!r} = {value!r}: give one or more non-zero label values (background 0 is not scored)"
            )
        normalised[str(name)] = values if is_region else values[0]
    return normalised


def labels_from_dataset_json(path: Path | str) -> dict[str, int | list[int]]:
    """The foreground classes of an nnU-Net v2 ``dataset.json``: its ``labels`` without ``background``."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read dataset.json ({error}); pass the dataset's dataset.json") from error
    if not isinstance(meta.get("labels"), Mapping):
        raise ValueError(f"{path}: no 'labels' mapping (name -> int); is this an nnU-Net v2 dataset.json?")
    if "ignore" in meta["labels"]:
        # nnU-Net masks ignore-label voxels out of every metric; surface metrics on partially
        # annotated masks are not defined here, so refuse rather than score them as background.
        raise ValueError(
            f"{path}: declares an 'ignore' label (sparse annotation); this evaluator scores dense "
            "annotations only: evaluate with nnU-Net's evaluator or drop the ignore label"
        )
    return _normalise_labels({name: value for name, value in meta["labels"].items() if value != 0})


def _class_mask(label_map: np.ndarray, value: int | list[int]) -> np.ndarray:
    return np.isin(label_map, value) if isinstance(value, list) else label_map == value


# --------------------------------------------------------------------------- one case


def _union_bbox(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Tight bounding box of ``a | b``. MONAI crops to it (zero-padding a 1-voxel margin) anyway, but
    only after converting the whole volume to float tensors: cropping first gives the same values and
    saves that conversion (a third of the time at 80^3 with organ-sized classes, more on larger scans)."""
    union = a | b
    box = []
    for axis in range(union.ndim):
        hits = np.flatnonzero(union.any(axis=tuple(i for i in range(union.ndim) if i != axis)))
        box.append(slice(hits[0], hits[-1] + 1))
    return tuple(box)


def _score_class(ref: np.ndarray, pred: np.ndarray, spacing: list[float], nsd_tolerance_mm: float) -> dict:
    """Dice, NSD, HD95 and status of one class given its boolean masks (rules in the module docstring)."""
    n_ref, n_pred = int(np.count_nonzero(ref)), int(np.count_nonzero(pred))
    result = {"ref_voxels": n_ref, "pred_voxels": n_pred}
    if n_ref == 0 and n_pred == 0:
        return {**result, "dice": None, "nsd": None, "hd95": None, "status": "both_empty"}
    if n_ref == 0 or n_pred == 0:
        status = "empty_reference" if n_ref == 0 else "empty_prediction"
        return {**result, "dice": 0.0, "nsd": 0.0, "hd95": None, "status": status}

    dice = 2.0 * np.count_nonzero(ref & pred) / (n_ref + n_pred)
    box = _union_bbox(ref, pred)
    # MONAI wants one-hot batches (B, C, X, Y, Z); one class at a time, background included.
    ref_t = torch.from_numpy(np.ascontiguousarray(ref[box]))[None, None]
    pred_t = torch.from_numpy(np.ascontiguousarray(pred[box]))[None, None]
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes its own deprecated argument internally on every call; nothing to act on here.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        nsd = compute_surface_dice(
            pred_t, ref_t, [nsd_tolerance_mm], include_background=True, spacing=spacing, use_subvoxels=True
        )
        hd95 = compute_hausdorff_distance(
            pred_t, ref_t, include_background=True, percentile=HD_PERCENTILE, spacing=spacing
        )
    nsd, hd95 = _from_float32(nsd.item()), _from_float32(hd95.item())
    return {**result, "dice": float(dice), "nsd": nsd, "hd95": hd95, "status": "scored"}


def _from_float32(value: float) -> float:
    """MONAI and NIfTI headers hold float32: keep the shortest decimal that round-trips it
    (1.2, not 1.2000000476837158)."""
    return float(str(np.float32(value)))


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def evaluate_arrays(
    ref: np.ndarray,
    pred: np.ndarray,
    spacing: Sequence[float],
    labels: LabelSpec,
    nsd_tolerance_mm: float = 1.0,
) -> dict:
    """Score one case: integer label maps ``ref`` and ``pred`` on the same grid, ``spacing`` in mm per axis.

    Returns ``{"classes": {name: {"dice", "nsd", "hd95", "status", "ref_voxels", "pred_voxels"}},
    "mean": {metric: ...}}`` with ``None`` for undefined values (empty-class rules in the module docstring).
    """
    ref, pred = np.asarray(ref), np.asarray(pred)
    if ref.shape != pred.shape:
        raise ValueError(
            f"prediction shape {pred.shape} differs from reference shape {ref.shape}; "
            "resample the prediction onto the reference grid"
        )
    spacing = [float(s) for s in spacing]
    if len(spacing) != ref.ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing {spacing} must give one positive voxel size (mm) per axis of the {ref.ndim}D arrays")
    if not (nsd_tolerance_mm >= 0 and math.isfinite(nsd_tolerance_mm)):
        raise ValueError(f"nsd_tolerance_mm must be a finite number >= 0, got {nsd_tolerance_mm}")
    classes = {
        name: _score_class(_class_mask(ref, value), _class_mask(pred, value), spacing, nsd_tolerance_mm)
        for name, value in _normalise_labels(labels).items()
    }
    return {"classes": classes, "mean": {m: _mean([c[m] for c in classes.values()]) for m in METRICS}}


# --------------------------------------------------------------------------- folders


def _load_label_map(path: Path, role: str, case: str) -> nib.Nifti1Image:
    try:
        image = nib.load(path)
    except (OSError, nib.filebasedimages.ImageFileError) as error:
        message = f"case {case}: cannot read {role} {path} ({error}); rewrite it as a NIfTI label map"
        raise ValueError(message) from error
    if len(image.shape) == 4 and image.shape[3] == 1:  # nnU-Net tools sometimes keep a singleton channel axis
        image = image.slicer[..., 0]
    if len(image.shape) != 3:
        raise ValueError(f"case {case}: {role} {path.name} has shape {image.shape}; expected one 3D label map")
    return image


def _label_array(image: nib.Nifti1Image, role: str, case: str) -> np.ndarray:
    """The voxel labels as integers; a float file must hold whole numbers (no probabilities, no interpolated edges)."""
    array = np.asanyarray(image.dataobj)
    if np.issubdtype(array.dtype, np.integer):
        return array
    if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
        raise ValueError(
            f"case {case}: {role} holds non-integer values; save the argmax label map "
            "(resampled with nearest-neighbour interpolation), not probabilities"
        )
    return array.astype(np.int32)


def _check_same_grid(ref: nib.Nifti1Image, pred: nib.Nifti1Image, case: str) -> None:
    if ref.shape != pred.shape:
        raise ValueError(
            f"case {case}: prediction shape {pred.shape} differs from reference shape {ref.shape}; "
            "export the prediction on the original image grid (undo cropping and resampling, "
            "e.g. preprocessing.revert_preprocessing) before evaluating"
        )
    if not same_affine(pred.affine, ref.affine):  # the grid tolerance of dataset verification
        difference = np.abs(pred.affine - ref.affine).max()
        raise ValueError(
            f"case {case}: prediction affine differs from the reference affine (max difference {difference:.4g}); "
            "save the prediction with the reference image's affine (nib.Nifti1Image(seg, reference.affine)) "
            "or resample it onto the reference grid"
        )


def _case_files(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise ValueError(f"{role} folder {folder} does not exist; pass the folder holding the {FILE_ENDING} files")
    # hidden files are skipped: macOS copies leave "._case.nii.gz" metadata files next to the real ones
    files = sorted(p for p in folder.glob(f"*{FILE_ENDING}") if not p.name.startswith("."))
    return {p.name[: -len(FILE_ENDING)]: p for p in files}


def _labels_in_references(references: Mapping[str, Path]) -> dict[str, int]:
    values: set[int] = set()
    for case, path in references.items():
        values.update(np.unique(_label_array(_load_label_map(path, "reference", case), "reference", case)).tolist())
    return {str(v): v for v in sorted(values - {0})}


def evaluate_folders(
    ref_dir: Path | str,
    pred_dir: Path | str,
    labels: LabelSpec | None = None,
    nsd_tolerance_mm: float = 1.0,
    *,
    dataset_json: Path | str | None = None,
    allow_missing: bool = False,
) -> dict:
    """Score every ``{case}.nii.gz`` of ``ref_dir`` against the same name in ``pred_dir``.

    ``labels``: ``{name: value}`` or a sequence of values; ``dataset_json``: take them from an
    nnU-Net v2 dataset.json instead; neither: every non-zero value in the references.
    Returns the JSON-serialisable summary described in the module docstring.
    """
    ref_dir, pred_dir = Path(ref_dir), Path(pred_dir)
    if labels is not None and dataset_json is not None:
        raise ValueError("give labels or dataset_json, not both")
    references, predictions = _case_files(ref_dir, "reference"), _case_files(pred_dir, "prediction")
    if not references:
        raise ValueError(
            f"no {FILE_ENDING} files in reference folder {ref_dir}; pass the folder of reference label maps"
        )
    missing = sorted(set(references) - set(predictions))
    unmatched = sorted(set(predictions) - set(references))
    if missing and not allow_missing:
        hint = f"; unmatched prediction files {unmatched[:5]} suggest a naming mismatch" if unmatched else ""
        raise ValueError(
            f"no prediction for case(s) {missing} in {pred_dir} (expected {missing[0]}{FILE_ENDING}){hint}; "
            "predict them, or pass --allow-missing to score them as empty predictions"
        )

    if dataset_json is not None:
        classes = labels_from_dataset_json(dataset_json)
    elif labels is not None:
        classes = _normalise_labels(labels)
    else:
        classes = _normalise_labels(_labels_in_references(references))

    per_case = []
    for case, ref_path in references.items():
        ref_image = _load_label_map(ref_path, "reference", case)
        ref = _label_array(ref_image, "reference", case)
        if case in predictions:
            pred_image = _load_label_map(predictions[case], "prediction", case)
            _check_same_grid(ref_image, pred_image, case)
            pred = _label_array(pred_image, "prediction", case)
        else:
            pred = np.zeros_like(ref)
        spacing = [_from_float32(z) for z in ref_image.header.get_zooms()[:3]]
        scores = evaluate_arrays(ref, pred, spacing, classes, nsd_tolerance_mm)
        per_case.append(
            {
                "case": case,
                "reference": str(ref_path),
                "prediction": str(predictions[case]) if case in predictions else None,
                "missing_prediction": case not in predictions,
                "shape": list(ref.shape),
                "spacing": spacing,
                **scores,
            }
        )

    per_class_mean = {}
    for name in classes:
        entries = [c["classes"][name] for c in per_case]
        per_class_mean[name] = {
            **{m: _mean([e[m] for e in entries]) for m in METRICS},
            "n_scored": {m: sum(e[m] is not None for e in entries) for m in METRICS},
            "counts": {s: sum(e["status"] == s for e in entries) for s in STATUSES},
        }
    mean = {
        **{m: _mean([c[m] for c in per_class_mean.values()]) for m in METRICS},
        "counts": {s: sum(c["counts"][s] for c in per_class_mean.values()) for s in STATUSES},
    }
    return {
        "per_case": per_case,
        "per_class_mean": per_class_mean,
        "mean": mean,
        "labels": classes,
        "settings": {
            "reference_dir": str(ref_dir),
            "prediction_dir": str(pred_dir),
            "nsd_tolerance_mm": float(nsd_tolerance_mm),
            "nsd_use_subvoxels": True,
            "hd_percentile": HD_PERCENTILE,
            "allow_missing": allow_missing,
        },
        "missing_predictions": missing,
        "unmatched_predictions": unmatched,
    }


# --------------------------------------------------------------------------- report


def format_table(summary: Mapping) -> str:
    """One cases x classes block per metric, with a per-case mean column and a per-class mean row."""
    names = list(summary["labels"])
    case_width = max(len("mean"), *(len(c["case"]) for c in summary["per_case"]))
    widths = [max(8, len(n)) for n in names]

    def cell(value: float | None, digits: int, width: int) -> str:
        return f"{'-' if value is None else f'{value:.{digits}f}':>{width}}"

    blocks = []
    for metric, title, digits in (("dice", "Dice", 4), ("nsd", "NSD", 4), ("hd95", "HD95 (mm)", 2)):
        if metric == "nsd":
            title += f" (tolerance {summary['settings']['nsd_tolerance_mm']:g} mm)"
        header = (
            f"{'case':<{case_width}}  "
            + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True))
            + f"  {'mean':>8}"
        )
        lines = [title, header, "-" * len(header)]
        for case in summary["per_case"]:
            row = [cell(case["classes"][n][metric], digits, w) for n, w in zip(names, widths, strict=True)]
            case_mean = cell(case["mean"][metric], digits, 8)
            lines.append(f"{case['case']:<{case_width}}  " + "  ".join(row) + f"  {case_mean}")
        lines.append("-" * len(header))
        row = [cell(summary["per_class_mean"][n][metric], digits, w) for n, w in zip(names, widths, strict=True)]
        lines.append(f"{'mean':<{case_width}}  " + "  ".join(row) + f"  {cell(summary['mean'][metric], digits, 8)}")
        blocks.append("\n".join(lines))

    counts = summary["mean"]["counts"]
    legend = (
        f"- = undefined, left out of the means: class absent from reference and prediction "
        f"({counts['both_empty']} case/class pairs); for HD95 also when only one of them is empty "
        f"({counts['empty_reference']} empty references, {counts['empty_prediction']} empty predictions, "
        "where Dice and NSD are 0)"
    )
    if summary["missing_predictions"]:
        legend += f"\nscored as empty predictions (missing files): {', '.join(summary['missing_predictions'])}"
    return "\n\n".join(blocks) + "\n\n" + legend


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", type=Path, required=True, help="folder of reference label maps {case}.nii.gz")
    parser.add_argument("--pred", type=Path, required=True, help="folder of predicted label maps {case}.nii.gz")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--labels", type=int, nargs="+", help="label values to score (default: all non-zero in the references)"
    )
    source.add_argument("--dataset-json", type=Path, help="nnU-Net v2 dataset.json giving the class names and values")
    parser.add_argument("--nsd-tolerance", type=float, default=1.0, help="NSD boundary tolerance in mm (default 1.0)")
    parser.add_argument("--allow-missing", action="store_true", help="score a missing prediction as all background")
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args(argv)

    try:
        summary = evaluate_folders(
            args.ref,
            args.pred,
            labels=args.labels,
            nsd_tolerance_mm=args.nsd_tolerance,
            dataset_json=args.dataset_json,
            allow_missing=args.allow_missing,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        # allow_nan=False: undefined values are null by construction; a NaN here would be a bug.
        args.json.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
