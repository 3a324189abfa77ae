"""DynamicSparsity under DistributedDataParallel: unwrapping the model, and checking that the ranks agree.

Ranks never communicate about masks: every decision is keyed by (seed, step, layer index) and reads weights and
gradients that DDP keeps identical. [`verify_ranks_agree`][sparsefuse.distributed.verify_ranks_agree]
(``DynamicSparsity.verify()``) checks that they still do.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:  # sparsity.py imports this module
    from .sparsity import DynamicSparsity

__all__ = ["unwrap_model", "verify_ranks_agree"]

_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel wrappers: its names lack the wrappers' ``module.`` prefix.

    Args:
        model: a module, wrapped or not.
    """
    while isinstance(model, _WRAPPERS):
        model = model.module
    return model


def _collective_device(group) -> torch.device | None:
    """Where ``group``'s backend wants collective tensors: CPU for gloo/mpi, the current GPU for nccl, else None
    (the caller then uses the weights' device)."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:  # "cpu:gloo,cuda:nccl" takes CPU tensors too
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _by_value(values: list, ranks: list[int], fmt: Callable = str) -> str:
    """'8 on ranks [0, 2]; 7 on rank [1]': which ranks hold which value, most common value first."""
    groups: dict = {}
    for value, rank in zip(values, ranks, strict=True):
        groups.setdefault(value, []).append(rank)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[1]))
    return "; ".join(f"{fmt(v)} on rank{'s' if len(r) > 1 else ''} {r}" for v, r in ordered)


def _fingerprint(masks: dict[str, Tensor], step: int, seed: int) -> tuple[Tensor, Tensor]:
    """(header, per-layer table) as int64: [step, seed, number of targets, CRC32 of names and group shapes]
    and one [active groups, CRC32 of the packed mask bits] row per target."""
    layout = repr([(name, tuple(mask.shape)) for name, mask in masks.items()]).encode()
    header = torch.tensor([step, seed % 2**63, len(masks), zlib.crc32(layout)], dtype=torch.int64)
    rows = [
        [int(mask.sum()), zlib.crc32(np.packbits(mask.reshape(-1).cpu().numpy()).tobytes())] for mask in masks.values()
    ]
    return header, torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 2)


def verify_ranks_agree(sparsity: DynamicSparsity, group: dist.ProcessGroup | None = None) -> None:
    """What [`DynamicSparsity.verify`][sparsefuse.DynamicSparsity.verify] runs: all-gathers every rank's step count,
    seed, target layout and per-mask checksums, and raises ``RuntimeError`` on every rank when they differ.

    Args:
        sparsity: the rank's sparsifier.
        group: the process group (default: all ranks).

    A no-op when ``torch.distributed`` is not available or not initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = group if group is not None else dist.group.WORLD
    ranks = list(dist.get_process_group_ranks(world))
    names = sparsity.target_names
    device = _collective_device(group)
    if device is None:
        device = sparsity.model.get_parameter(names[0]).device

    def gather(local: Tensor) -> list[tuple[int, ...]]:
        out = [torch.empty_like(local, device=device) for _ in ranks]
        dist.all_gather(out, local.to(device), group=group)
        return [tuple(o.cpu().reshape(-1).tolist()) for o in out]

    header, table = _fingerprint(sparsity.masks, sparsity.step_count, sparsity.seed)
    headers = gather(header)
    problems = []
    steps, seeds = [h[0] for h in headers], [h[1] for h in headers]
    if len(set(steps)) > 1:
        problems.append(f"step counts differ: {_by_value(steps, ranks)}")
    if len(set(seeds)) > 1:
        problems.append(f"seeds differ: {_by_value(seeds, ranks)}")
    if len({h[2:] for h in headers}) > 1:  # the layer tables would not even line up
        counts = _by_value([h[2] for h in headers], ranks, lambda n: f"{n} target" + "s" * (n != 1))
        problems.append(f"targets differ (names or group shapes): {counts}; this rank's targets are {list(names)}")
    else:
        n = len(names)
        tables = [[row[2 * i : 2 * i + 2] for i in range(n)] for row in gather(table)]
        differing = [i for i in range(n) if len({tuple(tab[i]) for tab in tables}) > 1]
        if differing:
            i = differing[0]
            masks = _by_value(
                [tuple(tab[i]) for tab in tables], ranks, lambda v: f"{v[0]} active groups (crc32 {v[1]:#010x})"
            )
            more = f" ({len(differing) - 1} more layers differ too)" if len(differing) > 1 else ""
            problems.append(f"mask of {names[i]!r} (target {i}) differs: {masks}{more}")
    if problems:
        when = f" at step {sparsity.step_count}" if len(set(steps)) == 1 else ""
        raise RuntimeError(
            f"DynamicSparsity.verify(): ranks disagree{when}: "
            + "; ".join(problems)
            + ". Likely causes: DynamicSparsity built with different seeds, targets, density or granularity on "
            "some rank; a rank that skipped or repeated sparsity.step() (a batch skipped on one rank only, "
            "an early `continue`); gradients not all-reduced before an update step (model.no_sync(), a "
            "parameter outside DDP); or masks changed on one rank only (load_state_dict on one rank)."
        )
