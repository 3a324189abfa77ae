"""The E2ENet demo, end to end on the embedded MNI data: prepare, train, predict, evaluate, account.

    python examples/e2enet/demo.py [--workdir runs/demo] [--epochs 20] [--iters-per-epoch 25] [--density 0.2]

Builds the MNI152 tissue dataset (nilearn's template, no download), trains the ``cpu-demo`` E2ENet twice under
the same iteration budget, dense and with dynamic sparse feature fusion at ``--density``, segments the held-out
test cases, scores them (Dice, NSD, HD95) and prints one table: mDice per class, Params and FLOPs (the paper's
eq. 4-5, and true MACs), the PT score (eq. 7, references taken over the two runs), seconds per training iteration
and inference seconds per case. Each step prints the equivalent command line. Rerunning continues finished or
interrupted runs (``--resume``). About 6 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import prepare_mni
import torch
from compare import add_pt_scores, run_setting


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
        print(f"$ python {Path(prepare_mni.__file__)} --out {dataset.parent}")
        dataset = prepare_mni.build_mni_dataset(dataset.parent)
    rows = [
        run_setting(
            name,
            ["--density", str(density)],
            dataset,
            args.workdir / f"density_{density}",
            preset="cpu-demo",
            epochs=args.epochs,
            iters_per_epoch=args.iters_per_epoch,
            progress=not args.no_progress,
        )
        for name, density in (("E2ENet dense", 1.0), (f"E2ENet DSFF {args.density}", args.density))
    ]
    add_pt_scores(rows)
    print(format_results(rows))
    return rows


def format_results(rows: list[dict]) -> str:
    classes = list(rows[0]["dice_per_class"])
    patch = "x".join(map(str, rows[0]["patch"]))
    header = (
        f"{'model':<20} "
        + " ".join(f"{c[:12]:>12}" for c in classes)
        + f" {'mDice':>7} {'Params':>9} {'FLOPs eq5':>10} {'MACs':>8} {'PT':>6} {'s/iter':>7} {'infer s':>8}"
    )
    lines = [
        "",
        f"E2ENet demo: test-set Dice per class (held-out cases); FLOPs per {patch} patch in G; "
        "PT = eq. 7 with references over these rows",
        header,
        "-" * len(header),
    ]
    for r in rows:
        per_class = " ".join(f"{r['dice_per_class'][c]:>12.4f}" for c in classes)
        lines.append(
            f"{r['name']:<20} {per_class} {r['mdice']:>7.4f} {r['params']:>9,} "
            f"{r['flops'] / 1e9:>10.3f} {r['flops_macs'] / 1e9:>8.3f} {r['pt']:>6.3f} "
            f"{r['seconds_per_iteration']:>7.3f} {r['inference_seconds_per_case']:>8.2f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
