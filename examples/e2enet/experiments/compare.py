"""E2ENet dense and sparse, its static ablation and the nnU-Net baseline, under one budget and over seeds.

    python examples/e2enet/compare.py [--task tissue|regions | --data DATASET_DIR] [--seeds 3]
        [--settings NAME ...] [--epochs E] [--iters-per-epoch N] [--lr LR] [--workdir runs/compare]
        [--json results.json]

Trains every setting with seeds 0..N-1, one run after the other in this process, on the same data, fold and
budget (train.py's ``cpu-demo`` recipe unless ``--preset paper``): E2ENet dense, DSFF at densities 0.2 and 0.1,
the static ablation at 0.1 (fixed random mask), and MONAI DynUNet configured like nnU-Net 3d_fullres (the paper's
strongest baseline, dense). Then segments the held-out test cases (the embedded MNI task, or ``--data``'s
imagesTs/labelsTs) and prints one row per setting: Dice per class and mDice as mean ± std over the seeds, Params,
FLOPs (eq. 5 and 2 x MACs per patch), the PT score (eq. 7 on the mean mDice, references over the rows), seconds
per training iteration and inference seconds per case. ``learning_curves.png`` in the workdir shows the mean
training loss and validation pseudo-Dice per epoch of every setting. Finished runs are reused (``--resume``), so an
interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from e2enet.dataset import mni as prepare_mni
from e2enet.evaluation import evaluate
from e2enet.experiments import accounting
from e2enet.experiments.paper_counting import pt_score
from e2enet.inference import predict
from e2enet.training.config import RunConfig, as_flags, make_config
from e2enet.training.plots import plot_dice_over_time, plot_learning_curves
from e2enet.training.train import train

INPUT_CHANNEL_ERK_01 = dict(density=0.1, granularity="input_channel", distribution="erk")
SETTINGS = {  # row name -> run settings (training/config.py) over the preset's
    "E2ENet dense": dict(density=1.0),
    "E2ENet DSFF 0.3": dict(density=0.3),
    "E2ENet DSFF 0.2": dict(density=0.2),
    "E2ENet DSFF 0.1": dict(density=0.1),
    "E2ENet static 0.1": dict(density=0.1, static=True),
    # Structured DSFF: whole input channels, which sparsefuse's compaction removes at inference.
    "E2ENet DSFF input-channel 0.2": dict(density=0.2, granularity="input_channel"),
    "E2ENet DSFF input-channel 0.1": dict(density=0.1, granularity="input_channel"),
    # The same total, spread by Erdos-Renyi-Kernel: narrow layers keep more of their inputs.
    "E2ENet DSFF input-channel 0.1 ERK": INPUT_CHANNEL_ERK_01,
    # ... with the transposed convs dense, so that each coarser level's features reach the node whole.
    "E2ENet DSFF input-channel 0.1 ERK, dense up": {**INPUT_CHANNEL_ERK_01, "sparse_layers": "fusion-convs"},
    # Input channels chosen per block of 4 outputs (each block reads its own), ERK, dense up.
    "E2ENet DSFF input-channel blocks 0.1 ERK, dense up": {
        **INPUT_CHANNEL_ERK_01,
        "granularity": "input_channel_blocks",
        "sparse_layers": "fusion-convs",
    },
    "DynUNet (nnU-Net)": dict(arch="dynunet", density=1.0),
}
DEFAULT_SETTINGS = ["E2ENet dense", "E2ENet DSFF 0.2", "E2ENet DSFF 0.1", "E2ENet static 0.1", "DynUNet (nnU-Net)"]


def run_setting(name: str, config: RunConfig) -> dict:
    """Train (resuming if interrupted), segment the test cases, score them and count Params / FLOPs: one run."""
    out, dataset = config.out, config.data
    print(
        f"\n=== {name}, seed {config.seed}\n$ python examples/e2enet/train.py {' '.join(as_flags(config))}", flush=True
    )
    trained = train(config)
    predict_argv = [
        "--model",
        str(out),
        "--input",
        str(dataset / "imagesTs"),
        "--output",
        str(out / "predictions_test"),
        "--overwrite",
        "--no-progress",
    ]
    print(f"$ python examples/e2enet/predict.py {' '.join(predict_argv)}", flush=True)
    started = time.perf_counter()
    cases = predict.main(predict_argv)
    infer_seconds = (time.perf_counter() - started) / max(1, len(cases))
    summary = evaluate.evaluate_folders(
        dataset / "labelsTs", out / "predictions_test", dataset_json=dataset / "dataset.json"
    )
    print(evaluate.format_table(summary))
    patch = list(reversed(trained["plans"].patch_size))  # the network sees (Z, Y, X)
    counts = accounting.account(trained["model"].cpu(), patch, trained["sparsity"])
    iterations = trained["config"]["epochs"] * trained["config"]["iters_per_epoch"]
    return {
        "name": name,
        "seed": config.seed,
        "mdice": summary["mean"]["dice"],
        "dice_per_class": {c: v["dice"] for c, v in summary["per_class_mean"].items()},
        "iterations": iterations,
        # Training epochs include the validation batches: seconds per iteration is an upper bound.
        "seconds_per_iteration": sum(r["seconds"] for r in trained["log"]) / iterations,
        "inference_seconds_per_case": infer_seconds,
        "patch": patch,
        "log": trained["log"],
        **counts,
    }


def summarise(runs: list[dict]) -> dict:
    """One row from the runs of one setting (its seeds): Dice as mean and std, costs as the mean."""
    dice = np.array([r["mdice"] for r in runs])
    classes = list(runs[0]["dice_per_class"])
    per_class = np.array([[r["dice_per_class"][c] for c in classes] for r in runs])
    return {
        "name": runs[0]["name"],
        "seeds": [r["seed"] for r in runs],
        "mdice": float(dice.mean()),
        "mdice_std": float(dice.std(ddof=1)) if len(runs) > 1 else 0.0,
        "dice_per_class": dict(zip(classes, per_class.mean(0).tolist(), strict=True)),
        "dice_per_class_std": dict(
            zip(classes, (per_class.std(0, ddof=1) if len(runs) > 1 else np.zeros(len(classes))).tolist(), strict=True)
        ),
        "classes_never_learnt": [c for c, column in zip(classes, per_class.T, strict=True) if column.min() < 0.05],
        **{k: runs[0][k] for k in ("params", "flops", "flops_macs", "patch", "iterations")},
        "seconds_per_iteration": float(np.mean([r["seconds_per_iteration"] for r in runs])),
        "inference_seconds_per_case": float(np.mean([r["inference_seconds_per_case"] for r in runs])),
        "runs": runs,
    }


def add_pt_scores(rows: list[dict]) -> dict:
    """PT score (eq. 7) of every row, with the references (best mDice, fewest Params and FLOPs) over the rows."""
    references = dict(
        mdice_max=max(r["mdice"] for r in rows),
        params_min=min(r["params"] for r in rows),
        flops_min=min(r["flops"] for r in rows),
    )
    for r in rows:
        r["pt"] = pt_score(r["mdice"], r["params"], r["flops"], **references)
    return references


def _spread(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.3f} ± {std:.3f}" if seeds > 1 else f"{mean:.3f}"  # one seed has no spread to show


def format_rows(rows: list[dict]) -> str:
    classes = list(rows[0]["dice_per_class"])
    header = (
        "| model | "
        + " | ".join(classes)
        + " | mDice | Params | FLOPs eq. 5 (G) | 2 x MACs (G) | PT | s / iteration | inference s / case |"
    )
    lines = [header, "|" + "---|" * (len(classes) + 8)]
    for r in rows:
        seeds = len(r["seeds"])
        per_class = " | ".join(_spread(r["dice_per_class"][c], r["dice_per_class_std"][c], seeds) for c in classes)
        lines.append(
            f"| {r['name']} | {per_class} | **{_spread(r['mdice'], r['mdice_std'], seeds)}** | {r['params']:,} | "
            f"{r['flops'] / 1e9:.3f} | {r['flops_macs'] / 1e9:.3f} | {r['pt']:.3f} | "
            f"{r['seconds_per_iteration']:.3f} | {r['inference_seconds_per_case']:.2f} |"
        )
    return "\n".join(lines)


def folder_name(name: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("runs/compare"))
    p.add_argument("--task", choices=sorted(prepare_mni.TASKS), default="tissue", help="embedded MNI task")
    p.add_argument("--data", type=Path, default=None, help="your dataset with imagesTs/labelsTs (instead of --task)")
    p.add_argument("--preset", default="cpu-demo", choices=["cpu-demo", "paper"])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per setting (mean ± std over them)")
    p.add_argument(
        "--settings", nargs="+", choices=list(SETTINGS), default=DEFAULT_SETTINGS, metavar="NAME", help="rows to run"
    )
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    p.add_argument("--iters-per-epoch", type=int, default=None, help="default: the preset's")
    p.add_argument("--lr", type=float, default=None, help="SGD's initial learning rate (default: the preset's)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")

    if args.data is None:
        dataset_id, dataset_name = prepare_mni.TASKS[args.task][:2]
        dataset = args.workdir / "raw" / f"Dataset{dataset_id:03d}_{dataset_name}"
        if not (dataset / "dataset.json").is_file():
            dataset = prepare_mni.build_mni_dataset(dataset.parent, task=args.task)
    else:
        dataset = args.data
    budget = {k: getattr(args, k) for k in ("epochs", "iters_per_epoch", "lr") if getattr(args, k) is not None}
    rows = []
    for name in args.settings:
        runs = []
        for seed in range(args.seeds):
            out = args.workdir / folder_name(name) / f"seed_{seed}"
            config = make_config(
                data=dataset,
                out=out,
                preset=args.preset,
                **SETTINGS[name],
                **budget,
                seed=seed,
                resume=True,
                progress=False,
            )
            runs.append(run_setting(name, config))
        rows.append(summarise(runs))
    references = add_pt_scores(rows)
    plot_learning_curves(rows, args.workdir / "learning_curves.png")
    plot_dice_over_time(rows, args.workdir / "dice_over_time.png")
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"\n{rows[0]['iterations']} iterations per model, preset {args.preset}, patch "
        f"{'x'.join(map(str, rows[0]['patch']))}, seeds {rows[0]['seeds']}, {dataset.name}; {machine}\n"
    )
    print(format_rows(rows))
    print(f"\nlearning curves: {args.workdir / 'learning_curves.png'}, {args.workdir / 'dice_over_time.png'}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "references": references, "machine": machine}, indent=1))
    return rows
