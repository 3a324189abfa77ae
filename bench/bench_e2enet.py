"""E2ENet against MONAI DynUNet (nnU-Net 3d_fullres) on CPU: inference forward and one training step.

Cases, all interleaved in one process (see ``common.interleaved``):

* inference: eval mode, ``torch.no_grad()``, input 1 x 1 x P^3 (P = --patch, 64 by default), E2ENet at density 1.0
  and with kernel masks at density 0.2 on its fusion weights (``e2enet_fusion_targets``), each in contiguous and
  channels_last_3d memory format, against DynUNet (contiguous) at the same preset scale;
* training step: forward, loss = sum of the deep-supervision outputs' mean squares, backward, SGD step (nnU-Net's
  momentum 0.99 Nesterov, weight decay 3e-5), and ``sparsity.step()`` for the masked model, at batch 2 x 1 x P^3.

Masks are zeros in dense weight tensors: there are no sparse kernels, so density 0.2 costs the same dense compute as
density 1.0 (its train step adds only the re-masking in ``sparsity.step()``). The table shows that as it is.

The paper preset's training step at 2 x 64^3 took 22-25 s for E2ENet (DynUNet: 6 s) on 2 quiet CPU cores (AMD EPYC,
torch 2.13), over the ~20 s a bench step can take, so training steps use the cpu-demo presets by default
(``--train-preset``); the output says which preset each part used.

    python bench/bench_e2enet.py [--quick] [--threads 2] [--patch 64] [--preset paper] [--train-preset cpu-demo]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
from torch import nn

import sparsefuse as sf
from common import interleaved, machine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "e2enet"))
from model import build_dynunet, build_e2enet, e2enet_fusion_targets, output_list  # noqa: E402

IN_CHANNELS, NUM_CLASSES = 1, 16  # CT, AMOS's 15 organs + background
DENSITY = 0.2
# Reported in the issue for the authors' E2ENet build and for DynUNet, inference on 1 x 64^3 with 2 CPU threads.
# Another machine and another code base: context only, never measured by this script.
ISSUE_E2ENET_S, ISSUE_DYNUNET_S = 2.72, 0.56
FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


def nnunet_sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99, nesterov=True, weight_decay=3e-5)


def e2enet_pair(preset: str) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, sf.DynamicSparsity]:
    """(dense E2ENet, a copy with fusion kernel masks at DENSITY, the copy's optimizer, its sparsifier)."""
    torch.manual_seed(0)
    dense = build_e2enet(preset, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES)
    masked = copy.deepcopy(dense)
    optimizer = nnunet_sgd(masked)
    sparsity = sf.DynamicSparsity(masked, optimizer, density=DENSITY, targets=e2enet_fusion_targets,
                                  granularity="kernel")
    return dense, masked, optimizer, sparsity


def dynunet(preset: str) -> nn.Module:
    torch.manual_seed(0)
    return build_dynunet(preset, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES)


def zero_fraction(model: nn.Module) -> float:
    weights = [p for n, p in model.named_parameters() if "fusion" in n.split(".") and n.endswith("weight")
               and p.dim() == 5]
    return sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights)


def inference_cases(preset: str, patch: int) -> tuple[dict, float]:
    dense, masked, _, _ = e2enet_pair(preset)
    base = dynunet(preset)
    cases = {}
    for model in (dense, masked, base):
        model.eval()
    x = torch.randn(1, IN_CHANNELS, patch, patch, patch)

    def forward(model: nn.Module, fmt: torch.memory_format):
        model = copy.deepcopy(model).to(memory_format=fmt)
        xf = x.contiguous(memory_format=fmt)

        def run():
            with torch.no_grad():
                model(xf)
        return run

    cases[("DynUNet", "1.0", "contiguous")] = forward(base, torch.contiguous_format)
    for fmt_name, fmt in FORMATS.items():
        cases[("E2ENet", "1.0", fmt_name)] = forward(dense, fmt)
        cases[("E2ENet", f"{DENSITY}", fmt_name)] = forward(masked, fmt)
    return cases, zero_fraction(masked)


def train_cases(preset: str, patch: int) -> dict:
    dense, masked, _, _ = e2enet_pair(preset)
    base = dynunet(preset)
    x = torch.randn(2, IN_CHANNELS, patch, patch, patch)

    def train_step(model: nn.Module, fmt: torch.memory_format, sparse: bool):
        model = copy.deepcopy(model).to(memory_format=fmt).train()
        optimizer = nnunet_sgd(model)
        # Rebuilt on the copy so it masks this optimizer's state; same seed, so the same masks as `masked`.
        sparsity = sf.DynamicSparsity(model, optimizer, density=DENSITY, targets=e2enet_fusion_targets,
                                      granularity="kernel") if sparse else None
        xf = x.contiguous(memory_format=fmt)

        def run():
            optimizer.zero_grad(set_to_none=True)
            loss = sum(o.float().square().mean() for o in output_list(model(xf)))
            loss.backward()
            optimizer.step()
            if sparsity is not None:
                sparsity.step()
        return run

    cases = {("DynUNet", "1.0", "contiguous"): train_step(base, torch.contiguous_format, False)}
    for fmt_name, fmt in FORMATS.items():
        cases[("E2ENet", "1.0", fmt_name)] = train_step(dense, fmt, False)
        cases[("E2ENet", f"{DENSITY}", fmt_name)] = train_step(masked, fmt, True)
    return cases


def report(title: str, t: dict) -> None:
    ref = t[("DynUNet", "1.0", "contiguous")]
    print(f"\n{title}")
    print(f"  | {'model':<8} | {'density':>7} | {'memory format':<16} | {'ms':>9} | {'vs DynUNet':>10} | "
          f"{'vs dense E2ENet':>15} |")
    print(f"  |{'-' * 10}|{'-' * 9}|{'-' * 18}|{'-' * 11}|{'-' * 12}|{'-' * 17}|")
    for (model, density, fmt), seconds in t.items():
        dense = t.get(("E2ENet", "1.0", fmt)) if model == "E2ENet" and density != "1.0" else None
        vs_dense = f"{seconds / dense:.3f}x" if dense else ""
        print(f"  | {model:<8} | {density:>7} | {fmt:<16} | {seconds * 1e3:>9.1f} | {seconds / ref:>9.2f}x | "
              f"{vs_dense:>15} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller train patch (a smoke "
                                                                 "run, noisy)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--patch", type=int, default=64, help="cubic patch edge (must be a multiple of the "
                                                                "network's total stride: 32 for paper, 8 for cpu-demo)")
    parser.add_argument("--preset", default="paper", choices=("paper", "cpu-demo"), help="preset of the inference "
                                                                                          "cases")
    parser.add_argument("--train-preset", default="cpu-demo", choices=("paper", "cpu-demo"),
                        help="preset of the training-step cases (paper: ~22 s per E2ENet step on 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"load average at start (1/5/15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    repeats, warmup = (1, 1) if args.quick else (5, 1)
    cases, zeros = inference_cases(args.preset, args.patch)
    t = interleaved(cases, repeats, warmup=warmup)
    report(f"Inference forward, eval, no grad, 1 x {IN_CHANNELS} x {args.patch}^3, {NUM_CLASSES} classes, "
           f"{args.preset} preset ({zeros:.1%} of E2ENet's fusion conv weights are zero at density {DENSITY}); "
           f"median of {repeats}", t)
    e2e_best = min(s for (m, d, _), s in t.items() if m == "E2ENet" and d == "1.0")
    print(f"  reported in the issue, not measured here (authors' code, 2 CPU threads, 1 x 64^3, another machine): "
          f"authors' E2ENet {ISSUE_E2ENET_S * 1e3:.0f} ms, DynUNet {ISSUE_DYNUNET_S * 1e3:.0f} ms "
          f"({ISSUE_E2ENET_S / ISSUE_DYNUNET_S:.2f}x)")
    if args.patch == 64 and args.preset == "paper":
        print(f"  this run, dense E2ENet in its faster format: {e2e_best / t[('DynUNet', '1.0', 'contiguous')]:.2f}x "
              f"DynUNet (times across machines are not comparable; the ratios are the context)")

    train_patch = 32 if args.quick else args.patch
    train_repeats = 3 if args.quick else 10
    t = interleaved(train_cases(args.train_preset, train_patch), train_repeats, warmup=1)
    note = "" if args.train_preset == "paper" else (" (cpu-demo: a paper-preset E2ENet step took ~22 s on 2 "
                                                     "cores, too slow to repeat here)")
    report(f"Training step (fwd + bwd + SGD step [+ sparsity.step()]), batch 2 x {IN_CHANNELS} x {train_patch}^3, "
           f"{args.train_preset} preset{note}; median of {train_repeats}", t)
    print("\nDensity 0.2 is zeros in dense weight tensors (no sparse kernels): it runs the same dense convolutions, so "
          "expect ~1.0x dense; the train step adds the re-masking in sparsity.step().")
    print(f"load average at end (1/5/15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
