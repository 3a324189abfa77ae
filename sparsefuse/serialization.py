"""Checkpoints that store masked weights as their masks and active values: `sparse_state_dict` and
`load_sparse_state_dict`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import unwrap_model
from .protocol import Sparsity, target_weight_masks
from .sparsity import DynamicSparsity

__all__ = ["sparse_state_dict", "load_sparse_state_dict", "SPARSE_FORMAT"]

SPARSE_FORMAT = "sparsefuse.sparse_state_dict/1"


def _pack_bits(mask: Tensor) -> Tensor:
    """Bool tensor -> uint8 tensor of its bits in row-major order, 8 to a byte (the last byte zero-padded)."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, -len(flat) % 8)).reshape(-1, 8)
    return (flat << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    count = 1
    for n in shape:
        count *= n
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[:count].bool().reshape(shape)


def sparse_state_dict(model: nn.Module, sparsity: Sparsity) -> dict:
    """A checkpoint of ``model`` that stores each masked weight as its group mask (one bit per group) and its
    active values only, in the order ``weight[weight_mask]`` reads them; everything else as ``state_dict()`` does.

    For a density-d target with groups of g weights that is about ``d * 4`` bytes per float32 weight plus
    ``1 / (8 g)`` for the mask, instead of 4 bytes: kernel masks on E2ENet's (1, 3, 3) fusion convs cost one bit
    per 9 weights, input-channel masks one bit per input channel.

    Args:
        model: the masked model (DDP / DataParallel wrappers are unwrapped).
        sparsity: its [`DynamicSparsity`][sparsefuse.DynamicSparsity], or any
            [`Sparsity`][sparsefuse.protocol.Sparsity] (group masks come from ``sparsity.masks``).

    Returns:
        A dict of tensors and plain values (``torch.save`` it; ``torch.load(..., weights_only=True)`` reads it):
        ``format``, ``dense`` (the state dict without the target weights), ``masks`` (packed bits),
        ``mask_shapes``, ``granularity`` (the repr of each bound granularity, checked on load) and ``values``.
        Load it with [`load_sparse_state_dict`][sparsefuse.serialization.load_sparse_state_dict]. It is a
        checkpoint for inference or a fresh start: the sparsifier's schedule position and update history are not
        in it.
    """
    model = unwrap_model(model)
    masks = target_weight_masks(model, sparsity)
    state = model.state_dict()
    groups = sparsity.masks
    return {
        "format": SPARSE_FORMAT,
        "dense": {k: v for k, v in state.items() if k not in masks},
        "masks": {name: _pack_bits(groups[name].cpu()) for name in masks},
        "mask_shapes": {name: list(groups[name].shape) for name in masks},
        "granularity": {name: repr(sparsity.granularity_of(name)) for name in masks},
        "values": {name: state[name][mask.to(state[name].device)] for name, mask in masks.items()},
    }


@torch.no_grad()
def load_sparse_state_dict(model: nn.Module, sparsity: DynamicSparsity, state: dict) -> None:
    """Load a [`sparse_state_dict`][sparsefuse.serialization.sparse_state_dict] into ``model`` and its masks into
    ``sparsity``.

    Args:
        model: a model of the saved architecture (DDP / DataParallel wrappers are unwrapped).
        sparsity: a [`DynamicSparsity`][sparsefuse.DynamicSparsity] on ``model`` with the saved targets and
            granularity, e.g. ``DynamicSparsity(model, None, targets=..., granularity=...)``; its step and history
            restart at 0. It must be a DynamicSparsity: the masks are loaded into it.
        state: what [`sparse_state_dict`][sparsefuse.serialization.sparse_state_dict] returned.

    Afterwards ``model`` holds the saved weights exactly (zeros off the masks) and ``sparsity`` the saved masks.
    """
    if not isinstance(sparsity, DynamicSparsity):
        raise TypeError(
            f"load_sparse_state_dict loads the saved masks into a sparsefuse.DynamicSparsity, got "
            f"{type(sparsity).__name__}; build one on the model, e.g. DynamicSparsity(model, None, targets=..., "
            f"granularity=...)"
        )
    if not isinstance(state, dict) or state.get("format") != SPARSE_FORMAT:
        raise ValueError(
            f"not a sparse state dict (expected format {SPARSE_FORMAT!r}); save one with "
            f"sparsefuse.sparse_state_dict(model, sparsity)"
        )
    model = unwrap_model(model)
    # Checked before anything is loaded, so that a state dict of another model leaves this one untouched.
    expected, saved = set(model.state_dict()), set(state["dense"]) | set(state["values"])
    if expected != saved:
        raise ValueError(
            f"sparse state dict does not fit this model: {sorted(expected ^ saved)} missing or unexpected; build "
            f"the model with the arguments of the one that was saved"
        )
    targets, saved_targets = set(sparsity.granularities()), set(state["masks"])
    if targets != saved_targets:
        raise ValueError(
            f"sparse state dict masks {sorted(saved_targets - targets)} are not targets of this sparsifier and "
            f"{sorted(targets - saved_targets)} were not saved; build DynamicSparsity with the targets of the run "
            f"that saved it"
        )
    sparsity.check_granularities(state.get("granularity"))
    groups = {name: _unpack_bits(packed, tuple(state["mask_shapes"][name])) for name, packed in state["masks"].items()}
    params = dict(model.named_parameters())
    for name, values in state["values"].items():
        granularity, shape = sparsity.granularity_of(name), params[name].shape
        if tuple(groups[name].shape) != granularity.groups_shape(shape):
            raise ValueError(
                f"{name}: the saved mask has shape {tuple(groups[name].shape)}, this model's weight needs "
                f"{granularity.groups_shape(shape)} ({granularity!r}); the state dict comes from a different model "
                f"or granularity"
            )
        active = int(granularity.to_weight(groups[name], shape).sum())
        if active != values.numel():
            raise ValueError(
                f"{name}: the mask has {active} active weights but {values.numel()} values were saved; "
                f"the sparsifier's granularity differs from the one that saved them"
            )
    sparsity.load_state_dict({"step": 0, "seed": sparsity.seed, "masks": groups})
    model.load_state_dict(state["dense"], strict=False)
    for name, values in state["values"].items():
        weight, mask = params[name], sparsity.weight_mask(name).to(params[name].device)
        weight.zero_()
        weight[mask] = values.to(weight.device, weight.dtype)
