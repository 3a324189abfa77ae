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

from e2enet.dataset import mni as prepare_mni
from e2enet.inference import onnx_export as export_onnx
from e2enet.inference import predict
from e2enet.training import train

try:
    import onnx
    import onnxruntime
except ImportError as error:  # checked before any fixture trains
    message = f'the onnx extra is not installed (pip install "sparsefuse[onnx]"): {error}'
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true requires it", pytrace=False)  # a collection error: the run fails
    pytest.skip(message, allow_module_level=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-epoch runs on the tiny MNI dataset (6 mm, about 25-30 voxels a side): input-channel DSFF, and DynUNet."""
    root = tmp_path_factory.mktemp("onnx")
    dataset = prepare_mni.build_mni_dataset(root / "raw", num_train=5, num_test=1, spacing_mm=6.0)
    flags = {
        "sparse": ["--density", "0.1", "--granularity", "input_channel"],
        "dynunet": ["--density", "1.0", "--arch", "dynunet"],
    }
    for name, extra in flags.items():
        train.main(
            ["--data", str(dataset), "--out", str(root / name), "--fold", "0", "--preset", "cpu-demo", *extra]
            + ["--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1", "--no-progress"]
            + ["--preprocessed", str(root / "pre")]
        )
    return {name: root / name for name in flags}


@pytest.mark.parametrize(
    ("run", "flags", "compacted"), [("sparse", [], True), ("sparse", ["--no-compact"], False), ("dynunet", [], False)]
)
def test_exported_fold_gives_pytorchs_logits_for_any_batch(runs, tmp_path, run, flags, compacted):
    target = tmp_path / "fold0.onnx"
    assert export_onnx.main(["--model", str(runs[run]), "--output", str(target), *flags]) == target
    models, plans, config, paths = predict.load_folds(runs[run], ["0"], "final", torch.device("cpu"), not flags)
    model = models[0]
    assert (type(model).__name__ == "CompactE2ENet") == compacted  # what predict.py runs is what was exported

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
    assert metadata["sparsefuse.compacted"] == str(compacted).lower() and metadata["sparsefuse.arch"] == config["arch"]
    assert metadata["sparsefuse.checkpoint_sha256"] == predict.file_sha256(paths["0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fold0.onnx"]  # no scratch files left behind


def test_a_mismatch_with_pytorch_writes_nothing(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(export_onnx, "TOLERANCE", -1.0)  # every export now counts as a mismatch
    target = tmp_path / "fold0.onnx"
    with pytest.raises(RuntimeError, match="differ from PyTorch's"):
        export_onnx.main(["--model", str(runs["dynunet"]), "--output", str(target)])
    assert not list(tmp_path.iterdir())


def test_unknown_fold_and_wrong_suffix_are_refused_with_the_fix(runs, tmp_path, capsys):
    refused = [
        (["--model", str(runs["sparse"]), "--fold", "3", "--output", str(tmp_path / "m.onnx")], "fold 3 of"),
        (["--model", str(tmp_path), "--output", str(tmp_path / "model.pth")], "does not end in .onnx"),
    ]
    for args, message in refused:
        with pytest.raises(SystemExit) as exit_info:
            export_onnx.main(args)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
