"""E2ENet Params / FLOPs / PT score, reproducing the paper's tables.

    python examples/e2enet/accounting.py --in-channels 1 --classes 16 --patch 128 128 128 --density 0.2
    python examples/e2enet/accounting.py --in-channels 1 --classes 16 --patch 128 128 128 \\
        --density 0.3 --override-48 0.2 --mdice 90.3 --json

The paper model is built on the ``meta`` device (no memory, no init cost) and
sparsified at kernel granularity without training: each fusion conv / transposed
conv keeps ``round(density * C_in * C_out)`` whole kernels, the count the authors'
uniform init draws (spec section 2), through a fixed-mask
``sparsefuse.DynamicSparsity`` (:func:`uniform_kernel_sparsity`). A live one from
training can be passed to :func:`account` instead.

Counting rule (spec section 3, reproduces all published numbers):

* Params: eq. 4 via ``sparsefuse.count_params`` (biases and norms count).
* FLOPs ("eq5"): eq. 5 (:func:`e2enet.experiments.paper_counting.eq5_flops`) over
  every conv and transposed conv, all four deep-supervision heads included,
  transposed convs at their output size, and the "+1" term only on fusion convs
  (:func:`e2enet.nets.e2enet.is_fusion_conv`).
* FLOPs ("macs"): the true cost, 2 x multiply-accumulates (``sparsefuse.count_flops``), for comparison.
* PT score: eq. 7 (:func:`e2enet.experiments.paper_counting.pt_score`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

import sparsefuse as sf
from e2enet.experiments.paper_counting import eq5_flops, pt_score
from e2enet.nets.e2enet import E2ENet, build_e2enet, e2enet_fusion_targets, is_fusion_conv

__all__ = [
    "PAPER_PT_REFERENCES",
    "uniform_kernel_sparsity",
    "paper_model",
    "account",
    "report",
    "format_table",
    "main",
]

# PT-score references (eq. 7): best mDice (%), smallest Params (M) and FLOPs (G) among
# the methods each paper table compares.
PAPER_PT_REFERENCES: dict[str, dict[str, float]] = {
    "amos": dict(mdice_max=90.5, params_min=7.64, flops_min=391.03),  # Table 1
    "btcv": dict(mdice_max=88.4, params_min=11.25, flops_min=164.91),  # Table 2
    "brats": dict(mdice_max=74.5, params_min=7.63, flops_min=494.52),  # Table 3
}


def uniform_kernel_sparsity(model: nn.Module, density: float, override_48: float | None = None) -> sf.DynamicSparsity:
    """The authors' uniform kernel density on every fusion target of ``model``, as a fixed-mask sparsifier.

    Each target keeps ``round(density * dim0 * dim1)`` random kernels, as the authors' uniform init draws; which
    ones does not change the counts. Works on a ``meta``-device model.

    Args:
        model: an :class:`E2ENet` (any device).
        density: fraction of kernels kept per layer (1 - the paper's S).
        override_48: the authors' quirk in released HEAD: every masked weight whose
            dim0 is 48 gets this density instead. dim0 is C_out for a conv and C_in
            for a transposed conv, so this hits the six 48-output fusion convs and no
            transposed conv. The paper's AMOS S=0.7 row needs 0.2 here; its other
            rows need it off (None).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1] (fraction of kernels kept = 1 - S), got {density}")
    if override_48 is not None and not 0.0 < override_48 <= 1.0:
        raise ValueError(f"override_48 must be in (0, 1] or None, got {override_48}")
    densities: dict[str, float] = {"default": density}
    if override_48 is not None:
        densities.update(
            {
                f"{name}.weight": override_48
                for name, module in model.named_modules()
                if e2enet_fusion_targets(name, module) and module.weight.shape[0] == 48
            }
        )
    return sf.DynamicSparsity(model, None, density=densities, targets=e2enet_fusion_targets, granularity="kernel")


def paper_model(
    in_channels: int, num_classes: int, shift_groups: int = 3, device: str | torch.device = "meta"
) -> E2ENet:
    """The paper preset, built on ``device`` (default ``meta``: instant, no memory)."""
    with torch.device(device):
        return build_e2enet("paper", in_channels=in_channels, num_classes=num_classes, shift_groups=shift_groups)


def account(model: E2ENet, patch: Sequence[int], sparsity=None) -> dict:
    """Params and FLOPs of ``model`` for one (1, C, *patch) input, the paper's way.

    Returns a dict with ``params`` (eq. 4), ``flops`` (eq. 5, the authors' rule),
    ``flops_macs`` (true 2 x MAC cost), and ``target_density`` (active / all
    weights over the sparsified tensors; 1.0 when dense).
    """
    shape = (1, model.in_channels, *patch)
    # The authors' inference forward still runs all four deep-supervision heads and
    # their FLOPs include them; our eval forward skips the three unused heads, so
    # count the training forward, whose layer list is exactly theirs.
    was_training = model.training
    model.train()
    try:
        flops = eq5_flops(model, shape, sparsity, bias_term=is_fusion_conv)
        flops_macs = sf.count_flops(model, shape, sparsity)
    finally:
        model.train(was_training)
    params = dict(model.named_parameters())
    if sparsity is None:
        target_density = 1.0
    else:
        names = sparsity.target_names
        total = sum(params[n].numel() for n in names)
        target_density = sum(int(sparsity.weight_mask(n).sum()) for n in names) / total
    return {
        "params": sf.count_params(model, sparsity),
        "flops": float(flops),
        "flops_macs": float(flops_macs),
        "target_density": target_density,
    }


def report(
    in_channels: int,
    num_classes: int,
    patch: Sequence[int],
    density: float = 1.0,
    override_48: float | None = None,
    shift_groups: int = 3,
    mdice: float | None = None,
    pt_references: Mapping[str, float] | None = None,
) -> dict:
    """Dense and sparse accounting of the paper model for one setting (what the CLI prints).

    Returns a JSON-ready dict: the setting, ``params`` / ``flops`` / ``flops_macs``
    at ``density`` (with ``override_48``), the same for the dense model under
    ``dense``, and ``pt_score`` (with the references used) if ``mdice`` is given.
    ``pt_references`` defaults to the AMOS table's (``PAPER_PT_REFERENCES["amos"]``).
    """
    model = paper_model(in_channels, num_classes, shift_groups)
    dense = account(model, patch)
    sparse = account(model, patch, uniform_kernel_sparsity(model, density, override_48))
    result = {
        "in_channels": in_channels,
        "num_classes": num_classes,
        "patch": list(patch),
        "density": density,
        "override_48": override_48,
        "shift_groups": shift_groups,
        **sparse,
        "dense": dense,
    }
    if mdice is not None:
        refs = dict(pt_references or PAPER_PT_REFERENCES["amos"])
        result["pt_references"] = refs
        result["pt_score"] = pt_score(mdice, sparse["params"] / 1e6, sparse["flops"] / 1e9, **refs)
    return result


def format_table(result: Mapping) -> str:
    """A paper-style table of a :func:`report` result (Params in M, FLOPs in G)."""
    patch = "x".join(map(str, result["patch"]))
    setting = f"{result['in_channels']} in, {result['num_classes']} classes, patch {patch}"
    label = f"density {result['density']:g}"
    if result["override_48"] is not None:
        label += f" (48-ch {result['override_48']:g})"
    rows = [("dense", result["dense"], None), (label, result, result.get("pt_score"))]
    lines = [
        f"E2ENet paper model: {setting}",
        f"{'':24} {'Params (M)':>11} {'FLOPs eq5 (G)':>14} {'FLOPs MACs (G)':>15} {'PT':>6}",
    ]
    for name, r, pt in rows:
        pt_text = f"{pt:6.2f}" if pt is not None else f"{'-':>6}"
        lines.append(
            f"{name:24} {r['params'] / 1e6:11.2f} {r['flops'] / 1e9:14.2f} {r['flops_macs'] / 1e9:15.2f} {pt_text}"
        )
    lines.append(
        "eq5: paper eq. 5 as the authors applied it (transposed convs at output size, +1 only on fusion convs); "
        "MACs: true cost, 2 x multiply-accumulates."
    )
    if "pt_references" in result:
        lines.append(f"PT references: {result['pt_references']}")
    return "\n".join(lines)


def _fraction(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-channels", type=int, default=1, help="image channels (AMOS/BTCV 1, BraTS 4)")
    parser.add_argument("--classes", type=int, default=16, help="classes incl. background (AMOS 16, BTCV 14, BraTS 4)")
    parser.add_argument(
        "--patch",
        type=int,
        nargs=3,
        default=[128, 128, 128],
        metavar=("D", "H", "W"),
        help="input patch; the paper uses 128^3 (BTCV 96^3)",
    )
    parser.add_argument(
        "--density", type=_fraction, default=1.0, help="fraction of fusion kernels kept, 1 - S (S=0.8 -> 0.2)"
    )
    parser.add_argument(
        "--override-48",
        type=_fraction,
        default=None,
        metavar="D",
        help="authors' quirk: masked weights with dim0 = 48 use density D (AMOS S=0.7 row: 0.2)",
    )
    parser.add_argument("--shift-groups", type=int, default=3, help="depth-shift groups (counts do not depend on it)")
    parser.add_argument("--mdice", type=float, default=None, help="mDice in %%, to compute the PT score (eq. 7)")
    parser.add_argument(
        "--pt-refs",
        choices=sorted(PAPER_PT_REFERENCES),
        default="amos",
        help="paper table whose best mDice / smallest Params / FLOPs are the PT references",
    )
    parser.add_argument("--mdice-max", type=float, default=None, help="override the reference best mDice (%%)")
    parser.add_argument("--params-min", type=float, default=None, help="override the reference smallest Params (M)")
    parser.add_argument("--flops-min", type=float, default=None, help="override the reference smallest FLOPs (G)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)

    refs = dict(PAPER_PT_REFERENCES[args.pt_refs])
    for key in ("mdice_max", "params_min", "flops_min"):
        if getattr(args, key) is not None:
            refs[key] = getattr(args, key)
    try:
        result = report(
            args.in_channels,
            args.classes,
            args.patch,
            args.density,
            args.override_48,
            args.shift_groups,
            args.mdice,
            refs,
        )
    except ValueError as e:  # e.g. a patch the network cannot downsample 5 times
        parser.error(str(e))
    print(json.dumps(result) if args.json else format_table(result))
    return result
