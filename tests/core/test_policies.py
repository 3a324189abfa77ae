"""Schedules, distributions, granularities and scorers checked against their definitions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparsefuse as sf


# Golden values, derived by hand from cos at special angles (cos(pi/6) = sqrt(3)/2, cos(pi/4) = sqrt(2)/2,
# cos(pi/3) = 1/2) in the paper's Algorithm 1, f(t) = drop_fraction/2 * (1 + cos(pi * t / T)), and 0 from T on.
@pytest.mark.parametrize(
    "drop_fraction, total, step, golden",
    [
        (0.5, 100, 0, 0.5),
        (0.5, 100, 25, 0.42677669529663687),  # 1/4 + sqrt(2)/8
        (0.5, 100, 50, 0.25),
        (0.5, 100, 75, 0.0732233047033631),  # 1/4 - sqrt(2)/8
        (0.5, 100, 100, 0.0),
        (0.5, 100, 250, 0.0),
        (0.3, 300, 50, 0.2799038105676658),  # 0.15 * (1 + sqrt(3)/2)
        (0.3, 300, 100, 0.225),  # 0.15 * 3/2
        (0.3, 300, 200, 0.075),  # 0.15 * 1/2
        (0.3, 300, 250, 0.02009618943233421),  # 0.15 * (1 - sqrt(3)/2)
    ],
)
def test_cosine_decay_golden_values(drop_fraction, total, step, golden):
    schedule = sf.schedules.CosineDecay(every=10, drop_fraction=drop_fraction, total_steps=total)
    assert schedule.fraction(step) == pytest.approx(golden, abs=1e-12)


@given(drop_fraction=st.floats(0.01, 1.0), total=st.integers(1, 10_000), data=st.data())
def test_cosine_decay_falls_from_drop_fraction_symmetrically_to_zero(drop_fraction, total, data):
    """Properties of the half cosine, not its formula: f(0) = drop_fraction, f(t) + f(T - t) = drop_fraction,
    falling, 0 from T."""
    schedule = sf.schedules.CosineDecay(every=10, drop_fraction=drop_fraction, total_steps=total)
    step = data.draw(st.integers(0, total))
    assert schedule.fraction(0) == pytest.approx(drop_fraction, abs=1e-12)
    assert schedule.fraction(step) + schedule.fraction(total - step) == pytest.approx(drop_fraction, abs=1e-12)
    assert schedule.fraction(min(step + 1, total)) <= schedule.fraction(step) + 1e-12
    assert schedule.fraction(total + data.draw(st.integers(0, total))) == pytest.approx(0.0, abs=1e-12)


def test_update_steps_are_multiples_of_every_up_to_stop():
    schedule = sf.schedules.CosineDecay(every=3, drop_fraction=0.5, total_steps=100, stop=10)
    assert [t for t in range(1, 20) if schedule.is_update(t)] == [3, 6, 9]
    assert sf.schedules.Linear(every=1, drop_fraction=0.4, total_steps=4).fraction(1) == pytest.approx(0.3)
    assert sf.schedules.Constant(every=5, drop_fraction=0.2).fraction(12345) == 0.2


def test_base_classes_are_abstract():
    """Schedule, Scorer and Growth cannot be built until a subclass defines fraction() / __call__()."""
    with pytest.raises(TypeError, match="abstract"):
        sf.schedules.Schedule(every=1, drop_fraction=0.5)
    for base in (sf.scorers.Scorer, sf.growth.Growth):
        with pytest.raises(TypeError, match="abstract"):
            base()


# Three layers whose ERK raw scores sum(shape) / prod(shape) are 1/6, 1/16 and 9/40. raw * size = sum(shape), so
# epsilon = budget / (sum of sum(shape) over the sparse layers) and each golden value below is a fraction worked
# out by hand (density * 440 weights in all):
#   0.2: epsilon = 88 / 48 = 11/6: all below 1, densities 11/36, 11/96, 33/80.
#   0.5: epsilon = 220 / 48 puts fc at 1.03 > 1: fc dense; then epsilon = (220 - 80) / 30 = 14/3: 7/9, 7/24.
#   0.8: epsilon = 352 / 48 puts fc at 1.65 and a at 1.22: fc (the top score) dense; then epsilon = 272 / 30 puts
#        a at 1.51: a dense; then epsilon = 200 / 18: b at 25/36.
# ER scores the first two dims only, (n0 + n1) / (n0 * n1) = 3/4, 3/8, 9/40, weighted sum 54 + 108 + 18 = 180:
#   0.2: epsilon = 88 / 180 = 22/45: densities 11/30, 11/60, 11/100.
HAND_SHAPES = {"a": (4, 2, 3, 3), "b": (8, 4, 3, 3), "fc": (10, 8)}


@pytest.mark.parametrize(
    "kind, density, golden",
    [
        ("erk", 0.2, {"a": 11 / 36, "b": 11 / 96, "fc": 33 / 80}),
        ("erk", 0.5, {"a": 7 / 9, "b": 7 / 24, "fc": 1.0}),
        ("erk", 0.8, {"a": 1.0, "b": 25 / 36, "fc": 1.0}),
        ("er", 0.2, {"a": 11 / 30, "b": 11 / 60, "fc": 11 / 100}),
    ],
)
def test_er_and_erk_golden_densities(kind, density, golden):
    assert sf.distribution.layer_densities(HAND_SHAPES, density, kind) == pytest.approx(golden, rel=1e-12)


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
def test_erk_spends_exactly_the_global_budget(density):
    ours = sf.distribution.layer_densities(RESNETISH, density, "erk")
    assert all(0.0 < d <= 1.0 for d in ours.values())
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
