"""Command line of the E2ENet example's nnU-Net-style data pipeline: verify, convert, plan and preprocess, sample.

    python examples/e2enet/data.py verify --data DATASET_DIR
    python examples/e2enet/data.py convert-msd --task Task04_Hippocampus --out RAW_ROOT [--id 4]
    python examples/e2enet/data.py plan --data DATASET_DIR [--out PREPROCESSED_DIR] [--stride 32]
        [--patch-budget 262144] [--patch-size X Y Z] [--batch-size B] [--plan-only] [--no-verify]
    python examples/e2enet/data.py sample --preprocessed PREPROCESSED_DIR [--fold 0] [--batches 20]

The steps live in their own modules, along nnU-Net v2's seams: ``dataset/layout.py`` (raw layout, dataset.json,
reading NIfTI files, MSD conversion), ``dataset/verify.py`` (every problem of a dataset at once),
``preprocessing/planning.py`` (fingerprint, plans, splits, and ``plan_and_preprocess``, the whole pipeline),
``preprocessing/preprocess.py`` (crop, normalise, resample, the cache) and ``training/loader.py`` (patches,
augmentation, ``TrainLoader``). A problem with the data is one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from e2enet.dataset.layout import convert_msd_dataset
from e2enet.dataset.verify import verify_dataset
from e2enet.preprocessing.planning import (
    DEFAULT_BATCH_VOXEL_BUDGET,
    DEFAULT_NETWORK_STRIDE,
    DEFAULT_PATCH_VOXEL_BUDGET,
    PLANS_FILE,
    SPLITS_FILE,
    Plans,
    default_preprocessed_dir,
    fold_cases,
    plan_and_preprocess,
)
from e2enet.preprocessing.preprocess import PreprocessReport, preprocessed_data_dir
from e2enet.problems import Problem, report_problem
from e2enet.training.loader import TrainLoader


def _print_plan(plans: Plans, preprocessed_dir: Path, report: PreprocessReport | None) -> None:
    fingerprint = plans.fingerprint
    print(f"dataset        {plans.dataset_name} ({len(fingerprint.case_ids)} training cases)")
    print(f"plans          {preprocessed_dir / PLANS_FILE}")
    print(f"target spacing {[round(s, 4) for s in plans.target_spacing]} mm (median)")
    print(f"median shape   {plans.median_shape} voxels after crop and resampling")
    print(f"patch size     {plans.patch_size} (network stride {plans.network_stride})")
    print(f"batch size     {plans.batch_size}")
    for norm in plans.normalization:
        print(f"normalisation  {norm.channel}: {norm.scheme} ({norm.describe()})")
    print(f"cropping kept  {fingerprint.median_relative_size_after_cropping:.2f} of the median image")
    if report is not None:
        print(f"preprocessed   {report.directory}: {len(report.computed)} computed, {len(report.reused)} reused")
        if (preprocessed_dir / SPLITS_FILE).is_file():
            print(f"splits         {preprocessed_dir / SPLITS_FILE}")


def _sample_command(args: argparse.Namespace) -> None:
    plans = Plans.load(args.preprocessed / PLANS_FILE)
    train_ids, _ = fold_cases(args.preprocessed, plans.fingerprint.case_ids, args.fold)
    loader = TrainLoader(preprocessed_data_dir(args.preprocessed, plans), train_ids, plans, seed=args.seed)
    next(loader)  # the first batch pays one-off costs (MONAI kernels, allocations)
    start, forced_with_foreground, forced_total = time.perf_counter(), 0, 0
    for _ in range(args.batches):
        batch = next(loader)
        for label, forced in zip(batch["label"], batch["forced_foreground"], strict=True):
            forced_total += forced
            forced_with_foreground += bool(forced and (label > 0).any())
    ms = (time.perf_counter() - start) / args.batches * 1000
    print(f"{args.batches} batches of {loader.batch_size} x {list(batch['image'].shape[1:])}: {ms:.0f} ms per batch")
    print(f"foreground-forced samples containing foreground: {forced_with_foreground}/{forced_total}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="nnU-Net-style data pipeline of the E2ENet example")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check a raw dataset and list every problem")
    verify.add_argument("--data", type=Path, required=True, help="DatasetXXX_Name folder")
    convert = sub.add_parser("convert-msd", help="convert an MSD task folder to the nnU-Net v2 layout")
    convert.add_argument("--task", type=Path, required=True, help="TaskNN_Name folder")
    convert.add_argument("--out", type=Path, required=True, help="raw root that receives DatasetNNN_Name")
    convert.add_argument("--id", type=int, default=None, help="dataset id (default: the task number)")
    plan = sub.add_parser("plan", help="fingerprint, plan, preprocess (cached) and split a raw dataset")
    plan.add_argument("--data", type=Path, required=True, help="DatasetXXX_Name folder")
    plan.add_argument(
        "--out",
        type=Path,
        default=None,
        help="preprocessed folder (default $nnUNet_preprocessed/NAME, else RAW_ROOT/preprocessed/NAME)",
    )
    plan.add_argument(
        "--stride",
        type=int,
        nargs="+",
        default=[DEFAULT_NETWORK_STRIDE],
        help="network total stride, 1 or 3 ints (default 32)",
    )
    plan.add_argument("--patch-budget", type=int, default=DEFAULT_PATCH_VOXEL_BUDGET, help="max voxels per patch")
    plan.add_argument(
        "--batch-budget", type=int, default=DEFAULT_BATCH_VOXEL_BUDGET, help="voxels per batch that set the batch size"
    )
    plan.add_argument("--patch-size", type=int, nargs=3, default=None, help="explicit patch size (validated)")
    plan.add_argument("--batch-size", type=int, default=None)
    plan.add_argument("--plan-only", action="store_true", help="write plans.json without preprocessing")
    plan.add_argument("--no-verify", action="store_true", help="skip the full dataset check (large datasets)")
    sample = sub.add_parser("sample", help="draw training batches and report ms per batch")
    sample.add_argument("--preprocessed", type=Path, required=True)
    sample.add_argument("--fold", default="0")
    sample.add_argument("--batches", type=int, default=20)
    sample.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        if args.command == "verify":
            cases = verify_dataset(args.data)
            print(f"{args.data}: OK, {len(cases)} training cases")
        elif args.command == "convert-msd":
            print(f"wrote {convert_msd_dataset(args.task, args.out, args.id)}")
        elif args.command == "plan":
            out = args.out or default_preprocessed_dir(args.data)
            plans, report = plan_and_preprocess(
                args.data,
                out,
                verify=not args.no_verify,
                preprocess=not args.plan_only,
                network_stride=args.stride[0] if len(args.stride) == 1 else args.stride,
                patch_voxel_budget=args.patch_budget,
                batch_voxel_budget=args.batch_budget,
                patch_size=args.patch_size,
                batch_size=args.batch_size,
            )
            _print_plan(plans, out, report)
        else:
            _sample_command(args)
    except Problem as problem:
        return report_problem(problem)
    return 0
