"""Export one trained fold to ONNX, for runtimes without PyTorch (onnxruntime, OpenVINO, TensorRT).

    python examples/e2enet/export_onnx.py --model RUN_DIR --output model.onnx [--fold 0] [--checkpoint final]
        [--no-compact]

The graph is the network predict.py runs: an input-channel-sparse E2ENet is compacted first, so its dead channels
are not in the file. It takes windows of the run's training patch, (B, C, Z, Y, X) in the network's axis order
(NIfTI's X, Y, Z reversed), for any batch size B, already preprocessed as the run's plans say, and returns the
logits (B, K, Z, Y, X). Sliding-window inference, softmax and resampling stay with the caller, as predict.py does
them. The file's metadata holds the plans (``sparsefuse.plans``: patch, spacing, normalisation, labels), the
input's axis order and the fold's checkpoint hash.

Before anything is written, onnxruntime runs the graph on a random batch of two windows and its logits are
compared with PyTorch's; the file is written (atomically) only if they agree to float rounding.
Needs the ``onnx`` extra: ``pip install "sparsefuse[onnx]"`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from atomic import atomic_write
from predict import file_sha256, load_folds
from problems import Problem, exit_on_problem

# onnxruntime's logits against PyTorch's: relative to the largest logit, float32 rounding of the same sums in
# another order (the compacted model itself matches the masked one to 1e-5).
TOLERANCE = 1e-4
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


def check_against_torch(path: Path, model: torch.nn.Module, window: list[int], in_channels: int) -> float:
    """Max |onnxruntime - PyTorch| over a random batch of 2 windows, relative to the largest PyTorch logit."""
    onnxruntime = _onnx_modules()
    x = torch.randn(2, in_channels, *window, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (ours,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        reference = model(x).numpy()
    return float(np.abs(ours - reference).max() / max(1.0, float(np.abs(reference).max())))


@exit_on_problem()  # a problem with the run or a missing extra: one line, exit status 2
def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="RUN_DIR given to train.py --out")
    p.add_argument("--output", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--fold", default="0", help="the fold to export (default: 0)")
    p.add_argument("--checkpoint", choices=["final", "latest"], default="final")
    p.add_argument("--no-compact", action="store_true", help="export an input-channel-sparse E2ENet masked")
    args = p.parse_args(argv)
    if args.output.suffix != ".onnx":
        raise Problem(f"--output {args.output} does not end in .onnx; name the file model.onnx or similar")
    _onnx_modules()  # before the slow part: say now if the extra is missing

    models, plans, config, paths = load_folds(
        args.model, [args.fold], args.checkpoint, torch.device("cpu"), not args.no_compact
    )
    model = models[0].float().eval()
    window = list(reversed(plans.patch_size))  # the plans' patch is (X, Y, Z); the network sees (Z, Y, X)
    metadata = {
        "sparsefuse.plans": json.dumps(plans.to_json()),
        "sparsefuse.input_axes": INPUT_AXES,
        "sparsefuse.arch": config["arch"],
        "sparsefuse.compacted": str(type(model).__name__ == "CompactE2ENet").lower(),
        "sparsefuse.checkpoint_sha256": file_sha256(paths[args.fold]),
    }
    program = export(model, window, config["in_channels"], metadata)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.output.parent) as scratch:
        candidate = Path(scratch) / args.output.name
        program.save(candidate)
        error = check_against_torch(candidate, model, window, config["in_channels"])
        if not error <= TOLERANCE:
            raise RuntimeError(f"onnxruntime's logits differ from PyTorch's by {error:.2e} (tolerance {TOLERANCE})")
        with atomic_write(args.output) as f:
            f.write(candidate.read_bytes())
    kind = "compacted " if metadata["sparsefuse.compacted"] == "true" else ""
    print(
        f"wrote {args.output}: {kind}{config['arch']} fold {args.fold}, input ({INPUT_AXES}) = "
        f"(B, {config['in_channels']}, {', '.join(map(str, window))}); onnxruntime matches PyTorch to {error:.1e}"
    )
    return args.output


if __name__ == "__main__":
    main()
