"""The baseline: MONAI DynUNet configured like nnU-Net 3d_fullres, trained through the same pipeline as E2ENet."""

from __future__ import annotations

from torch import nn

# MONAI DynUNet configured like nnU-Net 3d_fullres for isotropic data (the paper's strongest baseline): two
# 3x3x3 conv + InstanceNorm + LeakyReLU per stage, stride-2 convs, transposed-conv upsampling, deep supervision.
# "paper" is nnU-Net's 128^3 plan (32 -> 320 channels, 5 pools); "cpu-demo" matches E2ENet cpu-demo's depth and
# widths (3 pools, 8 -> 64) so the two compare under the same patch and iteration budget.
DYNUNET_PRESETS: dict[str, dict] = {
    "paper": dict(filters=(32, 64, 128, 256, 320, 320)),
    "cpu-demo": dict(filters=(8, 16, 32, 64)),
}


def build_dynunet(preset: str = "paper", *, in_channels: int, num_classes: int) -> nn.Module:
    """MONAI ``DynUNet`` as nnU-Net 3d_fullres builds it (see ``DYNUNET_PRESETS``)."""
    from monai.networks.nets import DynUNet  # the baseline is the only MONAI network here

    if preset not in DYNUNET_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(DYNUNET_PRESETS)}")
    filters = DYNUNET_PRESETS[preset]["filters"]
    stages = len(filters)
    return DynUNet(
        3,
        in_channels,
        num_classes,
        kernel_size=[3] * stages,
        strides=[1] + [2] * (stages - 1),
        upsample_kernel_size=[2] * (stages - 1),
        filters=filters,
        norm_name=("INSTANCE", {"affine": True}),
        deep_supervision=True,
        deep_supr_num=max(1, stages - 3),
    )
