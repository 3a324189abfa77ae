"""Verify a raw dataset: every problem found in one pass, reported in one list.

:func:`verify_dataset` reads every image and label in full (so a damaged gzip, a truncated file or a broken header
is one item of the list, not a crash) and checks: dataset.json keys and types; every case has all its channels and
a label; no stray files; numTraining matches; channels and label share shape and affine; images are finite, not
blank, and free of values extreme enough to collapse z-scoring; labels are integers and declared, and every declared
class occurs in some training label. ``imagesTs`` (and ``labelsTs`` if present) get the same checks. Blank images
and extreme values are flagged here, with the rest, because normalisation would otherwise stop on them one case at a
time; a class that no training label shows would train without error into a network that never predicts it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from e2enet.dataset.layout import RawCase, find_cases, load_volume, problem_list, read_dataset_json, same_affine
from e2enet.problems import Problem

# A value whose square overflows float32 turns a float32 z-score into zeros (std = inf) or NaN.
FLOAT32_SQUARE_LIMIT = float(np.sqrt(np.finfo(np.float32).max))
# Values this many interquartile ranges from the median dwarf the rest of the image: after z-scoring, everything
# else is one constant. Real intensities (CT metal, PET bladder, MRI flow artefacts) stay within ~10^2-10^3.
OUTLIER_FACTOR = 1e4


def intensity_problems(image: np.ndarray) -> list[str]:
    """What is wrong with one image's voxel values, each phrased to follow its file name."""
    finite = np.isfinite(image)
    problems = []
    if not finite.all():
        problems.append(f"has {int((~finite).sum())} NaN/inf voxel(s); fix or replace the image (e.g. set them to 0)")
    values = image[finite].astype(np.float64)
    if values.size == 0:
        return problems
    if values.min() == values.max():
        return problems + [
            f"is blank (every voxel is {values[0]:g}): there is nothing to segment and normalisation would make it "
            "a constant; replace the image or remove the case"
        ]
    nonzero = values[values != 0]  # the background of a skull-stripped or padded image says nothing of the anatomy
    q25, median, q75 = np.percentile(nonzero, [25, 50, 75])
    spread = (q75 - q25) or float(np.ptp(nonzero)) or abs(median)  # a two-valued image: its non-zero level
    distance = np.abs(values - median)
    extreme = (np.abs(values) >= FLOAT32_SQUARE_LIMIT) | (distance > OUTLIER_FACTOR * spread)
    if extreme.any():
        worst = values[np.argmax(np.where(extreme, distance, -1.0))]
        problems.append(
            f"has {int(extreme.sum())} voxel(s) with extreme values (e.g. {worst:.3g}) while half of its non-zero "
            f"voxels lie within [{q25:.4g}, {q75:.4g}]: normalising it would squash the rest of the image to a "
            "constant (or to zeros/NaN); set padding to 0, clip or fix those voxels, or replace the image"
        )
    return problems


def check_case(case: RawCase, declared_labels: set[int]) -> tuple[list[str], set[int] | None]:
    """Readability, geometry, intensity and label-value problems of one case (layout problems are found earlier),
    and the values its label holds (None where it has no readable integer label)."""
    problems = []
    reference_shape = reference_affine = None
    for path in case.images:
        try:
            image, affine = load_volume(path)
        except Problem as problem:
            problems.append(f"{case.case_id}: {problem}")
            continue
        problems += [f"{case.case_id}: {path.name} {problem}" for problem in intensity_problems(image)]
        if reference_shape is None:
            reference_shape, reference_affine = image.shape, affine
        elif image.shape != reference_shape or not same_affine(affine, reference_affine):
            problems.append(
                f"{case.case_id}: {path.name} (shape {image.shape}) is not on the grid of {case.images[0].name} "
                f"(shape {reference_shape}); all channels of a case must share shape and affine "
                "(resample them onto the first channel)"
            )
    if case.label is None:
        return problems, None
    try:
        label, affine = load_volume(case.label)
    except Problem as problem:
        return problems + [f"{case.case_id}: {problem}"], None
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
        return problems, None
    values = set(np.unique(label).astype(int).tolist())
    undeclared = sorted(values - declared_labels)
    if undeclared:
        problems.append(
            f"{case.case_id}: label values {undeclared} are not declared in dataset.json labels "
            f"{sorted(declared_labels)}; fix the label file or declare the classes"
        )
    return problems, values


def class_problems(labels: dict[str, int], training_values: set[int]) -> list[str]:
    """Declared classes that no training label shows (``training_values``: the union of their values): the network
    would learn never to predict them, and without any foreground it would learn nothing at all."""
    classes = {name: value for name, value in labels.items() if value != 0}
    named = ", ".join(f"{name!r} ({value})" for name, value in classes.items()) or "none besides background"
    if not training_values - {0}:
        return [
            f"no training label holds any foreground: every voxel of labelsTr is background (0), so there is "
            f"nothing to learn of the classes dataset.json declares ({named}); put the segmentations in labelsTr "
            "(not empty masks), or add cases that show the classes"
        ]
    return [
        f"class {name!r} (value {value}) is declared in dataset.json labels but occurs in no training label, so the "
        "network would learn never to predict it; add training cases that show it, or remove it from labels "
        "(renumbering the classes above it, in dataset.json and the label files)"
        for name, value in classes.items()
        if value not in training_values
    ]


def verify_dataset(dataset_dir: Path | str) -> list[RawCase]:
    """Check a raw dataset; return its training cases or raise one Problem listing every problem."""
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
    training_values: set[int] = set()
    every_label_read = True
    for case in train_cases:
        case_problems, values = check_case(case, declared)
        problems += case_problems
        every_label_read &= values is not None
        training_values |= values or set()
    for case in test_cases:
        problems += check_case(case, declared)[0]
    if train_cases and every_label_read:  # an unreadable label is listed already; its classes are unknown
        problems += class_problems(meta["labels"], training_values)
    if problems:
        raise Problem(f"dataset {dataset_dir} has {len(problems)} problem(s):\n{problem_list(problems)}")
    return train_cases
