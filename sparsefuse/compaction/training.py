"""Compacted training: between two topology updates, train smaller layers that hold only the live weights.

Masks change only at topology updates, so for a whole interval a layer whose masks leave channels dead can be
trained as a [`CompactLayer`][sparsefuse.compaction.CompactLayer] whose smaller weight is a Parameter: the gather,
the smaller layer and the scatter run forward and backward, and the optimizer updates the smaller weight with the
matching slice of its state. At each update everything goes back into the full masked model, the sparsifier updates
the masks there as it always does, and the layers are cut again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..distributed import unwrap_model
from ..protocol import target_weight_masks
from ..reports import UpdateReport
from ..sparsity import DynamicSparsity
from .modules import CompactLayer, LayerCut, WeightBlock
from .plan import MIN_DEAD_INPUTS, MIN_DEAD_OUTPUTS, LayerCompaction, module_parents, plan_layer, target_layers

__all__ = ["CompactedTraining", "TrainableCompactLayer"]

# Optimizers whose state is kept per weight: the state of a slice of a weight is the slice of its state, so the live
# block trains alone exactly as it does inside the full weight. LBFGS (a flat history), Adafactor (row and column
# factors) and SparseAdam keep their state otherwise.
_ELEMENTWISE_OPTIMIZERS = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adamax,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
)


class TrainableCompactLayer(CompactLayer):
    """A [`CompactLayer`][sparsefuse.compaction.CompactLayer] that trains as the masked layer it stands for.

    Built by [`CompactedTraining`][sparsefuse.compaction.CompactedTraining]. The smaller layer's weight is a
    Parameter holding the live block of the full weight. The full layer's bias is shared, not copied: the smaller
    layer adds it when it computes every output channel; otherwise the output starts as the bias and the computed
    channels are added on top, so every bias entry, dead channels' included, gets the gradient it gets in the masked
    layer.

    Args:
        cut: the layer cut down to its kept channels.
        weight: the live block of the full weight, laid out like it.
        bias: the full layer's bias Parameter, or None.
    """

    def __init__(self, cut: LayerCut, weight: nn.Parameter, bias: nn.Parameter | None):
        layer = cut.smaller_layer(bias=False)
        layer.weight = weight
        if cut.out_index is None:
            layer.bias = bias
        super().__init__(layer, cut.channel_dim, cut.in_index, cut.out_index, None, cut.shift_plan, cut.shift_dim)
        self.register_parameter("bias", bias if cut.out_index is not None else None)
        self.out_channels = cut.out_channels

    def _full_width(self, y: Tensor) -> Tensor:
        shape = list(y.shape)
        shape[self.channel_dim] = self.out_channels
        layout = _memory_format(y)
        if self.bias is None:
            out = torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=layout).zero_()
        else:
            fill = self.bias.to(y.dtype).reshape(-1, *([1] * (-self.channel_dim - 1)))
            out = fill.expand(shape).clone(memory_format=layout)
        return out.index_add_(self.channel_dim, self.out_index, y)

    def extra_repr(self) -> str:
        read = "all" if self.in_index is None else len(self.in_index)
        made = "all" if self.out_index is None else f"{len(self.out_index)} of {self.out_channels}"
        return f"reads {read} input channels, computes {made} output channels, trainable"


def _memory_format(t: Tensor) -> torch.memory_format:
    """channels_last (channels_last_3d) for a 4-D (5-D) tensor laid out so, else contiguous: tensors made here keep
    the model's layout, which decides the speed of its convolutions."""
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    if channels_last is not None and not t.is_contiguous() and t.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


def _weight_shaped(value: object, weight: Tensor) -> bool:
    """Optimizer state held per weight entry (momentum, moments), as DynamicSparsity masks it."""
    return isinstance(value, Tensor) and value.shape == weight.shape


@dataclass
class _CompactedLayer:
    """One target layer of the training model swapped for a TrainableCompactLayer."""

    full: nn.Module  # the training model's full layer, put back on expansion
    compact: TrainableCompactLayer
    weight: nn.Parameter  # the full weight, the masked model's
    block: WeightBlock
    keep: Tensor | None  # 0/1 over the block; None when the whole block is active

    @property
    def block_weight(self) -> nn.Parameter:
        return self.compact.layer.weight

    def to_block(self, full: Tensor) -> Tensor:
        return self.block.gather(full).contiguous(memory_format=_memory_format(self.weight))

    def to_full(self, block: Tensor) -> Tensor:
        # Off the block every weight is inactive, so its state there is 0, as the sparsifier leaves it.
        full = torch.zeros_like(self.weight, dtype=block.dtype)
        self.block.scatter(block, into=full)
        return full


@dataclass(frozen=True)
class _Swap:
    """A parameter taking another's place in the optimizer, and how each weight-shaped state entry converts."""

    new: nn.Parameter
    convert: Callable[[Tensor], Tensor]


class CompactedTraining:
    """Train a masked model with its channel-sparse layers cut down to their live channels between topology updates.

    Between two updates of ``sparsity`` the masks do not change, so every target layer with enough dead channels
    (see [`compact`][sparsefuse.compaction.compact]: ``min_dead_inputs``, ``min_dead_outputs``) trains as a
    [`TrainableCompactLayer`][sparsefuse.compaction.TrainableCompactLayer]: a gather of the live input channels, a
    smaller layer whose weight is a Parameter holding the live block of the full weight, and a scatter of the live
    outputs back to full width. The optimizer trains that block in place of the full weight: in its param groups
    the block takes the full weight's place (same group, same position, same hyperparameters) and its state is the
    block of the full weight's state (momentum, Adam's moments; step counts as they are). Layers below the
    thresholds, and layers compaction does not know, train as they are.

    At each topology update the blocks and their state go back into the full weights and the optimizer, the
    sparsifier updates the masks there exactly as in masked training, and the layers are cut again from the new
    masks. A scorer or growth that reads gradients (``growth="gradient"``) needs the gradient of the inactive
    weights, so the step before each update runs on the full layers.

    What stays exact: after every ``step()``, ``model`` (the masked model) holds the weights masked training would
    hold, and ``optimizer.state_dict()`` returns the full state masked training would have, in the same order, so
    checkpoints are those of masked training and load into either. Weights, masks and optimizer state equal
    masked training's to float rounding: the smaller layers add the same nonzero terms in another order. Gradient
    clipping by norm sees the active weights' gradients only (masked training also counts the inactive weights'
    gradients, which its ``step()`` then discards).

    Life cycle: build it after the model, optimizer and sparsifier (and after loading a checkpoint into them), run
    ``training.model`` forward and backward, call ``step()`` instead of ``sparsity.step()`` after every
    ``optimizer.step()``, and save ``model``, ``optimizer`` and ``sparsity`` as usual. ``close()`` (or leaving a
    ``with`` block) hands the optimizer back its full weights for good. Loading a checkpoint into ``model``, the
    optimizer or the sparsifier while this runs puts the full weights back first, so the loads land as in masked
    training, in any order; the step after them runs on the full layers, and its ``step()`` cuts them again.

    Args:
        model: the model ``sparsity`` masks, not wrapped in DDP or DataParallel: the parameters change at every
            update, while DDP fixes them when it is built. Move it to its device before building this.
        sparsity: the [`DynamicSparsity`][sparsefuse.DynamicSparsity] over ``model``, built with the optimizer; an
            SGD, Adam, AdamW, NAdam, RAdam, Adamax, RMSprop, Adagrad or Adadelta, whose state is kept per weight.
        min_dead_inputs: as for [`compact`][sparsefuse.compaction.compact].
        min_dead_outputs: as for [`compact`][sparsefuse.compaction.compact].

    Attributes:
        model: the module to train: a copy of ``model`` that shares every parameter and buffer with it and holds
            the compacted layers. It has its own train/eval flags (copied from ``model`` when built). Save
            ``model``, not this copy, whose compacted layers have other names.
        sparsity: the sparsifier.
        optimizer: the sparsifier's optimizer.

    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: DynamicSparsity,
        min_dead_inputs: float = MIN_DEAD_INPUTS,
        min_dead_outputs: float = MIN_DEAD_OUTPUTS,
    ):
        _check_arguments(model, sparsity, min_dead_inputs, min_dead_outputs)
        self.sparsity, self.optimizer = sparsity, sparsity.optimizer
        self.min_dead_inputs, self.min_dead_outputs = float(min_dead_inputs), float(min_dead_outputs)
        self._masked_model = model
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
        self.model: nn.Module = copy.deepcopy(model, shared)
        self._needs_dense_gradient = getattr(sparsity.scorer, "needs_grad", False) or getattr(
            sparsity.growth, "needs_grad", False
        )
        self._layers: dict[str, _CompactedLayer] = {}
        self._plan: dict[str, LayerCompaction] = {}
        self._compacted, self._closed = False, False
        self._settled_at = sparsity.step_count
        layers = {id(m): m for m, _ in target_layers(model, target_weight_masks(model, sparsity)).values()}
        self._handles = [
            self.optimizer.register_state_dict_post_hook(self._full_optimizer_state),
            self.optimizer.register_load_state_dict_pre_hook(self._before_load),
            sparsity.register_load_state_dict_pre_hook(self._before_load),
            *(layer.register_load_state_dict_post_hook(self._after_model_load) for layer in layers.values()),
        ]
        self._settle()

    # ----------------------------------------------------------------------------------------------- training
    def step(self) -> UpdateReport | None:
        """Call once after every ``optimizer.step()``, instead of ``sparsity.step()``, which it calls.

        Re-zeroes the inactive weights inside the compacted blocks and their optimizer state, writes the blocks into
        the masked model's weights, and on an update step puts the full weights back into the optimizer for the
        sparsifier's update, then cuts the layers again.

        Returns:
            What ``sparsity.step()`` returns: the [`UpdateReport`][sparsefuse.UpdateReport] on an update step, else
            None.

        Raises:
            RuntimeError: after ``close()``; or the sparsifier stepped without this (``sparsity.step()`` called
                directly), so the compacted layers no longer follow its masks; and what ``sparsity.step()`` raises.
        """
        if self._closed:
            raise RuntimeError(
                "this CompactedTraining is closed: the optimizer trains the full weights again; call sparsity.step() "
                "and train the masked model, or build a new CompactedTraining"
            )
        if self._compacted:
            if self.sparsity.step_count != self._settled_at:
                raise RuntimeError(
                    f"the sparsifier is at step {self.sparsity.step_count} but the compacted layers were cut at step "
                    f"{self._settled_at}: sparsity.step() was called directly. Call training.step() instead, which "
                    f"calls sparsity.step() and keeps the compacted layers in step with the masks"
                )
            self._mask_and_write_back()
            if self._update_due(self.sparsity.step_count + 1):
                self._expand(write_weights=False)  # just written
        report = self.sparsity.step()
        self._settle()
        return report

    @property
    def compacted(self) -> bool:
        """Whether ``model`` runs its compacted layers now; False for a step on the full layers (before the update
        of a gradient policy, after a load) and after ``close()``."""
        return self._compacted

    @property
    def plan(self) -> dict[str, LayerCompaction]:
        """{module name: [`LayerCompaction`][sparsefuse.compaction.LayerCompaction]} of every target layer as last
        cut: which layers train compacted and with how many channels, or why not."""
        return dict(self._plan)

    def close(self) -> None:
        """End compacted training: the optimizer gets its full weights and their state back for good, ``model`` runs
        its full layers, and the hooks on the optimizer, the sparsifier and the model are removed. Train on with
        ``sparsity.step()``."""
        if self._closed:
            return
        self._expand()
        for handle in self._handles:
            handle.remove()
        self._closed = True

    def __enter__(self) -> CompactedTraining:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        cut = sum(p.compacted for p in self._plan.values())
        now = "closed" if self._closed else "compacted" if self._compacted else "on the full layers"
        return f"CompactedTraining({cut} of {len(self._plan)} target layers compacted, {now})"

    # ------------------------------------------------------------------------------------------ life cycle
    def _update_due(self, step: int) -> bool:
        schedule = self.sparsity.schedule
        return schedule is not None and schedule.is_update(step)

    def _settle(self) -> None:
        """Compacted, unless the next step must give the full layers' gradients to a gradient policy."""
        dense_next = self._needs_dense_gradient and self._update_due(self.sparsity.step_count + 1)
        if dense_next and self._compacted:
            self._expand()
        elif not dense_next and not self._compacted:
            self._compact()
        self._settled_at = self.sparsity.step_count

    @torch.no_grad()
    def _mask_and_write_back(self) -> None:
        state = self.optimizer.state
        for layer in self._layers.values():
            block = layer.block_weight
            if layer.keep is not None:  # grouped convs and finer masks leave inactive weights inside the block
                block.mul_(layer.keep)
                for value in state.get(block, {}).values():
                    if _weight_shaped(value, block):
                        value.mul_(layer.keep)
            layer.block.scatter(block, into=layer.weight)

    @torch.no_grad()
    def _compact(self) -> None:
        masked = self._masked_model
        masks = target_weight_masks(masked, self.sparsity)
        parents = module_parents(masked)
        copies = dict(self.model.named_modules(remove_duplicate=False))
        self._plan, layers = {}, {}
        for name, (module, mask) in target_layers(masked, masks).items():
            plan, in_sel, out_sel = plan_layer(
                name, module, mask, parents.get(name), self.min_dead_inputs, self.min_dead_outputs
            )
            self._plan[name] = plan
            if plan.compacted:
                layers[name] = _cut(copies[name], in_sel, out_sel, mask)
        _swap_in_optimizer(self.optimizer, {id(c.weight): _Swap(c.block_weight, c.to_block) for c in layers.values()})
        _replace_children(self.model, {id(c.full): c.compact for c in layers.values()})
        self._layers, self._compacted = layers, True

    @torch.no_grad()
    def _expand(self, write_weights: bool = True) -> None:
        layers, self._layers = self._layers, {}
        for layer in layers.values():
            if write_weights:
                layer.block.scatter(layer.block_weight, into=layer.weight)
            layer.full.train(layer.compact.training)  # set on the compacted layer while the full one was out
        _swap_in_optimizer(self.optimizer, {id(c.block_weight): _Swap(c.weight, c.to_full) for c in layers.values()})
        _replace_children(self.model, {id(c.compact): c.full for c in layers.values()})
        self._compacted = False

    # ------------------------------------------------------------------------------------------------ hooks
    def _full_optimizer_state(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict | None:
        """optimizer.state_dict() with every block's state written into a full-size tensor, as masked training has
        it; the optimizer itself is left as it is."""
        by_block = {id(c.block_weight): c for c in self._layers.values()}
        if not by_block:
            return None
        state = dict(state_dict["state"])
        params = (p for group in optimizer.param_groups for p in group["params"])
        for index, param in enumerate(params):  # the numbering optimizer.state_dict() gives the parameters
            layer = by_block.get(id(param))
            if layer is not None and index in state:
                state[index] = {k: layer.to_full(v) if _weight_shaped(v, param) else v for k, v in state[index].items()}
        return {**state_dict, "state": state}

    def _before_load(self, owner: object, state: Mapping) -> None:
        self._expand()

    def _after_model_load(self, module: nn.Module, incompatible_keys: object) -> None:
        self._expand(write_weights=False)  # the loaded weights are the ones to keep


def _cut(full: nn.Module, in_sel: Tensor, out_sel: Tensor, mask: Tensor) -> _CompactedLayer:
    cut = LayerCut(full, in_sel, out_sel)
    weight = full.weight
    block = cut.block.gather(weight).contiguous(memory_format=_memory_format(weight))
    block_weight = nn.Parameter(block, requires_grad=weight.requires_grad)
    keep = cut.block.gather(mask.to(weight.device))
    weight.grad = None  # the full weight gets no gradient while compacted; an old one would only hold memory
    return _CompactedLayer(
        full,
        TrainableCompactLayer(cut, block_weight, full.bias).train(full.training),
        weight,
        cut.block,
        None if bool(keep.all()) else keep.to(weight.dtype),
    )


def _swap_in_optimizer(optimizer: torch.optim.Optimizer, swaps: dict[int, _Swap]) -> None:
    """Put each new parameter in its old one's place in the param groups and its converted state under its key,
    keeping the order of ``optimizer.state``, which ``optimizer.state_dict()`` follows."""
    if not swaps:
        return
    for group in optimizer.param_groups:
        params = group["params"]
        for position, param in enumerate(params):
            if id(param) in swaps:
                params[position] = swaps[id(param)].new
    entries = list(optimizer.state.items())
    optimizer.state.clear()
    for param, values in entries:
        swap = swaps.get(id(param))
        if swap is None:
            optimizer.state[param] = values
        else:
            optimizer.state[swap.new] = {
                key: swap.convert(value) if _weight_shaped(value, param) else value for key, value in values.items()
            }


def _replace_children(root: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Replace every reference to a module in ``replacements`` (a module registered under two names is one layer)."""
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if id(child) in replacements:
                setattr(module, name, replacements[id(child)])


def _check_arguments(model: object, sparsity: object, min_dead_inputs: object, min_dead_outputs: object) -> None:
    if not isinstance(sparsity, DynamicSparsity):
        raise TypeError(
            f"sparsity must be a sparsefuse.DynamicSparsity, whose topology updates compacted training follows; got "
            f"{type(sparsity).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if unwrap_model(model) is not model:
        raise ValueError(
            f"model is wrapped in {type(model).__name__}: compacted training swaps parameters at every topology "
            f"update, while DDP and DataParallel fix them when they are built. Train the masked model under DDP, or "
            f"pass the unwrapped model in a single process"
        )
    if model is not sparsity.model:
        raise ValueError(
            "model is not the model the sparsifier masks: pass the model given to DynamicSparsity(model, ...)"
        )
    optimizer = sparsity.optimizer
    if optimizer is None:
        raise ValueError(
            "the sparsifier has no optimizer, so there is nothing to train: build it as "
            "DynamicSparsity(model, optimizer, ...)"
        )
    if not isinstance(optimizer, _ELEMENTWISE_OPTIMIZERS):
        names = ", ".join(cls.__name__ for cls in _ELEMENTWISE_OPTIMIZERS)
        raise TypeError(
            f"compacted training does not support {type(optimizer).__name__}: it trains the live block of a weight "
            f"with the block of its optimizer state, which is right only for optimizers that keep their state per "
            f"weight ({names}). Train the masked model instead"
        )
    for name, value in (("min_dead_inputs", min_dead_inputs), ("min_dead_outputs", min_dead_outputs)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0 (0 compacts every dead channel), got {value!r}")
    masks = target_weight_masks(model, sparsity)
    layers = target_layers(model, masks)
    if "" in layers:
        raise ValueError(
            "model is itself a masked layer, which compacted training would have to replace: wrap it, e.g. "
            "nn.Sequential(layer), and build the optimizer and sparsifier on the wrapper"
        )
    holders: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), []).append(module_name)
    for name, (module, _) in layers.items():
        shared_with = holders[id(module.weight)]
        if len(shared_with) > 1:
            raise ValueError(
                f"the weight of {name!r} is shared by the modules {shared_with}: compacting one of them would untie "
                f"it. Leave it out of the sparsifier's targets"
            )
