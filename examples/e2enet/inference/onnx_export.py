"""Export one trained fold to ONNX, for runtimes without PyTorch (onnxruntime, OpenVINO, TensorRT).

    python examples/e2enet/export_onnx.py --model RUN_DIR --output model.onnx [--fold F] [--checkpoint final]
        [--no-compact]

The graph is the network predict.py runs for one fold: an input-channel-sparse E2ENet is compacted first, so its
dead channels are not in the file. It takes windows of the run's training patch, (B, C, Z, Y, X) in the network's
axis order (NIfTI's X, Y, Z reversed), for any batch size B, already preprocessed as the run's plans say, and
returns the logits (B, K, Z, Y, X). Sliding windows, mirror TTA, the average over folds, softmax and resampling
stay with the caller, as predict.py does them. The file's metadata holds the plans (``sparsefuse.plans``: patch,
spacing, normalisation, labels), the input's axis order, the network (``sparsefuse.arch``), whether it was
compacted and the fold's checkpoint hash.

Before anything is written, onnxruntime runs the graph on random batches of one and two windows and its logits are
compared with PyTorch's; the file is written (atomically) only if they agree to float rounding.
Needs the ``onnx`` extra: ``pip install "sparsefuse[onnx]"`` (onnx, onnxscript, onnxruntime; tested with torch 2.13).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from e2enet.atomic import atomic_write
from e2enet.inference.predict import file_sha256, folds_with_checkpoint, load_folds
from e2enet.problems import Problem, exit_on_problem
from e2enet.training.run_folder import load_run

# onnxruntime's logits against PyTorch's, relative to max(1, largest |logit|): float32 rounding of the same sums in
# another order (the compacted model itself matches the masked one to 1e-5).
TOLERANCE = 1e-4
CHECKED_BATCHES = (1, 2)  # the traced example has 2: batch 1 shows the batch size is really free
INPUT_AXES = "B, C, Z, Y, X (NIfTI's X, Y, Z reversed)"


def _onnx_modules():
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as error:
        raise Problem(
            f"ONNX export needs onnx, onnxscript and onnxruntime ({error}); "
            'install them with pip install "sparsefuse[onnx]"'
        ) from error
    return onnxruntime


def export(model: torch.nn.Module, window: list[int], in_channels: int, metadata: dict[str, str]):
    """The ONNX program of ``model`` for (B, in_channels, *window) inputs, batch size free, with ``metadata``."""
    example = torch.randn(2, in_channels, *window)
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    program.model.metadata_props.update(metadata)
    return program


def check_against_torch(graph: bytes, model: torch.nn.Module, window: list[int], in_channels: int) -> float:
    """Max |onnxruntime - PyTorch| over random batches (``CHECKED_BATCHES``), relative to max(1, largest logit)."""
    session = _onnx_modules().InferenceSession(graph, providers=["CPUExecutionProvider"])
    error = 0.0
    for batch in CHECKED_BATCHES:
        x = torch.randn(batch, in_channels, *window, generator=torch.Generator().manual_seed(batch))
        (ours,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            reference = model(x).numpy()
        error = max(error, float(np.abs(ours - reference).max() / max(1.0, float(np.abs(reference).max()))))
    return error


def choose_fold(run_dir: Path, fold: str | None, checkpoint: str) -> str:
    """The fold to export: ``fold`` (with or without its ``fold_`` prefix) if it has the checkpoint, else the
    run's only such fold; a Problem naming the trained folds otherwise."""
    load_run(run_dir)  # a Problem if run_dir is not a run folder
    trained = folds_with_checkpoint(run_dir, checkpoint)
    if fold is None:
        if len(trained) > 1:
            raise Problem(f"{run_dir} has {len(trained)} trained folds ({', '.join(trained)}); choose one with --fold")
        return trained[0]
    fold = fold.removeprefix("fold_")
    if fold not in trained:
        raise Problem(
            f"fold {fold} of {run_dir} has no checkpoint_{checkpoint}.pth; trained folds: {', '.join(trained)} "
            "(pass --fold)"
        )
    return fold


@exit_on_problem()  # a problem with the run or a missing extra: one line, exit status 2
def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="RUN_DIR given to train.py --out")
    p.add_argument("--output", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--fold", default=None, help="the fold to export (default: the run's only trained fold)")
    p.add_argument("--checkpoint", choices=["final", "latest"], default="final")
    p.add_argument("--no-compact", action="store_true", help="export an input-channel-sparse E2ENet masked")
    args = p.parse_args(argv)
    if args.output.suffix != ".onnx":
        raise Problem(f"--output {args.output} does not end in .onnx; name the file model.onnx or similar")
    _onnx_modules()  # before the slow part: say now if the extra is missing
    fold = choose_fold(args.model, args.fold, args.checkpoint)

    models, plans, config, paths = load_folds(
        args.model, [fold], args.checkpoint, torch.device("cpu"), not args.no_compact
    )
    model = models[0].float().eval()
    window = list(reversed(plans.patch_size))  # the plans' patch is (X, Y, Z); the network sees (Z, Y, X)
    compacted = type(model).__name__ == "CompactE2ENet"
    metadata = {
        "sparsefuse.plans": json.dumps(plans.to_json()),
        "sparsefuse.input_axes": INPUT_AXES,
        "sparsefuse.arch": config["arch"],
        "sparsefuse.compacted": str(compacted).lower(),
        "sparsefuse.checkpoint_sha256": file_sha256(paths[fold]),
    }
    graph = export(model, window, config["in_channels"], metadata).model_proto.SerializeToString()
    error = check_against_torch(graph, model, window, config["in_channels"])
    if not error <= TOLERANCE:
        raise RuntimeError(
            f"onnxruntime's logits differ from PyTorch's by {error:.2e} of the largest (tolerance {TOLERANCE}): "
            "an exporter bug; try --no-compact, and please report it with the run's config.json"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.output) as f:
        f.write(graph)
    print(
        f"wrote {args.output}: {'compacted ' if compacted else ''}{config['arch']} fold {fold}, input "
        f"({INPUT_AXES}) = (B, {config['in_channels']}, {', '.join(map(str, window))}); onnxruntime matches "
        f"PyTorch to {error:.1e}"
    )
    return args.output
