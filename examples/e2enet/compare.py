"""E2ENet at several densities, its static ablation and the nnU-Net baseline, under one iteration budget.

    python examples/e2enet/compare.py [--workdir runs/compare] [--epochs 20] [--iters-per-epoch 25]
        [--preset cpu-demo] [--json results.json]

Trains, one after the other in this process and on the same data, fold and budget: E2ENet at densities 1.0, 0.3,
0.2 and 0.1 (dynamic DSFF), E2ENet static at 0.1 (fixed random mask), and MONAI DynUNet configured like nnU-Net
3d_fullres (the paper's strongest baseline, dense). Then segments the held-out test cases of the MNI dataset (or
``--data``'s imagesTs/labelsTs) and prints mDice, Params, FLOPs (eq. 5 and 2 x MACs per patch), the PT score
(eq. 7 with references over the rows), seconds per training iteration and inference seconds per case.
Finished runs are reused (``--resume``), so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import accounting
import evaluate
import predict
import prepare_mni
import torch
import train

import sparsefuse as sf

SETTINGS = [  # (row name, train.py flags)
    ("E2ENet dense", ["--density", "1.0"]),
    ("E2ENet DSFF 0.3", ["--density", "0.3"]),
    ("E2ENet DSFF 0.2", ["--density", "0.2"]),
    ("E2ENet DSFF 0.1", ["--density", "0.1"]),
    ("E2ENet static 0.1", ["--density", "0.1", "--static"]),
    ("DynUNet (nnU-Net)", ["--arch", "dynunet", "--density", "1.0"]),
]


def run_setting(
    name: str,
    flags: list[str],
    dataset: Path,
    out: Path,
    *,
    preset: str,
    epochs: int,
    iters_per_epoch: int,
    progress: bool = False,
) -> dict:
    """Train (resuming if interrupted), segment the test cases, score them and count Params / FLOPs: one row."""
    argv = [
        "--data",
        str(dataset),
        "--out",
        str(out),
        "--fold",
        "0",
        "--preset",
        preset,
        "--epochs",
        str(epochs),
        "--iters-per-epoch",
        str(iters_per_epoch),
        "--resume",
        *([] if progress else ["--no-progress"]),
        *flags,
    ]
    print(f"\n=== {name}\n$ python {Path(train.__file__)} {' '.join(argv)}", flush=True)
    trained = train.main(argv)
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
    print(f"$ python {Path(predict.__file__)} {' '.join(predict_argv)}", flush=True)
    started = time.perf_counter()
    cases = predict.main(predict_argv)
    infer_seconds = (time.perf_counter() - started) / max(1, len(cases))
    summary = evaluate.evaluate_folders(
        dataset / "labelsTs", out / "predictions_test", dataset_json=dataset / "dataset.json"
    )
    print(evaluate.format_table(summary))
    patch = list(reversed(trained["plans"].patch_size))  # the network sees (Z, Y, X)
    counts = accounting.account(trained["model"].cpu(), patch, trained["sparsity"])
    return {
        "name": name,
        "mdice": summary["mean"]["dice"],
        "dice_per_class": {c: v["dice"] for c, v in summary["per_class_mean"].items()},
        # Training epochs include the validation batches: seconds per iteration is an upper bound.
        "seconds_per_iteration": sum(r["seconds"] for r in trained["log"]) / (epochs * iters_per_epoch),
        "inference_seconds_per_case": infer_seconds,
        "patch": patch,
        **counts,
    }


def add_pt_scores(rows: list[dict]) -> dict:
    """PT score (eq. 7) of every row, with the references (best mDice, fewest Params and FLOPs) over the rows."""
    references = dict(
        mdice_max=max(r["mdice"] for r in rows),
        params_min=min(r["params"] for r in rows),
        flops_min=min(r["flops"] for r in rows),
    )
    for r in rows:
        r["pt"] = sf.pt_score(r["mdice"], r["params"], r["flops"], **references)
    return references


def format_rows(rows: list[dict]) -> str:
    header = "| model | mDice | Params | FLOPs eq. 5 (G) | 2 x MACs (G) | PT | s / iteration | inference s / case |"
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['mdice']:.4f} | {r['params']:,} | {r['flops'] / 1e9:.3f} | "
            f"{r['flops_macs'] / 1e9:.3f} | {r['pt']:.3f} | {r['seconds_per_iteration']:.3f} | "
            f"{r['inference_seconds_per_case']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("runs/compare"))
    p.add_argument("--data", type=Path, default=None, help="dataset with imagesTs/labelsTs (default: MNI)")
    p.add_argument("--preset", default="cpu-demo", choices=["cpu-demo", "paper"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--iters-per-epoch", type=int, default=25)
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)

    dataset = args.data or args.workdir / "raw" / "Dataset990_MNITissue"
    if args.data is None and not (dataset / "dataset.json").is_file():
        dataset = prepare_mni.build_mni_dataset(dataset.parent)
    rows = [
        run_setting(
            name,
            flags,
            dataset,
            args.workdir / name.replace(" ", "_").replace("(", "").replace(")", ""),
            preset=args.preset,
            epochs=args.epochs,
            iters_per_epoch=args.iters_per_epoch,
        )
        for name, flags in SETTINGS
    ]
    references = add_pt_scores(rows)
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"\n{args.epochs * args.iters_per_epoch} iterations per model, preset {args.preset}, patch "
        f"{'x'.join(map(str, rows[0]['patch']))}; {machine}\n"
    )
    print(format_rows(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "references": references, "machine": machine}, indent=1))
    return rows


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
