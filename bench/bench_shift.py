"""Forward+backward timing of DepthShiftConv3d against plain and naive alternatives.

Usage: python bench/bench_shift.py [--quick] [--threads N]

All cases run in one process and are interleaved round-robin over repeats, so
slow phases of a noisy machine hit every case alike; medians are reported with
ratios against nn.Conv3d (1, 3, 3) in the same memory format (targets use the
medians; the min column is a less noise-sensitive cross-check on a busy machine).
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import interleaved_times, machine
from torch import nn

from sparsefuse.nn import DepthShiftConv3d

SHIFT_GROUPS = 3


def naive_shift(x: torch.Tensor) -> torch.Tensor:
    """zeros_like + slice assignment (a common first implementation)."""
    out = torch.zeros_like(x)
    chunks = torch.chunk(x, SHIFT_GROUPS, dim=1)
    start = 0
    for g, chunk in enumerate(chunks):
        s, c = g - SHIFT_GROUPS // 2, chunk.size(1)
        if s == 0:
            out[:, start : start + c] = chunk
        elif s > 0:
            out[:, start : start + c, s:] = chunk[:, :, :-s]
        else:
            out[:, start : start + c, :s] = chunk[:, :, -s:]
        start += c
    return out


def cat_shift(x: torch.Tensor) -> torch.Tensor:
    """torch.chunk + pad/slice + torch.cat (the authors' style)."""
    parts = []
    for g, chunk in enumerate(torch.chunk(x, SHIFT_GROUPS, dim=1)):
        s = g - SHIFT_GROUPS // 2
        if s > 0:
            chunk = F.pad(chunk[:, :, :-s], (0, 0, 0, 0, s, 0))
        elif s < 0:
            chunk = F.pad(chunk[:, :, -s:], (0, 0, 0, 0, 0, -s))
        parts.append(chunk)
    return torch.cat(parts, dim=1)


class ShiftThenConv(nn.Module):
    def __init__(self, shift: Callable[[torch.Tensor], torch.Tensor], conv: nn.Conv3d) -> None:
        super().__init__()
        self.shift, self.conv = shift, conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.shift(x))


def step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    x.grad = None
    model(x).sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (< 20 s)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="override the number of rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ch, batch, size = 48, 2, (24, 48, 48)
    repeats = args.repeats or (8 if args.quick else 20)
    warmup = 2 if args.quick else 3

    def make_models() -> dict[str, nn.Module]:
        conv133 = lambda: nn.Conv3d(ch, ch, (1, 3, 3), padding=(0, 1, 1))  # noqa: E731
        return {
            "Conv3d(1,3,3)": conv133(),
            "DepthShiftConv3d": DepthShiftConv3d(ch, ch, shift_groups=SHIFT_GROUPS),
            "naive shift+conv": ShiftThenConv(naive_shift, conv133()),
            "cat shift+conv": ShiftThenConv(cat_shift, conv133()),
            "Conv3d(3,3,3)": nn.Conv3d(ch, ch, 3, padding=1),
        }

    formats = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
    cases = {}
    for fmt_name, fmt in formats.items():
        # Fresh modules per format: Module.to(memory_format=...) works in place, and a
        # channels_last weight would silently switch the "contiguous" conv to channels_last.
        x = torch.randn(batch, ch, *size).to(memory_format=fmt).requires_grad_()
        for name, model in make_models().items():
            cases[(fmt_name, name)] = functools.partial(step, model.to(memory_format=fmt), x)
    names = list(make_models())
    times = interleaved_times(cases, repeats, warmup)

    print(f"machine: {machine()}")
    print(
        f"input ({batch}, {ch}, {size[0]}, {size[1]}, {size[2]}) float32, forward+backward, "
        f"shift_groups={SHIFT_GROUPS}, {repeats} interleaved rounds, median\n"
    )
    print(f"{'format':<17} {'case':<18} {'median ms':>10} {'vs 1x3x3':>9} {'min ms':>8} {'vs 1x3x3':>9}")
    results = {}
    for fmt_name in formats:
        base = statistics.median(times[(fmt_name, "Conv3d(1,3,3)")])
        base_min = min(times[(fmt_name, "Conv3d(1,3,3)")])
        for name in names:
            med, fastest = statistics.median(times[(fmt_name, name)]), min(times[(fmt_name, name)])
            results[(fmt_name, name)] = med
            print(
                f"{fmt_name:<17} {name:<18} {med * 1e3:>10.2f} {med / base:>8.2f}x "
                f"{fastest * 1e3:>8.2f} {fastest / base_min:>8.2f}x"
            )
    print()
    ok = True
    for fmt_name in formats:
        shift = results[(fmt_name, "DepthShiftConv3d")]
        for ref, limit in (("Conv3d(1,3,3)", 1.10), ("Conv3d(3,3,3)", 0.75)):
            ratio = shift / results[(fmt_name, ref)]
            passed = ratio <= limit
            ok &= passed
            print(
                f"target {fmt_name:<17} DepthShiftConv3d / {ref:<14} = {ratio:.3f}  "
                f"(<= {limit:.2f})  {'PASS' if passed else 'FAIL'}"
            )
    print("\nall targets PASS" if ok else "\nsome targets FAIL")


if __name__ == "__main__":
    main()
