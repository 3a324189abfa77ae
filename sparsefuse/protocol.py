"""What accounting, compaction and serialization read from a sparsifier: the `Sparsity` protocol, checked in one
place (`target_weight_masks`)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from .masks import Granularity

__all__ = ["Sparsity", "target_weight_masks"]

_MEMBERS = ("target_names", "masks", "weight_mask", "granularity_of")


@runtime_checkable
class Sparsity(Protocol):
    """A set of masked weights, as [`count_params`][sparsefuse.count_params],
    [`count_flops`][sparsefuse.count_flops], [`compact`][sparsefuse.compact],
    [`compaction_plan`][sparsefuse.compaction_plan] and [`sparse_state_dict`][sparsefuse.sparse_state_dict] read
    it. [`DynamicSparsity`][sparsefuse.DynamicSparsity] is one; fixed masks from elsewhere need only these four
    members, e.g. weight-shaped masks with ``granularity_of`` returning ``sparsefuse.masks.Element()`` (then
    ``masks`` and ``weight_mask`` give the same tensors).

    Attributes:
        target_names: the masked weights' names, as ``model.named_parameters()`` gives them.
        masks: {target name: bool group mask, in ``granularity_of(name).groups_shape(weight.shape)``}.
    """

    @property
    def target_names(self) -> tuple[str, ...]: ...

    @property
    def masks(self) -> Mapping[str, Tensor]: ...

    def weight_mask(self, name: str) -> Tensor:
        """Bool tensor shaped like the weight ``name``: True where the weight is active.

        Args:
            name: one of ``target_names``.
        """

    def granularity_of(self, name: str) -> Granularity:
        """The granularity (bound to the weight) that maps ``masks[name]`` onto the weight.

        Args:
            name: one of ``target_names``.
        """


def target_weight_masks(model: nn.Module, sparsity: Sparsity) -> dict[str, Tensor]:
    """{target name: weight-shaped bool mask} of ``sparsity``, checked against ``model``.

    Every function that takes a sparsity checks it here, so each refusal reads the same.

    Args:
        model: the model the masks are for (its parameter names must include every target name).
        sparsity: any [`Sparsity`][sparsefuse.protocol.Sparsity].

    Raises:
        TypeError: ``sparsity`` lacks a member of [`Sparsity`][sparsefuse.protocol.Sparsity].
        ValueError: it names a weight ``model`` does not have, or a mask is not shaped like its weight.
    """
    missing = [m for m in _MEMBERS if inspect.getattr_static(sparsity, m, None) is None]
    if missing:
        raise TypeError(
            f"sparsity must provide target_names, masks, weight_mask(name) and granularity_of(name) (the "
            f"sparsefuse.Sparsity protocol, e.g. a sparsefuse.DynamicSparsity); {type(sparsity).__name__} lacks "
            f"{', '.join(missing)}"
        )
    params = dict(model.named_parameters())
    unknown = [name for name in sparsity.target_names if name not in params]
    if unknown:
        raise ValueError(
            f"sparsity targets {unknown}, which are not parameters of this model; pass the model the sparsity was "
            f"built on (names must match model.named_parameters(); for a torch.compile'd model, its `_orig_mod`)"
        )
    masks = {}
    for name in sparsity.target_names:
        mask = sparsity.weight_mask(name)
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(
                f"sparsity.weight_mask({name!r}) has shape {tuple(mask.shape)} but the weight has shape "
                f"{tuple(params[name].shape)}; the mask must cover the weight element by element"
            )
        masks[name] = mask
    return masks
