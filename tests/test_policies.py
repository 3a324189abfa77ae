"""Schedules, distributions, granularities and scorers checked against their definitions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparsefuse as sf


@given(alpha=st.floats(0.01, 1.0), total=st.integers(1, 10_000), step=st.integers(0, 20_000))
def test_cosine_decay_is_the_papers_formula(alpha, total, step):
    schedule = sf.schedules.CosineDecay(every=10, alpha=alpha, total_steps=total)
    expected = alpha / 2 * (1 + math.cos(math.pi * min(step, total) / total))
    assert schedule.fraction(step) == pytest.approx(expected, abs=1e-12)


def test_update_steps_are_multiples_of_every_up_to_stop():
    schedule = sf.schedules.CosineDecay(every=3, alpha=0.5, total_steps=100, stop=10)
    assert [t for t in range(1, 20) if schedule.is_update(t)] == [3, 6, 9]
    assert sf.schedules.Linear(every=1, alpha=0.4, total_steps=4).fraction(1) == pytest.approx(0.3)
    assert sf.schedules.Constant(every=5, alpha=0.2).fraction(12345) == 0.2


def test_base_classes_are_abstract():
    """Schedule, Scorer and Growth cannot be built until a subclass defines fraction() / __call__()."""
    with pytest.raises(TypeError, match="abstract"):
        sf.schedules.Schedule(every=1, alpha=0.5)
    for base in (sf.scorers.Scorer, sf.growth.Growth):
        with pytest.raises(TypeError, match="abstract"):
            base()


def rigl_erk(shapes: dict, density: float, erk: bool = True) -> dict:
    """RigL's `get_sparsities_erdos_renyi` (google-research/rigl sparse_utils.py), ported without its
    per-layer floor of zero counts (sparsefuse solves the exact budget; tests/test_differential.py pins the
    difference against sparsimony, which floors as RigL does)."""
    dense_layers: set = set()
    while True:
        divisor, rhs, raw = 0.0, 0.0, {}
        for name, shape in shapes.items():
            n_param = math.prod(shape)
            n_zeros = n_param * (1 - density)
            n_ones = n_param * density
            if name in dense_layers:
                rhs -= n_zeros
            else:
                rhs += n_ones
                raw[name] = (
                    (sum(shape) / math.prod(shape)) if erk else ((shape[-2] + shape[-1]) / (shape[-2] * shape[-1]))
                )
                divisor += raw[name] * n_param
        eps = rhs / divisor
        max_prob = max(raw.values())
        if max_prob * eps > 1:
            dense_layers.update(n for n, p in raw.items() if p == max_prob)
        else:
            break
    return {n: 1.0 if n in dense_layers else eps * raw[n] for n in shapes}


RESNETISH = {
    "conv1": (64, 3, 7, 7),
    "l1": (64, 64, 3, 3),
    "l2": (128, 64, 3, 3),
    "l2d": (128, 64, 1, 1),
    "l3": (256, 128, 3, 3),
    "l4": (512, 256, 3, 3),
    "fc": (1000, 512),
}


@pytest.mark.parametrize("density", [0.05, 0.1, 0.2, 0.5, 0.8])
def test_erk_matches_rigl_solver(density):
    ours = sf.distribution.layer_densities(RESNETISH, density, "erk")
    assert ours == pytest.approx(rigl_erk(RESNETISH, density), rel=1e-9)
    total = sum(math.prod(s) for s in RESNETISH.values())
    assert sum(ours[n] * math.prod(s) for n, s in RESNETISH.items()) == pytest.approx(density * total, rel=1e-12)


def test_erk_makes_small_layers_dense_and_resolves():
    shapes = {"tiny": (4, 3, 3, 3), "big": (512, 512, 3, 3)}
    d = sf.distribution.layer_densities(shapes, 0.1, "erk")
    assert d["tiny"] == 1.0 and 0 < d["big"] < 0.1


def test_kernel_granularity_covers_whole_kernels_of_transposed_convs():
    conv_t = nn.ConvTranspose3d(6, 4, 2, stride=2)  # weight (C_in=6, C_out=4, 2, 2, 2)
    gran = sf.masks.Kernel().bind("w", conv_t.weight, conv_t)
    assert gran.groups_shape(conv_t.weight.shape) == (6, 4)
    assert gran.group_size(conv_t.weight.shape) == 8
    mask = torch.zeros(6, 4, dtype=torch.bool)
    mask[2, 3] = True
    dense = gran.to_weight(mask, conv_t.weight.shape)
    assert dense.sum() == 8 and dense[2, 3].all()


def test_channel_granularity_uses_output_channels():
    conv, conv_t = nn.Conv2d(3, 5, 3), nn.ConvTranspose2d(3, 5, 3)
    assert sf.masks.Channel().bind("a", conv.weight, conv).groups_shape(conv.weight.shape) == (5,)
    assert sf.masks.Channel().bind("b", conv_t.weight, conv_t).groups_shape(conv_t.weight.shape) == (5,)


def test_block_group_sum_and_expand_are_adjoint():
    gran = sf.masks.Block(2, 3)
    values = torch.arange(4 * 6 * 2, dtype=torch.float).reshape(4, 6, 2)
    sums = gran.group_sum(values)
    assert sums.shape == (2, 2)
    assert sums[1, 0] == values[2:4, 0:3].sum()
    probe = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert (gran.expand(probe, values.shape) * values).sum() == sums[0, 1]


def test_l1_and_magnitude_rank_kernels_differently():
    weight = torch.zeros(1, 2, 2)
    weight[0, 0] = torch.tensor([1.0, 1.0])  # L1 2, L2 1.41
    weight[0, 1] = torch.tensor([1.8, 0.0])  # L1 1.8, L2 1.8
    gen = torch.Generator()
    kernel = sf.masks.Kernel()
    assert sf.scorers.L1()(weight, None, kernel, gen).argmax() == 0
    assert sf.scorers.Magnitude()(weight, None, kernel, gen).argmax() == 1


class TwoBlocks(sf.masks.Granularity):
    """A user-defined granularity: the first and second half of dim 0."""

    def groups_shape(self, weight_shape):
        return (2,)

    def expand(self, group_values, weight_shape):
        half = weight_shape[0] // 2
        return group_values.repeat_interleave(half).reshape(-1, *([1] * (len(weight_shape) - 1)))

    def group_sum(self, values):
        return values.reshape(2, -1).sum(1)


def test_a_user_granularity_plugs_in():
    model = nn.Linear(3, 4)
    sparsity = sf.DynamicSparsity(
        model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.5, granularity=TwoBlocks(), targets=["weight"]
    )
    mask = sparsity.weight_mask("weight")
    assert mask.sum() == 6 and (mask[:2].all() ^ mask[2:].all())
    assert torch.all(model.weight[~mask] == 0)
