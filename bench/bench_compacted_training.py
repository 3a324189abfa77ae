"""Training step time of a masked 3D conv stack against sparsefuse.CompactedTraining, on one CPU thread.

The stack is bench_compact.py's (an E2ENet fusion stage: Conv3d 96 -> 48 and 48 -> 48, (1, 3, 3) kernels,
LeakyReLU), trained on 1 x 96 x 24 x 48 x 48 inputs with SGD (Nesterov momentum, weight decay). A step is forward,
backward, optimizer.step() and the sparsifier's step: sparsity.step() for the masked model, training.step() for
the compacted one. Rows: input-channel masks at densities 0.5, 0.2 and 0.1 between topology updates, and at 0.2
with a topology update at every step (the compacted run then also puts the full weights back and cuts the layers
again each step: the worst case). All cases run interleaved in one process; after timing, every compacted run is
checked against its masked twin, which took the same steps on the same batch.

    python bench/bench_compacted_training.py [--repeats 7]
"""

from __future__ import annotations

import copy

import torch
from bench_compact import one_thread_setup
from common import interleaved

import sparsefuse as sf

SETTINGS = (  # (label, density, topology update every n steps or None)
    ("density 0.5", 0.5, None),
    ("density 0.2", 0.2, None),
    ("density 0.1", 0.1, None),
    ("density 0.2, update every step", 0.2, 1),
)


def training_run(base: torch.nn.Module, density: float, every: int | None, compacted: bool):
    """(model, one training step on ``x``) for the masked or the compacted run of one setting."""
    model = copy.deepcopy(base).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=3e-5)
    schedule = None if every is None else sf.schedules.Constant(every=every, drop_fraction=0.3)
    sparsity = sf.DynamicSparsity(model, optimizer, density=density, granularity="input_channel", schedule=schedule)
    stepper = sf.CompactedTraining(model, sparsity) if compacted else sparsity
    forward = stepper.model if compacted else model

    def step(x: torch.Tensor) -> None:
        optimizer.zero_grad()
        forward(x).square().mean().backward()
        optimizer.step()
        stepper.step()

    return model, step


def main() -> None:
    args, base, x = one_thread_setup(__doc__)
    cases, models = {}, {}
    for label, density, every in SETTINGS:
        for kind in ("masked", "compacted"):
            models[(label, kind)], step = training_run(base, density, every, kind == "compacted")
            cases[(label, kind)] = lambda step=step: step(x)
    times = interleaved(cases, args.repeats)

    for label, _, _ in SETTINGS:
        masked, compacted = (models[(label, kind)].state_dict() for kind in ("masked", "compacted"))
        scale = max(v.abs().max().item() for v in masked.values())
        error = max((masked[k] - compacted[k]).abs().max().item() for k in masked) / scale
        assert error < 1e-4, f"{label}: compacted training's weights differ from masked training's by {error:.2e}"

    print(
        f"\ntraining step (forward, backward, SGD, sparsifier step), Conv3d 96->48 -> Conv3d 48->48, (1,3,3) "
        f"kernels, input {tuple(x.shape)}, input-channel masks, median of {args.repeats} interleaved rounds"
    )
    print(f"  {'masks':<32} {'masked ms':>10} {'compacted ms':>13} {'compacted/masked':>17}")
    for label, _, _ in SETTINGS:
        masked_s, compacted_s = times[(label, "masked")], times[(label, "compacted")]
        print(f"  {label:<32} {masked_s * 1e3:>10.1f} {compacted_s * 1e3:>13.1f} {compacted_s / masked_s:>16.2f}x")


if __name__ == "__main__":
    main()
