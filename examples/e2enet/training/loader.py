"""Training batches: patch sampling with foreground oversampling, the E2ENet trainer's augmentation, TrainLoader.

:class:`TrainLoader` gives endless batches of patches with 33 % foreground oversampling (the last
``B - round(0.67 B)`` samples of each batch are centred on a foreground voxel) and the nnU-Net "moreDA"
augmentation of the E2ENet trainer (:class:`Augmentation`), seeded by one numpy Generator whose state is
checkpointed with ``state_dict()``.

Patches larger than an image: images smaller than the patch are zero-padded (label background), as nnU-Net does;
the automatic plan produces this whenever the median shape is not a multiple of the stride. A patch given
explicitly must be a multiple of the stride and no larger than the largest case (rounded up to the stride) along
any axis: beyond that every patch would be padding along that axis, which is a configuration mistake, so it raises.

Differences from nnU-Net, chosen for a CPU demo: augmentation with bilinear interpolation and per-sample (not
per-channel) probabilities, and a single process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Affine,
    Compose,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    SpatialCrop,
    SpatialPad,
)

from e2enet.preprocessing.geometry import rotation_matrix, to_network_layout
from e2enet.preprocessing.planning import Plans, as_triple, check_patch_size
from e2enet.preprocessing.preprocess import load_preprocessed_case
from e2enet.training.config import ALL_AXES, AUGMENTATIONS

OVERSAMPLE_FOREGROUND = 0.33
# Augmentation recipes (train.py --augment). "nnunet" is the E2ENet trainer's, made for 250,000 iterations; in a
# run of a few thousand it slows learning more than it regularises (docs/results/log.md).
# "light" keeps the cheap intensity changes (brightness, contrast, gamma) and mirroring, no resampling or noise.


class Augmentation:
    """Training augmentation; ``recipe="nnunet"`` is the E2ENet trainer's (nnU-Net "moreDA"), in its order.

    ``nnunet``: first a spatial transform per sample (rotation and/or scaling, applied by the loader while it
    resamples the patch), then MONAI dictionary transforms on ``{"image", "label"}``: noise, blur, brightness,
    contrast, low resolution, gamma (inverted and plain) and mirroring. ``light``: brightness, contrast, gamma
    and mirroring only. Mirroring flips the array axes in ``mirror_axes`` (data layout, (X, Y, Z) as nibabel
    reads the NIfTI); leave out an axis along which left and right are different classes. The spatial draws come
    from the loader's Generator; the MONAI transforms are reseeded from it once per batch (:meth:`reseed`).
    """

    rotation_deg = 30.0
    p_rotation = 0.2
    scale_range = (0.7, 1.4)
    p_scale = 0.2

    def __init__(self, recipe: str = "nnunet", mirror_axes: Sequence[int] = ALL_AXES):
        if recipe not in ("nnunet", "light"):
            raise ValueError(f"unknown augmentation {recipe!r}: use 'nnunet' or 'light' (or no Augmentation)")
        if any(a not in ALL_AXES for a in mirror_axes) or len(set(mirror_axes)) != len(mirror_axes):
            raise ValueError(f"mirror_axes must be distinct axes among 0, 1, 2, got {list(mirror_axes)}")
        self.recipe, self.mirror_axes = recipe, tuple(mirror_axes)
        image, both, sigma = ["image"], ["image", "label"], (0.5, 1.0)
        brightness = RandScaleIntensityd(image, factors=0.25, prob=0.15)  # x U(0.75, 1.25)
        # contrast: (x - mean) * U(0.75, 1.25) + mean, clipped to the original range
        contrast = RandScaleIntensityFixedMeand(image, factors=0.25, fixed_mean=True, preserve_range=True, prob=0.15)
        gamma = RandAdjustContrastd(image, gamma=(0.7, 1.5), invert_image=False, retain_stats=True, prob=0.3)
        mirror = [RandFlipd(both, spatial_axis=axis, prob=0.5) for axis in self.mirror_axes]
        if recipe == "light":
            transforms = [brightness, contrast, gamma, *mirror]
        else:
            transforms = [
                # nnU-Net draws the noise variance from U(0, 0.1); MONAI draws the std from U(0, std).
                RandGaussianNoised(image, prob=0.1, std=0.1**0.5),
                RandGaussianSmoothd(image, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=0.2),
                brightness,
                contrast,
                RandSimulateLowResolutiond(image, zoom_range=(0.5, 1.0), prob=0.25),
                RandAdjustContrastd(image, gamma=(0.7, 1.5), invert_image=True, retain_stats=True, prob=0.1),
                gamma,
                *mirror,
            ]
        self._intensity_and_mirror = Compose(transforms)

    def reseed(self, seed: int) -> None:
        self._intensity_and_mirror.set_random_state(seed=seed)

    def spatial(self, rng: np.random.Generator) -> np.ndarray | None:
        """The linear part of this sample's rotation/scaling (3x3), or None to crop the patch unchanged."""
        if self.recipe != "nnunet":
            return None
        rotate = rng.random() < self.p_rotation
        scale = rng.random() < self.p_scale
        if not (rotate or scale):
            return None
        angles = np.deg2rad(rng.uniform(-self.rotation_deg, self.rotation_deg, 3)) if rotate else np.zeros(3)
        factor = rng.uniform(*self.scale_range) if scale else 1.0
        return rotation_matrix(angles) * factor

    def intensity_and_mirror(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._intensity_and_mirror({"image": image, "label": label})
        return out["image"], out["label"]


class TrainLoader:
    """Endless, reproducible batches of augmented training patches (nnU-Net recipe, single process).

    Every random choice (case, patch position, augmentation) comes from one ``numpy`` Generator:
    each batch draws a seed for the MONAI transforms from it. So ``state_dict()`` (the
    generator's state and the batch count, JSON-serialisable) is all a checkpoint needs, and
    after ``load_state_dict`` the loader continues with exactly the batches it would have produced.

    Each batch is a dict: ``image`` float32 (B, C, *patch), ``label`` int64 (B, 1, *patch),
    ``case_ids`` and ``forced_foreground`` (which samples were centred on foreground). Cases are
    held in memory (the CPU demo datasets are a few MB each).

    On the MNI dataset at 2.5 mm (B = 2, 64^3, one channel) a batch takes 20-30 ms on two CPU cores
    with augmentation and 5 ms without. The model step it feeds takes seconds on a CPU, so a
    single process is enough.
    """

    def __init__(
        self,
        data_dir: Path | str,
        case_ids: Sequence[str],
        plans: Plans,
        *,
        seed: int,
        batch_size: int | None = None,
        patch_size: Sequence[int] | None = None,
        oversample_foreground: float = OVERSAMPLE_FOREGROUND,
        augment: str = "nnunet",
        mirror_axes: Sequence[int] = ALL_AXES,
    ):
        if not case_ids:
            raise ValueError("TrainLoader needs at least one case id")
        self.cases = [load_preprocessed_case(data_dir, case_id) for case_id in case_ids]
        self.batch_size = int(batch_size or plans.batch_size)
        if patch_size is None:
            self.patch_size = np.asarray(plans.patch_size)
        else:
            self.patch_size = np.asarray(as_triple(patch_size, "patch_size"))
            shapes = [case.data.shape[1:] for case in self.cases]
            check_patch_size(self.patch_size.tolist(), plans.network_stride, shapes, list(case_ids))
        # nnU-Net: sample b is forced to foreground unless b < round(B * (1 - p)).
        self.num_random = int(round(self.batch_size * (1 - oversample_foreground)))
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        self.augmentation = None if augment == "none" else Augmentation(augment, mirror_axes)
        self.masked_channels = [i for i, n in enumerate(plans.normalization) if n.use_nonzero_mask]
        # Background outside the non-zero mask is marked -1, as nnU-Net does, so that one
        # nearest-neighbour resampling carries both the label and the mask through rotations.
        self._labels = [
            np.where(case.nonzero_mask | (case.seg > 0), case.seg, -1).astype(case.seg.dtype)
            if self.masked_channels and case.nonzero_mask is not None
            else case.seg
            for case in self.cases
        ]
        self._rng = np.random.default_rng(seed)
        self.batches_drawn = 0

    def state_dict(self) -> dict:
        return {"bit_generator": self._rng.bit_generator.state, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["bit_generator"]
        self.batches_drawn = state["batches_drawn"]

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        # Augmenting a patch is hundreds of small tensor ops. A second intra-op thread gains
        # little on a quiet machine (~20 vs ~25 ms per batch) but costs 20x when other jobs share
        # the cores (~1 s vs ~50 ms: threads wait for each other), and MONAI's MetaTensor
        # bookkeeping is pure overhead for random patches. Both switches are process-wide, so
        # they are restored for the caller's model.
        threads, tracking = torch.get_num_threads(), get_track_meta()
        torch.set_num_threads(1)
        set_track_meta(False)
        try:
            return self._next_batch()
        finally:
            torch.set_num_threads(threads)
            set_track_meta(tracking)

    def _next_batch(self) -> dict:
        rng = self._rng
        seed = int(rng.integers(2**32))  # drawn with or without augmentation, so both consume the same stream
        if self.augmentation is not None:
            self.augmentation.reseed(seed)
        images, labels, case_ids, forced = [], [], [], []
        for sample in range(self.batch_size):
            index = int(rng.integers(len(self.cases)))
            force = sample >= self.num_random
            image, label = self._sample_patch(index, force, rng)
            if self.augmentation is not None:
                image, label = self.augmentation.intensity_and_mirror(image, label)
            if self.masked_channels:  # nnU-Net's mask transform: keep outside-the-anatomy at 0
                outside = label[0] < 0
                image[self.masked_channels] = image[self.masked_channels].masked_fill(outside, 0.0)
                label = label.clamp_min(0)
            images.append(image)
            labels.append(label)
            case_ids.append(self.cases[index].case_id)
            forced.append(force)
        self.batches_drawn += 1
        return {
            "image": torch.stack(images).float(),
            "label": torch.stack(labels).long(),
            "case_ids": case_ids,
            "forced_foreground": forced,
        }

    def _sample_patch(
        self, index: int, force_foreground: bool, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop (or rotate/scale and resample) one patch; returns image (C, *P) and label (1, *P)."""
        case, label = self.cases[index], self._labels[index]
        shape, patch = np.asarray(case.data.shape[1:]), self.patch_size
        # Range of the patch's lower corner that keeps it inside the image, or centred when
        # the image is smaller than the patch (nnU-Net's get_bbox with the final patch size).
        need = np.maximum(patch - shape, 0)
        lower_lo = -(need // 2)
        lower_hi = shape + need // 2 + need % 2 - patch
        classes = [k for k, where in case.locations.items() if len(where)]
        if force_foreground and classes:
            cls = classes[int(rng.integers(len(classes)))]
            centre = case.locations[cls][int(rng.integers(len(case.locations[cls])))]
        else:  # a case without any foreground falls back to a random patch
            bounds = zip(lower_lo, lower_hi, strict=True)
            centre = np.array([rng.integers(lo, hi + 1) for lo, hi in bounds]) + patch // 2
        linear = self.augmentation.spatial(rng) if self.augmentation is not None else None
        if linear is not None:
            return self._resample_patch(case.data, label, centre, linear)
        lower = np.clip(centre - patch // 2, lower_lo, lower_hi)
        return self._crop_patch(case.data, label, lower)

    def _crop_patch(self, data: np.ndarray, label: np.ndarray, lower: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch starting at ``lower``, zero-padded where it leaves the image.

        ``lower`` is negative only where the image is smaller than the patch, and then centres it (any odd voxel
        of padding at the end), which is how ``SpatialPad`` pads.
        """
        crop = SpatialCrop(roi_start=lower, roi_end=lower + self.patch_size)
        pad = SpatialPad(self.patch_size.tolist(), method="symmetric")
        # Copies, as cropping returns a view of the cached case and the augmentation may work in place.
        image = pad(crop(torch.from_numpy(data))).clone()
        label = pad(crop(torch.from_numpy(label)[None])).to(torch.int16, copy=True)
        return image, label

    def _resample_patch(
        self, data: np.ndarray, label: np.ndarray, centre: np.ndarray, linear: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate/scale about ``centre`` with MONAI ``Affine``; patch voxel P // 2 samples exactly ``centre``.

        Anchoring the output voxel P // 2 (not the half-voxel patch centre) on ``centre`` means a
        foreground-forced sample keeps its foreground voxel under any rotation or scaling.
        """
        patch = self.patch_size
        in_centre, out_centre = (np.asarray(data.shape[1:]) - 1) / 2, (patch - 1) / 2
        matrix = np.eye(4)
        matrix[:3, :3] = linear  # MONAI maps centred output coordinates to centred input coordinates
        matrix[:3, 3] = centre - in_centre - linear @ (patch // 2 - out_centre)
        matrix = torch.from_numpy(matrix).float()
        size = patch.tolist()
        image = Affine(affine=matrix, spatial_size=size, mode="bilinear", padding_mode="zeros", image_only=True)(
            torch.from_numpy(data)
        )
        label = Affine(affine=matrix, spatial_size=size, mode="nearest", padding_mode="zeros", image_only=True)(
            torch.from_numpy(label[None].astype(np.float32))
        )
        return image, label.round().to(torch.int16)


def to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch as the network takes it: (image, label) in its axis order, the image channels-last."""
    image = to_network_layout(batch["image"]).to(device, memory_format=torch.channels_last_3d)
    return image, to_network_layout(batch["label"]).to(device)
