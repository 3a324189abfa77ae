"""Cost of DynamicSparsity on a training step, against dense training and torch.nn.utils.prune's masking.

Prints, per model, the median step time of: dense; dense + ``sparsity.step()`` (sparsefuse); masking through
torch.nn.utils.prune's forward pre-hook (the anchor); and one topology update over all layers. All cases run
interleaved in one process.

    python bench/bench_sparsity.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import interleaved, machine
from torch import nn
from torch.nn.utils import prune

import sparsefuse as sf

TARGET_OVERHEAD = 1.03


def conv3d_net() -> tuple[nn.Module, torch.Tensor]:
    """A 3D encoder-decoder slice shaped like E2ENet's fusion stages (48/96 channels, (1,3,3) kernels)."""
    model = nn.Sequential(
        nn.Conv3d(1, 48, (1, 3, 3), padding=(0, 1, 1)),
        nn.LeakyReLU(0.01),
        nn.Conv3d(48, 96, (1, 3, 3), stride=2, padding=(0, 1, 1)),
        nn.LeakyReLU(0.01),
        nn.Conv3d(96, 96, (1, 3, 3), padding=(0, 1, 1)),
        nn.LeakyReLU(0.01),
        nn.ConvTranspose3d(96, 48, 2, stride=2),
        nn.LeakyReLU(0.01),
        nn.Conv3d(48, 4, 1),
    )
    return model, torch.randn(2, 1, 16, 48, 48)


def mlp() -> tuple[nn.Module, torch.Tensor]:
    """Many small steps: the worst case for a per-step overhead."""
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    return model, torch.randn(128, 512)


def make_step(model: nn.Module, x: torch.Tensor, sparsity: sf.DynamicSparsity | None):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99, nesterov=True, weight_decay=3e-5)
    if sparsity is not None:  # rebind to this optimizer: the sparsifier masks the optimizer's state too
        sparsity = sf.DynamicSparsity(
            model, optimizer, density=sparsity.density(), granularity=sparsity.granularity, seed=sparsity.seed
        )

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
        optimizer.step()
        if sparsity is not None:
            sparsity.step()

    return step


def bench_model(name: str, build, granularity: str, repeats: int) -> None:
    torch.manual_seed(0)
    base, x = build()
    dense = copy.deepcopy(base)
    ours = copy.deepcopy(base)
    template = sf.DynamicSparsity(ours, None, density=0.2, granularity=granularity)
    pruned = copy.deepcopy(base)
    for module_name, module in pruned.named_modules():
        if sf.sparsity.default_targets(module_name, module):
            prune.custom_from_mask(module, "weight", template.weight_mask(f"{module_name}.weight"))

    # One topology update over every layer (drop by L1, regrow at random), timed on its own copy; without an
    # optimizer, since step() is timed alone (with one, it refuses a second call before an optimizer step).
    updating = copy.deepcopy(base)
    updater = sf.DynamicSparsity(
        updating, None, density=0.2, granularity=granularity, schedule=sf.schedules.Constant(every=1, drop_fraction=0.3)
    )
    updating(x).float().square().mean().backward()

    cases = {
        "dense": make_step(dense, x, None),
        "sparsefuse": make_step(ours, x, template),
        "nn.utils.prune": make_step(pruned, x, None),
        "update only": updater.step,
    }
    t = interleaved(cases, repeats)
    print(f"\n{name} ({granularity} masks, density 0.2)")
    print(f"  {'case':<16} {'ms':>9} {'vs dense':>9}")
    for case, seconds in t.items():
        print(f"  {case:<16} {seconds * 1e3:>9.2f} {seconds / t['dense']:>8.3f}x")
    overhead = t["sparsefuse"] / t["dense"]
    verdict = "PASS" if overhead <= TARGET_OVERHEAD else "FAIL"
    print(f"  target: train step with sparsity.step() <= {TARGET_OVERHEAD}x dense: {overhead:.3f}x {verdict}")
    verdict = "PASS" if t["update only"] < t["dense"] else "FAIL"
    print(f"  target: one topology update < one training step: {t['update only'] / t['dense']:.3f}x {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, noisy)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    repeats = 5 if args.quick else 30
    bench_model("conv3d encoder-decoder, batch 2 x 1 x 16x48x48", conv3d_net, "kernel", repeats)
    bench_model("MLP 512-1024-1024-10, batch 128", mlp, "element", repeats * 4)


if __name__ == "__main__":
    main()
