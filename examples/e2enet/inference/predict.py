"""Segment NIfTI images with trained E2ENet folds: sliding window, optional mirror TTA, fold ensemble.

    python examples/e2enet/predict.py --model RUN_DIR --input FOLDER --output FOLDER [--folds 0 1 2 3 4] [--tta]
        [--save-probabilities] [--overwrite] [--checkpoint final|latest]

Input files follow the nnU-Net naming ``{case}_{XXXX}.nii.gz`` (one file per channel, all on one grid). Each case is
reoriented to the orientation of the training data (``plans.json``), preprocessed with the run's plans (crop,
normalise, resample), predicted with a sliding window (window = training patch, 50% overlap, Gaussian weighting with
sigma = patch / 8, MONAI), optionally averaged over the 8 mirrorings, softmax averaged over the folds, resampled
and reoriented back and written as ``{case}.nii.gz`` with the input's affine and shape.

Every fold's checkpoint is checked against the run (network, classes, channels, preprocessing, patch) before
anything is predicted. Outputs are written atomically, and ``FOLDER/predict_manifest.json`` records what made them
(checkpoint and plans hashes, folds, TTA) and, per case, the hashes of its inputs and outputs. A case counts as
done only when its recorded output is there, intact, from the same inputs, model and settings (with
``--save-probabilities``: its probabilities too); otherwise it is predicted again and the reason printed. A folder
holding predictions of other settings, or unrecorded ones, is refused unless ``--overwrite``; the input folder, or
one holding the input images, always. A write that fails (a full disk, a read-only folder) stops with the path
and the fix, leaving the manifest recording only the cases whose files were written.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from tqdm import tqdm

from e2enet.atomic import atomic_write, write_json
from e2enet.dataset.layout import CHANNEL_FILE, load_volume, problem_list, same_affine, save_nifti
from e2enet.inference.compaction import compact_e2enet
from e2enet.nets.registry import build_model, inference_memory_format
from e2enet.preprocessing.geometry import to_network_layout
from e2enet.preprocessing.planning import PLANS_FILE
from e2enet.preprocessing.preprocess import preprocess_case, revert_preprocessing
from e2enet.problems import Problem, exit_on_problem
from e2enet.training.checkpoint import load_checkpoint
from e2enet.training.config import CHANNEL_GRANULARITIES
from e2enet.training.run_folder import CONFIG_FILE, fold_problems, load_run, trained_folds

MANIFEST_FILE = "predict_manifest.json"
# What must be equal for a recorded prediction to count as this model's with these settings.
COMPARED_SETTINGS = ("plans_sha256", "checkpoint", "folds", "tta_axes")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_input_cases(folder: Path, num_channels: int) -> dict[str, list[Path]]:
    """{case: [channel files in order]}; stops on a case with missing or extra channels."""
    if not folder.is_dir():
        raise Problem(f"input folder {folder} does not exist; pass the folder holding the CASE_XXXX.nii.gz images")
    cases: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = CHANNEL_FILE.match(path.name)
        if match:
            cases.setdefault(match["case"], {})[int(match["channel"])] = path
    if not cases:
        raise Problem(
            f"no images named CASE_XXXX.nii.gz in {folder}; name each channel file "
            f"{{case}}_0000.nii.gz, {{case}}_0001.nii.gz, ... as nnU-Net does"
        )
    for case, channels in cases.items():
        if sorted(channels) != list(range(num_channels)):
            raise Problem(
                f"case {case!r} has channel files {sorted(channels)} but the model was trained on "
                f"{num_channels} channel(s) 0..{num_channels - 1}; add or remove {case}_XXXX files"
            )
    return {case: [channels[i] for i in range(num_channels)] for case, channels in cases.items()}


def check_output_folder(output: Path, input_folder: Path, cases: dict[str, list[Path]]) -> None:
    """Refuse, before anything is written and whatever --overwrite says, an --output that is a file or would mix
    the segmentations and the manifest into a folder of images."""
    if output.exists() and not output.is_dir():
        raise Problem(f"--output {output} is a file, not a folder; pass a folder (predict.py creates it if missing)")
    if not output.is_dir():
        return
    if output.samefile(input_folder):
        raise Problem(
            f"--output {output} is the --input folder, where the segmentations and {MANIFEST_FILE} would lie among "
            "the images; pass a folder of their own"
        )
    held = [path.name for files in cases.values() for path in files if (output / path.name).exists()]
    if held:
        raise Problem(
            f"--output {output} holds {len(held)} of the input images (e.g. {held[0]}), among which the "
            f"segmentations and {MANIFEST_FILE} would lie; pass a folder of their own"
        )


def grid_of(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) of one image, read whole and checked (``load_volume``)."""
    image, affine = load_volume(path)
    return image.shape, affine


def describe_grid(path: Path, shape: tuple[int, ...], affine: np.ndarray) -> str:
    voxel_size = nib.affines.voxel_sizes(affine).round(3).tolist()
    return f"{path.name} (shape {shape}, voxel size {voxel_size} mm, origin {affine[:3, 3].round(2).tolist()} mm)"


def check_channel_grids(cases: dict[str, list[Path]]) -> None:
    """Refuse, before predicting any, a case whose channels lie on different grids: stacked as they are, voxels of
    different places would be read as one (dataset/verify.py checks the same of training cases)."""
    problems = []
    for case, (first, *others) in cases.items():
        reference = grid_of(first) if others else None
        for path in others:
            shape, affine = grid_of(path)
            if shape != reference[0] or not same_affine(affine, reference[1]):
                problems.append(
                    f"case {case!r}: {describe_grid(path, shape, affine)} is not on the grid of "
                    f"{describe_grid(first, *reference)}; resample {path.name} onto channel 0 (every channel of a "
                    "case must share its shape and affine)"
                )
    if problems:
        raise Problem(problems[0] if len(problems) == 1 else f"cannot predict these cases:\n{problem_list(problems)}")


def folds_with_checkpoint(run_dir: Path, checkpoint: str) -> list[str]:
    """The folds of a run (``fold_`` prefix dropped) holding ``checkpoint_{checkpoint}.pth``; a Problem if none."""
    name = f"checkpoint_{checkpoint}.pth"
    folds = [f.removeprefix("fold_") for f in trained_folds(run_dir) if (run_dir / f / name).is_file()]
    if not folds:
        raise Problem(f"no fold_*/{name} in {run_dir}; train first (train.py --out {run_dir})")
    return folds


def load_folds(run_dir: Path, folds: list[str] | None, checkpoint: str, device: torch.device, compact: bool = True):
    """The run's networks, one per fold, after checking every fold's checkpoint against the run.

    An input-channel-sparse E2ENet fold (a granularity of ``CHANNEL_GRANULARITIES``) is compacted
    (``compaction.compact_e2enet``) unless ``compact`` is False: its dead channels are not computed, to the same
    outputs within float rounding. Its zero weights are its masks, so the checkpoint alone defines the compacted
    network.
    """
    plans, config = load_run(run_dir)
    name = f"checkpoint_{checkpoint}.pth"
    folds = folds or folds_with_checkpoint(run_dir, checkpoint)
    paths = {fold: run_dir / f"fold_{fold}" / name for fold in folds}
    problems, states = [], {}
    for fold, path in paths.items():
        if not path.is_file():
            problems.append(f"fold {fold}: {path} not found; train it or leave it out of --folds")
            continue
        try:
            states[fold] = load_checkpoint(path)
        except Problem as problem:
            problems.append(str(problem))
            continue
        problems += fold_problems(path, states[fold]["config"], plans, config)
    if problems:
        raise Problem(
            problems[0] if len(problems) == 1 else f"cannot predict with {run_dir}:\n{problem_list(problems)}"
        )
    models = []
    for fold, state in states.items():
        model = build_model(
            config["arch"],
            config["preset"],
            in_channels=config["in_channels"],
            num_classes=config["num_classes"],
            **config["model_arguments"],
        )
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise Problem(
                f"{paths[fold]} does not fit the network described by {run_dir / CONFIG_FILE} "
                f"({str(error).splitlines()[0]}); train the fold again in this run"
            ) from error
        # Measured per network and preset; compacted E2ENets were fastest in the same layouts as the masked ones.
        layout = inference_memory_format(config["arch"], config["preset"], device)
        if compact and config["granularity"] in CHANNEL_GRANULARITIES and state.get("sparsity") is not None:
            models.append(compact_e2enet(model.eval(), None, layout).to(device))
            continue
        models.append(model.to(device, memory_format=layout).eval())
    return models, plans, config, paths


def tta_axes(config: dict, tta: bool) -> list[int]:
    """The image array axes (X, Y, Z = 0, 1, 2) that test-time augmentation mirrors: those the run was trained to
    see mirrored, none without ``tta``. Mirroring an axis the network never saw flipped (left and right as
    different classes, say) would average its predictions with wrong ones."""
    if not tta:
        return []
    if "augment" not in config:
        raise Problem(
            "--tta: this run's config.json does not record its augmentation (it predates that record), so which "
            "mirrorings the network saw is unknown; predict without --tta, or train the run again"
        )
    return [] if config["augment"] == "none" else sorted(config["mirror_axes"])


@torch.no_grad()
def predict_probabilities(models, image: torch.Tensor, patch: list[int], mirror_axes: list[int]) -> torch.Tensor:
    """(1, C, X, Y, Z) normalised image -> (K, X, Y, Z) softmax, averaged over folds and the mirrorings of every
    subset of ``mirror_axes`` (image array axes)."""
    x = to_network_layout(image)
    roi = list(reversed(patch))  # the plans' patch is (X, Y, Z); the network sees (Z, Y, X)
    dims = [4 - axis for axis in mirror_axes]  # array axis X, Y, Z is dim 4, 3, 2 of the (B, C, Z, Y, X) tensor
    flips = [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]
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


def describe_tta(config: dict, tta: bool, mirror_axes: list[int]) -> str:
    if not tta:
        return ""
    if not mirror_axes:
        return "; --tta: the run trained without mirroring, so there is nothing to average (plain prediction)"
    names = ", ".join("XYZ"[axis] for axis in mirror_axes)
    return f" and mirror TTA over array axes {names} (those the run trained with), {2 ** len(mirror_axes)} passes"


# ------------------------------------------------------------------------------------------------ manifest
def prediction_settings(run_dir: Path, paths: dict[str, Path], checkpoint: str, tta_axes: list[int]) -> dict:
    """What makes a prediction this model's: the run's plans, each fold's checkpoint (by hash), the mirrored axes."""
    return {
        "model": str(run_dir.resolve()),  # for the reader; the hashes decide
        "plans_sha256": file_sha256(run_dir / PLANS_FILE),
        "checkpoint": checkpoint,
        "folds": {fold: file_sha256(path) for fold, path in paths.items()},
        "tta_axes": tta_axes,
    }


def describe_change(key: str, saved, now) -> str:
    if key == "folds":
        saved = saved or {}
        changed = sorted(fold for fold in {**saved, **now} if saved.get(fold) != now.get(fold))
        return f"the checkpoints of fold(s) {', '.join(changed)} are not the recorded ones"
    return f"{key} saved {saved!r} vs now {now!r}"


def open_manifest(output: Path, settings: dict, case_ids, overwrite: bool) -> dict:
    """The manifest to continue: the folder's own if it records these settings, else a new one (or a refusal)."""
    path, fresh = output / MANIFEST_FILE, {"settings": settings, "cases": {}}
    try:
        recorded = json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        if not overwrite:
            raise Problem(f"{path} is damaged ({error}); pass --overwrite to predict every case again") from error
        return fresh
    if recorded is None:
        unrecorded = [case for case in case_ids if (output / f"{case}.nii.gz").exists()]
        if unrecorded and not overwrite:
            raise Problem(
                f"{output} already holds segmentations of {len(unrecorded)} of these cases (e.g. {unrecorded[0]}) "
                f"but no {MANIFEST_FILE} saying which model made them; use another --output, or --overwrite to "
                "replace them"
            )
        return fresh
    saved = recorded["settings"]
    different = [key for key in COMPARED_SETTINGS if saved.get(key) != settings[key]]
    if not different:
        return recorded
    changes = "; ".join(describe_change(key, saved.get(key), settings[key]) for key in different)
    if not overwrite:
        raise Problem(
            f"{output} holds predictions made with other settings ({changes}); use another --output, or "
            "--overwrite to replace them"
        )
    print(f"replacing the predictions in {output}, made with other settings ({changes})")
    return fresh


def redo_reason(entry: dict | None, inputs: dict, target: Path, npz: Path, probabilities: bool) -> str | None:
    """None when the case is done; else why it is predicted (again): "" for a case never predicted."""
    if entry is None:
        return "its output was never recorded as complete (a run killed while writing it?)" if target.exists() else ""
    if entry["inputs"] != inputs:
        return "its input images changed"
    if not target.is_file() or file_sha256(target) != entry["segmentation"]:
        return "its segmentation is missing or not the one recorded (truncated or edited)"
    if probabilities and (not npz.is_file() or file_sha256(npz) != entry["probabilities"]):
        return "its probabilities were not saved, or not these"
    return None


@contextlib.contextmanager
def write_problems(path: Path) -> Iterator[None]:
    """Inside: an OSError writing ``path`` (a full disk, a read-only folder) becomes a Problem naming it and the fix.
    The writes are atomic, so the failed file is either absent or its earlier, complete version."""
    try:
        yield
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free space on that disk or pass another --output, then run again (finished cases are kept)"
        elif isinstance(error, PermissionError) or error.errno == errno.EROFS:
            fix = f"make {path.parent} writable or pass another --output"
        else:
            fix = "check that folder or pass another --output"
        raise Problem(f"cannot write {path} ({error.strerror or error}); {fix}") from error


# ---------------------------------------------------------------------------------------------------- main
@exit_on_problem()  # a problem with the run, the inputs or the output folder: one line, exit status 2
def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="RUN_DIR given to train.py --out")
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--folds", nargs="+", default=None, help="folds to ensemble (default: every trained fold)")
    p.add_argument("--checkpoint", choices=["final", "latest"], default="final")
    p.add_argument(
        "--tta",
        action="store_true",
        help="average over the mirrorings of the axes the run trained with (up to 8x slower; none if it trained "
        "without mirroring)",
    )
    p.add_argument("--save-probabilities", action="store_true", help="also write {case}.npz with the softmax")
    p.add_argument("--overwrite", action="store_true", help="predict every case again, whatever the folder holds")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--no-compact",
        action="store_true",
        help="run an input-channel-sparse E2ENet (input_channel, input_channel_blocks or input_channel_pool) masked "
        "(dense tensors with zeros), not compacted",
    )
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models, plans, config, paths = load_folds(args.model, args.folds, args.checkpoint, device, not args.no_compact)
    cases = find_input_cases(args.input, config["in_channels"])
    check_output_folder(args.output, args.input, cases)
    check_channel_grids(cases)
    mirror_axes = tta_axes(config, args.tta)
    settings = prediction_settings(args.model, paths, args.checkpoint, mirror_axes)
    manifest = open_manifest(args.output, settings, cases, args.overwrite)
    with write_problems(args.output):
        args.output.mkdir(parents=True, exist_ok=True)
    written = []
    print(f"predicting {len(cases)} case(s) with fold(s) {list(paths)}{describe_tta(config, args.tta, mirror_axes)}")
    for case, files in tqdm(cases.items(), disable=args.no_progress):
        target, npz = args.output / f"{case}.nii.gz", args.output / f"{case}.npz"
        inputs = {path.name: file_sha256(path) for path in files}
        entry = None if args.overwrite else manifest["cases"].get(case)
        reason = "" if args.overwrite else redo_reason(entry, inputs, target, npz, args.save_probabilities)
        if reason is None:
            continue
        if reason:
            tqdm.write(f"{case}: predicting again, {reason}")
        data, _, _, properties = preprocess_case(files, None, plans, case_id=case)
        orientation = properties["original_orientation"]
        reoriented_from = orientation if orientation != plans.orientation else None
        if reoriented_from:
            tqdm.write(
                f"{case}: stored in {orientation} orientation; predicted in the training data's {plans.orientation} "
                f"and written back in {orientation}"
            )
        probs = predict_probabilities(models, torch.from_numpy(data)[None].to(device), plans.patch_size, mirror_axes)
        probs = revert_preprocessing(probs.cpu().numpy(), properties, is_label=False)
        segmentation = probs.argmax(0).astype(np.uint8)
        with write_problems(target):
            save_nifti(nib.Nifti1Image(segmentation, np.asarray(properties["original_affine"])), target)
        with write_problems(npz):
            if args.save_probabilities:
                with atomic_write(npz) as f:  # a file object also keeps numpy from appending ".npz"
                    np.savez_compressed(f, probabilities=probs.astype(np.float16))
            else:
                npz.unlink(missing_ok=True)  # probabilities of an earlier prediction of this case would not match
        probabilities = file_sha256(npz) if args.save_probabilities else None
        manifest["cases"][case] = {
            "inputs": inputs,
            "segmentation": file_sha256(target),
            "probabilities": probabilities,
            "reoriented_from": reoriented_from,
        }
        with write_problems(args.output / MANIFEST_FILE):  # after the files: a case is recorded once it is whole
            write_json(args.output / MANIFEST_FILE, manifest)
        written.append(target)
    print(f"wrote {len(written)} segmentation(s) to {args.output} ({len(cases) - len(written)} already there)")
    return written
