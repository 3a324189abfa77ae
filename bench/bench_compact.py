"""Inference time of a masked 3D conv stack against its sparsefuse.compact() copy, on one CPU thread.

The stack is shaped like an E2ENet fusion stage: Conv3d 96 -> 48 and 48 -> 48, (1, 3, 3) kernels, LeakyReLU,
input 1 x 96 x 24 x 48 x 48. Rows: input-channel masks at densities 0.2 and 0.1 (the case compaction is for), and
the settings behind compact()'s thresholds: input density 0.9 (10% of inputs dead) and output-channel ("channel")
masks at densities 0.8 and 0.5, compacted regardless of the thresholds. All cases run interleaved in one process.

    python bench/bench_compact.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import interleaved, machine
from torch import nn

import sparsefuse as sf

SETTINGS = (  # (label, granularity, density)
    ("input channels, density 0.2", "input_channel", 0.2),
    ("input channels, density 0.1", "input_channel", 0.1),
    ("input channels, density 0.9 (forced)", "input_channel", 0.9),
    ("output channels, density 0.8 (forced)", "channel", 0.8),
    ("output channels, density 0.5", "channel", 0.5),
)


def conv_stack() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(96, 48, (1, 3, 3), padding=(0, 1, 1)),
        nn.LeakyReLU(0.01),
        nn.Conv3d(48, 48, (1, 3, 3), padding=(0, 1, 1)),
        nn.LeakyReLU(0.01),
    ).eval()


def one_thread_setup(doc: str) -> tuple[argparse.Namespace, nn.Module, torch.Tensor]:
    """(--repeats, the conv stack, its input) of a one-thread conv-stack benchmark whose help is ``doc``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    torch.manual_seed(0)
    return args, conv_stack(), torch.randn(1, 96, 24, 48, 48)


def main() -> None:
    args, base, x = one_thread_setup(__doc__)
    cases, plans = {}, {}
    for label, granularity, density in SETTINGS:
        masked = copy.deepcopy(base)
        sparsity = sf.DynamicSparsity(masked, None, density=density, granularity=granularity)
        # Thresholds at 0: every dead channel is removed, also where compact() would by default keep it.
        compacted = sf.compact(masked, sparsity, min_dead_inputs=0.0, min_dead_outputs=0.0)
        plans[label] = sf.compaction_plan(masked, sparsity)
        with torch.no_grad():
            reference = masked(x)
            error = (compacted(x) - reference).abs().max().item() / reference.abs().max().item()
        assert error < 1e-5, f"{label}: compacted output differs from the masked one by {error:.2e} (relative)"
        cases[(label, "masked")] = lambda m=masked: m(x)
        cases[(label, "compacted")] = lambda m=compacted: m(x)
    with torch.no_grad():
        times = interleaved(cases, args.repeats)

    print(
        f"\nforward, Conv3d 96->48 -> Conv3d 48->48, (1,3,3) kernels, input {tuple(x.shape)}, "
        f"median of {args.repeats} interleaved rounds"
    )
    print(f"  {'masks':<38} {'masked ms':>10} {'compacted ms':>13} {'compacted/masked':>17}  compact() default")
    for label, _, _ in SETTINGS:
        masked_s, compacted_s = times[(label, "masked")], times[(label, "compacted")]
        default = "compacts" if any(p.compacted for p in plans[label].values()) else "keeps the layers"
        print(
            f"  {label:<38} {masked_s * 1e3:>10.1f} {compacted_s * 1e3:>13.1f} {compacted_s / masked_s:>16.2f}x"
            f"  {default}"
        )


if __name__ == "__main__":
    main()
