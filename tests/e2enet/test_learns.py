"""E2ENet learns at a CPU budget: a short run of the cpu-demo recipe must learn every tissue class.

The guard for the accuracy fixes (docs/results/log.md). On this case and budget the
authors' configuration (shifted (1,3,3) stem, widths 8-64, nnU-Net augmentation) reached mDice 0.46 with CSF
never predicted (Dice 0); the first cpu-demo recipe reached 0.54 with every class above 0.1, and today's (3x3x3
strided convs, widths 12-64) 0.70 with CSF at 0.48. The floors sit between the authors' and the first recipe's.
"""

from __future__ import annotations

import json

import torch

from e2enet.dataset import mni as prepare_mni
from e2enet.evaluation import evaluate
from e2enet.inference import predict
from e2enet.training.config import make_config
from e2enet.training.train import train

MDICE_FLOOR = 0.50
CLASS_FLOOR = 0.05


def test_cpu_demo_recipe_learns_every_class(tmp_path):
    raw = prepare_mni.build_mni_dataset(tmp_path / "raw", num_train=5, num_test=1, spacing_mm=4.0)
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        budget = dict(epochs=12, iters_per_epoch=25, val_iters=1)
        train(make_config(data=raw, out=run, fold="all", density=1.0, **budget, threads=1, progress=False))
    finally:
        torch.set_num_threads(threads)
    predict.main(["--model", str(run), "--input", str(raw / "imagesTs"), "--output", str(tmp_path / "pred")])
    summary = evaluate.evaluate_folders(raw / "labelsTs", tmp_path / "pred", dataset_json=raw / "dataset.json")
    per_class = {name: values["dice"] for name, values in summary["per_class_mean"].items()}
    report = json.dumps({"mdice": summary["mean"]["dice"], **per_class}, indent=1)
    assert summary["mean"]["dice"] >= MDICE_FLOOR, report
    assert min(per_class.values()) >= CLASS_FLOOR, report
