"""Sparsify a small CNN on scikit-learn's handwritten digits (bundled with the package, no download).

Trains the same network dense, static-sparse and dynamic-sparse (SET and RigL) at 10% density and prints test
accuracy, realised density and parameter counts. Runs in well under a minute on 2 CPU cores.

    python examples/quickstart.py [--density 0.1] [--epochs 30]
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import sparsefuse as sf


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def load_data(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    return train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)


def run(method: str, density: float, epochs: int, seed: int, data) -> dict:
    x_train, x_test, y_train, y_test = data
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    batch = 64
    steps = epochs * ((len(x_train) + batch - 1) // batch)
    sparsity = None
    if method != "dense":
        schedule = (
            None
            if method == "static"
            else sf.schedules.CosineDecay(every=20, drop_fraction=0.3, total_steps=int(0.75 * steps))
        )
        growth = sf.growth.Gradient() if method == "rigl" else sf.growth.RandomGrowth()
        # Element granularity for every layer: the kernel of a 3x3 conv on 8x8 digits is too coarse a unit.
        sparsity = sf.DynamicSparsity(
            model,
            optimizer,
            density=density,
            granularity="element",
            scorer=sf.scorers.Magnitude(),
            growth=growth,
            schedule=schedule,
            distribution="erk",
            seed=seed,
        )
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if sparsity is not None:
                sparsity.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return {
        "method": method,
        "accuracy": accuracy,
        "density": sparsity.density() if sparsity else 1.0,
        "params": sf.count_params(model, sparsity),
        "updates": len(sparsity.history) if sparsity else 0,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(
        1
    )  # a tiny CNN: thread hand-offs cost more than they save (300 ms vs 3.5 ms per step on a busy 2-core box)
    data = load_data(args.seed)
    print(f"digits: {len(data[0])} train / {len(data[1])} test images, 8x8, 10 classes; target density {args.density}")
    print(f"{'method':<8} {'accuracy':>9} {'density':>8} {'params':>8} {'updates':>8} {'seconds':>8}")
    for method in ("dense", "static", "set", "rigl"):
        r = run(method, args.density, args.epochs, args.seed, data)
        print(
            f"{r['method']:<8} {r['accuracy']:>9.4f} {r['density']:>8.4f} {r['params']:>8,} "
            f"{r['updates']:>8} {r['seconds']:>8.1f}"
        )


if __name__ == "__main__":
    main()
