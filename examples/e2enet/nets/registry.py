"""The networks train.py and predict.py can build, by name, and the conventions of their outputs."""

from __future__ import annotations

import torch
from torch import nn

from e2enet.nets.dynunet import build_dynunet
from e2enet.nets.e2enet import PRESETS, E2ENet, Stride, build_e2enet, stride_product

ARCHITECTURES = ("e2enet", "dynunet")
# Memory format of CPU inference, the faster one as measured per network and preset, masked or compacted
# (docs/results/index.md, "Memory format"). CUDA always takes channels_last_3d.
CPU_INFERENCE_LAYOUT = {
    ("e2enet", "paper"): torch.channels_last_3d,
    ("e2enet", "cpu-demo"): torch.contiguous_format,
    ("dynunet", "paper"): torch.contiguous_format,
    ("dynunet", "cpu-demo"): torch.contiguous_format,
}


def build_model(arch: str, preset: str, *, in_channels: int, num_classes: int, **e2enet_options) -> nn.Module:
    """``"e2enet"`` (:func:`build_e2enet`, ``e2enet_options`` overriding the preset's arguments) or
    ``"dynunet"`` (:func:`build_dynunet`) at a preset."""
    if arch == "e2enet":
        return build_e2enet(preset, in_channels=in_channels, num_classes=num_classes, **e2enet_options)
    if e2enet_options:
        raise ValueError(f"options {sorted(e2enet_options)} are E2ENet arguments; {arch!r} takes none")
    if arch == "dynunet":
        return build_dynunet(preset, in_channels=in_channels, num_classes=num_classes)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")


def model_arguments(arch: str, preset: str, options: dict) -> dict:
    """Every constructor argument a network of ``arch`` at ``preset`` with ``options`` is built with: E2ENet's preset
    arguments with the options over them; none for DynUNet, whose presets take no options."""
    return {**PRESETS[preset], **options} if arch == "e2enet" else {}


def inference_memory_format(arch: str, preset: str, device: torch.device) -> torch.memory_format:
    """The layout to run a network (masked or compacted) in for inference on ``device``."""
    if device.type == "cuda":
        return torch.channels_last_3d
    return CPU_INFERENCE_LAYOUT.get((arch, preset), torch.contiguous_format)


def network_stride(model: nn.Module) -> Stride:
    """Total downsampling per axis: patches must be multiples of it."""
    if isinstance(model, E2ENet):
        return model.total_stride
    return stride_product(model.strides)  # DynUNet


def output_list(outputs: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """Training outputs as a list, full resolution first: E2ENet returns a list; DynUNet stacks its
    deep-supervision maps, upsampled to full resolution, along dim 1 (B, N, C, D, H, W)."""
    if isinstance(outputs, torch.Tensor):
        return list(outputs.unbind(1)) if outputs.dim() == 6 else [outputs]
    return list(outputs)
