"""Build the embedded datasets: segmentation tasks rendered from nilearn's MNI152 template, nothing downloaded.

``python examples/e2enet/prepare_mni.py --out DIR [--task NAME] [--cases 8] [--test-cases 2] [--seed 0]
[--spacing MM]`` writes ``DIR/Dataset990_MNITissue`` (or the folder of another task,
:mod:`e2enet.dataset.mni_tasks`) in the nnU-Net v2 raw layout::

    dataset.json              channel_names ({"0": "T1"}, ...), labels name -> int, numTraining, file_ending
    imagesTr/mni_train_000_0000.nii.gz ...   labelsTr/mni_train_000.nii.gz ...
    imagesTs/mni_test_000_0000.nii.gz ...    labelsTs/mni_test_000.nii.gz ...   (labels for evaluation)
    mni_provenance.json       seed, held-out region and the drawn parameters of every case

Nothing is downloaded: the T1 template and the grey/white-matter probability maps ship inside the
nilearn wheel (``load_mni152_template``, ``load_mni152_gm_template``, ``load_mni152_wm_template``),
and so do the coordinate tables some tasks place their classes with (:mod:`e2enet.dataset.mni_tasks`).

Tasks
    ``tissue`` (the default, Dataset990_MNITissue): 0 background (outside the brain), 1 grey matter,
    2 white matter, 3 CSF/other inside the brain. The brain is the template above 0.2 (the threshold
    of nilearn's ``load_mni152_brain_mask``); inside it each voxel takes the argmax of
    (1 - p_gm - p_wm, p_gm, p_wm) after warping. ``regions`` (Dataset991_MNIRegions): the same tissue
    in 7 foreground classes, cut by hemisphere and front/back (docs/e2enet.md). The other tasks of
    the suite (small structures, many classes, two channels, CT, thick slices) are described in
    :mod:`e2enet.dataset.mni_tasks`.

Cases
    Every case is the same template seen through a different random "acquisition": a rotation
    (up to 8 degrees per axis), a head size (0.95-1.05), a smooth non-linear warp (at most 2.5 mm),
    a shift of the anatomy inside the field of view, a per-axis voxel size (the task's spacing
    +-8 %), and intensity changes (for MRI: gamma 0.8-1.25, a smooth multiplicative bias field, a
    random global scale, Rician noise as in magnitude MRI). MRI keeps the template's zero background
    (it is skull-stripped), so cropping to the non-zero region behaves as on skull-stripped MRI.

Held-out anatomy
    The superior-most 20 % of the brain (template z above ``z_cut_mm``) never appears in a training
    case of a whole-brain task: each training field of view stops below it; test cases show the whole
    brain. World z in the NIfTI headers lets anyone check this from the files (``mni_provenance.json``
    has the cut and its margin, ``HELD_OUT_MARGIN_MM``). What the data is and is not: docs/e2enet.md.

Licence of the template: ICBM 2009a, Copyright (C) 1993-2009 Louis Collins, McConnell Brain
Imaging Centre, Montreal Neurological Institute, McGill University (permissive notice; cite
Fonov et al., NeuroImage 2011 and 2009). The files are read from the installed nilearn, never
copied into this repository; the coordinate tables' provenance is in :mod:`e2enet.dataset.mni_tasks`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from e2enet.atomic import write_json
from e2enet.dataset.mni_tasks import (
    BRAIN_THRESHOLD,
    GAMMA_RANGE,
    INTENSITY_SCALE_RANGE,
    NOISE_FRACTION_RANGE,
    SUITE,
    TASKS,
    Acquisition,
    CaseMaps,
    Task,
    smooth_field,
)
from e2enet.preprocessing.geometry import rotation_matrix

DATASET_ID = TASKS["tissue"].dataset_id
DATASET_NAME = TASKS["tissue"].dataset_name
FILE_ENDING = ".nii.gz"
PROVENANCE_FILE = "mni_provenance.json"

HELD_OUT_FRACTION = 0.2  # superior-most fraction of the brain's z extent kept out of training
FOV_MARGIN_MM = 15.0  # field of view = brain bounding box + this margin on every side

MAX_ROTATION_DEG = 8.0  # small enough that array axis 2 stays the superior direction
SIZE_RANGE = (0.95, 1.05)
MAX_WARP_MM = 2.5
MAX_SHIFT_MM = 6.0
SPACING_JITTER = 0.08

# Bound on |world z - template z| for any brain voxel. With template point
# p = c + (x - c) / s + d(x):  x_z - p_z = (s - 1)(p_z - c_z) - s d_z, and the template brain
# lies within 77 mm of c_z along z, so |.| <= 0.05 * 77 + 1.05 * 2.5 = 6.5 mm. 10 mm is safe.
HELD_OUT_MARGIN_MM = 10.0


@dataclass
class Template:
    """The MNI152 maps on their native 1 mm grid, plus the geometry the cases are built around."""

    t1: np.ndarray  # [0, 1], skull-stripped
    grey_matter: np.ndarray  # probability
    white_matter: np.ndarray  # probability
    affine: np.ndarray  # voxel -> MNI mm
    brain_lo_mm: np.ndarray  # brain bounding box in MNI mm
    brain_hi_mm: np.ndarray

    @property
    def centre_mm(self) -> np.ndarray:
        return (self.brain_lo_mm + self.brain_hi_mm) / 2

    @property
    def z_cut_mm(self) -> float:
        """Template z above which anatomy is held out of training."""
        return float(self.brain_hi_mm[2] - HELD_OUT_FRACTION * (self.brain_hi_mm[2] - self.brain_lo_mm[2]))


@dataclass
class CaseParams:
    """The random draws that define one case (saved to the provenance file)."""

    case_id: str
    split: str  # "train" or "test"
    spacing_mm: list[float]
    rotation_deg: list[float]
    shift_mm: list[float]
    size_scale: float
    gamma: float
    intensity_scale: float
    noise_fraction: float
    shape: list[int] | None = None  # set once the case is rendered (training cases are cropped)


def load_template() -> Template:
    """Load the offline MNI152 T1 and GM/WM maps from the installed nilearn (no network)."""
    from nilearn import datasets  # imported here: it costs seconds and only this step needs it

    t1_img = datasets.load_mni152_template(resolution=1)
    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm_img = datasets.load_mni152_wm_template(resolution=1)
    for name, img in (("grey matter", gm_img), ("white matter", wm_img)):
        if img.shape != t1_img.shape or not np.allclose(img.affine, t1_img.affine):
            raise RuntimeError(f"nilearn's MNI152 {name} map is not on the T1 grid; this nilearn is not supported")
    t1 = t1_img.get_fdata(dtype=np.float32)
    brain_voxels = np.argwhere(t1 > BRAIN_THRESHOLD)
    lo_mm = nib.affines.apply_affine(t1_img.affine, brain_voxels.min(axis=0))
    hi_mm = nib.affines.apply_affine(t1_img.affine, brain_voxels.max(axis=0))
    return Template(
        t1=t1,
        grey_matter=gm_img.get_fdata(dtype=np.float32),
        white_matter=wm_img.get_fdata(dtype=np.float32),
        affine=t1_img.affine,
        brain_lo_mm=lo_mm,
        brain_hi_mm=hi_mm,
    )


def draw_case_params(rng: np.random.Generator, case_id: str, split: str, spacing_mm) -> CaseParams:
    """Draw the geometric and intensity parameters of one case; ``spacing_mm`` is nominal, a number or per axis."""
    return CaseParams(
        case_id=case_id,
        split=split,
        spacing_mm=(spacing_mm * rng.uniform(1 - SPACING_JITTER, 1 + SPACING_JITTER, 3)).round(4).tolist(),
        rotation_deg=rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3).round(3).tolist(),
        shift_mm=rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, 3).round(3).tolist(),
        size_scale=round(float(rng.uniform(*SIZE_RANGE)), 4),
        gamma=round(float(np.exp(rng.uniform(*np.log(GAMMA_RANGE)))), 4),
        intensity_scale=round(float(rng.uniform(*INTENSITY_SCALE_RANGE)), 2),
        noise_fraction=round(float(rng.uniform(*NOISE_FRACTION_RANGE)), 4),
    )


def sample_case(
    template: Template, acquisition: Acquisition, params: CaseParams, rng: np.random.Generator
) -> tuple[CaseMaps, np.ndarray]:
    """The template's maps on the grid of one case, and the grid's affine (voxel -> world mm).

    ``rng`` supplies the warp. For a training case of a task that holds the top out, ``kept_slices``
    says where the case will be cut along array axis 2 so that no voxel of the held-out top is in view.
    """
    spacing = np.asarray(params.spacing_mm)
    if acquisition.fov_mm is None:
        fov_mm = template.brain_hi_mm - template.brain_lo_mm + 2 * FOV_MARGIN_MM
        fov_centre = template.centre_mm + np.asarray(params.shift_mm)
    else:
        lo, hi = (np.asarray(corner, float) for corner in acquisition.fov_mm)
        fov_mm, fov_centre = hi - lo, (lo + hi) / 2 + np.asarray(params.shift_mm)
    shape = np.ceil(fov_mm / spacing).astype(int)
    # Case grid: rotated, with its centre on the field of view's centre moved by the shift. The
    # affine maps voxels to world mm, and world mm are template mm up to the size change and warp.
    linear = rotation_matrix(np.deg2rad(params.rotation_deg)) @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = fov_centre - linear @ ((shape - 1) / 2)

    # World and template coordinates as (3, *shape) float32 arrays: affine maps by broadcasting,
    # far cheaper than an (N, 3) @ (3, 3) product on 0.4 M points.
    axes = np.ogrid[tuple(slice(0, n) for n in shape)]
    world = np.stack([sum(linear[k, j] * axes[j] for j in range(3)) + affine[k, 3] for k in range(3)])
    world = world.astype(np.float32)
    warp = np.stack([smooth_field(rng, world, MAX_WARP_MM) for _ in range(3)])
    centre = template.centre_mm.astype(np.float32)[:, None, None, None]
    template_mm = centre + (world - centre) / params.size_scale + warp
    to_template_vox = np.linalg.inv(template.affine)
    template_vox = np.tensordot(to_template_vox[:3, :3], template_mm, axes=1)
    template_vox += to_template_vox[:3, 3, None, None, None]
    # A thick slice averages the anatomy through its extent; the warp is smooth enough to stay fixed within it.
    slice_step = to_template_vox[:3, :3] @ linear[:, 2] / params.size_scale
    offsets = (np.arange(acquisition.samples_per_slice) + 0.5) / acquisition.samples_per_slice - 0.5

    def sample(volume: np.ndarray) -> np.ndarray:
        if acquisition.samples_per_slice == 1:
            return ndimage.map_coordinates(volume, template_vox, order=1, cval=0.0)
        points = (template_vox + (o * slice_step)[:, None, None, None] for o in offsets)
        return np.mean([ndimage.map_coordinates(volume, p, order=1, cval=0.0) for p in points], axis=0)

    maps = CaseMaps(
        world=world,
        template_mm=template_mm,
        spacing_mm=spacing,
        t1=sample(template.t1),
        grey_matter=sample(template.grey_matter),
        white_matter=sample(template.white_matter),
        template_centre_mm=template.centre_mm,
    )
    if params.split == "train" and acquisition.hold_out_top:
        held_out_in_slice = (maps.support & (template_mm[2] > template.z_cut_mm)).any(axis=(0, 1))
        if not held_out_in_slice.any():
            raise RuntimeError(f"{params.case_id}: the held-out region is outside the field of view; nothing to cut")
        maps.kept_slices = int(np.argmax(held_out_in_slice))  # first slice showing held-out anatomy
    return maps, affine


def synthesize_case(
    template: Template, params: CaseParams, rng: np.random.Generator, task: Task
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, dict]:
    """Render one case: (images float32, one per channel; label uint8; affine voxel -> world mm; further draws).

    ``rng`` supplies the warp, then the task's pathology (if any) and each channel's randomness in
    channel order. The further draws (lesions, a second contrast's scale, CT values) go to the
    provenance file. Training cases of a whole-brain task are cropped below the held-out top.
    """
    maps, affine = sample_case(template, task.acquisition, params, rng)
    drawn = task.pathology(maps, rng) if task.pathology else {}
    label = task.label_rule(maps)
    images = []
    for render in task.channels.values():
        image, channel_draws = render(maps, params, rng)
        images.append(image)
        drawn |= channel_draws
    if maps.kept_slices is not None:
        images, label = [image[..., : maps.kept_slices] for image in images], label[..., : maps.kept_slices]
    return images, label, affine, drawn


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)  # both forms set, so every reader (MONAI, SimpleITK, ITK-SNAP) agrees
    img.set_sform(affine, code=1)
    nib.save(img, path)


def nominal_spacing(task: Task, spacing_mm: float | None) -> np.ndarray:
    """The task's nominal spacing per axis, scaled so that its finest axis is ``spacing_mm`` when given."""
    own = np.asarray(task.acquisition.spacing_mm, float)
    if spacing_mm is None:
        return own
    if not 0.5 <= spacing_mm <= 8.0:
        raise ValueError(f"--spacing {spacing_mm} mm is outside 0.5-8 mm; use e.g. 2.5 (about 70x84x74 voxels)")
    return spacing_mm * (own / own.min())


def _clear(dataset_dir: Path, overwrite: bool) -> None:
    if dataset_dir.exists() and any(dataset_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dataset_dir} exists; pass --overwrite to rebuild it or choose another --out")
        if not (dataset_dir / PROVENANCE_FILE).exists():
            raise FileExistsError(
                f"{dataset_dir} was not written by prepare_mni.py (no {PROVENANCE_FILE}); not deleting it"
            )
        shutil.rmtree(dataset_dir)


def build_mni_dataset(
    out_root: Path | str,
    num_train: int = 8,
    num_test: int = 2,
    seed: int = 0,
    spacing_mm: float | None = None,
    dataset_id: int | None = None,
    overwrite: bool = False,
    task: str = "tissue",
) -> Path:
    """Write the dataset of ``task`` (TASKS) under ``out_root`` and return the dataset folder.

    Deterministic for a given (task, seed, spacing, counts). ``spacing_mm`` sets the finest axis
    (default: the task's own spacing). ``overwrite`` replaces a folder this script wrote before
    (recognised by its provenance file); any other existing folder is left alone and an error is raised.
    """
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need at least 1 training case and >= 0 test cases, got {num_train} and {num_test}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    spec = TASKS[task]
    spacing = nominal_spacing(spec, spacing_mm)
    dataset_id = spec.dataset_id if dataset_id is None else dataset_id
    dataset_dir = Path(out_root) / f"Dataset{dataset_id:03d}_{spec.dataset_name}"
    _clear(dataset_dir, overwrite)

    template = load_template()
    case_rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(num_train + num_test)]
    splits = [("train", f"mni_train_{i:03d}") for i in range(num_train)]
    splits += [("test", f"mni_test_{i:03d}") for i in range(num_test)]
    folders = {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}
    for folder in (f for pair in folders.values() for f in pair):
        (dataset_dir / folder).mkdir(parents=True, exist_ok=True)

    cases = []
    for rng, (split, case_id) in zip(case_rngs, splits, strict=True):
        params = draw_case_params(rng, case_id, split, spacing)
        images, label, affine, drawn = synthesize_case(template, params, rng, spec)
        params.shape = list(label.shape)
        image_dir, label_dir = folders[split]
        for channel, image in enumerate(images):
            _save_nifti(image, affine, dataset_dir / image_dir / f"{case_id}_{channel:04d}{FILE_ENDING}")
        _save_nifti(label, affine, dataset_dir / label_dir / f"{case_id}{FILE_ENDING}")
        cases.append(asdict(params) | ({"drawn": drawn} if drawn else {}))

    dataset_json = {
        "name": spec.dataset_name,
        "description": spec.description,
        "reference": spec.reference,
        "licence": spec.licence,
        "channel_names": {str(i): name for i, name in enumerate(spec.channels)},
        "labels": spec.labels,
        "numTraining": num_train,
        "numTest": num_test,
        "file_ending": FILE_ENDING,
    }
    held_out = {
        "description": "template (MNI) z above z_cut_mm never appears in training cases",
        "axis": "z (superior)",
        "z_cut_mm": template.z_cut_mm,
        "world_margin_mm": HELD_OUT_MARGIN_MM,
    }
    provenance = {
        "generator": "examples/e2enet/prepare_mni.py",
        "seed": seed,
        # one number when isotropic: the finest axis, as --spacing gives it
        "spacing_mm": float(spacing[0]) if np.all(spacing == spacing[0]) else spacing.tolist(),
        "held_out": held_out if spec.acquisition.hold_out_top else None,
        "cases": cases,
    }
    write_json(dataset_dir / "dataset.json", dataset_json)
    write_json(dataset_dir / PROVENANCE_FILE, provenance)
    return dataset_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", required=True, type=Path, help="raw data root (e.g. $nnUNet_raw); the dataset folder goes inside"
    )
    parser.add_argument("--cases", type=int, default=8, help="number of training cases (default 8)")
    parser.add_argument("--test-cases", type=int, default=2, help="number of test cases with labels (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--spacing",
        type=float,
        default=None,
        help="nominal voxel size of the finest axis in mm, sets the image size (default: the task's, e.g. tissue "
        "2.5: ~70x84x74)",
    )
    parser.add_argument(
        "--task",
        choices=sorted(TASKS),
        default="tissue",
        help="; ".join(f"{name}: {len(t.labels) - 1} classes ({t.folder_name})" for name, t in TASKS.items())
        + f". The suite: {', '.join(SUITE)}",
    )
    parser.add_argument("--dataset-id", type=int, default=None, help="default: the task's (tissue 990, regions 991)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset folder this script wrote before")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        dataset_dir = build_mni_dataset(
            args.out, args.cases, args.test_cases, args.seed, args.spacing, args.dataset_id, args.overwrite, args.task
        )
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    provenance = json.loads((dataset_dir / PROVENANCE_FILE).read_text())
    print(f"wrote {dataset_dir} in {time.perf_counter() - start:.1f} s")
    for case in provenance["cases"]:
        shape = "x".join(map(str, case["shape"]))
        spacing = "x".join(f"{s:.2f}" for s in case["spacing_mm"])
        print(f"  {case['split']:5s} {case['case_id']}: {shape} voxels at {spacing} mm")
    held_out = provenance["held_out"]
    if held_out:
        cut = held_out["z_cut_mm"]
        print(f"  held out of training: template z > {cut:.1f} mm (top {HELD_OUT_FRACTION:.0%} of brain)")
    return 0
