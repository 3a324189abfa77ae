"""GPU benchmark at the paper's scale: E2ENet (density 1.0 and 0.2) against DynUNet (nnU-Net 3d_fullres).

Run it on a CUDA machine. Cases run one after another rather than interleaved (a GPU is not a shared, noisy CPU,
and sequential cases give a clean peak memory per case):

* training step: batch 2 x 1 x 128^3, fp16 autocast + GradScaler, channels_last_3d, nnU-Net's SGD (momentum 0.99,
  Nesterov, weight decay 3e-5), loss = sum of the deep-supervision outputs' mean squares (fp32); for density 0.2,
  ``sf.DynamicSparsity(model, optimizer, density=0.2, targets=e2enet_fusion_targets, granularity="kernel",
  scaler=scaler)`` with ``sparsity.step()`` after ``scaler.step(optimizer)`` and ``scaler.update()`` (static masks:
  every step re-masks, no topology update falls inside the timed steps);
* inference: the same model in eval mode, ``torch.inference_mode()``, fp16 autocast, batch 1 x 1 x 128^3;
* E2ENet compacted: ``compact_e2enet`` (examples/e2enet/inference/compaction.py) of the E2ENet with random
  input-channel masks at density 0.1 on its fusion weights, built in channels_last_3d; inference only (it is not a
  training model).
  Then the same model under ``torch.compile(mode="reduce-overhead")``, which on CUDA replays the forward as a CUDA
  graph (warm-up calls include the compilation), against DynUNet compiled the same way (inference rows only);
  and the compacted model with ERK layer densities (the input-channel setting that measured accurate on the CPU),
  compiled too.

Time: median of --steps calls after --warmup calls (cudnn.benchmark is on, so the first calls pick algorithms),
each call bracketed by ``torch.cuda.synchronize()``. Peak memory: ``torch.cuda.max_memory_allocated()`` over the
timed calls, reset after warm-up (so it is the steady state: parameters, gradients, momentum and activations, not
cudnn's one-off benchmarking workspaces). A case that runs out of memory is reported as "OOM"; the others go on. A
time budget (--budget-s) skips what would not fit.

Prints a markdown table with the GPU name and torch version; also writes it as JSON to $OUT/gpu_bench.json when the
environment variable OUT is set.

    python bench/gpu.py                 # on a GPU
    python bench/gpu.py --dry-run       # same code path on CPU: cpu-demo preset, 32^3, bf16 autocast, < 60 s
    python bench/gpu.py --inference-only  # skip the training steps (the slowest cases)

DynUNet needs MONAI. On a machine where it is not installed and cannot be, put it in ``.gpu_deps`` at the
repository root (e.g. ``pip install --no-deps --target .gpu_deps monai``, or a copy of a virtual environment's
``monai`` folder), keep that folder out of git and put it on ``PYTHONPATH`` with the checkout when the project is not
installed (``PYTHONPATH=.:examples:.gpu_deps python bench/gpu.py``; bench/gpu_check.sh does). Without it the DynUNet
rows say "unavailable".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import sparsefuse as sf
from e2enet.inference.compaction import compact_e2enet
from e2enet.nets.dynunet import build_dynunet
from e2enet.nets.e2enet import build_e2enet, e2enet_fusion_targets
from e2enet.nets.registry import output_list

IN_CHANNELS, NUM_CLASSES = 1, 16  # CT, AMOS's 15 organs + background
DENSITY = 0.2
COMPACT_DENSITY = 0.1  # input-channel masks, the setting compaction is for
GIB = 2**30
COMPILED = "E2ENet compacted, torch.compile"
COMPILED_ERK = "E2ENet compacted ERK, torch.compile"
DYNUNET_COMPILED = "DynUNet, torch.compile"


class Clock:
    """Wall-clock seconds since start, and whether a budget is spent."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn, device: torch.device, warmup: int, steps: int, clock: Clock, case_budget_s: float) -> dict:
    """Median seconds of ``fn`` over up to ``steps`` calls after ``warmup``; stops early (>= 3 calls) past the
    case's time budget. Peak memory over the timed calls."""
    for _ in range(warmup):
        fn()
    reset_peak(device)
    times: list[float] = []
    started = time.perf_counter()
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 3 and (time.perf_counter() - started > case_budget_s or clock.left() < 0):
            break
    return {
        "ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "calls": len(times),
        "peak_gib": peak_gib(device),
    }


def compiled(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    # Hundreds of small operators per forward: on a GPU their launches, not their arithmetic, set the time.
    # reduce-overhead replays the whole forward as one CUDA graph; on the CPU (dry run) it only compiles.
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else "default")


def build(arch: str, preset: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch.startswith("E2ENet compacted"):  # built on the CPU, already in channels_last_3d
        model = build_e2enet(preset, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES)
        sparsity = sf.DynamicSparsity(
            model,
            None,
            density=COMPACT_DENSITY,
            targets=e2enet_fusion_targets,
            granularity="input_channel",
            distribution="erk" if arch == COMPILED_ERK else "uniform",
        )
        compacted = compact_e2enet(model, sparsity, torch.channels_last_3d).to(device)
        return compiled(compacted, device) if arch in (COMPILED, COMPILED_ERK) else compacted
    if arch == "E2ENet":
        model = build_e2enet(preset, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES)
    else:
        model = build_dynunet(preset, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES)
    model = model.to(device, memory_format=torch.channels_last_3d)
    return compiled(model.eval(), device) if arch == DYNUNET_COMPILED else model


def train_case(model, density: float, args, device, amp_dtype, clock: Clock, case_budget_s: float) -> dict:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99, nesterov=True, weight_decay=3e-5)
    use_scaler = amp_dtype == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    sparsity = None
    if density < 1.0:
        sparsity = sf.DynamicSparsity(
            model, optimizer, density=density, targets=e2enet_fusion_targets, granularity="kernel", scaler=scaler
        )
    x = torch.randn(args.batch, IN_CHANNELS, *(args.patch,) * 3, device=device)
    x = x.contiguous(memory_format=torch.channels_last_3d)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype):
            outputs = output_list(model(x))
        loss = sum(o.float().square().mean() for o in outputs)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if sparsity is not None:
            sparsity.step()

    result = timed(step, device, args.warmup, args.steps, clock, case_budget_s)
    optimizer.zero_grad(set_to_none=True)
    if sparsity is not None:
        weights = [t for name, t in model.named_parameters() if "fusion" in name.split(".") and t.dim() == 5]
        result["fusion_zero_fraction"] = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return result


def inference_case(model, args, device, amp_dtype, clock: Clock, case_budget_s: float) -> dict:
    model.eval()
    model.zero_grad(set_to_none=True)  # a training case that ran out of memory may have left gradients
    x = torch.randn(1, IN_CHANNELS, *(args.patch,) * 3, device=device)
    x = x.contiguous(memory_format=torch.channels_last_3d)

    def forward():
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype):
            model(x)

    return timed(forward, device, args.warmup, args.steps, clock, case_budget_s)


def guarded(fn, device: torch.device) -> dict:
    """Run one measurement; an out-of-memory error becomes {"error": "OOM"} and the memory is released."""
    failed = None
    try:
        return fn()
    except torch.OutOfMemoryError:
        failed = "OOM"
    except RuntimeError as err:  # cuDNN/cuBLAS allocation failures surface as plain RuntimeErrors
        if "out of memory" not in str(err).lower() and "CUDNN_STATUS_ALLOC_FAILED" not in str(err):
            raise
        failed = "OOM"
    free_memory(device)  # outside the except block: the traceback no longer pins the case's tensors
    return {"error": failed}


def run_model(arch: str, density: float, args, device, amp_dtype, clock: Clock) -> dict:
    row = {"model": arch, "density": density, "preset": args.preset}
    if clock.left() < 30:
        return {**row, "train": {"error": "skipped (time budget)"}, "inference": {"error": "skipped (time budget)"}}
    try:
        model = build(arch, args.preset, device)
    except ImportError as err:
        missing = f"unavailable ({err.name or err} not installed)"
        return {**row, "train": {"error": missing}, "inference": {"error": missing}}
    row["params"] = sum(p.numel() for p in model.parameters())
    if args.inference_only or arch.startswith("E2ENet compacted") or arch == DYNUNET_COMPILED:
        row["train"] = {"error": "n/a (inference only)"}
    else:
        row["train"] = guarded(
            lambda m=model: train_case(m, density, args, device, amp_dtype, clock, args.case_budget_s), device
        )
    row["inference"] = guarded(
        lambda m=model: inference_case(m, args, device, amp_dtype, clock, args.case_budget_s / 2), device
    )
    del model
    free_memory(device)
    print(
        f"  done {arch} density {density} at {clock.elapsed():.0f} s: train {row['train']}, "
        f"inference {row['inference']}",
        flush=True,
    )
    return row


def cell_ms(result: dict, ref: dict | None) -> tuple[str, str]:
    if "error" in result:
        return result["error"], ""
    ratio = f"{result['ms'] / ref['ms']:.2f}x" if ref and "ms" in ref else ""
    return f"{result['ms']:.1f}", ratio


def cell_gib(result: dict) -> str:
    if "error" in result:
        return result["error"]
    return "n/a (CPU)" if result["peak_gib"] is None else f"{result['peak_gib']:.2f}"


def table(rows: list[dict]) -> str:
    # Compiled rows are compared with the compiled DynUNet, the others with the eager one.
    refs = {r["model"]: r for r in rows if r["model"] in ("DynUNet", DYNUNET_COMPILED)}
    lines = [
        "| model | density | train step ms | vs DynUNet | train peak GiB | inference ms | vs DynUNet | "
        "inference peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = refs.get(DYNUNET_COMPILED if "torch.compile" in r["model"] else "DynUNet")
        t_ms, t_ratio = cell_ms(r["train"], ref["train"] if ref else None)
        i_ms, i_ratio = cell_ms(r["inference"], ref["inference"] if ref else None)
        lines.append(
            f"| {r['model']} ({r['preset']}) | {r['density']} | {t_ms} | {t_ratio} | {cell_gib(r['train'])} "
            f"| {i_ms} | {i_ratio} | {cell_gib(r['inference'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run the same code on CPU at a tiny size (cpu-demo preset, 32^3, bf16, 2+3 calls)",
    )
    parser.add_argument("--preset", default=None, help="E2ENet/DynUNet preset (default: paper; dry run: cpu-demo)")
    parser.add_argument("--patch", type=int, default=None, help="cubic patch edge (default 128; dry run 32)")
    parser.add_argument("--batch", type=int, default=2, help="training batch (inference is always batch 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed calls per case (default 20; dry run 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default 5; dry run 2)")
    parser.add_argument(
        "--dtype",
        choices=("fp16", "bf16"),
        default=None,
        help="autocast dtype (default fp16 with GradScaler; dry run bf16, no scaler)",
    )
    parser.add_argument("--inference-only", action="store_true", help="skip the training-step cases")
    parser.add_argument("--budget-s", type=float, default=420.0, help="whole-run time budget in seconds")
    parser.add_argument("--case-budget-s", type=float, default=60.0, help="timed seconds per training case")
    args = parser.parse_args()
    dry = args.dry_run
    args.preset = args.preset or ("cpu-demo" if dry else "paper")
    args.patch = args.patch or (32 if dry else 128)
    args.steps = args.steps or (3 if dry else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if dry else 5)
    args.dtype = args.dtype or ("bf16" if dry else "fp16")
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    if dry:
        device = torch.device("cpu")
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        device_name = f"CPU dry run ({platform.processor() or platform.machine()}), not a GPU measurement"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or use --dry-run for the CPU smoke test")
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        device_name = torch.cuda.get_device_name(device)
    clock = Clock(args.budget_s)
    header = {
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "dry_run": dry,
        "settings": {
            "preset": args.preset,
            "train_batch": args.batch,
            "inference_batch": 1,
            "patch": args.patch,
            "in_channels": IN_CHANNELS,
            "num_classes": NUM_CLASSES,
            "autocast": args.dtype,
            "grad_scaler": amp_dtype == torch.float16,
            "memory_format": "channels_last_3d",
            "cudnn_benchmark": device.type == "cuda",
            "warmup": args.warmup,
            "steps": args.steps,
            "sparse_density": DENSITY,
            "sparse_granularity": "kernel",
            "sparse_targets": "e2enet_fusion_targets",
            "compacted_density": COMPACT_DENSITY,
            "compacted_granularity": "input_channel",
        },
    }
    print(f"{device_name}; torch {torch.__version__}; CUDA {torch.version.cuda}", flush=True)

    rows = [
        run_model(arch, density, args, device, amp_dtype, clock)
        for arch, density in (
            ("DynUNet", 1.0),
            ("E2ENet", 1.0),
            ("E2ENet", DENSITY),
            ("E2ENet compacted", COMPACT_DENSITY),
            (DYNUNET_COMPILED, 1.0),
            (COMPILED, COMPACT_DENSITY),
            (COMPILED_ERK, COMPACT_DENSITY),
        )
    ]
    md = table(rows)
    print(
        f"\n{device_name}, torch {torch.__version__}, CUDA {torch.version.cuda}: train batch {args.batch} x "
        f"{IN_CHANNELS} x {args.patch}^3, inference batch 1, {args.dtype} autocast"
        f"{' + GradScaler' if amp_dtype == torch.float16 else ''}, channels_last_3d, median of up to "
        f"{args.steps} calls after {args.warmup} warm-up; peak = max_memory_allocated over the timed calls."
    )
    print(
        "Density 0.2 masks are zeros in dense tensors (no sparse kernels): same convolutions as dense. The "
        f"compacted E2ENet computes only the channels its input-channel masks at {COMPACT_DENSITY} leave read.\n"
    )
    print(md)
    print(f"\ntotal {clock.elapsed():.0f} s")
    out = os.environ.get("OUT")
    if out:
        path = Path(out) / "gpu_bench.json"
        path.write_text(json.dumps({**header, "rows": rows, "markdown": md, "total_s": clock.elapsed()}, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
