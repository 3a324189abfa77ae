"""Array geometry every seam shares: nibabel's (X, Y, Z) axis order against the network's (Z, Y, X), the orientation
of an array in the world and the reorientation between two, and the rotation matrices of the synthetic acquisitions
and the training augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms.utils import create_rotate
from nibabel import orientations

from e2enet.problems import Problem


def to_network_layout(x: torch.Tensor) -> torch.Tensor:
    """(B, C, X, Y, Z) as nibabel reads NIfTI <-> (B, C, Z, Y, X), the order nnU-Net (SimpleITK) feeds networks.

    E2ENet's depth axis (dim 2: where it shifts, and where its kernels are 1 wide) must be the slice axis Z, as in
    the authors' nnU-Net pipeline. Reversing the spatial axes is its own inverse.
    """
    return x.permute(0, 1, 4, 3, 2)


def orientation_codes(affine: np.ndarray, source: object) -> str:
    """Where the array axes X, Y, Z point in the world, as nibabel's axis codes: "RAS" is x to the right, y to the
    front, z up. An oblique grid gets the codes of its nearest world axes. ``source`` names the file in a Problem."""
    codes = orientations.aff2axcodes(affine)
    if None in codes:
        raise Problem(
            f"{source}: its affine {np.asarray(affine).round(3).tolist()} maps an array axis to no direction in the "
            "world (a zero column), so where the image lies is unknown; fix its header (qform/sform)"
        )
    return "".join(codes)


def _orientation_transform(source: str, target: str) -> np.ndarray:
    return orientations.ornt_transform(orientations.axcodes2ornt(source), orientations.axcodes2ornt(target))


def reorient(volumes: np.ndarray, source: str, target: str) -> np.ndarray:
    """(C, X, Y, Z) ``volumes`` stored in orientation ``source`` (axis codes), in orientation ``target``: the same
    voxels, their axes transposed and flipped."""
    moved = orientations.apply_orientation(np.moveaxis(volumes, 0, -1), _orientation_transform(source, target))
    return np.ascontiguousarray(np.moveaxis(moved, -1, 0))  # apply_orientation reorients the leading axes


def reoriented_affine(affine: np.ndarray, shape: Sequence[int], source: str, target: str) -> np.ndarray:
    """The affine of a grid of ``shape`` in orientation ``source`` once :func:`reorient` has turned it to
    ``target``: every voxel keeps its place in the world."""
    return affine @ orientations.inv_ornt_aff(_orientation_transform(source, target), shape)


def rotation_matrix(radians: Sequence[float]) -> np.ndarray:
    """3x3 rotation about x by ``radians[0]``, then y, then z (fixed axes): Rz @ Ry @ Rx.

    MONAI composes Rx @ Ry @ Rz (its only order before MONAI 1.6), so this is the transpose of MONAI's matrix
    for the opposite angles.
    """
    return create_rotate(3, [-r for r in radians])[:3, :3].T
