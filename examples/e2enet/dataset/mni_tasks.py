"""The tasks of the embedded MNI suite: what each labels, what it images, and through which acquisition.

Every task renders the MNI152 template (:mod:`e2enet.dataset.mni`) through one random acquisition per case, shared
by all tasks (rotation, size, warp, shift, spacing jitter, held-out top). A :class:`Task` chooses the nominal
spacing and field of view of that acquisition, a label rule and its image channels. ``SUITE`` lists the tasks a
training recipe is chosen on (``compare.py --suite``); they differ in what matters to a segmenter:

=========  ===============  ===================  ========  =========================================================
task       classes          spacing (mm)         channels  what is different
=========  ===============  ===================  ========  =========================================================
tissue     3                2.5                  T1        large classes, one thin (CSF/other)
regions    7                2.5                  T1        cuts by position (left/right, front/back), not by contrast
deep       3                1.5, central crop    T1        small structures (2 x 400-600 voxels each) of faint contrast,
                                                           no held-out top; the field of view is filled with unlabelled
                                                           tissue
parcels    13               3.0                  T1        many classes with borders no contrast shows; small volumes
lesions    4                2.5                  T1, T2    a class that differs per case, visible mainly in T2
ct         3                2.4 x 2.4 x 8        CT        Hounsfield units, skull and air; thick slices that average
                                                           8 mm, CT normalisation in planning
=========  ===============  ===================  ========  =========================================================

Sources, all read from the installed nilearn wheel (BSD-3-Clause), nothing downloaded or copied here:

* the ICBM 2009a MNI152 T1 and grey/white-matter maps (Fonov et al., NeuroImage 2011; Copyright (C) 1993-2009
  Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University, permissive
  notice), every task;
* the Seitzman et al. 300 ROI coordinates and their anatomical labels (NeuroImage 2020, "A set of
  functionally-defined brain regions with improved representation of the subcortex and cerebellum";
  ``fetch_coords_seitzman_2018``): the centres of the deep structures;
* the Dosenbach et al. 160 ROI coordinates and networks (Science 2010, "Prediction of individual brain maturity
  using fMRI"; ``fetch_coords_dosenbach_2010``): the parcels' centres.

nilearn's own descriptions give the licence of both coordinate tables as unknown (Seitzman) or do not state it
(Dosenbach); they are coordinates published in those papers, and only their means are used, at build time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:  # the acquisition's draws; mni.py builds on this module
    from e2enet.dataset.mni import CaseParams

BRAIN_THRESHOLD = 0.2  # nilearn's load_mni152_brain_mask threshold on the [0, 1] template
GAMMA_RANGE = (0.8, 1.25)
MAX_LOG_BIAS = 0.2  # bias field exp(b) with |b| <= 0.2, i.e. 0.82-1.22
INTENSITY_SCALE_RANGE = (500.0, 1500.0)  # arbitrary MRI units
NOISE_FRACTION_RANGE = (0.01, 0.04)  # Rician noise sigma relative to the intensity scale

LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2, "csf_other": 3}
# The same tissue split by hemisphere (MNI x, + is right) and, for grey matter, into a front and a back half at the
# brain's centre (MNI y). Seven foreground classes, four of them small, and two of the cuts are positional rather
# than visible in the image: left and right look alike, and the front/back plane crosses uniform tissue, so a
# network must use context, and mirroring along x would swap the hemispheres.
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

# Deep structures: ellipsoids around a centre, the mean of Seitzman ROIs of one anatomical label in one hemisphere,
# inside the brain. The Seitzman table has no caudate label: its basal-ganglia ROIs in front of y = 10 mm lie in the
# caudate's head. The three kinds differ in shape (the thalamus and caudate ovoids, the hippocampus long and thin)
# and are darker in T1 than their surroundings by a gain each case draws (darker, because grey matter made brighter
# looks like the white matter around it); left and right look alike. 400-600 voxels a side at 1.5 mm.
DEEP_STRUCTURES = {"thalamus": "thalamus", "caudate": "basalGanglia", "hippocampus": "hippocampus"}
CAUDATE_MIN_Y_MM = 10.0
DEEP_SEMI_AXES_MM = {"thalamus": (7.0, 10.0, 7.0), "caudate": (5.0, 9.0, 8.0), "hippocampus": (5.0, 13.0, 5.0)}
DEEP_T1_GAIN = (0.10, 0.20)
DEEP_EDGE = 0.15  # the contrast fades over this share of the semi-axes either side of the surface
# One class per kind, left and right together: told apart by side alone, six classes were not learnt in the cpu-demo
# budget (each pair got one label); the regions task asks for left and right already.
DEEP_LABELS = {"background": 0} | {name: 1 + i for i, name in enumerate(DEEP_STRUCTURES)}
# Field of view of the deep task in template mm: the ellipsoids stay over 10 mm inside it after any shift and
# rotation.
DEEP_FOV_MM = ((-56.0, -60.0, -44.0), (56.0, 52.0, 38.0))

# Parcels: grey matter by nearest centre (a Voronoi partition), the centres being the mean of each Dosenbach
# network's ROIs in each hemisphere; the cells are parcels of grey matter, not the networks.
DOSENBACH_NETWORKS = ("cerebellum", "cingulo-opercular", "default", "fronto-parietal", "occipital", "sensorimotor")
PARCEL_LABELS = {"background": 0} | {
    f"parcel_{network.replace('-', '_')}_{side}": 1 + 2 * i + j
    for i, network in enumerate(DOSENBACH_NETWORKS)
    for j, side in enumerate(("left", "right"))
}
PARCEL_LABELS["white_matter"] = len(PARCEL_LABELS)

# Lesions: ellipsoids centred in deep white matter, bright in T2, a little dark in T1, labelled where they lie in
# white matter; 2-4 per case, semi-axes 6-12 mm, so their number, place and size differ in every case. With 4-9 mm
# (150-250 lesion voxels per case) the lesion class was learnt on one run of eight in the cpu-demo budget.
LESION_LABELS = LABELS | {"lesion": 4}
LESION_COUNT = (2, 4)
LESION_SEMI_AXES_MM = (6.0, 12.0)
LESION_EDGE = 0.2  # the contrast fades from 1 - edge to 1 + edge of the ellipsoid's normalised radius
LESION_T1_DROP = 0.15
T2_BY_TISSUE = (1.0, 0.55, 0.35)  # CSF, grey, white matter: the inverse order of T1
LESION_T2 = 0.85

# Head CT in Hounsfield units: brain tissue (grey 36-44, white 8-14 lower, CSF 2-10), then outward from the brain
# CSF, bone, scalp and air; Gaussian noise and a smooth offset (beam hardening).
AIR_HU = -1000.0
CT_DRAWS = {  # name -> uniform range
    "grey_hu": (36.0, 44.0),
    "grey_minus_white_hu": (8.0, 14.0),
    "csf_hu": (2.0, 10.0),
    "bone_hu": (800.0, 1500.0),
    "scalp_hu": (10.0, 50.0),
    "csf_gap_mm": (1.0, 3.0),
    "bone_mm": (5.0, 8.0),
    "scalp_mm": (3.0, 6.0),
    "noise_hu": (3.0, 7.0),
}
MAX_CT_OFFSET_HU = 3.0
MAX_BONE_VARIATION_HU = 150.0

TEMPLATE_REFERENCE = "Fonov et al., NeuroImage 2011; template shipped with nilearn"
TEMPLATE_LICENCE = "ICBM 2009a MNI BIC permissive notice (Copyright 1993-2009 Louis Collins, MNI, McGill University)"
TABLE_LICENCE = "ROI table shipped in the nilearn wheel (BSD-3-Clause); nilearn gives the table's own licence as {}"


@dataclass
class CaseMaps:
    """The template's maps sampled on one case's grid, where every label rule and image channel starts."""

    world: np.ndarray  # (3, *shape) world mm of each voxel centre
    template_mm: np.ndarray  # (3, *shape) MNI mm each voxel shows
    spacing_mm: np.ndarray  # (3,) the case's voxel size
    t1: np.ndarray  # [0, 1], exactly zero outside the skull-stripped template
    grey_matter: np.ndarray  # probability
    white_matter: np.ndarray  # probability
    template_centre_mm: np.ndarray  # the brain's bounding-box centre in MNI mm
    kept_slices: int | None = None  # a training case keeps array-axis-2 slices [0, kept_slices); None: all
    lesion: np.ndarray | None = None  # [0, 1] weight of a lesion's contrast, set by a task's pathology
    t1_factor: np.ndarray | None = None  # what a task's pathology multiplies the T1 signal by; None: 1

    @property
    def shape(self) -> tuple[int, ...]:
        return self.t1.shape

    @property
    def support(self) -> np.ndarray:
        return self.t1 > 0

    @property
    def brain(self) -> np.ndarray:
        return self.t1 > BRAIN_THRESHOLD


@dataclass(frozen=True)
class Acquisition:
    """What a task's scanner does: nominal voxel size per array axis, field of view, what training may not see."""

    spacing_mm: tuple[float, float, float]
    fov_mm: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None  # None: the brain + margin
    hold_out_top: bool = True  # training cases stop below the superior-most part of the brain
    samples_per_slice: int = 1  # > 1: a voxel averages this many points through its array-axis-2 extent


# An image channel: (maps, the case's draws, rng) -> (image, what it drew beyond the case's draws, for provenance).
Channel = Callable[[CaseMaps, "CaseParams", np.random.Generator], tuple[np.ndarray, dict]]


@dataclass(frozen=True)
class Task:
    """One dataset of the suite: its name and id, classes, acquisition, label rule and image channels."""

    dataset_id: int
    dataset_name: str
    labels: dict[str, int]
    description: str
    acquisition: Acquisition
    label_rule: Callable[[CaseMaps], np.ndarray]
    channels: dict[str, Channel]  # channel name (dataset.json) -> its rendering, in file order
    pathology: Callable[[CaseMaps, np.random.Generator], dict] | None = None  # changes the maps before both
    reference: str = TEMPLATE_REFERENCE
    licence: str = TEMPLATE_LICENCE

    @property
    def folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.dataset_name}"


def smooth_field(rng: np.random.Generator, points_mm: np.ndarray, max_abs: float, n_waves: int = 4) -> np.ndarray:
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


# ------------------------------------------------------------------------------------------------ label rules
def tissue_labels(maps: CaseMaps) -> np.ndarray:
    """LABELS: inside the brain the argmax of (1 - p_gm - p_wm, p_gm, p_wm), background outside."""
    label = np.zeros(maps.shape, np.uint8)
    brain = maps.brain
    tissue = np.argmax(np.stack([1.0 - maps.grey_matter - maps.white_matter, maps.grey_matter, maps.white_matter]), 0)
    tissue_to_label = np.array([LABELS["csf_other"], LABELS["grey_matter"], LABELS["white_matter"]], np.uint8)
    label[brain] = tissue_to_label[tissue[brain]]
    return label


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


def regions_rule(maps: CaseMaps) -> np.ndarray:
    return region_labels(tissue_labels(maps), maps.template_mm, maps.template_centre_mm)


def _nearest(template_mm: np.ndarray, where: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of and squared distance to the nearest of ``centres`` (K, 3), for the voxels in ``where``."""
    points = template_mm[:, where]  # (3, N)
    squared = ((points[None] - centres[:, :, None].astype(np.float32)) ** 2).sum(1)  # (K, N)
    nearest = squared.argmin(0)
    return nearest, squared[nearest, np.arange(points.shape[1])]


def _deep_structure_radius(template_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every voxel, the deep structure whose ellipsoid is nearest and the radius in its semi-axes (1 on the
    surface), from the voxel's template position (3, *shape) in MNI mm."""
    axes = np.repeat([DEEP_SEMI_AXES_MM[name] for name in DEEP_STRUCTURES], 2, axis=0)  # left, right of each
    offsets = template_mm[None] - deep_structure_centres()[:, :, None, None, None].astype(np.float32)
    radius = np.sqrt(((offsets / axes[:, :, None, None, None].astype(np.float32)) ** 2).sum(1))  # (6, *shape)
    nearest = radius.argmin(0)
    return nearest, np.take_along_axis(radius, nearest[None], 0)[0]


def deep_rule(maps: CaseMaps) -> np.ndarray:
    """DEEP_LABELS: the brain inside each deep structure's ellipsoids (MNI mm), left and right one class."""
    nearest, radius = _deep_structure_radius(maps.template_mm)
    return np.where(maps.brain & (radius <= 1.0), nearest // 2 + 1, 0).astype(np.uint8)


def parcels_rule(maps: CaseMaps) -> np.ndarray:
    """PARCEL_LABELS: grey matter by its nearest parcel centre (MNI mm), and white matter."""
    tissue = tissue_labels(maps)
    grey = tissue == LABELS["grey_matter"]
    label = np.zeros(maps.shape, np.uint8)
    label[grey] = _nearest(maps.template_mm, grey, parcel_centres())[0] + 1
    label[tissue == LABELS["white_matter"]] = PARCEL_LABELS["white_matter"]
    return label


def lesions_rule(maps: CaseMaps) -> np.ndarray:
    """LESION_LABELS: the tissue, and lesion where the lesion weight is at least one half."""
    label = tissue_labels(maps)
    label[(maps.lesion >= 0.5) & maps.brain] = LESION_LABELS["lesion"]
    return label


# -------------------------------------------------------------------------------------------------- centres
def _sides(xyz: np.ndarray) -> dict[str, np.ndarray]:
    return {"left": xyz[:, 0] <= 0, "right": xyz[:, 0] > 0}  # as region_labels: x = 0 is left


@functools.cache
def deep_structure_centres() -> np.ndarray:
    """(6, 3) MNI mm centres of the deep structures, left then right of each in DEEP_STRUCTURES order, from the
    Seitzman ROI table."""
    import pandas as pd
    from nilearn import datasets  # imported here: it costs seconds and only building needs it

    table = datasets.fetch_coords_seitzman_2018(ordered_regions=False)
    xyz, regions = pd.DataFrame(table.rois)[["x", "y", "z"]].to_numpy(float), np.asarray(table.regions)
    centres = []
    for name, region in DEEP_STRUCTURES.items():
        chosen = regions == region
        if name == "caudate":
            chosen &= xyz[:, 1] > CAUDATE_MIN_Y_MM
        for side in _sides(xyz).values():
            if not (chosen & side).any():
                raise RuntimeError(f"nilearn's Seitzman table has no {region} ROI for the {name}; unsupported nilearn")
            centres.append(xyz[chosen & side].mean(0))
    return np.array(centres)


@functools.cache
def parcel_centres() -> np.ndarray:
    """(12, 3) MNI mm parcel centres in PARCEL_LABELS order, from the Dosenbach ROI table."""
    import pandas as pd
    from nilearn import datasets

    table = datasets.fetch_coords_dosenbach_2010(ordered_regions=False)
    xyz, networks = pd.DataFrame(table.rois)[["x", "y", "z"]].to_numpy(float), np.asarray(table.networks)
    if set(networks) != set(DOSENBACH_NETWORKS):
        raise RuntimeError(f"nilearn's Dosenbach networks {sorted(set(networks))} are not {DOSENBACH_NETWORKS}")
    return np.array([xyz[(networks == n) & side].mean(0) for n in DOSENBACH_NETWORKS for side in _sides(xyz).values()])


# ------------------------------------------------------------------------------------------------ pathology
def draw_lesions(maps: CaseMaps, rng: np.random.Generator) -> dict:
    """Set ``maps.lesion``: ellipsoids around voxels of deep white matter that a training case keeps in view."""
    candidate = (maps.white_matter > 0.9) & maps.brain
    if maps.kept_slices is not None:
        candidate[..., maps.kept_slices :] = False
    voxels = np.argwhere(candidate)
    if len(voxels) == 0:
        raise RuntimeError("no deep white matter in view to place a lesion in; use a finer --spacing")
    count = int(rng.integers(LESION_COUNT[0], LESION_COUNT[1] + 1))
    weight = np.zeros(maps.shape, np.float32)
    drawn = []
    for voxel in voxels[rng.choice(len(voxels), min(count, len(voxels)), replace=False)]:
        centre = maps.world[(slice(None), *voxel)]
        semi_axes = rng.uniform(*LESION_SEMI_AXES_MM, 3)
        radius = np.sqrt(sum(((maps.world[k] - centre[k]) / semi_axes[k]) ** 2 for k in range(3)))
        weight = np.maximum(weight, np.clip((1 + LESION_EDGE - radius) / (2 * LESION_EDGE), 0, 1))
        drawn.append({"centre_mm": centre.round(2).tolist(), "semi_axes_mm": semi_axes.round(2).tolist()})
    maps.lesion = np.where(maps.white_matter > 0.3, weight, 0).astype(np.float32)  # lesions of the white matter
    maps.t1_factor = 1 - LESION_T1_DROP * maps.lesion
    return {"lesions": drawn}


def contrast_deep_structures(maps: CaseMaps, rng: np.random.Generator) -> dict:
    """Set ``maps.t1_factor``: the deep structures darker by one gain per case."""
    gain = round(float(rng.uniform(*DEEP_T1_GAIN)), 3)
    radius = _deep_structure_radius(maps.template_mm)[1]
    inside = np.clip((1 + DEEP_EDGE - radius) / (2 * DEEP_EDGE), 0, 1)
    maps.t1_factor = (1 - gain * inside).astype(np.float32)
    return {"deep_t1_gain": gain}


# ------------------------------------------------------------------------------------------------- channels
def _rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    # Magnitude of a complex signal with Gaussian noise in both parts: Rician, always positive.
    return np.hypot(signal + rng.normal(0, sigma, signal.shape), rng.normal(0, sigma, signal.shape))


def t1_channel(maps: CaseMaps, params: CaseParams, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """T1-weighted MRI: the template with the case's gamma, scale, a bias field and Rician noise; zero outside."""
    bias = np.exp(smooth_field(rng, maps.world, MAX_LOG_BIAS))
    t1 = np.clip(maps.t1, 0, 1) ** params.gamma
    if maps.t1_factor is not None:
        t1 = t1 * maps.t1_factor
    signal = params.intensity_scale * bias * t1
    noisy = _rician(rng, signal, params.noise_fraction * params.intensity_scale)
    return np.where(maps.support, noisy, 0.0).astype(np.float32), {}


def t2_channel(maps: CaseMaps, params: CaseParams, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """T2-like MRI: fluid bright, white matter dark, from the tissue maps, with its own scale, bias and noise."""
    scale = round(float(rng.uniform(*INTENSITY_SCALE_RANGE)), 2)
    noise_fraction = round(float(rng.uniform(*NOISE_FRACTION_RANGE)), 4)
    csf = np.clip(1 - maps.grey_matter - maps.white_matter, 0, 1)
    t2 = T2_BY_TISSUE[0] * csf + T2_BY_TISSUE[1] * maps.grey_matter + T2_BY_TISSUE[2] * maps.white_matter
    if maps.lesion is not None:
        t2 = t2 * (1 - maps.lesion) + LESION_T2 * maps.lesion
    signal = scale * np.exp(smooth_field(rng, maps.world, MAX_LOG_BIAS)) * t2
    noisy = _rician(rng, signal, noise_fraction * scale)
    return np.where(maps.support, noisy, 0.0).astype(np.float32), {"t2_scale": scale, "t2_noise": noise_fraction}


def ct_channel(maps: CaseMaps, params: CaseParams, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Head CT in Hounsfield units: tissue values inside the template, CSF, skull, scalp and air around it."""
    d = {name: round(float(rng.uniform(*bounds)), 2) for name, bounds in CT_DRAWS.items()}
    white = d["grey_hu"] - d["grey_minus_white_hu"]
    csf = np.clip(1 - maps.grey_matter - maps.white_matter, 0, 1)
    brain = d["csf_hu"] * csf + d["grey_hu"] * maps.grey_matter + white * maps.white_matter
    outside_mm = ndimage.distance_transform_edt(~maps.support, sampling=maps.spacing_mm)
    bone = d["bone_hu"] + smooth_field(rng, maps.world, MAX_BONE_VARIATION_HU)
    skull_from, scalp_from = d["csf_gap_mm"], d["csf_gap_mm"] + d["bone_mm"]
    head = np.select(
        [outside_mm <= skull_from, outside_mm <= scalp_from, outside_mm <= scalp_from + d["scalp_mm"]],
        [d["csf_hu"], bone, d["scalp_hu"]],
        AIR_HU,
    )
    hu = np.where(maps.support, brain, head) + smooth_field(rng, maps.world, MAX_CT_OFFSET_HU)
    return (hu + rng.normal(0, d["noise_hu"], maps.shape)).astype(np.float32), {"ct": d}


# ---------------------------------------------------------------------------------------------------- tasks
_HELD_OUT = "the top 20% of the brain is held out of training. Not a clinical benchmark."
TASKS = {
    "tissue": Task(
        990,
        "MNITissue",
        LABELS,
        f"Brain tissue (GM/WM/CSF-other) on synthetic variations of the MNI152 2009a template; {_HELD_OUT}",
        Acquisition((2.5, 2.5, 2.5)),
        tissue_labels,
        {"T1": t1_channel},
    ),
    "regions": Task(
        991,
        "MNIRegions",
        REGION_LABELS,
        "Brain tissue by hemisphere, grey matter also by front/back half (7 classes), on synthetic variations of "
        f"the MNI152 2009a template; {_HELD_OUT}",
        Acquisition((2.5, 2.5, 2.5)),
        regions_rule,
        {"T1": t1_channel},
    ),
    "deep": Task(
        992,
        "MNIDeepStructures",
        DEEP_LABELS,
        "Thalamus, caudate and hippocampus, each left and right together: ellipsoids around Seitzman 2018 ROI "
        "centres, 10-20% darker in T1 than their surroundings, at 1.5 mm in a central crop of synthetic variations "
        "of the MNI152 2009a template. Not a clinical benchmark.",
        Acquisition((1.5, 1.5, 1.5), fov_mm=DEEP_FOV_MM, hold_out_top=False),
        deep_rule,
        {"T1": t1_channel},
        pathology=contrast_deep_structures,
        reference=f"{TEMPLATE_REFERENCE}; Seitzman et al., NeuroImage 2020 (ROI coordinates)",
        licence=f"{TEMPLATE_LICENCE}; {TABLE_LICENCE.format('unknown')}",
    ),
    "parcels": Task(
        993,
        "MNIParcels",
        PARCEL_LABELS,
        "Grey matter in 12 Voronoi parcels around the per-hemisphere centroids of the Dosenbach 2010 networks' "
        "ROIs, and white matter (13 classes), at 3 mm on synthetic variations of the MNI152 2009a template; "
        + _HELD_OUT,
        Acquisition((3.0, 3.0, 3.0)),
        parcels_rule,
        {"T1": t1_channel},
        reference=f"{TEMPLATE_REFERENCE}; Dosenbach et al., Science 2010 (ROI coordinates)",
        licence=f"{TEMPLATE_LICENCE}; {TABLE_LICENCE.format('not stated')}",
    ),
    "lesions": Task(
        994,
        "MNILesionsT1T2",
        LESION_LABELS,
        "Brain tissue and random white-matter lesions (bright in T2, faint in T1), T1 and a synthetic T2 of "
        f"synthetic variations of the MNI152 2009a template; {_HELD_OUT}",
        Acquisition((2.5, 2.5, 2.5)),
        lesions_rule,
        {"T1": t1_channel, "T2": t2_channel},
        pathology=draw_lesions,
    ),
    "ct": Task(
        995,
        "MNIHeadCT",
        LABELS,
        "Brain tissue on a synthetic head CT (Hounsfield units, skull, scalp, air) with 8 mm slices, from "
        f"synthetic variations of the MNI152 2009a template; {_HELD_OUT}",
        Acquisition((2.4, 2.4, 8.0), samples_per_slice=4),
        tissue_labels,
        {"CT": ct_channel},
    ),
}
SUITE = ("tissue", "regions", "deep", "parcels", "lesions", "ct")
