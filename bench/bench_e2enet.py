"""E2ENet, masked and compacted (examples/e2enet/inference/compaction.py), against MONAI DynUNet (nnU-Net
3d_fullres) on CPU.

Sections; within each, all cases run interleaved in one process on the same inputs (``common.interleaved``):

1. where the time goes: one forward of the dense E2ENet and of its compacted copy at input-channel density 0.1
   (paper preset, 1 x 1 x 64^3) under torch.profiler, by kind of work;
2. splitting a fusion conv over its inputs (a sum of convs over the concatenated parts) against one conv over the
   assembled input, for fusion node x(0, 1) of the paper preset at 64^3;
3. inference, paper presets, eval, no grad, batch 1, 1 x 64^3: DynUNet and dense E2ENet (contiguous and
   channels_last_3d), the compacted copies at density 1.0 (every channel kept: the lean dense path), 0.2 and 0.1,
   0.1 with ERK layer densities in both formats, and 0.1 with the transposed convs dense and with input-channel
   masks per block of 4 outputs ("blocks", uniform and ERK);
4. inference at 1 x 128^3: DynUNet against the compacted copies at 0.2 and 0.1, at 0.1 with the transposed convs
   dense, and at 0.1 with ERK layer densities and with per-block masks (few repeats: ~8 s a call);
5. cpu-demo presets: inference at 1 x 32^3 in both memory formats, and one training step (forward, loss = sum
   of the deep-supervision outputs' mean squares, backward, nnU-Net's SGD, ``sparsity.step()`` for the masked
   model) at batch 2 x 32^3: training runs the masked model (compaction is for inference);
6. checkpoint sizes at the paper preset: dense state dicts against ``sparse_state_dict`` (masks + active weights)
   at density 0.1, kernel and input-channel masks, and the compacted model's state dict.

Masks are random (a sparsifier without training): the cost depends on how many channels each layer keeps, not on
which. "compacted d" = ``compact_e2enet`` of the E2ENet with input-channel masks at density d on its fusion convs
and transposed convs (``e2enet_fusion_targets``); the masked model itself runs at dense speed (zeros in dense
tensors).

OpenMP threads sleep between parallel regions here (OMP_WAIT_POLICY=PASSIVE unless set otherwise): on a machine
shared with other processes, spinning workers lose their core at every barrier, which made 2-thread times 1.7x
(DynUNet) to 4x (compacted E2ENet, many small ops) slower than 1-thread times in measurement.

    python bench/bench_e2enet.py [--quick] [--threads 2] [--sections 1 2 3 4 5 6]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP

import argparse
import copy
import io
from collections import defaultdict

import torch
from common import interleaved, machine
from torch import nn

import sparsefuse as sf
from e2enet.inference.compact_layers import copy_runs
from e2enet.inference.compaction import channel_assembly, compact_e2enet, e2enet_compaction_plan
from e2enet.nets.dynunet import build_dynunet
from e2enet.nets.e2enet import build_e2enet, e2enet_fusion_targets, is_fusion_conv
from e2enet.nets.registry import output_list
from sparsefuse.serialization import sparse_state_dict

IN_CHANNELS, NUM_CLASSES = 1, 16  # CT, AMOS's 15 organs + background
DENSITIES = (0.2, 0.1)
ERK_DENSITY = 0.1  # also timed with ERK layer densities, which keep more of the narrow full-resolution layers
ERK_NAME = f"compacted {ERK_DENSITY} ERK"
# More mask settings at ERK_DENSITY, name -> input_channel_masks options: the fusion convs alone with the transposed
# convs dense (train.py --sparse-layers fusion-convs), and input channels per block of 4 outputs: uniform, uniform
# with the transposed convs dense, and ERK.
MASK_SETTINGS = {
    f"compacted {ERK_DENSITY}, dense ups": dict(targets=is_fusion_conv),
    f"compacted {ERK_DENSITY} blocks": dict(granularity="input_channel_blocks"),
    f"compacted {ERK_DENSITY} blocks, dense ups": dict(granularity="input_channel_blocks", targets=is_fusion_conv),
    f"compacted {ERK_DENSITY} blocks ERK": dict(granularity="input_channel_blocks", distribution="erk"),
}
CONTIGUOUS, CHANNELS_LAST = torch.contiguous_format, torch.channels_last_3d
FORMAT_NAMES = {CONTIGUOUS: "contiguous", CHANNELS_LAST: "channels_last_3d"}
# Kind of work of each operator called from Python (torch.profiler's top-level events).
KINDS = {
    "convolution": ("aten::conv3d", "aten::mkldnn_convolution", "aten::convolution"),
    "transposed conv (up)": ("aten::conv_transpose3d", "aten::matmul", "aten::reshape"),
    "instance norm": (
        "aten::instance_norm",
        "aten::batch_norm",
        "aten::sum",
        "aten::sub",
        "aten::square_",
        "aten::addcmul",
        "aten::rsqrt",
        "aten::mul",
        "aten::add",
        "aten::div",
        "aten::neg",
    ),
    "shift / concat / gather copies": (
        "_DepthShiftFn",
        "aten::cat",
        "aten::copy_",
        "aten::zero_",
        "aten::index",
        "aten::index_select",
        "aten::empty",
        "aten::empty_like",
    ),
    "max pool": ("aten::max_pool3d",),
    "LeakyReLU": ("aten::leaky_relu_",),
}


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def e2enet(preset: str) -> nn.Module:
    torch.manual_seed(0)
    return build_e2enet(preset, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES).eval()


def dynunet(preset: str) -> nn.Module:
    torch.manual_seed(0)
    return build_dynunet(preset, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES).eval()


def input_channel_masks(
    model: nn.Module,
    density: float,
    optimizer=None,
    distribution: str = "uniform",
    granularity: str = "input_channel",
    targets=e2enet_fusion_targets,
) -> sf.DynamicSparsity:
    """Random input-channel masks on the fusion weights of ``model`` (zeroed in place)."""
    return sf.DynamicSparsity(
        model,
        optimizer,
        density=density,
        targets=targets,
        granularity=granularity,
        distribution=distribution,
    )


def compacted(dense: nn.Module, density: float, fmt: torch.memory_format = CHANNELS_LAST, **options) -> nn.Module:
    """``compact_e2enet`` of a copy of ``dense`` with random masks (``options``: see ``input_channel_masks``)."""
    masked = copy.deepcopy(dense)
    return compact_e2enet(masked, input_channel_masks(masked, density, **options), fmt)


def gflops(arch: str, patch: int, plan: dict | None = None) -> float:
    """2 x the multiply-accumulates of the convs and transposed convs of one eval forward at 1 x patch^3; with a
    compaction plan, of the channels the compacted E2ENet keeps (counted on the meta device: shapes only)."""
    shape = (1, IN_CHANNELS, patch, patch, patch)
    with torch.device("meta"):
        model = (dynunet if arch == "DynUNet" else e2enet)("paper")
    if plan is None:
        return float(sf.count_flops(model, shape)) / 1e9
    total = 0.0

    def count(name: str):
        def hook(module, inputs, output):
            nonlocal total
            # A transposed conv with kernel == stride does one multiply-add per output voxel and channel pair.
            taps = module.weight[0, 0].numel() if type(module) is not nn.ConvTranspose3d else 1
            total += 2 * output[0, 0].numel() * plan[name].kept_in * plan[name].kept_out * taps

        return hook

    for name, module in model.named_modules():
        if name in plan:
            module.register_forward_hook(count(name))
    with torch.no_grad():
        model(torch.empty(shape, device="meta"))
    return total / 1e9


def compacted_gflops(patch: int) -> str:
    dense = e2enet("paper")
    parts = []
    for density, distribution in [(d, "uniform") for d in DENSITIES] + [(ERK_DENSITY, "erk")]:
        masked = copy.deepcopy(dense)
        plan = e2enet_compaction_plan(masked, input_channel_masks(masked, density, distribution=distribution))
        name = ERK_NAME if distribution == "erk" else f"compacted {density}"
        parts.append(f"{name} {gflops('E2ENet', patch, plan):.0f} G")
    for name, options in MASK_SETTINGS.items():
        masked = copy.deepcopy(dense)
        sparsity = input_channel_masks(masked, ERK_DENSITY, **options)
        parts.append(f"{name} {gflops('E2ENet', patch, e2enet_compaction_plan(masked, sparsity)):.0f} G")
    return (
        f"  conv cost (2 x MACs): DynUNet {gflops('DynUNet', patch):.0f} G, E2ENet dense "
        f"{gflops('E2ENet', patch):.0f} G, " + ", ".join(parts)
    )


def forward(model: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            model(x)

    return run


def table(title: str, times: dict, reference: tuple, second: tuple | None = None) -> None:
    """One row per case: ms and the ratio of its time to ``reference``'s (and to ``second``'s)."""
    refs = [reference] + ([second] if second else [])
    print(f"\n{title}")
    print("  | model | memory format | ms | " + " | ".join(f"vs {' '.join(r)}" for r in refs) + " |")
    print("  |---|---|---|" + "---|" * len(refs))
    for (model, fmt), seconds in times.items():
        ratios = " | ".join(f"{seconds / times[r]:.2f}x" for r in refs)
        print(f"  | {model} | {fmt} | {seconds * 1e3:.1f} | {ratios} |")


def breakdown(models: dict[str, nn.Module], x: torch.Tensor) -> None:
    print(f"\n1. Where the time goes: one forward, paper preset, input {tuple(x.shape)}, torch.profiler, ms by kind")
    shares = {}
    for name, model in models.items():
        with torch.no_grad():
            model(x)  # warm-up: oneDNN primitives are created on the first call
            with torch.profiler.profile() as prof:
                model(x)
        totals = defaultdict(float)
        for event in prof.events():
            if event.cpu_parent is None:
                kind = next((k for k, names in KINDS.items() if event.name in names), "other")
                totals[kind] += event.cpu_time_total / 1e3
        shares[name] = totals
    names = list(models)
    print(f"  | {'kind of work':<32} | " + " | ".join(f"{n:>26}" for n in names) + " |")
    print(f"  |{'-' * 34}|" + "|".join("-" * 28 for _ in names) + "|")
    for kind in [*KINDS, "other"]:
        cells = []
        for n in names:
            total = sum(shares[n].values())
            cells.append(f"{shares[n][kind]:>10.0f} ms ({shares[n][kind] / total:>5.1%})".rjust(26))
        print(f"  | {kind:<32} | " + " | ".join(cells) + " |")
    print(f"  | {'total':<32} | " + " | ".join(f"{sum(shares[n].values()):>10.0f} ms".rjust(26) for n in names) + " |")


def split_conv_cases(density: float) -> dict:
    """Fusion node x(0, 1) of the paper preset at 64^3, reading ``density`` of each of its two 48-channel inputs
    (same level, upsampled): one conv over the input assembled with its depth shifts, against the sum of one conv
    per part (each part still needs its shifted copy)."""
    torch.manual_seed(0)
    c, size = 48, 64
    read = max(1, round(density * c))
    same, up = torch.randn(1, c, size, size, size), torch.randn(1, c, size, size, size)
    weight, bias = torch.randn(c, 2 * read, 1, 3, 3), torch.randn(c)
    picked = torch.randperm(c)[:read].sort().values.tolist()
    group = -(-2 * c // 3)  # DepthShiftConv3d's three chunks over the 2c concatenated channels: shifts -1, 0, +1
    # The shipped assembly (compaction.channel_assembly + compact_layers.copy_runs): each read channel, shifted as in
    # the full-width input, copied in runs of neighbouring channels.
    read_same = [(0, ch, ch // group - 1) for ch in picked]
    read_up = [(1, ch, (c + ch) // group - 1) for ch in picked]

    def assembled(layout, parts):
        runs, fills, _ = channel_assembly(layout, [c] * len(parts))
        return copy_runs(parts, runs, fills, len(layout), 2, torch.contiguous_format)

    def conv(x, w, b):
        return torch.mkldnn_convolution(x, w, b, (0, 1, 1), (1, 1, 1), (1, 1, 1), 1)

    def one_conv():
        conv(assembled(read_same + read_up, [same, up]), weight, bias)

    def split():
        up_only = [(0, ch, shift) for _, ch, shift in read_up]
        first, second = assembled(read_same, [same]), assembled(up_only, [up])
        conv(first, weight[:, :read], bias).add_(conv(second, weight[:, read:], None))

    label = f"{read} + {read} channels read"
    return {(label, "one conv over the assembled input"): one_conv, (label, "sum of per-part convs"): split}


def inference_64(args) -> None:
    dense_e2e, base = e2enet("paper"), dynunet("paper")
    x = torch.randn(1, IN_CHANNELS, 64, 64, 64)
    x_cl = x.contiguous(memory_format=CHANNELS_LAST)
    cases = {}
    for fmt, xf in ((CONTIGUOUS, x), (CHANNELS_LAST, x_cl)):
        cases[("DynUNet", FORMAT_NAMES[fmt])] = forward(copy.deepcopy(base).to(memory_format=fmt), xf)
        cases[("E2ENet dense", FORMAT_NAMES[fmt])] = forward(copy.deepcopy(dense_e2e).to(memory_format=fmt), xf)
    for density in (1.0, *DENSITIES):
        for fmt in (CHANNELS_LAST, CONTIGUOUS) if density in (1.0, 0.1) else (CHANNELS_LAST,):
            cases[(f"compacted {density}", FORMAT_NAMES[fmt])] = forward(compacted(dense_e2e, density, fmt), x)
    for fmt in (CHANNELS_LAST, CONTIGUOUS):
        erk = compacted(dense_e2e, ERK_DENSITY, fmt, distribution="erk")
        cases[(ERK_NAME, FORMAT_NAMES[fmt])] = forward(erk, x)
    for name, options in MASK_SETTINGS.items():
        cases[(name, "channels_last_3d")] = forward(compacted(dense_e2e, ERK_DENSITY, **options), x)
    times = interleaved(cases, args.repeats_64, warmup=1)
    table(
        f"3. Inference, paper presets, 1 x {IN_CHANNELS} x 64^3, {NUM_CLASSES} classes, median of "
        f"{args.repeats_64} (load {load()})",
        times,
        ("DynUNet", "contiguous"),
        ("E2ENet dense", "contiguous"),
    )
    print(compacted_gflops(64))


def inference_128(args) -> None:
    dense_e2e, base = e2enet("paper"), dynunet("paper")
    x = torch.randn(1, IN_CHANNELS, 128, 128, 128)
    cases = {("DynUNet", "contiguous"): forward(base, x)}
    for density in DENSITIES:
        cases[(f"compacted {density}", "channels_last_3d")] = forward(compacted(dense_e2e, density), x)
    cases[(ERK_NAME, "channels_last_3d")] = forward(compacted(dense_e2e, ERK_DENSITY, distribution="erk"), x)
    for name, options in MASK_SETTINGS.items():
        cases[(name, "channels_last_3d")] = forward(compacted(dense_e2e, ERK_DENSITY, **options), x)
    del dense_e2e
    times = interleaved(cases, args.repeats_128, warmup=1)
    table(
        f"4. Inference, paper presets, 1 x {IN_CHANNELS} x 128^3, median of {args.repeats_128} (load {load()})",
        times,
        ("DynUNet", "contiguous"),
    )
    print(compacted_gflops(128))
    for name in ("compacted 0.1", ERK_NAME, *MASK_SETTINGS):
        ratio = times[(name, "channels_last_3d")] / times[("DynUNet", "contiguous")]
        print(
            f"  target: {name} >= 1.3x faster than DynUNet (<= 0.77x its time): {1 / ratio:.2f}x faster, "
            f"{'met' if ratio <= 1 / 1.3 else 'missed'}"
        )


def nnunet_sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99, nesterov=True, weight_decay=3e-5)


def train_step(model: nn.Module, fmt: torch.memory_format, x: torch.Tensor, density: float | None):
    model = copy.deepcopy(model).to(memory_format=fmt).train()
    optimizer = nnunet_sgd(model)
    sparsity = None if density is None else input_channel_masks(model, density, optimizer)
    xf = x.contiguous(memory_format=fmt)

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = sum(o.float().square().mean() for o in output_list(model(xf)))
        loss.backward()
        optimizer.step()
        if sparsity is not None:
            sparsity.step()

    return run


def cpu_demo(args) -> None:
    dense_e2e, base = e2enet("cpu-demo"), dynunet("cpu-demo")
    x = torch.randn(1, IN_CHANNELS, 32, 32, 32)
    cases = {}
    for fmt in (CONTIGUOUS, CHANNELS_LAST):
        xf = x.contiguous(memory_format=fmt)
        cases[("DynUNet", FORMAT_NAMES[fmt])] = forward(copy.deepcopy(base).to(memory_format=fmt), xf)
        cases[("E2ENet dense", FORMAT_NAMES[fmt])] = forward(copy.deepcopy(dense_e2e).to(memory_format=fmt), xf)
        cases[("compacted 0.1", FORMAT_NAMES[fmt])] = forward(compacted(dense_e2e, 0.1, fmt), x)
    times = interleaved(cases, args.repeats_demo, warmup=2)
    table(
        f"5a. Inference, cpu-demo presets, 1 x {IN_CHANNELS} x 32^3, median of {args.repeats_demo} (load {load()})",
        times,
        ("DynUNet", "contiguous"),
        ("E2ENet dense", "contiguous"),
    )

    x = torch.randn(2, IN_CHANNELS, 32, 32, 32)
    cases = {}
    for fmt in (CONTIGUOUS, CHANNELS_LAST):
        cases[("DynUNet", FORMAT_NAMES[fmt])] = train_step(base, fmt, x, None)
        cases[("E2ENet dense", FORMAT_NAMES[fmt])] = train_step(dense_e2e, fmt, x, None)
        cases[("E2ENet masked 0.1", FORMAT_NAMES[fmt])] = train_step(dense_e2e, fmt, x, 0.1)
    times = interleaved(cases, args.repeats_demo, warmup=1)
    table(
        f"5b. Training step (fwd + bwd + SGD [+ sparsity.step()]), cpu-demo presets, batch 2 x {IN_CHANNELS} x "
        f"32^3, input-channel masks, median of {args.repeats_demo} (load {load()})",
        times,
        ("DynUNet", "contiguous"),
        ("E2ENet dense", "contiguous"),
    )


def saved_mb(obj) -> float:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell() / 1e6


def checkpoint_sizes() -> None:
    dense_e2e = e2enet("paper")
    rows = {
        "DynUNet state_dict": saved_mb(dynunet("paper").state_dict()),
        "E2ENet dense state_dict": saved_mb(dense_e2e.state_dict()),
    }
    for granularity in ("kernel", "input_channel"):
        masked = copy.deepcopy(dense_e2e)
        sparsity = sf.DynamicSparsity(masked, None, density=0.1, targets=e2enet_fusion_targets, granularity=granularity)
        state = sparse_state_dict(masked, sparsity)
        rows[f"E2ENet sparse_state_dict, {granularity} masks 0.1"] = saved_mb(state)
        rows[f"  of which masks ({granularity})"] = saved_mb(state["masks"])
        if granularity == "input_channel":
            rows["E2ENet compacted 0.1 state_dict"] = saved_mb(compact_e2enet(masked, sparsity).state_dict())
    reference = rows["DynUNet state_dict"]
    print("\n6. Checkpoint size, paper presets, torch.save (MB = 10^6 bytes)")
    print(f"  | {'checkpoint':<52} | {'MB':>7} | {'vs DynUNet':>10} |")
    print(f"  |{'-' * 54}|{'-' * 9}|{'-' * 12}|")
    for name, mb in rows.items():
        print(f"  | {name:<52} | {mb:>7.2f} | {mb / reference:>9.3f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repeat of everything (a smoke run, noisy)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--sections", type=int, nargs="+", choices=range(1, 7), default=list(range(1, 7)), help="sections to run"
    )
    args = parser.parse_args()
    args.repeats_64, args.repeats_128, args.repeats_demo = (1, 1, 2) if args.quick else (3, 3, 7)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"load average at start (1/5/15 min): {load()}")

    if 1 in args.sections:
        dense_e2e = e2enet("paper")
        x = torch.randn(1, IN_CHANNELS, 64, 64, 64)
        breakdown({"E2ENet dense, contiguous": dense_e2e, "compacted 0.1, channels_last": compacted(dense_e2e, 0.1)}, x)
        del dense_e2e
    if 2 in args.sections:
        times = interleaved({**split_conv_cases(1.0), **split_conv_cases(0.1)}, 3 if args.quick else 7, warmup=1)
        print("\n2. Fusion conv of x(0, 1) at 64^3 (48 + 48 input channels -> 48, shifted), median ms")
        for (read, how), seconds in times.items():
            print(f"  {read:>10}: {how:<36} {seconds * 1e3:8.1f}")
    sections = {3: inference_64, 4: inference_128, 5: cpu_demo, 6: lambda args: checkpoint_sizes()}
    for number, run in sections.items():
        if number in args.sections:
            run(args)
    print(f"\nload average at end (1/5/15 min): {load()}")


if __name__ == "__main__":
    main()
