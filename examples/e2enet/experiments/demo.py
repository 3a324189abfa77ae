"""The E2ENet demo, end to end on the embedded MNI data: prepare, train, predict, evaluate, account.

    python examples/e2enet/demo.py [--workdir runs/demo] [--density 0.2] [--epochs E] [--iters-per-epoch N]

Builds the MNI152 tissue dataset (nilearn's template, no download), trains three networks under the same budget
and train.py's ``cpu-demo`` recipe: E2ENet dense, E2ENet with dynamic sparse feature fusion at ``--density``, and
nnU-Net's DynUNet (the baseline); segments the held-out test cases, scores them and prints one table: Dice per
class and mDice, Params and FLOPs (the paper's eq. 4-5, and true MACs), the PT score (eq. 7, references over the
rows), seconds per training iteration and inference seconds per case; and draws the learning curves to
``WORKDIR/learning_curves.png``. Each step prints the equivalent command line. Rerunning continues finished or
interrupted runs (``--resume``). One seed: for mean ± std over seeds run compare.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from e2enet.dataset import mni as prepare_mni
from e2enet.experiments.compare import SETTINGS, add_pt_scores, folder_name, format_rows, run_setting, summarise
from e2enet.training.config import make_config
from e2enet.training.plots import plot_dice_over_time, plot_learning_curves


def cost_against_baseline(rows: list[dict], baseline: str = "DynUNet (nnU-Net)") -> str:
    """One line per E2ENet row: its training time per iteration and inference time per case as multiples of the
    baseline's, from the single runs above (bench/ measures ratios side by side)."""
    base = next(r for r in rows if r["name"] == baseline)
    lines = [f"\ntime against {baseline} (single runs; bench/ times them side by side):"]
    for r in rows:
        if r["name"] != baseline:
            train = r["seconds_per_iteration"] / base["seconds_per_iteration"]
            infer = r["inference_seconds_per_case"] / base["inference_seconds_per_case"]
            lines.append(
                f"  {r['name']}: {train:.2f}x its time per training iteration, {infer:.2f}x its inference time"
            )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    p.add_argument("--epochs", type=int, default=None, help="default: the cpu-demo preset's")
    p.add_argument("--iters-per-epoch", type=int, default=None, help="default: the cpu-demo preset's")
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    dataset = args.workdir / "raw" / "Dataset990_MNITissue"
    if not (dataset / "dataset.json").is_file():
        print(f"$ python examples/e2enet/prepare_mni.py --out {dataset.parent}")
        dataset = prepare_mni.build_mni_dataset(dataset.parent)
    settings = [
        ("E2ENet dense", SETTINGS["E2ENet dense"]),
        (f"E2ENet DSFF {args.density}", dict(density=args.density)),
        ("DynUNet (nnU-Net)", SETTINGS["DynUNet (nnU-Net)"]),
    ]
    budget = {k: getattr(args, k) for k in ("epochs", "iters_per_epoch") if getattr(args, k) is not None}
    rows = []
    for name, settings_of_row in settings:
        out = args.workdir / folder_name(name)
        config = make_config(
            data=dataset, out=out, **settings_of_row, **budget, resume=True, progress=not args.no_progress
        )
        run = run_setting(name, config)
        rows.append(summarise([run]))
    add_pt_scores(rows)
    plot_learning_curves(rows, args.workdir / "learning_curves.png")
    plot_dice_over_time(rows, args.workdir / "dice_over_time.png")
    patch = "x".join(map(str, rows[0]["patch"]))
    print(
        f"\nE2ENet demo: Dice on the held-out test cases, {rows[0]['iterations']} iterations per model, one seed; "
        f"FLOPs per {patch} patch; PT = eq. 7 with references over these rows\n"
    )
    print(format_rows(rows))
    print(cost_against_baseline(rows))
    never = {r["name"]: r["classes_never_learnt"] for r in rows if r["classes_never_learnt"]}
    if never:
        print(f"\nclasses below Dice 0.05: {never}")
    print(f"\nlearning curves: {args.workdir / 'learning_curves.png'}, {args.workdir / 'dice_over_time.png'}")
    return rows
