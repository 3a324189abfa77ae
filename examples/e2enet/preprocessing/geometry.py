"""Array geometry every seam shares: nibabel's (X, Y, Z) axis order against the network's (Z, Y, X), and the rotation
matrices of the synthetic acquisitions and the training augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms.utils import create_rotate


def to_network_layout(x: torch.Tensor) -> torch.Tensor:
    """(B, C, X, Y, Z) as nibabel reads NIfTI <-> (B, C, Z, Y, X), the order nnU-Net (SimpleITK) feeds networks.

    E2ENet's depth axis (dim 2: where it shifts, and where its kernels are 1 wide) must be the slice axis Z, as in
    the authors' nnU-Net pipeline. Reversing the spatial axes is its own inverse.
    """
    return x.permute(0, 1, 4, 3, 2)


def rotation_matrix(radians: Sequence[float]) -> np.ndarray:
    """3x3 rotation about x by ``radians[0]``, then y, then z (fixed axes): Rz @ Ry @ Rx.

    MONAI composes Rx @ Ry @ Rz (its only order before MONAI 1.6), so this is the transpose of MONAI's matrix
    for the opposite angles.
    """
    return create_rotate(3, [-r for r in radians])[:3, :3].T
