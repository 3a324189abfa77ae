"""E2ENet dense and sparse, its static ablation and the nnU-Net baseline, under one budget and over seeds.

    python examples/e2enet/compare.py [--task NAME | --data DATASET_DIR] [--seeds 3]
        [--settings NAME ...] [--epochs E] [--iters-per-epoch N] [--lr LR] [--workdir runs/compare]
        [--json results.json]
    python examples/e2enet/compare.py --suite | --tasks NAME ... [--jobs 2] [--seeds 3] [--settings NAME ...]

Trains every setting with seeds 0..N-1, one run after the other in this process, on the same data, fold and
budget (train.py's ``cpu-demo`` recipe unless ``--preset paper``): E2ENet dense, DSFF at densities 0.2 and 0.1,
the static ablation at 0.1 (fixed random mask), and MONAI DynUNet configured like nnU-Net 3d_fullres (the paper's
strongest baseline, dense). Then segments the held-out test cases (the embedded MNI task, or ``--data``'s
imagesTs/labelsTs) and prints one row per setting: Dice per class and mDice as mean ± std over the seeds, Params,
FLOPs (eq. 5 and 2 x MACs per patch), the PT score (eq. 7 on the mean mDice, references over the rows), seconds
per training iteration and inference seconds per case. ``learning_curves.png`` in the workdir shows the mean
training loss and validation pseudo-Dice per epoch of every setting. Finished runs are reused (``--resume``), so an
interrupted comparison continues where it stopped.

A suite (``--suite``: every task of ``SUITE`` in :mod:`e2enet.dataset.mni_tasks`, or ``--tasks``) chooses a recipe
on tasks of different character: by default DynUNet, E2ENet dense and DSFF at 0.2 and 0.1 on each task and seed,
``--jobs`` runs at a time, each in a fresh process with one torch thread, so results do not depend on ``--jobs``.
It prints one table (per task mDice mean ± std over seeds, the mean over tasks, the lowest Dice of any class and
the training seconds per run), draws ``suite_dice_over_time.png`` and writes every row to ``suite_results.json``
in the workdir. Runs live in ``WORKDIR/TASK/SETTING/seed_S``; a finished run's row (``compare_result.json``) is
reused while the run's settings are unchanged, and an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import platform
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
import torch

from e2enet.atomic import write_json
from e2enet.dataset import mni as prepare_mni
from e2enet.evaluation import evaluate
from e2enet.experiments import accounting
from e2enet.experiments.paper_counting import pt_score
from e2enet.experiments.suite_report import format_suite, plot_suite, spread, suite_summary
from e2enet.inference import predict
from e2enet.nets.registry import model_arguments
from e2enet.problems import Problem
from e2enet.training.config import RunConfig, as_flags, identity_keys, make_config, settings_of
from e2enet.training.plots import plot_dice_over_time, plot_learning_curves
from e2enet.training.train import train

INPUT_CHANNEL_ERK_01 = dict(density=0.1, granularity="input_channel", distribution="erk")
SETTINGS = {  # row name -> run settings (training/config.py) over the preset's
    "E2ENet dense": dict(density=1.0),
    "E2ENet DSFF 0.3": dict(density=0.3),
    "E2ENet DSFF 0.2": dict(density=0.2),
    "E2ENet DSFF 0.1": dict(density=0.1),
    # cpu-demo's low-density update rules (a smaller first exchange, a mask fixed for the last quarter) at 0.2.
    "E2ENet DSFF 0.2 gentle": dict(density=0.2, drop_fraction=0.2, update_until=0.75),
    # The first mask trains unchanged for the first quarter of the run; the paper's rules from there.
    "E2ENet DSFF 0.2 late start": dict(density=0.2, update_from=0.25),
    "E2ENet static 0.2": dict(density=0.2, static=True),
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
    "E2ENet DSFF input-channel blocks 0.2 ERK, dense up": {
        **INPUT_CHANNEL_ERK_01,
        "density": 0.2,
        "granularity": "input_channel_blocks",
        "sparse_layers": "fusion-convs",
    },
    # ... with the blocks drawing their inputs from a shared pool of twice one block's reads, so a compacted layer
    # reads about twice the density instead of the union of four blocks.
    "E2ENet DSFF input-channel pool 0.2 ERK, dense up": {
        **INPUT_CHANNEL_ERK_01,
        "density": 0.2,
        "granularity": "input_channel_pool",
        "sparse_layers": "fusion-convs",
    },
    "E2ENet DSFF input-channel pool 0.2, dense up": {
        "density": 0.2,
        "granularity": "input_channel_pool",
        "sparse_layers": "fusion-convs",
    },
    "DynUNet (nnU-Net)": dict(arch="dynunet", density=1.0),
}
DEFAULT_SETTINGS = ["E2ENet dense", "E2ENet DSFF 0.2", "E2ENet DSFF 0.1", "E2ENet static 0.1", "DynUNet (nnU-Net)"]
SUITE_SETTINGS = ["DynUNet (nnU-Net)", "E2ENet dense", "E2ENet DSFF 0.2", "E2ENet DSFF 0.1"]
RESULT_FILE = "compare_result.json"  # a finished suite run's row, with what it ran, beside the run


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
        per_class = " | ".join(spread(r["dice_per_class"][c], r["dice_per_class_std"][c], seeds) for c in classes)
        lines.append(
            f"| {r['name']} | {per_class} | **{spread(r['mdice'], r['mdice_std'], seeds)}** | {r['params']:,} | "
            f"{r['flops'] / 1e9:.3f} | {r['flops_macs'] / 1e9:.3f} | {r['pt']:.3f} | "
            f"{r['seconds_per_iteration']:.3f} | {r['inference_seconds_per_case']:.2f} |"
        )
    return "\n".join(lines)


def folder_name(name: str) -> str:
    return name.replace(" ", "_").replace("(", "").replace(")", "")


def embedded_dataset(workdir: Path, task: str) -> Path:
    """The embedded task's raw dataset under ``workdir/raw``, built at its default size unless already there."""
    dataset = workdir / "raw" / prepare_mni.TASKS[task].folder_name
    if not (dataset / "dataset.json").is_file():
        print(f"$ python examples/e2enet/prepare_mni.py --task {task} --out {dataset.parent}", flush=True)
        dataset = prepare_mni.build_mni_dataset(dataset.parent, task=task)
    return dataset


def machine_line() -> str:
    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}"


# ------------------------------------------------------------------------------------------------------ suite
def run_identity(config: RunConfig) -> dict:
    """What makes a suite run the same experiment: the settings a resumed training must share, and the data."""
    settings = settings_of(config)
    # A dataset rebuilt another way (seed, spacing, counts) changes its dataset.json or provenance file.
    digest = hashlib.sha256()
    for name in ("dataset.json", prepare_mni.PROVENANCE_FILE):
        digest.update((config.data / name).read_bytes() if (config.data / name).is_file() else b"")
    network = model_arguments(config.arch, config.preset, config.model_options)  # a preset's widths may change
    return {key: settings[key] for key in identity_keys(settings)} | {
        "dataset": digest.hexdigest(),
        "model_arguments": network,
    }


def run_in_child(name: str, config: RunConfig) -> None:
    """One suite run in a process of its own: its output to a log beside the run, its result to RESULT_FILE. A run
    that train.py refuses (a ``Problem``, e.g. a run folder of an older version) exits with status 2 and the reason
    in one line, in the log and on stderr."""
    config.out.mkdir(parents=True, exist_ok=True)
    with open(config.out / "compare.log", "w") as log:
        try:
            with redirect_stdout(log), redirect_stderr(log):
                run = run_setting(name, config)
        except Problem as problem:
            for stream in (log, sys.stderr):
                print(f"error: {problem}", file=stream, flush=True)
            raise SystemExit(2) from None
    write_json(config.out / RESULT_FILE, {"identity": run_identity(config), "run": run})


def finished_run(config: RunConfig) -> dict | None:
    """The result of a finished run of this very experiment in ``config.out``, or None."""
    path = config.out / RESULT_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["run"] if saved["identity"] == run_identity(config) else None


def run_jobs(jobs: list[tuple[str, str, RunConfig]], parallel: int) -> dict[Path, dict]:
    """Run every (task, setting, config) not finished before, ``parallel`` at a time; each run's result by folder.

    Every run trains in a fresh process with one torch thread, so its result does not depend on ``parallel``,
    on the order or on the runs before it; ``parallel`` only decides how many share the machine at once.
    """
    results = {config.out: run for _, _, config in jobs if (run := finished_run(config)) is not None}
    pending = [job for job in jobs if job[2].out not in results]
    print(f"{len(jobs)} runs: {len(results)} finished before, {len(pending)} to run, {parallel} at a time", flush=True)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state shared with this one
    running, failed = {}, []
    while pending or running:
        while pending and len(running) < parallel:
            task, name, config = pending.pop(0)
            process = context.Process(target=run_in_child, args=(name, config))
            process.start()
            running[process.sentinel] = (process, task, name, config, time.perf_counter())
        for sentinel in wait(list(running)):
            process, task, name, config, started = running.pop(sentinel)
            process.join()
            where = f"{task} / {name} / seed {config.seed}"
            if process.exitcode != 0 or (run := finished_run(config)) is None:
                failed.append(f"{where}: exit status {process.exitcode}, see {config.out / 'compare.log'}")
                print(f"failed: {failed[-1]}", flush=True)
                continue
            results[config.out] = run
            print(
                f"[{len(results)}/{len(jobs)}] {where}: mDice {run['mdice']:.3f}, "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
    if failed:
        raise SystemExit("error: runs failed:\n  " + "\n  ".join(failed))
    return results


def suite_jobs(args: argparse.Namespace, budget: dict) -> list[tuple[str, str, RunConfig]]:
    """(task, setting, config) of every suite run, seed 0 of every task and setting first: an early look at all."""
    datasets = {task: embedded_dataset(args.workdir, task) for task in args.tasks}
    jobs = []
    for seed in range(args.seeds):
        for task in args.tasks:
            for name in args.settings:
                out = args.workdir / task / folder_name(name) / f"seed_{seed}"
                settings = dict(**SETTINGS[name], **budget, seed=seed, resume=True, progress=False, threads=1)
                config = make_config(data=datasets[task], out=out, preset=args.preset, **settings)
                jobs.append((task, name, config))
    return jobs


def run_suite(args: argparse.Namespace, budget: dict) -> list[dict]:
    """Every setting on every task over the seeds: one table, one figure, one JSON of all rows."""
    jobs = suite_jobs(args, budget)
    results = run_jobs(jobs, args.jobs)
    rows_by_task = {
        task: [summarise([results[c.out] for t, n, c in jobs if (t, n) == (task, name)]) for name in args.settings]
        for task in args.tasks
    }
    entries = suite_summary(rows_by_task)
    figure = args.workdir / "suite_dice_over_time.png"
    plot_suite(entries, len(args.tasks), figure)
    machine = f"{machine_line()}, 1 torch thread per run, {args.jobs} at a time"
    json_path = args.json or args.workdir / "suite_results.json"
    summary = [{k: v for k, v in e.items() if k != "runs"} for e in entries]
    write_json(
        json_path,
        {"tasks": args.tasks, "preset": args.preset, "budget": budget, "machine": machine, "summary": summary}
        | {"rows": rows_by_task},
        indent=1,
    )
    iterations = rows_by_task[args.tasks[0]][0]["iterations"]
    print(f"\n{iterations} iterations per run, preset {args.preset}, seeds {entries[0]['seeds']}; {machine}\n")
    print(format_suite(entries))
    print(f"\nfigure: {figure}; every row: {json_path}")
    return entries


# ----------------------------------------------------------------------------------------------- one dataset
def run_dataset(args: argparse.Namespace, budget: dict) -> list[dict]:
    """Every setting on one dataset over the seeds, one run after the other in this process."""
    dataset = args.data if args.data is not None else embedded_dataset(args.workdir, args.task or "tissue")
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
    machine = f"{machine_line()}, {torch.get_num_threads()} threads"
    print(
        f"\n{rows[0]['iterations']} iterations per model, preset {args.preset}, patch "
        f"{'x'.join(map(str, rows[0]['patch']))}, seeds {rows[0]['seeds']}, {dataset.name}; {machine}\n"
    )
    print(format_rows(rows))
    print(f"\nlearning curves: {args.workdir / 'learning_curves.png'}, {args.workdir / 'dice_over_time.png'}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "references": references, "machine": machine}, indent=1))
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("runs/compare"))
    tasks = sorted(prepare_mni.TASKS)
    p.add_argument("--task", choices=tasks, default=None, help="embedded MNI task (default: tissue)")
    p.add_argument("--data", type=Path, default=None, help="your dataset with imagesTs/labelsTs (instead of --task)")
    p.add_argument("--suite", action="store_true", help=f"every task of the suite: {', '.join(prepare_mni.SUITE)}")
    p.add_argument("--tasks", nargs="+", choices=tasks, default=None, metavar="TASK", help="these tasks as a suite")
    p.add_argument("--jobs", type=int, default=1, help="suite runs side by side, one torch thread each (default 1)")
    p.add_argument("--preset", default="cpu-demo", choices=["cpu-demo", "paper"])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per setting (mean ± std over them)")
    p.add_argument(
        "--settings",
        nargs="+",
        choices=list(SETTINGS),
        default=None,
        metavar="NAME",
        help=f"rows to run (default: {DEFAULT_SETTINGS}; with a suite {SUITE_SETTINGS})",
    )
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    p.add_argument("--iters-per-epoch", type=int, default=None, help="default: the preset's")
    p.add_argument("--lr", type=float, default=None, help="SGD's initial learning rate (default: the preset's)")
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write the rows as JSON (a suite: always, by default WORKDIR/suite_results.json)",
    )
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.suite and args.tasks:
        p.error("--suite runs every task of the suite and --tasks the ones named: give one of them")
    if args.suite:
        args.tasks = list(prepare_mni.SUITE)
    suite = args.tasks is not None
    if suite and (args.task or args.data):
        p.error("--task and --data name one dataset; --suite and --tasks run embedded tasks: give one kind")
    if args.jobs > 1 and not suite:
        p.error("--jobs runs suite runs side by side; use it with --suite or --tasks")
    if suite and len(set(args.tasks)) != len(args.tasks):
        p.error(f"--tasks names a task twice: {args.tasks}")
    if args.settings is None:
        args.settings = SUITE_SETTINGS if suite else DEFAULT_SETTINGS
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    budget = {k: getattr(args, k) for k in ("epochs", "iters_per_epoch", "lr") if getattr(args, k) is not None}
    return run_suite(args, budget) if args.tasks is not None else run_dataset(args, budget)
