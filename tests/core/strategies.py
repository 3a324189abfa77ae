"""Hypothesis strategies shared by the property tests: small random models, granularities, optimizers, policies."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TypeVar

import torch
from hypothesis import reject
from hypothesis import strategies as st
from torch import nn

import sparsefuse as sf

LAYER_KINDS = ("linear", "conv1d", "conv2d", "conv3d", "convT2d", "convT3d")
SPATIAL = {"linear": (), "conv1d": (5,), "conv2d": (4, 4), "conv3d": (3, 3, 3), "convT2d": (3, 3), "convT3d": (2, 2, 2)}


class LayerBag(nn.Module):
    """Independent layers, each fed its own input: any mix of shapes gets real, dense gradients.

    A spec is ``(kind, c_in, c_out, k)``, or ``(kind, c_in, c_out, k, groups)`` for a grouped conv."""

    def __init__(self, specs):
        super().__init__()
        self.specs = specs
        self.layers = nn.ModuleList(make_layer(*spec) for spec in specs)

    def inputs(self, generator: torch.Generator) -> list[torch.Tensor]:
        return [torch.randn(2, c_in, *SPATIAL[kind], generator=generator) for kind, c_in, *_ in self.specs]

    def forward(self, inputs):
        return sum(
            (layer(x).sin() * (i + 1)).mean() for i, (layer, x) in enumerate(zip(self.layers, inputs, strict=True))
        )


def make_layer(kind: str, c_in: int, c_out: int, k: int, groups: int = 1) -> nn.Module:
    if kind == "linear":
        return nn.Linear(c_in, c_out)
    dims = kind[-2]  # "conv2d" -> "2"
    if kind.startswith("convT"):
        return getattr(nn, f"ConvTranspose{dims}d")(c_in, c_out, k, stride=2, groups=groups)
    return getattr(nn, f"Conv{dims}d")(c_in, c_out, k, padding=k // 2, groups=groups)


@st.composite
def granularities(draw):
    kind = draw(st.sampled_from(["element", "kernel", "channel", "block", "input_channel_blocks"]))
    if kind == "block":
        return sf.masks.Block(draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if kind == "input_channel_blocks":
        return sf.masks.InputChannelBlocks(draw(st.integers(1, 3)), pool=draw(st.sampled_from([None, 1.0, 2.0, 3.5])))
    return kind


@st.composite
def layer_specs(draw, granularity, max_layers: int = 3):
    rows, cols = (granularity.rows, granularity.cols) if isinstance(granularity, sf.masks.Block) else (1, 1)
    out_multiple = granularity.blocks if isinstance(granularity, sf.masks.InputChannelBlocks) else 1
    specs = []
    for _ in range(draw(st.integers(1, max_layers))):
        kind = draw(st.sampled_from(LAYER_KINDS))
        dim0, dim1 = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        # Block granularity needs dims that are multiples of the block; transposed weights are (c_in, c_out).
        dim0, dim1 = dim0 * rows, dim1 * cols
        c_in, c_out = (dim0, dim1) if kind.startswith("convT") else (dim1, dim0)
        c_out *= out_multiple  # InputChannelBlocks: the blocks divide the outputs
        specs.append((kind, c_in, c_out, draw(st.integers(1, 3))))
    return specs


def optimizers(params, kind: str) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.99, nesterov=True, weight_decay=1e-2)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
    return torch.optim.Adam(params, lr=0.01, amsgrad=True)


OPTIMIZERS = ("sgd", "adamw", "adam-amsgrad")


T = TypeVar("T")


def keeping_a_group(build: Callable[[], T]) -> T:
    """``build()``, or a rejected example where the drawn density keeps no group of some small layer:
    DynamicSparsity refuses those (test_sparsity tests the refusal), so the properties are drawn without them."""
    try:
        return build()
    except ValueError as e:
        if "keeps no group" in str(e):
            reject()
        raise


def build(specs, granularity, opt_kind: str, density, schedule, scorer, growth, *, init_seed: int = 0, **options):
    """A LayerBag of ``specs`` with weights drawn from ``init_seed``, its optimizer and a DynamicSparsity over it.

    ``options`` (seed, distribution, regrow_init, grace_updates) go to DynamicSparsity. Returns the three."""
    torch.manual_seed(init_seed)
    model = LayerBag(specs)
    optimizer = optimizers(model.parameters(), opt_kind)
    sparsity = keeping_a_group(
        lambda: sf.DynamicSparsity(
            model,
            optimizer,
            density=density,
            granularity=granularity,
            scorer=scorer,
            growth=growth,
            schedule=schedule,
            **options,
        )
    )
    return model, optimizer, sparsity


@st.composite
def schedules(draw):
    every = draw(st.integers(1, 3))
    drop_fraction = draw(st.floats(0.05, 1.0))
    kind = draw(st.sampled_from(["cosine", "constant", "linear"]))
    stop = draw(st.none() | st.integers(1, 8))
    if kind == "constant":
        return sf.schedules.Constant(every=every, drop_fraction=drop_fraction, stop=stop)
    total = draw(st.integers(1, 12))
    cls = sf.schedules.CosineDecay if kind == "cosine" else sf.schedules.Linear
    return cls(every=every, drop_fraction=drop_fraction, total_steps=total, stop=stop)


densities = st.floats(0.05, 1.0)
scorers = st.sampled_from([sf.scorers.L1(), sf.scorers.Magnitude(), sf.scorers.RandomDrop()])
growths = st.sampled_from([sf.growth.RandomGrowth(), sf.growth.Gradient()])


def train_step(model: LayerBag, optimizer, sparsity, step: int, data_seed: int = 1234):
    """One deterministic step: the batch depends only on (data_seed, step)."""
    inputs = model.inputs(torch.Generator().manual_seed(data_seed * 100_003 + step))
    optimizer.zero_grad()
    model(inputs).backward()
    optimizer.step()
    return sparsity.step()


def train_and_resume(build_run, stop_at: int, steps: int, **other_seeds):
    """The same run twice: ``steps`` steps in one go, and interrupted after ``stop_at`` with its state saved and
    restored into fresh objects ``build_run(**other_seeds)`` that train on. Returns (uninterrupted, resumed)."""
    reference = build_run()
    for step in range(1, steps + 1):
        train_step(*reference, step)
    first = build_run()
    for step in range(1, stop_at + 1):
        train_step(*first, step)
    buffer = io.BytesIO()
    torch.save([part.state_dict() for part in first], buffer)  # model, optimizer, sparsity
    buffer.seek(0)
    resumed = build_run(**other_seeds)
    for part, state in zip(resumed, torch.load(buffer), strict=True):
        part.load_state_dict(state)
    for step in range(stop_at + 1, steps + 1):
        train_step(*resumed, step)
    return reference, resumed


def assert_same_run(reference, resumed) -> None:
    """Bit-identical weights, masks and update history."""
    for (name, a), b in zip(reference[0].state_dict().items(), resumed[0].state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert all(torch.equal(reference[2].masks[n], resumed[2].masks[n]) for n in reference[2].target_names)
    assert reference[2].history == resumed[2].history
