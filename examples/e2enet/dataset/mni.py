"""Build the embedded default dataset: brain tissue segmentation from nilearn's MNI152 template.

``python examples/e2enet/prepare_mni.py --out DIR [--task tissue|regions] [--cases 8] [--test-cases 2] [--seed 0]
[--spacing 2.5]`` writes ``DIR/Dataset990_MNITissue`` (or ``Dataset991_MNIRegions``) in the nnU-Net v2 raw layout::

    dataset.json              channel_names {"0": "T1"}, labels name -> int, numTraining, file_ending
    imagesTr/mni_train_000_0000.nii.gz ...   labelsTr/mni_train_000.nii.gz ...
    imagesTs/mni_test_000_0000.nii.gz ...    labelsTs/mni_test_000.nii.gz ...   (labels for evaluation)
    mni_provenance.json       seed, held-out region and the drawn parameters of every case

Nothing is downloaded: the T1 template and the grey/white-matter probability maps ship inside the
nilearn wheel (``load_mni152_template``, ``load_mni152_gm_template``, ``load_mni152_wm_template``).

Labels
    0 background (outside the brain), 1 grey matter, 2 white matter, 3 CSF/other inside the brain.
    The brain is the template above 0.2 (the threshold of nilearn's ``load_mni152_brain_mask``);
    inside it each voxel takes the argmax of (1 - p_gm - p_wm, p_gm, p_wm) after warping.

The harder task (``--task regions``, Dataset991_MNIRegions)
    The same tissue in 7 foreground classes: grey matter left/right x front/back, white matter
    left/right, CSF/other; the hemisphere and front/back cuts are positional (docs/e2enet.md).

Cases
    Every case is the same template seen through a different random "acquisition": a rotation
    (up to 8 degrees per axis), a head size (0.95-1.05), a smooth non-linear warp (at most 2.5 mm),
    a shift of the anatomy inside the field of view, a per-axis voxel size (spacing +-8 %), and
    intensity changes (gamma 0.8-1.25, a smooth multiplicative bias field, a random global scale,
    Rician noise as in magnitude MRI). Images keep the template's zero background (it is
    skull-stripped), so cropping to the non-zero region behaves as on skull-stripped MRI.

Held-out anatomy
    The superior-most 20 % of the brain (template z above ``z_cut_mm``) never appears in a training
    case: each training field of view stops below it; test cases show the whole brain. World z in
    the NIfTI headers lets anyone check this from the files (``mni_provenance.json`` has the cut
    and its margin, ``HELD_OUT_MARGIN_MM``). What the data is and is not: docs/e2enet.md.

Licence of the template: ICBM 2009a, Copyright (C) 1993-2009 Louis Collins, McConnell Brain
Imaging Centre, Montreal Neurological Institute, McGill University (permissive notice; cite
Fonov et al., NeuroImage 2011 and 2009). The files are read from the installed nilearn, never
copied into this repository.
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
from e2enet.training.loader import rotation_matrix

DATASET_ID = 990
DATASET_NAME = "MNITissue"
FILE_ENDING = ".nii.gz"
LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2, "csf_other": 3}
# The harder task: the same tissue split by hemisphere (MNI x, + is right) and, for grey matter, into a front and a
# back half at the brain's centre (MNI y). Seven foreground classes, four of them small, and two of the cuts are
# positional rather than visible in the image: left and right look alike, and the front/back plane crosses
# uniform tissue, so a network must use context, and mirroring along x would swap the hemispheres.
REGION_LABELS = {
    "background": 0,
    "grey_matter_left_front": 1,
    "grey_matter_left_back": 2,
    "grey_matter_right_front": 3,
    "grey_matter_right_back": 4,
    "white_matter_left": 5,
    "white_matter_right": 6,
    "csf_other": 7,
}
TASKS = {  # task -> (dataset id, dataset name, labels, description)
    "tissue": (
        DATASET_ID,
        DATASET_NAME,
        LABELS,
        "Brain tissue (GM/WM/CSF-other) on synthetic variations of the MNI152 2009a template; the top 20% of the "
        "brain is held out of training. Not a clinical benchmark.",
    ),
    "regions": (
        991,
        "MNIRegions",
        REGION_LABELS,
        "Brain tissue by hemisphere, grey matter also by front/back half (7 classes), on synthetic variations of "
        "the MNI152 2009a template; the top 20% of the brain is held out of training. Not a clinical benchmark.",
    ),
}
PROVENANCE_FILE = "mni_provenance.json"

BRAIN_THRESHOLD = 0.2  # nilearn's load_mni152_brain_mask threshold on the [0, 1] template
HELD_OUT_FRACTION = 0.2  # superior-most fraction of the brain's z extent kept out of training
FOV_MARGIN_MM = 15.0  # field of view = brain bounding box + this margin on every side

MAX_ROTATION_DEG = 8.0  # small enough that array axis 2 stays the superior direction
SIZE_RANGE = (0.95, 1.05)
MAX_WARP_MM = 2.5
MAX_SHIFT_MM = 6.0
SPACING_JITTER = 0.08
GAMMA_RANGE = (0.8, 1.25)
MAX_LOG_BIAS = 0.2  # bias field exp(b) with |b| <= 0.2, i.e. 0.82-1.22
INTENSITY_SCALE_RANGE = (500.0, 1500.0)  # arbitrary MRI units
NOISE_FRACTION_RANGE = (0.01, 0.04)  # Rician noise sigma relative to the intensity scale

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


def _smooth_field(rng: np.random.Generator, points_mm: np.ndarray, max_abs: float, n_waves: int = 4) -> np.ndarray:
    """A smooth random scalar field on ``points_mm`` (3, *shape), bounded by ``max_abs`` everywhere.

    A sum of plane waves with 60-150 mm wavelengths: smooth like a bias field or an anatomical
    deformation, cheap to evaluate, and bounded exactly (no clipping needed), which the held-out
    margin relies on.
    """
    field = np.zeros(points_mm.shape[1:], np.float32)
    for _ in range(n_waves):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        wavelength = rng.uniform(60.0, 150.0)
        amplitude = max_abs / n_waves * rng.uniform(0.5, 1.0)
        phase = np.tensordot(direction * (2 * np.pi / wavelength), points_mm, axes=1) + rng.uniform(0, 2 * np.pi)
        field += amplitude * np.sin(phase, dtype=np.float32)
    return field


def draw_case_params(rng: np.random.Generator, case_id: str, split: str, spacing_mm: float) -> CaseParams:
    """Draw the geometric and intensity parameters of one case."""
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


def region_labels(tissue_label: np.ndarray, template_mm: np.ndarray, centre_mm: np.ndarray) -> np.ndarray:
    """Tissue labels (LABELS) -> REGION_LABELS, from each voxel's template position (3, *shape) in MNI mm."""
    right = template_mm[0] > 0  # the template's midline is x = 0
    front = template_mm[1] > centre_mm[1]
    out = np.zeros_like(tissue_label)
    gm, wm = tissue_label == LABELS["grey_matter"], tissue_label == LABELS["white_matter"]
    for side, side_mask in (("left", ~right), ("right", right)):
        out[gm & side_mask & front] = REGION_LABELS[f"grey_matter_{side}_front"]
        out[gm & side_mask & ~front] = REGION_LABELS[f"grey_matter_{side}_back"]
        out[wm & side_mask] = REGION_LABELS[f"white_matter_{side}"]
    out[tissue_label == LABELS["csf_other"]] = REGION_LABELS["csf_other"]
    return out


def synthesize_case(
    template: Template, params: CaseParams, rng: np.random.Generator, task: str = "tissue"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one case: returns (image float32, label uint8, affine voxel -> world mm).

    ``rng`` supplies the warp, bias field and noise. Training cases (``params.split == "train"``)
    are cropped along array axis 2 so that no voxel of the template's held-out top is in view.
    """
    spacing = np.asarray(params.spacing_mm)
    extent_mm = template.brain_hi_mm - template.brain_lo_mm + 2 * FOV_MARGIN_MM
    shape = np.ceil(extent_mm / spacing).astype(int)
    # Case grid: rotated, with its centre on the brain centre moved by the shift. The affine maps
    # voxels to world mm, and world mm are template mm up to the size change and the warp.
    linear = rotation_matrix(np.deg2rad(params.rotation_deg)) @ np.diag(spacing)
    fov_centre = template.centre_mm + np.asarray(params.shift_mm)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = fov_centre - linear @ ((shape - 1) / 2)

    # World and template coordinates as (3, *shape) float32 arrays: affine maps by broadcasting,
    # far cheaper than an (N, 3) @ (3, 3) product on 0.4 M points.
    axes = np.ogrid[tuple(slice(0, n) for n in shape)]
    world = np.stack([sum(linear[k, j] * axes[j] for j in range(3)) + affine[k, 3] for k in range(3)])
    world = world.astype(np.float32)
    warp = np.stack([_smooth_field(rng, world, MAX_WARP_MM) for _ in range(3)])
    centre = template.centre_mm.astype(np.float32)[:, None, None, None]
    template_mm = centre + (world - centre) / params.size_scale + warp
    to_template_vox = np.linalg.inv(template.affine)
    template_vox = np.tensordot(to_template_vox[:3, :3], template_mm, axes=1)
    template_vox += to_template_vox[:3, 3, None, None, None]

    def sample(volume: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(volume, template_vox, order=1, cval=0.0)

    t1, gm, wm = sample(template.t1), sample(template.grey_matter), sample(template.white_matter)
    support = t1 > 0  # the skull-stripped template's non-zero region; stays exactly zero outside

    label = np.zeros(shape, np.uint8)
    brain = t1 > BRAIN_THRESHOLD
    tissue = np.argmax(np.stack([1.0 - gm - wm, gm, wm]), axis=0)
    tissue_to_label = np.array([LABELS["csf_other"], LABELS["grey_matter"], LABELS["white_matter"]], np.uint8)
    label[brain] = tissue_to_label[tissue[brain]]
    if task == "regions":
        label = region_labels(label, template_mm, template.centre_mm)

    bias = np.exp(_smooth_field(rng, world, MAX_LOG_BIAS))
    signal = params.intensity_scale * bias * np.clip(t1, 0, 1) ** params.gamma
    sigma = params.noise_fraction * params.intensity_scale
    # Magnitude of a complex signal with Gaussian noise in both parts: Rician, always positive.
    noisy = np.hypot(signal + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))
    image = np.where(support, noisy, 0.0).astype(np.float32)

    if params.split == "train":
        held_out_in_slice = (support & (template_mm[2] > template.z_cut_mm)).any(axis=(0, 1))
        if not held_out_in_slice.any():
            raise RuntimeError(f"{params.case_id}: the held-out region is outside the field of view; nothing to cut")
        keep = int(np.argmax(held_out_in_slice))  # first slice showing held-out anatomy
        image, label = image[..., :keep], label[..., :keep]
    return image, label, affine


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)  # both forms set, so every reader (MONAI, SimpleITK, ITK-SNAP) agrees
    img.set_sform(affine, code=1)
    nib.save(img, path)


def build_mni_dataset(
    out_root: Path | str,
    num_train: int = 8,
    num_test: int = 2,
    seed: int = 0,
    spacing_mm: float = 2.5,
    dataset_id: int | None = None,
    overwrite: bool = False,
    task: str = "tissue",
) -> Path:
    """Write the MNI tissue dataset under ``out_root`` and return the dataset folder.

    Deterministic for a given (seed, spacing, counts). ``overwrite`` replaces a folder this
    script wrote before (recognised by its provenance file); any other existing folder is left
    alone and an error is raised.
    """
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need at least 1 training case and >= 0 test cases, got {num_train} and {num_test}")
    if not 0.5 <= spacing_mm <= 8.0:
        raise ValueError(f"--spacing {spacing_mm} mm is outside 0.5-8 mm; use e.g. 2.5 (about 70x84x74 voxels)")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    default_id, dataset_name, labels, description = TASKS[task]
    dataset_id = default_id if dataset_id is None else dataset_id
    dataset_dir = Path(out_root) / f"Dataset{dataset_id:03d}_{dataset_name}"
    if dataset_dir.exists() and any(dataset_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dataset_dir} exists; pass --overwrite to rebuild it or choose another --out")
        if not (dataset_dir / PROVENANCE_FILE).exists():
            raise FileExistsError(
                f"{dataset_dir} was not written by prepare_mni.py (no {PROVENANCE_FILE}); not deleting it"
            )
        shutil.rmtree(dataset_dir)

    template = load_template()
    case_rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(num_train + num_test)]
    splits = [("train", f"mni_train_{i:03d}") for i in range(num_train)]
    splits += [("test", f"mni_test_{i:03d}") for i in range(num_test)]
    folders = {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}
    for folder in (f for pair in folders.values() for f in pair):
        (dataset_dir / folder).mkdir(parents=True, exist_ok=True)

    cases = []
    for rng, (split, case_id) in zip(case_rngs, splits, strict=True):
        params = draw_case_params(rng, case_id, split, spacing_mm)
        image, label, affine = synthesize_case(template, params, rng, task)
        params.shape = list(image.shape)
        image_dir, label_dir = folders[split]
        _save_nifti(image, affine, dataset_dir / image_dir / f"{case_id}_0000{FILE_ENDING}")
        _save_nifti(label, affine, dataset_dir / label_dir / f"{case_id}{FILE_ENDING}")
        cases.append(asdict(params))

    dataset_json = {
        "name": dataset_name,
        "description": description,
        "reference": "Fonov et al., NeuroImage 2011; template shipped with nilearn",
        "licence": "ICBM 2009a MNI BIC permissive notice (Copyright 1993-2009 Louis Collins, MNI, McGill University)",
        "channel_names": {"0": "T1"},
        "labels": labels,
        "numTraining": num_train,
        "numTest": num_test,
        "file_ending": FILE_ENDING,
    }
    provenance = {
        "generator": "examples/e2enet/prepare_mni.py",
        "seed": seed,
        "spacing_mm": spacing_mm,
        "held_out": {
            "description": "template (MNI) z above z_cut_mm never appears in training cases",
            "axis": "z (superior)",
            "z_cut_mm": template.z_cut_mm,
            "world_margin_mm": HELD_OUT_MARGIN_MM,
        },
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
        "--spacing", type=float, default=2.5, help="nominal voxel size in mm, sets the image size (2.5: ~70x84x74)"
    )
    parser.add_argument(
        "--task",
        choices=sorted(TASKS),
        default="tissue",
        help="tissue: 3 classes (Dataset990_MNITissue); regions: 7 classes by hemisphere and front/back "
        "(Dataset991_MNIRegions)",
    )
    parser.add_argument("--dataset-id", type=int, default=None, help="default: 990 (tissue) or 991 (regions)")
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
    print(f"  held out of training: template z > {held_out['z_cut_mm']:.1f} mm (top {HELD_OUT_FRACTION:.0%} of brain)")
    return 0
