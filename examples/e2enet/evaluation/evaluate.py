"""Score predicted segmentations against references: Dice, NSD and HD95 per case and per class.

    python examples/e2enet/evaluate.py --ref LABELS_DIR --pred PREDICTIONS_DIR \\
        [--labels 1 2 3 | --dataset-json DATASET_DIR/dataset.json] [--nsd-tolerance 1.0] \\
        [--allow-missing] [--json summary.json]

Files are NIfTI label maps named ``{case}.nii.gz`` (nnU-Net naming, no ``_0000`` channel suffix),
matched by file name. Every reference needs a prediction on the same voxel grid (same shape, and
affines equal within rtol 1e-4 / atol 1e-3, the tolerance of ``verify.verify_dataset``); anything
else, a damaged or truncated file included, raises a ``problems.Problem`` (a ValueError) naming the case and the
fix. Predictions without a reference are listed in the summary (``unmatched_predictions``) and not scored;
predicted label values outside the scored classes are warned about (``unscored_prediction_labels``).

Classes
    ``--dataset-json``: the nnU-Net v2 ``labels`` (name -> int, or name -> list of ints for a
    region such as BraTS "whole tumor"; ``background`` = 0 is not scored). A reference holding a value that
    ``labels`` does not declare is refused: it belongs to another dataset, and its voxels would count as
    background. ``--labels``: those values, named by their number, a chosen subset: reference values outside
    it are warned about (``unscored_reference_labels``). Neither: every non-zero value found in the references.

Metrics and empty classes
    Dice, NSD and HD95 per case and class, with the voxel spacing from the reference NIfTI header (mm), and
    the rules for empty classes (``scored``, ``both_empty``, ``empty_reference``, ``empty_prediction``):
    ``metrics.py``. So an HD95 mean covers only cases where both masks are non-empty; ``n_scored`` says how many
    cases each mean covers and ``counts`` how many fell under each rule, so a low HD95 mean with
    many ``empty_prediction`` cases is visible as such. A missing prediction is an error, or with
    ``--allow-missing`` an all-background prediction (``missing_prediction: true`` on the case).

Means
    Per class: the mean over cases of the non-null values. Per case: the mean over its classes'
    non-null values. Overall (``mean``, the foreground mean): the mean of the per-class means, as
    nnU-Net's ``foreground_mean``, so each class weighs the same however often it is empty.

Summary (``evaluate_folders``; written atomically by ``--json``, with ``null`` for undefined values)
    * ``per_case``: one entry per reference: ``case``, ``reference``, ``prediction``,
      ``missing_prediction``, ``shape``, ``spacing`` (mm), ``classes`` {name: {``dice``, ``nsd``,
      ``hd95``, ``status``, ``ref_voxels``, ``pred_voxels``}} and ``mean`` {metric: value}.
    * ``per_class_mean``: {name: {``dice``, ``nsd``, ``hd95``, ``n_scored`` {metric: cases
      averaged}, ``counts`` {status: cases}}}.
    * ``mean``: {``dice``, ``nsd``, ``hd95``, ``counts`` {status: case/class pairs}}.
    * ``labels`` {name: value or [values]}, ``settings`` (folders, tolerance, percentile),
      ``missing_predictions`` and ``unmatched_predictions`` (case names), ``unscored_prediction_labels``
      {case: predicted values outside the scored classes}, ``unscored_reference_labels`` {case: such values of
      the reference, with ``labels``}.

In-process use (the demo and comparison scripts)::

    from e2enet.evaluation.evaluate import evaluate_folders, format_table
    summary = evaluate_folders(ref_dir, pred_dir, labels={"liver": 1}, nsd_tolerance_mm=1.0)
    print(format_table(summary))

Without ``labels`` the references are read twice (once to collect their labels): pass
``labels`` or ``dataset_json`` on large datasets.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from e2enet.atomic import atomic_write
from e2enet.dataset.layout import read_nifti, same_affine
from e2enet.evaluation.metrics import (
    HD_PERCENTILE,
    METRICS,
    STATUSES,
    LabelSpec,
    evaluate_arrays,
    from_float32,
    mean_of,
    normalise_labels,
)
from e2enet.problems import Problem, report_problem, unwritable_as_problem

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


# --------------------------------------------------------------------------- labels


def labels_from_dataset_json(path: Path | str) -> dict[str, int | list[int]]:
    """The foreground classes of an nnU-Net v2 ``dataset.json``: its ``labels`` without ``background``."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise Problem(f"{path}: cannot read dataset.json ({error}); pass the dataset's dataset.json") from error
    if not isinstance(meta.get("labels"), Mapping):
        raise Problem(f"{path}: no 'labels' mapping (name -> int); is this an nnU-Net v2 dataset.json?")
    background = meta["labels"].get("background", 0)
    if background != 0:
        # Value 0 is background whatever its name: the class named background would be scored, the one at 0 not.
        raise Problem(
            f"{path}: labels gives 'background' the value {background!r}, but background is 0 (never scored): "
            "give background the value 0 and renumber the classes, in dataset.json and the label files"
        )
    if "ignore" in meta["labels"]:
        # nnU-Net masks ignore-label voxels out of every metric; surface metrics on partially
        # annotated masks are not defined here, so refuse rather than score them as background.
        raise Problem(
            f"{path}: declares an 'ignore' label (sparse annotation); this evaluator scores dense "
            "annotations only: evaluate with nnU-Net's evaluator or drop the ignore label"
        )
    return normalise_labels({name: value for name, value in meta["labels"].items() if value != 0})


# --------------------------------------------------------------------------- folders


def _load_label_map(path: Path, role: str, case: str) -> nib.Nifti1Image:
    try:
        image = read_nifti(path)
    except Problem as problem:
        raise Problem(f"case {case}: {role} {problem}") from problem
    if len(image.shape) == 4 and image.shape[3] == 1:  # nnU-Net tools sometimes keep a singleton channel axis
        image = image.slicer[..., 0]
    if len(image.shape) != 3:
        raise Problem(f"case {case}: {role} {path.name} has shape {image.shape}; expected one 3D label map")
    return image


def _label_array(image: nib.Nifti1Image, role: str, case: str) -> np.ndarray:
    """The voxel labels as integers; a float file must hold whole numbers (no probabilities, no interpolated edges)."""
    array = np.asanyarray(image.dataobj)
    if np.issubdtype(array.dtype, np.integer):
        return array
    if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
        raise Problem(
            f"case {case}: {role} holds non-integer values; save the argmax label map "
            "(resampled with nearest-neighbour interpolation), not probabilities"
        )
    return array.astype(np.int32)


def _check_same_grid(ref: nib.Nifti1Image, pred: nib.Nifti1Image, case: str) -> None:
    if ref.shape != pred.shape:
        raise Problem(
            f"case {case}: prediction shape {pred.shape} differs from reference shape {ref.shape}; "
            "export the prediction on the original image grid (undo cropping and resampling, "
            "e.g. preprocessing.revert_preprocessing) before evaluating"
        )
    if not same_affine(pred.affine, ref.affine):  # the grid tolerance of dataset verification
        difference = np.abs(pred.affine - ref.affine).max()
        raise Problem(
            f"case {case}: prediction affine differs from the reference affine (max difference {difference:.4g}); "
            "save the prediction with the reference image's affine (nib.Nifti1Image(seg, reference.affine)) "
            "or resample it onto the reference grid"
        )


def _case_files(folder: Path, role: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise Problem(f"{role} folder {folder} does not exist; pass the folder holding the {FILE_ENDING} files")
    # hidden files are skipped: macOS copies leave "._case.nii.gz" metadata files next to the real ones
    files = sorted(p for p in folder.glob(f"*{FILE_ENDING}") if not p.name.startswith("."))
    return {p.name[: -len(FILE_ENDING)]: p for p in files}


def _labels_in_references(references: Mapping[str, Path]) -> dict[str, int]:
    values: set[int] = set()
    for case, path in references.items():
        values.update(np.unique(_label_array(_load_label_map(path, "reference", case), "reference", case)).tolist())
    return {str(v): v for v in sorted(values - {0})}


def _matched_cases(
    ref_dir: Path, pred_dir: Path, allow_missing: bool
) -> tuple[dict[str, Path], dict[str, Path], list[str], list[str]]:
    """(references, predictions, cases without a prediction, predictions without a reference), {case: file}."""
    references, predictions = _case_files(ref_dir, "reference"), _case_files(pred_dir, "prediction")
    if not references:
        raise Problem(f"no {FILE_ENDING} files in reference folder {ref_dir}; pass the folder of reference label maps")
    missing = sorted(set(references) - set(predictions))
    unmatched = sorted(set(predictions) - set(references))
    if missing and not allow_missing:
        hint = f"; unmatched prediction files {unmatched[:5]} suggest a naming mismatch" if unmatched else ""
        raise Problem(
            f"no prediction for case(s) {missing} in {pred_dir} (expected {missing[0]}{FILE_ENDING}){hint}; "
            "predict them, or pass --allow-missing to score them as empty predictions"
        )
    return references, predictions, missing, unmatched


def _scored_classes(
    labels: LabelSpec | None, dataset_json: Path | str | None, references: Mapping[str, Path]
) -> dict[str, int | list[int]]:
    if dataset_json is not None:
        return labels_from_dataset_json(dataset_json)
    if labels is not None:
        return normalise_labels(labels)
    return normalise_labels(_labels_in_references(references))


def _read_case(case: str, ref_path: Path, pred_path: Path | None) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray]:
    """(reference image, reference labels, predicted labels on its grid; all background without a prediction)."""
    ref_image = _load_label_map(ref_path, "reference", case)
    ref = _label_array(ref_image, "reference", case)
    if pred_path is None:
        return ref_image, ref, np.zeros_like(ref)
    pred_image = _load_label_map(pred_path, "prediction", case)
    _check_same_grid(ref_image, pred_image, case)
    return ref_image, ref, _label_array(pred_image, "prediction", case)


def _means(per_case: list[dict], classes: Mapping[str, int | list[int]]) -> tuple[dict, dict]:
    """(per-class means over the cases, the foreground mean over the per-class means), with their counts."""
    per_class_mean = {}
    for name in classes:
        entries = [c["classes"][name] for c in per_case]
        per_class_mean[name] = {
            **{m: mean_of([e[m] for e in entries]) for m in METRICS},
            "n_scored": {m: sum(e[m] is not None for e in entries) for m in METRICS},
            "counts": {s: sum(e["status"] == s for e in entries) for s in STATUSES},
        }
    mean = {
        **{m: mean_of([c[m] for c in per_class_mean.values()]) for m in METRICS},
        "counts": {s: sum(c["counts"][s] for c in per_class_mean.values()) for s in STATUSES},
    }
    return per_class_mean, mean


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
        raise Problem("give labels or dataset_json, not both")
    references, predictions, missing, unmatched = _matched_cases(ref_dir, pred_dir, allow_missing)
    classes = _scored_classes(labels, dataset_json, references)

    scored_values = {v for value in classes.values() for v in (value if isinstance(value, list) else [value])}
    per_case, unscored, unscored_reference = [], {}, {}
    for case, ref_path in references.items():
        ref_image, ref, pred = _read_case(case, ref_path, predictions.get(case))
        undeclared = sorted(set(np.unique(ref).tolist()) - scored_values - {0})
        if undeclared and dataset_json is not None:
            raise Problem(
                f"case {case}: reference {ref_path} holds label value(s) {undeclared}, which {dataset_json} does not "
                f"declare (its classes: {classes}), so they would be scored as background; pass the dataset.json of "
                "these references, or fix the reference"
            )
        if undeclared:
            unscored_reference[case] = undeclared
            warnings.warn(
                f"{case}: reference label(s) {undeclared} are none of the scored classes {sorted(scored_values)} and "
                "are not scored; give every class to score them (--labels, --dataset-json)",
                stacklevel=2,
            )
        extra = sorted(set(np.unique(pred).tolist()) - scored_values - {0})
        if extra:
            unscored[case] = extra
            warnings.warn(
                f"{case}: predicted label(s) {extra} are none of the scored classes {sorted(scored_values)} and "
                "are not scored; score every class (--labels, --dataset-json) or check the prediction",
                stacklevel=2,
            )
        spacing = [from_float32(z) for z in ref_image.header.get_zooms()[:3]]
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

    per_class_mean, mean = _means(per_case, classes)
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
        "unscored_prediction_labels": unscored,
        "unscored_reference_labels": unscored_reference,
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
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            summary = evaluate_folders(
                args.ref,
                args.pred,
                labels=args.labels,
                nsd_tolerance_mm=args.nsd_tolerance,
                dataset_json=args.dataset_json,
                allow_missing=args.allow_missing,
            )
    except Problem as problem:
        return report_problem(problem)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(format_table(summary))
    if args.json:
        try:
            with unwritable_as_problem():  # a read-only folder, a full disk: atomic, so no half-written summary
                args.json.parent.mkdir(parents=True, exist_ok=True)
                # allow_nan=False: undefined values are null by construction; a NaN here would be a bug.
                with atomic_write(args.json) as f:
                    f.write((json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
        except Problem as problem:
            return report_problem(problem)
        print(f"\nwrote {args.json}")
    return 0
