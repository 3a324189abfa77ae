"""export_onnx.py: a trained fold, compacted when sparse, runs in onnxruntime with PyTorch's logits for any batch size.

Needs the onnx extra (onnx, onnxscript, onnxruntime): skipped without it, except under ``CI=true`` (``.ci/run``),
where a missing extra fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
pytest.importorskip("nilearn")

import export_onnx  # noqa: E402
import predict  # noqa: E402
import prepare_mni  # noqa: E402
import train  # noqa: E402


def _onnxruntime():
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        message = f'the onnx extra is not installed (pip install "sparsefuse[onnx]"): {error}'
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI=true requires it", pytrace=False)
        pytest.skip(message)
    return onnx, onnxruntime


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    """A one-epoch input-channel DSFF run on the tiny MNI dataset (6 mm, about 25-30 voxels a side)."""
    root = tmp_path_factory.mktemp("onnx")
    dataset = prepare_mni.build_mni_dataset(root / "raw", num_train=5, num_test=1, spacing_mm=6.0)
    out = root / "run"
    train.main(
        ["--data", str(dataset), "--out", str(out), "--fold", "0", "--preset", "cpu-demo", "--density", "0.1"]
        + ["--granularity", "input_channel", "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1"]
        + ["--no-progress", "--preprocessed", str(root / "pre")]
    )
    return out


def test_exported_fold_gives_pytorchs_logits_for_any_batch(sparse_run, tmp_path):
    onnx, onnxruntime = _onnxruntime()
    target = tmp_path / "fold0.onnx"
    assert export_onnx.main(["--model", str(sparse_run), "--output", str(target)]) == target
    models, plans, config, paths = predict.load_folds(sparse_run, ["0"], "final", torch.device("cpu"))
    model = models[0]
    assert type(model).__name__ == "CompactE2ENet"  # what predict.py runs is what was exported

    window = list(reversed(plans.patch_size))
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (1, 3):
        x = torch.randn(batch, config["in_channels"], *window, generator=torch.Generator().manual_seed(batch))
        (logits,) = session.run(None, {name: x.numpy()})
        with torch.no_grad():
            reference = model(x).numpy()
        assert logits.shape == (batch, config["num_classes"], *window)
        assert np.abs(logits - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max())

    # The file says how to feed it: the run's plans, the axis order, and which checkpoint it came from.
    metadata = {p.key: p.value for p in onnx.load(str(target)).metadata_props}
    assert json.loads(metadata["sparsefuse.plans"]) == plans.to_json()
    assert metadata["sparsefuse.compacted"] == "true" and metadata["sparsefuse.arch"] == "e2enet"
    assert metadata["sparsefuse.checkpoint_sha256"] == predict.file_sha256(paths["0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fold0.onnx"]  # no scratch files left behind


def test_refuses_an_output_that_is_not_an_onnx_file(sparse_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main(["--model", str(sparse_run), "--output", str(tmp_path / "model.pth")])
    assert exit_info.value.code == 2
    assert "does not end in .onnx" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
