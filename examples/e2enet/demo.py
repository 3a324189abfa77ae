"""The E2ENet demo, end to end on the embedded MNI data: prepare, train, predict, evaluate, account.

    python examples/e2enet/demo.py [--workdir runs/demo] [--epochs 12] [--iters-per-epoch 25] [--density 0.2]

Builds the MNI152 tissue dataset (nilearn's template, no download), trains the ``cpu-demo`` E2ENet twice under
the same iteration budget, dense and with dynamic sparse feature fusion at ``--density``, segments the held-out
test cases, scores them (Dice, NSD, HD95) and prints one table: mDice per class, Params and FLOPs (the paper's
eq. 4-5, and true MACs), the PT score (eq. 7, references taken over the two runs), training and inference time.
Each step prints the equivalent command line. Rerunning continues finished or interrupted runs (``--resume``).
About 5 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import sparsefuse as sf
import accounting
import evaluate
import predict
import prepare_mni
import train

SCRIPTS = Path(__file__).parent


def show(script: str, argv: list[str]) -> None:
    print(f"\n$ python {SCRIPTS / script} {' '.join(argv)}", flush=True)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--iters-per-epoch", type=int, default=25)
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    dataset = args.workdir / "raw" / "Dataset990_MNITissue"
    if not (dataset / "dataset.json").is_file():
        show("prepare_mni.py", ["--out", str(dataset.parent)])
        dataset = prepare_mni.build_mni_dataset(dataset.parent)

    results = []
    for name, density in (("E2ENet dense", 1.0), (f"E2ENet DSFF {args.density}", args.density)):
        run = args.workdir / f"density_{density}"
        train_argv = ["--data", str(dataset), "--out", str(run), "--fold", "0", "--density", str(density),
                      "--preset", "cpu-demo", "--epochs", str(args.epochs), "--iters-per-epoch",
                      str(args.iters_per_epoch), "--resume"] + (["--no-progress"] if args.no_progress else [])
        show("train.py", train_argv)
        trained = train.main(train_argv)
        train_seconds = sum(row["seconds"] for row in trained["log"])

        predictions = run / "predictions_test"
        predict_argv = ["--model", str(run), "--input", str(dataset / "imagesTs"), "--output", str(predictions),
                        "--overwrite", "--no-progress"]
        show("predict.py", predict_argv)
        started = time.perf_counter()
        cases = predict.main(predict_argv)
        infer_seconds = (time.perf_counter() - started) / max(1, len(cases))

        show("evaluate.py", ["--ref", str(dataset / "labelsTs"), "--pred", str(predictions), "--dataset-json",
                             str(dataset / "dataset.json")])
        summary = evaluate.evaluate_folders(dataset / "labelsTs", predictions, dataset_json=dataset / "dataset.json")
        print(evaluate.format_table(summary))

        patch = list(reversed(trained["plans"]["patch_size"]))  # the network sees (Z, Y, X)
        counts = accounting.account(trained["model"].cpu(), patch, trained["sparsity"])
        results.append({"name": name, "density": density, "summary": summary, "train_seconds": train_seconds,
                        "infer_seconds": infer_seconds, "patch": patch, **counts})

    mdice_max = max(r["summary"]["mean"]["dice"] for r in results)
    params_min = min(r["params"] for r in results)
    flops_min = min(r["flops"] for r in results)
    for r in results:
        r["pt"] = sf.pt_score(r["summary"]["mean"]["dice"], r["params"], r["flops"], mdice_max=mdice_max,
                              params_min=params_min, flops_min=flops_min)
    print(format_results(results))
    return results


def format_results(results: list[dict]) -> str:
    classes = list(results[0]["summary"]["per_class_mean"])
    patch = "x".join(map(str, results[0]["patch"]))
    header = (f"{'model':<20} " + " ".join(f"{c[:12]:>12}" for c in classes) +
              f" {'mDice':>7} {'Params':>9} {'FLOPs eq5':>10} {'MACs':>8} {'PT':>6} {'train s':>8} {'infer s':>8}")
    lines = ["", f"E2ENet demo: test-set Dice per class (held-out cases); FLOPs per {patch} patch in G; "
                 "PT = eq. 7 with references over these rows", header, "-" * len(header)]
    for r in results:
        per_class = " ".join(f"{r['summary']['per_class_mean'][c]['dice']:>12.4f}" for c in classes)
        lines.append(f"{r['name']:<20} {per_class} {r['summary']['mean']['dice']:>7.4f} {r['params']:>9,} "
                     f"{r['flops'] / 1e9:>10.3f} {r['flops_macs'] / 1e9:>8.3f} {r['pt']:>6.3f} "
                     f"{r['train_seconds']:>8.1f} {r['infer_seconds']:>8.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
