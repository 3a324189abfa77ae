"""Segment NIfTI images with trained E2ENet folds: sliding window, optional mirror TTA, fold ensemble.

    python examples/e2enet/predict.py --model RUN_DIR --input FOLDER --output FOLDER [--folds 0 1 2 3 4] [--tta]
        [--save-probabilities] [--overwrite] [--checkpoint final|latest]

Input files follow the nnU-Net naming ``{case}_{XXXX}.nii.gz`` (one file per channel). Each case is preprocessed
with the run's plans (crop, normalise, resample), predicted with a sliding window (window = training patch,
50% overlap, Gaussian weighting with sigma = patch / 8, MONAI), optionally averaged over the 8 mirrorings, softmax
averaged over the folds, resampled back and written as ``{case}.nii.gz`` with the input's affine and shape.
Cases whose output already exists are skipped unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from dataset import CHANNEL_FILE
from loader import to_network_layout
from model import build_model
from monai.inferers import sliding_window_inference
from planning import PLANS_FILE, Plans
from preprocessing import preprocess_case, revert_preprocessing
from tqdm import tqdm


def find_input_cases(folder: Path, num_channels: int) -> dict[str, list[Path]]:
    """{case: [channel files in order]}; stops on a case with missing or extra channels."""
    cases: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = CHANNEL_FILE.match(path.name)
        if match:
            cases.setdefault(match["case"], {})[int(match["channel"])] = path
    if not cases:
        raise SystemExit(
            f"no images named CASE_XXXX.nii.gz in {folder}; name each channel file "
            f"{{case}}_0000.nii.gz, {{case}}_0001.nii.gz, ... as nnU-Net does"
        )
    for case, channels in cases.items():
        if sorted(channels) != list(range(num_channels)):
            raise SystemExit(
                f"case {case!r} has channel files {sorted(channels)} but the model was trained on "
                f"{num_channels} channel(s) 0..{num_channels - 1}; add or remove {case}_XXXX files"
            )
    return {case: [channels[i] for i in range(num_channels)] for case, channels in cases.items()}


def load_folds(run_dir: Path, folds: list[str] | None, checkpoint: str, device: torch.device):
    config = json.loads((run_dir / "config.json").read_text())
    plans = Plans.load(run_dir / PLANS_FILE)
    folds = folds or sorted(
        p.name.removeprefix("fold_") for p in run_dir.glob("fold_*") if (p / f"checkpoint_{checkpoint}.pth").is_file()
    )
    if not folds:
        raise SystemExit(f"no fold_*/checkpoint_{checkpoint}.pth in {run_dir}; train first (train.py --out {run_dir})")
    models = []
    for fold in folds:
        path = run_dir / f"fold_{fold}" / f"checkpoint_{checkpoint}.pth"
        if not path.is_file():
            raise SystemExit(f"fold {fold}: {path} not found; train it or leave it out of --folds")
        state = torch.load(path, map_location="cpu", weights_only=False)
        model = build_model(
            config["arch"],
            config["preset"],
            in_channels=config["in_channels"],
            num_classes=config["num_classes"],
            **config.get("model_options", {}),
        )
        model.load_state_dict(state["model"])
        models.append(model.to(device, memory_format=torch.channels_last_3d).eval())
    return models, plans, config, folds


@torch.no_grad()
def predict_probabilities(models, image: torch.Tensor, patch: list[int], tta: bool) -> torch.Tensor:
    """(1, C, X, Y, Z) normalised image -> (K, X, Y, Z) softmax, averaged over folds and mirrorings."""
    x = to_network_layout(image)
    roi = list(reversed(patch))  # the plans' patch is (X, Y, Z); the network sees (Z, Y, X)
    flips = [()] + ([c for r in (1, 2, 3) for c in itertools.combinations((2, 3, 4), r)] if tta else [])
    total = None
    for model in models:
        for axes in flips:
            flipped = x.flip(axes) if axes else x
            logits = sliding_window_inference(
                flipped, roi_size=roi, sw_batch_size=1, predictor=model, overlap=0.5, mode="gaussian", sigma_scale=0.125
            )
            probs = torch.softmax(logits.float(), 1)
            probs = probs.flip(axes) if axes else probs
            total = probs if total is None else total + probs
    return to_network_layout(total / (len(models) * len(flips)))[0]


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="RUN_DIR given to train.py --out")
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--folds", nargs="+", default=None, help="folds to ensemble (default: every trained fold)")
    p.add_argument("--checkpoint", choices=["final", "latest"], default="final")
    p.add_argument("--tta", action="store_true", help="average over the 8 mirrorings (8x slower)")
    p.add_argument("--save-probabilities", action="store_true", help="also write {case}.npz with the softmax")
    p.add_argument("--overwrite", action="store_true", help="predict cases whose output already exists")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models, plans, config, folds = load_folds(args.model, args.folds, args.checkpoint, device)
    cases = find_input_cases(args.input, config["in_channels"])
    args.output.mkdir(parents=True, exist_ok=True)
    written = []
    print(f"predicting {len(cases)} case(s) with fold(s) {folds}{' and mirror TTA' if args.tta else ''}")
    for case, files in tqdm(cases.items(), disable=args.no_progress):
        target = args.output / f"{case}.nii.gz"
        if target.exists() and not args.overwrite:
            continue
        data, _, _, properties = preprocess_case(files, None, plans, case_id=case)
        probs = predict_probabilities(models, torch.from_numpy(data)[None].to(device), plans.patch_size, args.tta)
        probs = revert_preprocessing(probs.cpu().numpy(), properties, is_label=False)
        segmentation = probs.argmax(0).astype(np.uint8)
        affine = np.asarray(properties["original_affine"])
        nib.save(nib.Nifti1Image(segmentation, affine), target)
        if args.save_probabilities:
            np.savez_compressed(args.output / f"{case}.npz", probabilities=probs.astype(np.float16))
        written.append(target)
    print(f"wrote {len(written)} segmentation(s) to {args.output} ({len(cases) - len(written)} already there)")
    return written


if __name__ == "__main__":
    main()
