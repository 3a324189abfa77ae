"""Parameter and FLOP accounting for sparse models (E2ENet paper, eq. 4-7).

* :func:`count_params` -- eq. 4: untargeted parameters count in full, targeted
  weights count their active elements.
* :func:`count_flops` -- eq. 5/6 per convolution / linear layer, with each
  targeted layer's input-channel term scaled by its measured density; or the
  true multiply-accumulate cost (``convention="macs"``).
* :func:`pt_score` -- eq. 7, the performance trade-off score.

``sparsity`` arguments are duck-typed: any object with

* ``target_names`` -- iterable of the qualified names of the targeted weights
  (``"up4.0.weight"``),
* ``weight_mask(name)`` -- bool tensor shaped like that weight, True where active,
* ``density(name)`` -- float, active groups / all groups of that weight,

such as :class:`sparsefuse.DynamicSparsity`. ``None`` means dense.

FLOPs are counted without doing any arithmetic: the forward pass runs on the
``meta`` device (parameters and buffers are swapped for meta stand-ins via
:func:`torch.func.functional_call`, the input is a meta tensor of the given
shape) and forward hooks record each layer's input and output shapes. A full
3-D segmentation net at 128^3 is accounted in well under a second and with no
activation memory; the model itself is left untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real

import torch
from torch import nn

__all__ = ["count_params", "count_flops", "pt_score", "FlopCount", "LayerFlops"]

_CONVENTIONS = ("eq5", "macs")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_COUNTED = _CONV + _CONV_T + (nn.Linear,)

BiasTerm = bool | Callable[[str, nn.Module], bool]


def _check_sparsity(sparsity, model: nn.Module) -> dict[str, nn.Parameter]:
    """Validate the duck-typed sparsity object; return {target name: parameter}."""
    missing = [m for m in ("target_names", "weight_mask", "density") if not hasattr(sparsity, m)]
    if missing:
        raise TypeError(
            f"sparsity must provide target_names, weight_mask(name) and density(name) "
            f"(e.g. sparsefuse.DynamicSparsity); {type(sparsity).__name__} lacks {', '.join(missing)}"
        )
    params = dict(model.named_parameters())
    targets = {}
    for name in sparsity.target_names:
        if name not in params:
            raise ValueError(
                f"sparsity targets {name!r}, which is not a parameter of this model; build the "
                f"sparsity on the same model object (names must match model.named_parameters())"
            )
        targets[name] = params[name]
    return targets


def count_params(model: nn.Module, sparsity=None) -> int:
    """Parameter count of ``model`` under ``sparsity`` (paper eq. 4).

    Every parameter not targeted by ``sparsity`` counts in full, whatever its
    values (a zero-initialised bias still counts: this is a parameter count, not a
    non-zero count). Each targeted weight counts its active elements, i.e.
    active groups x group size = ``sparsity.weight_mask(name).sum()``. Shared
    (tied) parameters count once.

    Args:
        model: any module; may live on the ``meta`` device.
        sparsity (DynamicSparsity | None): the sparsifier whose masks apply (any object with
            ``target_names``, ``weight_mask`` and ``density``, see the module docstring), or None for dense.

    Returns:
        The number of parameters, as an int.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = _check_sparsity(sparsity, model) if sparsity is not None else {}
    total = 0
    for name, p in model.named_parameters():
        if name not in targets:
            total += p.numel()
            continue
        mask = sparsity.weight_mask(name)
        if tuple(mask.shape) != tuple(p.shape):
            raise ValueError(
                f"sparsity.weight_mask({name!r}) has shape {tuple(mask.shape)} but the weight has "
                f"shape {tuple(p.shape)}; the mask must cover the weight element by element"
            )
        total += int(mask.sum())
    return total


@dataclass(frozen=True)
class LayerFlops:
    """One layer call as counted by :func:`count_flops`.

    Attributes:
        name: the module's qualified name ("" for the root module).
        kind: the module's class name (e.g. "DepthShiftConv3d").
        input_shape, output_shape: shapes seen by the forward hook, batch included.
        density: fraction of the layer's input-channel term kept (1.0 if untargeted).
        bias_term: whether eq. 5's "+1" was charged (always False under "macs").
        flops: this call's FLOPs.
    """

    name: str
    kind: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    density: float
    bias_term: bool
    flops: float


class FlopCount(float):
    """Total FLOPs as a ``float``, with the per-layer breakdown attached.

    Behaves as the plain total in arithmetic, comparisons, formatting and JSON.

    Attributes:
        layers: tuple of :class:`LayerFlops`, in call order (a module called twice
            appears twice).
        convention: "eq5" or "macs".
    """

    layers: tuple[LayerFlops, ...]
    convention: str

    def __new__(cls, layers: Sequence[LayerFlops], convention: str) -> FlopCount:
        self = super().__new__(cls, math.fsum(layer.flops for layer in layers))
        self.layers = tuple(layers)
        self.convention = convention
        return self

    def __reduce__(self):
        # float's default reduce would call __new__(cls, total); rebuild from the layers.
        return (FlopCount, (self.layers, self.convention))

    def __repr__(self) -> str:
        return f"FlopCount({float(self)!r}, convention={self.convention!r}, layers={len(self.layers)})"


def _layer_flops(
    module: nn.Module,
    in_shape: torch.Size,
    out_shape: torch.Size,
    density: float,
    convention: str,
    bias: bool,
) -> float:
    """FLOPs of one call of a conv / transposed conv / linear layer.

    eq5:  (2 * K * C_in/groups * density + b) * C_out * V_out * batch
    macs: 2 * density * MACs, where a conv does K * C_in/groups * C_out * V_out and a
          transposed conv K * C_in * C_out/groups * V_in multiply-accumulates (per sample).
    """
    b = 1.0 if bias else 0.0
    if isinstance(module, nn.Linear):
        c_in, c_out = module.in_features, module.out_features
        rows = math.prod(out_shape[:-1])  # batch and any other leading dims
        if convention == "eq5":
            return (2.0 * c_in * density + b) * c_out * rows
        return 2.0 * c_in * c_out * density * rows
    ndim = len(module.kernel_size)
    k = math.prod(module.kernel_size)
    c_in, c_out, g = module.in_channels, module.out_channels, module.groups
    # Conv layers also accept unbatched (C, *spatial) input: batch = product of
    # whatever precedes the channel axis (1 if nothing does).
    batch = math.prod(out_shape[: -ndim - 1])
    v_out = math.prod(out_shape[-ndim:])
    if convention == "eq5":
        return (2.0 * k * (c_in // g) * density + b) * c_out * v_out * batch
    if isinstance(module, _CONV_T):
        # Each input voxel is scattered through K taps into C_out/groups channels.
        v_in = math.prod(in_shape[-ndim:])
        return 2.0 * k * c_in * (c_out // g) * v_in * batch * density
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


def count_flops(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    sparsity=None,
    convention: str = "eq5",
    bias_term: BiasTerm | None = None,
) -> FlopCount:
    """FLOPs of one forward pass of ``model`` on an input shaped like ``example_input``.

    Counted layers: every call of an ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``
    or ``nn.Linear`` module, subclasses included (e.g. ``DepthShiftConv3d``).
    Everything else (norms, activations, pooling, shifts, functional ops, ...)
    is free, as in the paper. The count is for the *given* input, batch
    included: pass batch 1 (``(1, C, 128, 128, 128)``) for the paper's per-sample
    numbers. The forward runs in the model's current train/eval mode; the mode
    matters only for models whose forward branches on ``self.training``.

    Conventions, per layer call, with K the kernel volume, V_out / V_in the
    output / input voxel count per sample and d the layer's density (1 if the
    layer's weight is not targeted, else ``sparsity.density("<module>.weight")``):

    * ``"eq5"`` (paper eq. 5/6 as written): conv and transposed conv
      ``(2 K C_in/groups d + b) C_out V_out``; linear ``(2 C_in d + b) C_out``;
      times the batch (and, for linear, any other leading dims). A transposed
      conv is charged at its *output* (upsampled) size, as the paper did, which
      overstates its real cost by the stride volume.
    * ``"macs"``: twice the true multiply-accumulates, no bias adds: conv
      ``2 K C_in/groups C_out V_out d``, transposed conv ``2 K C_in C_out/groups V_in d``,
      linear ``2 C_in C_out d``.

    Args:
        model: module to account; its parameters, buffers and mode are not changed.
        example_input: a tensor (only its shape, dtype and strides are used) or a
            shape tuple (dtype taken from the model's parameters).
        sparsity (DynamicSparsity | None): the sparsifier whose masks apply (any object with
            ``target_names``, ``weight_mask`` and ``density``, see the module docstring), or None for dense.
        convention: "eq5" (default) or "macs".
        bias_term: eq5's "+1" term b. None (default) or True charges it on every
            layer, as eq. 5 is written, whether or not the layer has a bias; False
            on none; a callable ``(qualified module name, module) -> bool`` picks
            layers (the E2ENet authors' numbers charge it only on fusion convs).
            Must be None under "macs".

    Returns:
        :class:`FlopCount`: a float equal to the total FLOPs, with ``.layers``
        giving the per-call breakdown.

    Raises:
        ValueError: unknown convention, bad shape, sparsity naming unknown weights
            or densities outside [0, 1].
        TypeError: wrong argument types.
        RuntimeError: the forward cannot run on the meta device (data-dependent ops).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be one of {_CONVENTIONS}, got {convention!r}")
    if bias_term is None:
        bias_term = convention == "eq5"
    elif convention == "macs":
        raise ValueError(
            "bias_term only applies to convention='eq5' (the 'macs' convention counts true "
            "multiply-accumulates, no bias adds); leave bias_term=None"
        )
    elif not (isinstance(bias_term, bool) or callable(bias_term)):
        raise TypeError(
            f"bias_term must be a bool or a callable (module name, module) -> bool, got {type(bias_term).__name__}"
        )
    targets = _check_sparsity(sparsity, model) if sparsity is not None else {}
    x = _meta_input(example_input, model)

    records: list[LayerFlops] = []

    def make_hook(name: str, module: nn.Module):
        weight_name = f"{name}.weight" if name else "weight"
        density = 1.0
        if weight_name in targets:
            density = float(sparsity.density(weight_name))
            if not 0.0 <= density <= 1.0:
                raise ValueError(f"sparsity.density({weight_name!r}) must be in [0, 1], got {density}")
        charge_bias = bias_term(name, module) if callable(bias_term) else bias_term

        def hook(mod, inputs, output):
            in_shape, out_shape = inputs[0].shape, output.shape
            flops = _layer_flops(mod, in_shape, out_shape, density, convention, bool(charge_bias))
            records.append(
                LayerFlops(
                    name, type(mod).__name__, tuple(in_shape), tuple(out_shape), density, bool(charge_bias), flops
                )
            )

        return hook

    # One meta stand-in per tensor, shared by every name of a tied tensor
    # (functional_call rejects distinct values for tied names).
    stand_ins: dict[int, torch.Tensor] = {}
    meta_state = {
        name: stand_ins.setdefault(id(t), torch.empty_like(t, device="meta"))
        for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
    }
    handles = [
        m.register_forward_hook(make_hook(name, m)) for name, m in model.named_modules() if isinstance(m, _COUNTED)
    ]
    try:
        with torch.no_grad():
            torch.func.functional_call(model, meta_state, (x,))
    except (RuntimeError, NotImplementedError) as e:
        raise RuntimeError(
            f"count_flops runs the forward on the meta device and it failed there ({e}); "
            f"forwards that read tensor values (e.g. .item(), data-dependent shapes) cannot be "
            f"accounted this way"
        ) from e
    finally:
        for h in handles:
            h.remove()
    return FlopCount(records, convention)


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, Real):
            raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v}")


def pt_score(
    mdice: float,
    params: float,
    flops: float,
    *,
    mdice_max: float,
    params_min: float,
    flops_min: float,
    alpha1: float = 1.0,
    alpha2: float = 0.5,
) -> float:
    """Performance trade-off score (paper eq. 7).

    ``PT = alpha1 * mdice / mdice_max + alpha2 * (params_min / params + flops_min / flops)``

    The references are the best mDice and the smallest Params and FLOPs among the
    compared methods. Each ratio is unit-free, so use the same units within a pair
    (e.g. mDice in %, Params in M, FLOPs in G, as the paper's tables).

    Example (paper Table 1, E2ENet s=0.8 on AMOS): ``pt_score(90.3, 9.44, 778.74,
    mdice_max=90.5, params_min=7.64, flops_min=391.03)`` = 1.65.
    """
    _check_positive(params=params, flops=flops, mdice_max=mdice_max, params_min=params_min, flops_min=flops_min)
    for name, v in (("mdice", mdice), ("alpha1", alpha1), ("alpha2", alpha2)):
        if isinstance(v, bool) or not isinstance(v, Real):
            raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    return float(alpha1 * mdice / mdice_max + alpha2 * (params_min / params + flops_min / flops))
