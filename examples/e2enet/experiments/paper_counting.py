"""The E2ENet paper's counting rules on top of sparsefuse's accounting: eq. 5/6 FLOPs and the eq. 7 PT score.

``sparsefuse.count_flops`` counts the true cost (twice the multiply-accumulates) and records every layer call
with its name, shapes and density. The paper counts otherwise, and :func:`eq5_flops` recomputes each recorded
call its way:

* conv and transposed conv ``(2 K C_in/groups d + b) C_out V_out``, linear ``(2 C_in d + b) C_out``, times the
  batch (and, for linear, any other leading dims), with K the kernel volume, V_out the output voxels per sample
  and d the layer's density;
* a transposed conv is charged at its *output* (upsampled) size, which overstates its real cost by the stride
  volume;
* ``b`` is eq. 5's "+1" term, charged whether or not the layer has a bias; the authors' published numbers charge
  it on the fusion convs only (``e2enet.nets.e2enet.is_fusion_conv``).

:func:`pt_score` is eq. 7, the performance trade-off score of the paper's tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from numbers import Real

import torch
from torch import nn

import sparsefuse as sf
from sparsefuse.accounting import FlopCount, LayerFlops

__all__ = ["Eq5LayerFlops", "eq5_flops", "pt_score"]

BiasTerm = bool | Callable[[str, nn.Module], bool]


@dataclass(frozen=True)
class Eq5LayerFlops(LayerFlops):
    """A layer call counted by eq. 5: ``flops`` is eq. 5's, ``bias_term`` whether its "+1" was charged."""

    bias_term: bool = False


def _eq5(module: nn.Module, out_shape: Sequence[int], density: float, bias: bool) -> float:
    b = 1.0 if bias else 0.0
    if isinstance(module, nn.Linear):
        rows = math.prod(out_shape[:-1])  # batch and any other leading dims
        return (2.0 * module.in_features * density + b) * module.out_features * rows
    ndim = len(module.kernel_size)
    k = math.prod(module.kernel_size)
    batch = math.prod(out_shape[: -ndim - 1])  # 1 for an unbatched (C, *spatial) input
    v_out = math.prod(out_shape[-ndim:])
    return (2.0 * k * (module.in_channels // module.groups) * density + b) * module.out_channels * v_out * batch


def eq5_flops(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    sparsity: sf.Sparsity | None = None,
    bias_term: BiasTerm = True,
) -> FlopCount:
    """FLOPs of one forward pass by the paper's eq. 5/6 (the rule is in the module docstring).

    Args:
        model: as for ``sparsefuse.count_flops``, whose layer records this recounts.
        example_input: a tensor or a shape tuple, batch included (batch 1 gives the paper's per-sample numbers).
        sparsity: the masks that apply (a ``sparsefuse.Sparsity``), or None for dense.
        bias_term: eq. 5's "+1": True (as eq. 5 is written) charges it on every layer, False on none, a callable
            ``(qualified module name, module) -> bool`` on the layers it picks (called once per module).

    Returns:
        A ``sparsefuse.accounting.FlopCount`` whose ``layers`` are :class:`Eq5LayerFlops`.
    """
    if not (isinstance(bias_term, bool) or callable(bias_term)):
        raise TypeError(
            f"bias_term must be a bool or a callable (module name, module) -> bool, got {type(bias_term).__name__}"
        )
    modules = dict(model.named_modules())
    charged: dict[str, bool] = {}
    layers = []
    for layer in sf.count_flops(model, example_input, sparsity).layers:
        module = modules[layer.name]
        if layer.name not in charged:
            charged[layer.name] = bool(bias_term(layer.name, module) if callable(bias_term) else bias_term)
        bias = charged[layer.name]
        flops = _eq5(module, layer.output_shape, layer.density, bias)
        layers.append(Eq5LayerFlops(**{**asdict(layer), "flops": flops, "bias_term": bias}))
    return FlopCount(layers)


def _check_real(name: str, value, strictly_positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (strictly_positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'>' if strictly_positive else '>='} 0, got {value}")


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

    The references are the best mDice and the smallest Params and FLOPs among the compared methods. Each ratio
    is unit-free, so use the same units within a pair (e.g. mDice in %, Params in M, FLOPs in G, as the paper's
    tables).

    Example (paper Table 1, E2ENet s=0.8 on AMOS): ``pt_score(90.3, 9.44, 778.74, mdice_max=90.5,
    params_min=7.64, flops_min=391.03)`` = 1.65.
    """
    for name, value in (
        ("params", params),
        ("flops", flops),
        ("mdice_max", mdice_max),
        ("params_min", params_min),
        ("flops_min", flops_min),
    ):
        _check_real(name, value, strictly_positive=True)
    for name, value in (("mdice", mdice), ("alpha1", alpha1), ("alpha2", alpha2)):
        _check_real(name, value, strictly_positive=False)
    return float(alpha1 * mdice / mdice_max + alpha2 * (params_min / params + flops_min / flops))
