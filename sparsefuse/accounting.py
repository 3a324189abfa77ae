"""Parameter and FLOP accounting for sparse models.

* [`count_params`][sparsefuse.count_params]: untargeted parameters count in full, targeted weights count their
  active elements.
* [`count_flops`][sparsefuse.count_flops]: the true multiply-accumulate cost of every convolution, transposed
  convolution and linear call, each targeted layer's scaled by its density, with one record per call
  ([`LayerFlops`][sparsefuse.accounting.LayerFlops]) from which other counting rules can be built.

``sparsity`` arguments are any [`Sparsity`][sparsefuse.protocol.Sparsity], such as a
[`DynamicSparsity`][sparsefuse.DynamicSparsity]; ``None`` means dense.

FLOPs are counted without doing any arithmetic: the forward pass runs on the ``meta`` device (parameters and
buffers are swapped for meta stand-ins via ``torch.func.functional_call``, the input is a meta tensor of the given
shape) and forward hooks record each layer's input and output shapes. A full 3-D segmentation net at 128^3 is
accounted in well under a second and with no activation memory; the model itself is left untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .protocol import Sparsity, target_weight_masks

__all__ = ["count_params", "count_flops", "FlopCount", "LayerFlops"]

_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *_CONV_T, nn.Linear)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def count_params(model: nn.Module, sparsity: Sparsity | None = None) -> int:
    """Parameter count of ``model`` under ``sparsity`` (the E2ENet paper's eq. 4).

    Every parameter not targeted by ``sparsity`` counts in full, whatever its values (a zero-initialised bias
    still counts: this is a parameter count, not a non-zero count). Each targeted weight counts its active
    elements, ``sparsity.weight_mask(name).sum()``. Shared (tied) parameters count once.

    Args:
        model: any module; may live on the ``meta`` device.
        sparsity: the masks that apply (any [`Sparsity`][sparsefuse.protocol.Sparsity]), or None for dense.

    Returns:
        The number of parameters, as an int.
    """
    _check_model(model)
    masks = target_weight_masks(model, sparsity) if sparsity is not None else {}
    return sum(int(masks[name].sum()) if name in masks else p.numel() for name, p in model.named_parameters())


@dataclass(frozen=True)
class LayerFlops:
    """One layer call as counted by [`count_flops`][sparsefuse.count_flops].

    Attributes:
        name: the module's qualified name ("" for the root module); ``model.get_submodule(name)`` is the layer.
        kind: the module's class name (e.g. "DepthShiftConv3d").
        input_shape: the shape of the call's input, batch included.
        output_shape: the shape of its output, batch included.
        density: the fraction of the layer's weight that is active (1.0 if untargeted).
        flops: this call's FLOPs.
    """

    name: str
    kind: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    density: float
    flops: float


class FlopCount(float):
    """Total FLOPs as a ``float``, with the per-layer breakdown attached.

    Behaves as the plain total in arithmetic, comparisons, formatting and JSON. ``FlopCount(layers)`` builds one
    from per-call records; the total is their exact sum.

    Attributes:
        layers: tuple of [`LayerFlops`][sparsefuse.accounting.LayerFlops], in call order (a module called twice
            appears twice).
    """

    layers: tuple[LayerFlops, ...]

    def __new__(cls, layers: Sequence[LayerFlops]) -> FlopCount:
        self = super().__new__(cls, math.fsum(layer.flops for layer in layers))
        self.layers = tuple(layers)
        return self

    def __reduce__(self):
        # float's default reduce would call __new__(cls, total); rebuild from the layers.
        return (type(self), (self.layers,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({float(self)!r}, layers={len(self.layers)})"


def _layer_flops(module: nn.Module, in_shape: torch.Size, out_shape: torch.Size, density: float) -> float:
    """Twice the multiply-accumulates of one call, times ``density``: a conv does K * C_in/groups * C_out * V_out,
    a transposed conv K * C_in * C_out/groups * V_in per sample, a linear C_in * C_out per row."""
    if isinstance(module, nn.Linear):
        rows = math.prod(out_shape[:-1])  # batch and any other leading dims
        return 2.0 * module.in_features * module.out_features * density * rows
    ndim = len(module.kernel_size)
    k = math.prod(module.kernel_size)
    c_in, c_out, g = module.in_channels, module.out_channels, module.groups
    # Conv layers also accept unbatched (C, *spatial) input: batch = product of whatever precedes the channel axis.
    batch = math.prod(out_shape[: -ndim - 1])
    if isinstance(module, _CONV_T):
        # Each input voxel is scattered through K taps into C_out/groups channels.
        v_in = math.prod(in_shape[-ndim:])
        return 2.0 * k * c_in * (c_out // g) * v_in * batch * density
    v_out = math.prod(out_shape[-ndim:])
    return 2.0 * k * (c_in // g) * c_out * v_out * batch * density


def _meta_input(example_input, model: nn.Module) -> torch.Tensor:
    if isinstance(example_input, torch.Tensor):
        # empty_like keeps the strides, so a channels_last input stays channels_last.
        return torch.empty_like(example_input, device="meta")
    if isinstance(example_input, Sequence) and not isinstance(example_input, str):
        shape = tuple(example_input)
        if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise ValueError(
                f"example_input shape must be a non-empty sequence of positive ints such as "
                f"(1, 1, 128, 128, 128), got {example_input!r}"
            )
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return torch.empty(shape, dtype=dtype, device="meta")
    raise TypeError(
        f"example_input must be a tensor or a shape tuple such as (1, 1, 128, 128, 128), "
        f"got {type(example_input).__name__}"
    )


def _run_on_meta(model: nn.Module, x: torch.Tensor, densities: dict[str, float]) -> list[LayerFlops]:
    """Run ``model`` on meta stand-ins of its tensors and record every counted layer call."""
    records: list[LayerFlops] = []

    def make_hook(name: str):
        density = densities.get(f"{name}.weight" if name else "weight", 1.0)

        def hook(module, inputs, output):
            in_shape, out_shape = inputs[0].shape, output.shape
            flops = _layer_flops(module, in_shape, out_shape, density)
            records.append(LayerFlops(name, type(module).__name__, tuple(in_shape), tuple(out_shape), density, flops))

        return hook

    # One meta stand-in per tensor, shared by every name of a tied tensor (functional_call rejects distinct
    # values for tied names).
    stand_ins: dict[int, torch.Tensor] = {}
    meta_state = {
        name: stand_ins.setdefault(id(t), torch.empty_like(t, device="meta"))
        for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
    }
    handles = [m.register_forward_hook(make_hook(name)) for name, m in model.named_modules() if isinstance(m, _COUNTED)]
    try:
        with torch.no_grad():
            torch.func.functional_call(model, meta_state, (x,))
    except (RuntimeError, NotImplementedError) as e:
        raise RuntimeError(
            f"count_flops runs the forward on the meta device and it failed there ({e}); forwards that read "
            f"tensor values (e.g. .item(), data-dependent shapes) cannot be accounted this way"
        ) from e
    finally:
        for h in handles:
            h.remove()
    return records


def count_flops(
    model: nn.Module, example_input: torch.Tensor | Sequence[int], sparsity: Sparsity | None = None
) -> FlopCount:
    """FLOPs of one forward pass of ``model`` on an input shaped like ``example_input``: twice its true
    multiply-accumulates, no bias adds.

    Counted layers: every call of an ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or ``nn.Linear`` module,
    subclasses included (e.g. ``DepthShiftConv3d``). Everything else (norms, activations, pooling, shifts,
    functional ops, ...) is free. The count is for the *given* input, batch included: pass batch 1 for per-sample
    numbers. The forward runs in the model's current train/eval mode; the mode matters only for models whose
    forward branches on ``self.training``.

    Per layer call, with K the kernel volume, V_out / V_in the output / input voxel count per sample and d the
    fraction of the layer's weight that is active (1 if the weight is not targeted): conv
    ``2 K C_in/groups C_out V_out d``, transposed conv ``2 K C_in C_out/groups V_in d``, linear ``2 C_in C_out d``
    per row, times the batch. Other counting rules (the E2ENet paper's eq. 5, for instance) can be computed from
    the per-call records, which give each layer's name, shapes and density.

    Args:
        model: module to account; its parameters, buffers and mode are not changed.
        example_input: a tensor (only its shape, dtype and strides are used) or a shape tuple (dtype taken from
            the model's parameters).
        sparsity: the masks that apply (any [`Sparsity`][sparsefuse.protocol.Sparsity]), or None for dense.

    Returns:
        [`FlopCount`][sparsefuse.accounting.FlopCount]: a float equal to the total FLOPs, with ``.layers`` giving
        the per-call breakdown.

    Raises:
        ValueError: bad shape, or a sparsity naming weights the model does not have.
        TypeError: wrong argument types.
        RuntimeError: the forward cannot run on the meta device (data-dependent ops).
    """
    _check_model(model)
    masks = target_weight_masks(model, sparsity) if sparsity is not None else {}
    densities = {name: int(mask.sum()) / mask.numel() for name, mask in masks.items()}
    return FlopCount(_run_on_meta(model, _meta_input(example_input, model), densities))
