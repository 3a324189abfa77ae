"""Segmentation metrics of one case: Dice, NSD and HD95 per class, with explicit rules for empty classes.

``evaluate_arrays(ref, pred, spacing, labels)`` scores two integer label maps on the same grid (``spacing`` in mm per
axis); ``evaluate.py`` applies it to folders of NIfTI files.

Metrics, for each case and class
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

Classes are ``{name: value}`` (a list of values for a region such as BraTS "whole tumor", the union of its labels)
or a plain sequence of values, named by their number; background 0 is never scored.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from e2enet.problems import Problem

METRICS = ("dice", "nsd", "hd95")
STATUSES = ("scored", "both_empty", "empty_reference", "empty_prediction")
HD_PERCENTILE = 95.0

LabelSpec = Mapping[str, "int | Sequence[int]"] | Sequence[int]


def normalise_labels(labels: LabelSpec) -> dict[str, int | list[int]]:
    """Return ``{name: value or [values]}`` from a name mapping or a plain sequence of values."""
    if isinstance(labels, Mapping):
        named = dict(labels)
    else:
        named = {str(int(value)): int(value) for value in labels}
    if not named:
        raise Problem("no classes to score; pass --labels, --dataset-json, or references with non-zero labels")
    normalised: dict[str, int | list[int]] = {}
    for name, value in named.items():
        is_region = isinstance(value, (list, tuple))  # nnU-Net region: the union of several labels
        values = [int(v) for v in value] if is_region else [int(value)]
        if not values or 0 in values:
            raise Problem(
                f"class {name!r} = {value!r}: give one or more non-zero label values (background 0 is not scored)"
            )
        normalised[str(name)] = values if is_region else values[0]
    return normalised


def class_mask(label_map: np.ndarray, value: int | list[int]) -> np.ndarray:
    return np.isin(label_map, value) if isinstance(value, list) else label_map == value


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
    nsd, hd95 = from_float32(nsd.item()), from_float32(hd95.item())
    return {**result, "dice": float(dice), "nsd": nsd, "hd95": hd95, "status": "scored"}


def from_float32(value: float) -> float:
    """MONAI and NIfTI headers hold float32: keep the shortest decimal that round-trips it
    (1.2, not 1.2000000476837158)."""
    return float(str(np.float32(value)))


def mean_of(values: list[float | None]) -> float | None:
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
        raise Problem(
            f"prediction shape {pred.shape} differs from reference shape {ref.shape}; "
            "resample the prediction onto the reference grid"
        )
    spacing = [float(s) for s in spacing]
    if len(spacing) != ref.ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise Problem(f"spacing {spacing} must give one positive voxel size (mm) per axis of the {ref.ndim}D arrays")
    if not (nsd_tolerance_mm >= 0 and math.isfinite(nsd_tolerance_mm)):
        raise Problem(f"nsd_tolerance_mm must be a finite number >= 0, got {nsd_tolerance_mm}")
    classes = {
        name: _score_class(class_mask(ref, value), class_mask(pred, value), spacing, nsd_tolerance_mm)
        for name, value in normalise_labels(labels).items()
    }
    return {"classes": classes, "mean": {m: mean_of([c[m] for c in classes.values()]) for m in METRICS}}
