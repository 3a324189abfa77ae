"""Granularities: how a weight tensor is cut into *groups*, the units a mask switches on and off.

A group mask is a bool tensor in the granularity's own (smaller) shape; `expand` turns it into something that
broadcasts against the weight, `group_sum` folds a weight-shaped tensor back into group shape. Everything the
sparsifier does (scoring, growth, masking) goes through these three methods, so a new granularity is one subclass.

Weight layouts this module knows: ``Linear`` (out, in), ``ConvNd`` (out, in/groups, *k),
``ConvTransposeNd`` (in, out/groups, *k). "dim0, dim1" below means the first two weight dims whatever they are.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from .registry import resolve_policy

__all__ = [
    "Granularity",
    "Element",
    "Kernel",
    "Channel",
    "InputChannel",
    "InputChannelBlocks",
    "Block",
    "PooledBlock",
    "GRANULARITIES",
    "get_granularity",
]


class Granularity(ABC):
    """Base class. Subclasses define the group shape and the two mappings between group and weight space.

    A granularity may also limit which groups are active together (``confines_growth`` True, and ``confine``): the
    sparsifier then asks it to rank the candidates of the first mask and of every regrowth.
    """

    confines_growth = False

    def bind(self, name: str, weight: Tensor, module: nn.Module | None) -> Granularity:
        """Return the granularity to use for one weight (self, or a copy configured for it).

        Args:
            name: the weight's parameter name, for messages.
            weight: the weight.
            module: the module that owns it (its type tells the weight layout), or None.

        Raises:
            ValueError: naming ``name``, if this granularity cannot cut that weight.
        """
        return self

    def confine(self, mask: Tensor, scores: Tensor, count: int) -> Tensor:
        """Growth scores re-ranked so that the groups this granularity prefers come first; called only when
        ``confines_growth`` is True (the base class keeps the scores).

        Args:
            mask: the group mask before ``count`` groups are grown (after the drop; all False for the first mask).
            scores: the growth policy's scores, in group shape.
            count: how many groups are about to be grown.
        """
        return scores

    @abstractmethod
    def groups_shape(self, weight_shape: torch.Size) -> tuple[int, ...]:
        """Shape of the group mask for a weight of ``weight_shape``.

        Args:
            weight_shape: the weight's shape.
        """

    @abstractmethod
    def expand(self, group_values: Tensor, weight_shape: torch.Size) -> Tensor:
        """Group-shaped tensor -> tensor broadcastable to ``weight_shape`` (a view where possible).

        Args:
            group_values: a tensor in ``groups_shape(weight_shape)``.
            weight_shape: the weight's shape.
        """

    @abstractmethod
    def group_sum(self, values: Tensor) -> Tensor:
        """Weight-shaped tensor -> group-shaped tensor, summing the elements of each group.

        Args:
            values: a tensor shaped like the weight.
        """

    def group_size(self, weight_shape: torch.Size) -> int:
        return math.prod(weight_shape) // math.prod(self.groups_shape(weight_shape))

    def to_weight(self, group_values: Tensor, weight_shape: torch.Size) -> Tensor:
        """Group-shaped tensor -> dense weight-shaped tensor (a copy).

        Args:
            group_values: a tensor in ``groups_shape(weight_shape)``.
            weight_shape: the weight's shape.
        """
        return self.expand(group_values, weight_shape).expand(weight_shape).clone()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Element(Granularity):
    """One group per weight element (unstructured sparsity, as in RigL and SET)."""

    def groups_shape(self, weight_shape):
        return tuple(weight_shape)

    def expand(self, group_values, weight_shape):
        return group_values

    def group_sum(self, values):
        return values


def _require_2d(kind: str, name: str, weight: Tensor) -> None:
    if weight.dim() < 2:
        raise ValueError(
            f"granularity {kind!r} needs a weight with at least 2 dims, but {name!r} has shape {tuple(weight.shape)}; "
            f"leave it out of `targets` or use granularity='element'"
        )


class Kernel(Granularity):
    """One group per (dim0, dim1) pair, covering the whole spatial kernel: the E2ENet paper's M in {0,1}^(Cin x Cout).

    For a Linear weight (no spatial dims) a kernel is a single element, exactly as for a 1x1 conv.
    """

    def bind(self, name, weight, module):
        _require_2d("kernel", name, weight)
        return self

    def groups_shape(self, weight_shape):
        return tuple(weight_shape[:2])

    def expand(self, group_values, weight_shape):
        return group_values.reshape(*group_values.shape, *([1] * (len(weight_shape) - 2)))

    def group_sum(self, values):
        return values.flatten(2).sum(2) if values.dim() > 2 else values


class Channel(Granularity):
    """One group per output channel (whole filters).

    The output-channel dim is 0 for Linear/Conv and 1 for ConvTranspose; ``dim`` overrides the choice.

    Args:
        dim: the weight dim that indexes output channels; None picks it from the layer type.
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim

    def bind(self, name, weight, module):
        _require_2d("channel", name, weight)
        dim = self.dim
        if dim is None:
            transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
            dim = 1 if transposed else 0
        if not 0 <= dim < weight.dim():
            raise ValueError(f"Channel(dim={dim}) is out of range for {name!r} with shape {tuple(weight.shape)}")
        return Channel(dim)

    def groups_shape(self, weight_shape):
        return (weight_shape[self.dim],)

    def expand(self, group_values, weight_shape):
        shape = [1] * len(weight_shape)
        shape[self.dim] = -1
        return group_values.reshape(shape)

    def group_sum(self, values):
        other = [d for d in range(values.dim()) if d != self.dim]
        return values.sum(dim=other)

    def __repr__(self):
        return f"Channel(dim={self.dim})"


class InputChannel(Granularity):
    """One group per input channel: a dead group is an input map the layer no longer reads at all.

    The input-channel dim is 1 for Linear/Conv (in_features, in/groups) and 0 for ConvTranspose (in); ``dim``
    overrides the choice for other layers. This is the structure [`compact`][sparsefuse.compaction.compact] removes
    outright.

    Grouped convolutions (``groups`` > 1, weight (out, in/groups, *k)): weight dim 1 holds position ``j`` of each
    group, and input channel ``c = group * (in/groups) + j`` is read only by the outputs of its own group, so
    there is one group per input channel, ``in`` in all, each covering ``out/groups`` filters' slices.
    ``groups`` is taken from the module by ``bind``. A grouped ConvTranspose needs nothing special: its dim 0 is
    already the full input-channel dim.

    Shapes: group mask (in,) for a weight (out, in/groups, *k), (in_features,) for (out, in_features),
    (in,) for a ConvTranspose weight (in, out/groups, *k).

    Args:
        dim: the weight dim that indexes input channels; None picks 1, or 0 for ConvTranspose.
        groups: the conv's ``groups``; ``bind`` sets it from the module, so pass it only to cut a bare weight shape.
    """

    def __init__(self, dim: int | None = None, groups: int = 1):
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"InputChannel(groups=...) needs a positive int, got {groups!r}")
        self.dim, self.groups = dim, groups

    def bind(self, name, weight, module):
        _require_2d("input_channel", name, weight)
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        dim = self.dim if self.dim is not None else (0 if transposed else 1)
        if not 0 <= dim < weight.dim():
            raise ValueError(f"InputChannel(dim={dim}) is out of range for {name!r} with shape {tuple(weight.shape)}")
        # Only a plain conv's dim 1 is split by groups; a transposed conv's dim 0 is the full input dim.
        split = isinstance(module, nn.modules.conv._ConvNd) and not transposed and dim == 1
        return InputChannel(dim, module.groups if split else 1)

    def groups_shape(self, weight_shape):
        return (weight_shape[self.dim] * self.groups,)

    def expand(self, group_values, weight_shape):
        if self.groups == 1:
            shape = [1] * len(weight_shape)
            shape[self.dim] = -1
            return group_values.reshape(shape)
        # (in,) -> (groups, in/groups) -> one row per filter of its group: (out, in/groups, 1, ...).
        per_group = group_values.reshape(self.groups, -1)
        rows = per_group.repeat_interleave(weight_shape[0] // self.groups, dim=0)
        return rows.reshape(*rows.shape, *([1] * (len(weight_shape) - 2)))

    def group_sum(self, values):
        if self.groups == 1:
            other = [d for d in range(values.dim()) if d != self.dim]
            return values.sum(dim=other)
        pairs = values.flatten(2).sum(2) if values.dim() > 2 else values
        return pairs.reshape(self.groups, pairs.shape[0] // self.groups, pairs.shape[1]).sum(1).reshape(-1)

    def __repr__(self):
        return f"InputChannel(dim={self.dim}, groups={self.groups})"


class InputChannelBlocks(Granularity):
    """Input-channel masks per block of outputs: the outputs are cut into ``blocks`` equal, consecutive slices, and
    each slice reads its own set of input channels. A group is every weight by which the outputs of one block read
    one input channel.

    Between [`InputChannel`][sparsefuse.masks.InputChannel] (``blocks=1``: every output reads the same inputs) and
    [`Kernel`][sparsefuse.masks.Kernel] (``blocks`` = the number of outputs). The layer's density is spread over
    all (block, input) groups, so a block reads density x ``in`` inputs on average (some blocks more, some fewer,
    possibly none), as many as an ``InputChannel`` mask reads for the whole layer; together the blocks read up to
    ``blocks`` times more distinct inputs. Compaction removes the input channels no block reads.

    With ``pool``, the blocks draw their inputs from a shared pool of ``pool`` times the inputs one block reads on
    average (``pool`` x density x ``in``): the first mask and every regrowth take groups whose input some block
    already reads, and new inputs only to refill the pool to that size, so the union of what the blocks read, and
    with it the compacted layer, stays near ``pool`` x density x ``in``. The limit is kept wherever the pool has
    room for the regrowth (``pool`` of at least 1 + the drop fraction); where it has not, growth goes beyond it.

    ``bind`` returns the [`Block`][sparsefuse.masks.Block] that cuts the layer this way: ``Block(out / blocks, 1)``
    for a Linear/Conv weight (out, in, *k), group mask (blocks, in); ``Block(1, out / blocks)`` for a
    ConvTranspose weight (in, out, *k), group mask (in, blocks); with ``pool``, the
    [`PooledBlock`][sparsefuse.masks.PooledBlock] of that shape. Grouped convolutions are refused (use
    ``input_channel``), and ``blocks`` must divide the number of outputs.

    Args:
        blocks: output slices per layer, each with its own input-channel mask (default 4).
        pool: None (no limit), or the shared pool's size in multiples of one block's reads, at least 1.
    """

    def __init__(self, blocks: int = 4, pool: float | None = None):
        if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
            raise ValueError(f"InputChannelBlocks(blocks=...) needs a positive int, got {blocks!r}")
        self.blocks, self.pool = blocks, None if pool is None else _pool_size("InputChannelBlocks", pool)

    def bind(self, name, weight, module):
        _require_2d("input_channel_blocks", name, weight)
        if getattr(module, "groups", 1) != 1:
            raise ValueError(
                f"{self!r} cannot cut the grouped conv {name!r} (groups={module.groups}); use "
                f"granularity='input_channel' or leave it out of `targets`"
            )
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        outputs = weight.shape[1 if transposed else 0]
        if outputs % self.blocks:
            raise ValueError(
                f"{name!r} has {outputs} outputs, which {self.blocks} blocks do not divide; choose a number of "
                f"blocks that divides every target's outputs, or leave {name!r} out of `targets`"
            )
        per_block = outputs // self.blocks
        rows, cols = (1, per_block) if transposed else (per_block, 1)
        if self.pool is None:
            return Block(rows, cols)
        return PooledBlock(rows, cols, pool=self.pool, input_dim=0 if transposed else 1)

    def _unbound(self, *args):
        raise TypeError(f"{self!r} cuts a weight only once bound to its layer: call bind(name, weight, module)")

    groups_shape = expand = group_sum = _unbound

    def __repr__(self):
        pool = "" if self.pool is None else f", pool={self.pool}"
        return f"InputChannelBlocks(blocks={self.blocks}{pool})"


class Block(Granularity):
    """Blocks of ``rows x cols`` (dim0, dim1) pairs, each pair covering its whole spatial kernel.

    Args:
        rows: block size along weight dim 0; it must divide that dim of every target.
        cols: block size along weight dim 1; it must divide that dim of every target.
    """

    def __init__(self, rows: int, cols: int):
        if not (isinstance(rows, int) and isinstance(cols, int) and rows >= 1 and cols >= 1):
            raise ValueError(f"Block(rows, cols) needs two positive ints, got rows={rows!r}, cols={cols!r}")
        self.rows, self.cols = rows, cols

    def bind(self, name, weight, module):
        _require_2d("block", name, weight)
        d0, d1 = weight.shape[:2]
        if d0 % self.rows or d1 % self.cols:
            raise ValueError(
                f"{self!r} does not tile {name!r}: its first two dims are ({d0}, {d1}), which must be multiples "
                f"of ({self.rows}, {self.cols}); choose a block shape that divides them or leave the layer out of "
                f"`targets`"
            )
        return self

    def groups_shape(self, weight_shape):
        return (weight_shape[0] // self.rows, weight_shape[1] // self.cols)

    def expand(self, group_values, weight_shape):
        pairs = group_values.repeat_interleave(self.rows, 0).repeat_interleave(self.cols, 1)
        return pairs.reshape(*pairs.shape, *([1] * (len(weight_shape) - 2)))

    def group_sum(self, values):
        pairs = values.flatten(2).sum(2) if values.dim() > 2 else values
        r, c = self.rows, self.cols
        return pairs.reshape(pairs.shape[0] // r, r, pairs.shape[1] // c, c).sum(dim=(1, 3))

    def __repr__(self):
        return f"Block({self.rows}, {self.cols})"


def _pool_size(owner: str, pool) -> float:
    if isinstance(pool, bool) or not isinstance(pool, int | float) or not 1 <= pool < math.inf:
        raise ValueError(
            f"{owner}(pool=...) needs a finite number >= 1 (the pool in multiples of one block's reads; 2 is a good "
            f"start), got {pool!r}"
        )
    return float(pool)


class PooledBlock(Block):
    """A [`Block`][sparsefuse.masks.Block] whose groups along one weight dim (the inputs) share a pool: the union
    of the inputs read is kept near ``pool`` x (active groups / blocks). Built by
    [`InputChannelBlocks`][sparsefuse.masks.InputChannelBlocks] with ``pool``.

    Args:
        rows: block size along weight dim 0.
        cols: block size along weight dim 1.
        pool: the pool's size in multiples of the inputs one block reads on average, at least 1.
        input_dim: the group-mask dim of the inputs (1 for a conv's (blocks, in), 0 for a transposed conv's).
    """

    confines_growth = True

    def __init__(self, rows: int, cols: int, pool: float, input_dim: int):
        super().__init__(rows, cols)
        if input_dim not in (0, 1):
            raise ValueError(f"PooledBlock(input_dim=...) is 0 or 1, got {input_dim!r}")
        self.pool, self.input_dim = _pool_size("PooledBlock", pool), input_dim

    def confine(self, mask, scores, count):
        """Ranks (float64) that put every group of the pool above every group outside it, each side in the order of
        ``scores``. The pool is the inputs some block reads, refilled to its size with the inputs whose best group
        scores highest (a group just dropped counts too: it cannot be regrown, but its input can)."""
        blocks_dim = 1 - self.input_dim
        read = mask.any(blocks_dim)  # the inputs some block reads
        size = min(read.numel(), math.ceil(self.pool * (int(mask.sum()) + count) / mask.shape[blocks_dim]))
        pool = read.clone()
        missing = size - int(read.sum())
        if missing > 0:
            best = scores.amax(blocks_dim).masked_fill(read, float("-inf"))
            pool[best.topk(missing).indices] = True
        # Ranks, not scores plus an offset: an offset would round small scores (gradients) to ties.
        ranks = scores.flatten().argsort(stable=True).argsort().reshape(scores.shape).to(torch.float64)
        return ranks + scores.numel() * pool.unsqueeze(blocks_dim).to(torch.float64)

    def __repr__(self):
        return f"PooledBlock({self.rows}, {self.cols}, pool={self.pool}, input_dim={self.input_dim})"


GRANULARITIES = {
    "element": Element,
    "kernel": Kernel,
    "channel": Channel,
    "input_channel": InputChannel,
    "input_channel_blocks": InputChannelBlocks,
    "input_channel_pool": InputChannelBlocks(4, pool=2.0),
}


def get_granularity(spec: str | Granularity) -> Granularity:
    """The granularity ``spec`` names or is.

    Args:
        spec: ``"element"``, ``"kernel"``, ``"channel"``, ``"input_channel"``, ``"input_channel_blocks"`` (4
            blocks) or ``"input_channel_pool"`` (4 blocks sharing a pool of twice one block's reads), the keys of
            `GRANULARITIES`; or a [`Granularity`][sparsefuse.masks.Granularity] instance
            such as ``Block(4, 4)`` or ``InputChannelBlocks(8)``.
    """
    return resolve_policy(
        "granularity",
        spec,
        GRANULARITIES,
        lambda g: isinstance(g, Granularity),
        "a sparsefuse.masks.Granularity such as sparsefuse.masks.Block(rows, cols)",
    )
