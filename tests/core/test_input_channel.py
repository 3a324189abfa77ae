"""granularity="input_channel" (sparsefuse.masks.InputChannel): one group per input channel, grouped convs included.

The DST invariants of tests/core/test_sparsity.py, checked for this granularity on random models that include
grouped convolutions, plus the meaning of a group: bit c of a layer's mask switches every weight that reads input
channel c, and nothing else.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsefuse as sf
from tests.core.strategies import (
    LAYER_KINDS,
    OPTIMIZERS,
    assert_same_run,
    build,
    growths,
    make_layer,
    schedules,
    scorers,
    train_and_resume,
    train_step,
)

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STEPS = 6


@st.composite
def grouped_specs(draw, max_layers: int = 3):
    specs = []
    for _ in range(draw(st.integers(1, max_layers))):
        kind = draw(st.sampled_from(LAYER_KINDS))
        groups = 1 if kind == "linear" else draw(st.sampled_from([1, 2, 3]))
        specs.append(
            (kind, groups * draw(st.integers(1, 4)), groups * draw(st.integers(1, 3)), draw(st.integers(1, 3)), groups)
        )
    return specs


def reads(layer: nn.Module, weight_shape: torch.Size, channel: int) -> torch.Tensor:
    """Bool, weight-shaped: the weights of ``layer`` that read input channel ``channel``, from torch's layouts."""
    where = torch.zeros(weight_shape, dtype=torch.bool)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):  # (in, out/groups, *k)
        where[channel] = True
    elif isinstance(layer, nn.Linear):  # (out, in)
        where[:, channel] = True
    else:  # (out, in/groups, *k): filters of the channel's group, at its position within the group
        per_group_in, per_group_out = layer.in_channels // layer.groups, layer.out_channels // layer.groups
        group = channel // per_group_in
        where[group * per_group_out : (group + 1) * per_group_out, channel % per_group_in] = True
    return where


def check_invariants(model, optimizer, sparsity, expected_active: dict[str, int]) -> None:
    params = dict(model.named_parameters())
    for index, layer in enumerate(model.layers):
        name = f"layers.{index}.weight"
        mask, weight = sparsity.masks[name], params[name].detach()
        assert mask.shape == (model.specs[index][1],)  # one group per input channel of the layer
        assert int(mask.sum()) == expected_active[name]  # exact density
        expected = torch.zeros(weight.shape, dtype=torch.bool)
        for channel in mask.nonzero().flatten().tolist():
            expected |= reads(layer, weight.shape, channel)
        assert torch.equal(sparsity.weight_mask(name), expected)
        assert torch.all(weight[~expected] == 0.0)
        for value in optimizer.state.get(params[name], {}).values():
            if torch.is_tensor(value) and value.shape == weight.shape:
                assert torch.all(value[~expected] == 0.0)


@PROPERTY
@given(
    specs=grouped_specs(),
    opt_kind=st.sampled_from(OPTIMIZERS),
    density=st.floats(0.05, 1.0),
    schedule=schedules(),
    scorer=scorers,
    growth=growths,
    distribution=st.sampled_from(["uniform", "er", "erk"]),
    regrow_init=st.sampled_from(["zeros", "reinit"]),
)
def test_invariants_hold_through_training(
    specs, opt_kind, density, schedule, scorer, growth, distribution, regrow_init
):
    model, optimizer, sparsity = build(
        specs,
        "input_channel",
        opt_kind,
        density,
        schedule,
        scorer,
        growth,
        distribution=distribution,
        regrow_init=regrow_init,
    )
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in sparsity.target_names}
    layer_density = sf.distribution.layer_densities(shapes, density, distribution)
    expected = {n: round(layer_density[n] * sparsity.masks[n].numel()) for n in shapes}
    check_invariants(model, optimizer, sparsity, expected)
    for step in range(1, STEPS + 1):
        before = sparsity.masks
        report = train_step(model, optimizer, sparsity, step)
        check_invariants(model, optimizer, sparsity, expected)
        after = sparsity.masks
        if not schedule.is_update(step):
            assert report is None and all(torch.equal(before[n], after[n]) for n in before)
            continue
        for name in before:  # drop == grow == the schedule's count, grown groups were inactive
            active = int(before[name].sum())
            count = min(int(schedule.fraction(step) * active), before[name].numel() - active)
            assert report.layers[name].dropped == report.layers[name].grown == count
            assert int((after[name] & ~before[name]).sum()) == int((before[name] & ~after[name]).sum()) == count


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=grouped_specs(),
    density=st.floats(0.1, 0.9),
    schedule=schedules(),
    growth=growths,
    stop_at=st.integers(0, STEPS),
)
def test_resume_is_bit_identical(specs, density, schedule, growth, stop_at):
    reference, resumed = train_and_resume(
        lambda **seeds: build(specs, "input_channel", "sgd", density, schedule, sf.scorers.L1(), growth, **seeds),
        stop_at,
        STEPS,
        seed=5,
        init_seed=5,
    )
    assert_same_run(reference, resumed)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=grouped_specs(), density=st.floats(0.05, 0.8), schedule=schedules())
def test_compaction_after_training_reads_exactly_the_active_channels(specs, density, schedule):
    model, optimizer, sparsity = build(
        specs, "input_channel", "adamw", density, schedule, sf.scorers.L1(), sf.growth.Gradient()
    )
    for step in range(1, STEPS + 1):
        train_step(model, optimizer, sparsity, step)
    compacted = sf.compact(model, sparsity, min_dead_inputs=0.0)
    for index, layer in enumerate(model.layers):
        active = sparsity.masks[f"layers.{index}.weight"]
        groups = getattr(layer, "groups", 1)
        small = compacted.layers[index]
        if groups == 1 and active.any():  # grouped convs may keep dead channels to even out their groups
            kept = small.in_index if isinstance(small, sf.CompactLayer) and small.in_index is not None else None
            assert torch.equal(active.nonzero().flatten(), torch.arange(len(active)) if kept is None else kept)
    x = model.inputs(torch.Generator().manual_seed(99))
    with torch.no_grad():
        for layer, small, xi in zip(model.layers, compacted.layers, x, strict=True):
            want = layer(xi)
            assert (small(xi) - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())


def test_scores_sum_over_the_weights_that_read_each_channel():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, groups=2)
    granularity = sf.masks.InputChannel().bind("weight", conv.weight, conv)
    assert repr(granularity) == "InputChannel(dim=1, groups=2)"
    scores = sf.scorers.L1()(conv.weight, None, granularity, torch.Generator())
    brute = [conv.weight.detach().abs()[reads(conv, conv.weight.shape, c)].sum() for c in range(6)]
    torch.testing.assert_close(scores, torch.stack(brute))
    assert granularity.group_size(conv.weight.shape) == 2 * 9  # two filters per group read each channel


def test_named_and_refused():
    assert isinstance(sf.masks.get_granularity("input_channel"), sf.masks.InputChannel)
    depthwise = nn.Conv3d(4, 8, 3, groups=4)
    sparsity = sf.DynamicSparsity(depthwise, None, density=0.5, granularity="input_channel")
    assert sparsity.masks["weight"].shape == (4,) and int(sparsity.masks["weight"].sum()) == 2
    with pytest.raises(ValueError, match="'input_channel' needs a weight with at least 2 dims"):
        sf.DynamicSparsity(nn.Sequential(nn.Linear(3, 3)), None, targets=["0.bias"], granularity="input_channel")
    with pytest.raises(ValueError, match=r"InputChannel\(dim=4\) is out of range"):
        sf.DynamicSparsity(nn.Linear(3, 3), None, granularity=sf.masks.InputChannel(dim=4))
    with pytest.raises(ValueError, match="groups"):
        sf.masks.InputChannel(groups=0)


@pytest.mark.parametrize("kind", ["linear", "conv3d", "convT3d"])
def test_input_channel_blocks_group_is_one_output_block_reading_one_input_channel(kind):
    torch.manual_seed(0)
    layer = make_layer(kind, 5, 6, 2)
    transposed = kind == "convT3d"
    granularity = sf.masks.InputChannelBlocks(3).bind("weight", layer.weight, layer)
    groups = (5, 3) if transposed else (3, 5)  # the weight's own dim order: (in, out) for a transposed conv
    assert granularity.groups_shape(layer.weight.shape) == groups
    magnitude = layer.weight.detach().abs()
    scores = sf.scorers.L1()(layer.weight, None, granularity, torch.Generator())
    for block in range(3):
        for channel in range(5):
            group = torch.zeros(groups, dtype=torch.bool)
            group[(channel, block) if transposed else (block, channel)] = True
            outputs = torch.zeros(6, dtype=torch.bool)
            outputs[2 * block : 2 * block + 2] = True  # 6 outputs in 3 blocks of 2
            spatial = [1] * (layer.weight.dim() - 2)
            expected = reads(layer, layer.weight.shape, channel)
            expected &= outputs.view(1, -1, *spatial) if transposed else outputs.view(-1, 1, *spatial)
            assert torch.equal(granularity.to_weight(group, layer.weight.shape), expected)
            torch.testing.assert_close(scores[group].sum(), magnitude[expected].sum())


def test_input_channel_blocks_named_and_refused():
    assert repr(sf.masks.get_granularity("input_channel_blocks")) == "InputChannelBlocks(blocks=4)"
    with pytest.raises(ValueError, match="6 outputs, which 4 blocks do not divide"):
        sf.DynamicSparsity(nn.Conv3d(3, 6, 3), None, granularity="input_channel_blocks")
    with pytest.raises(ValueError, match="grouped conv 'weight'.*use granularity='input_channel'"):
        sf.DynamicSparsity(nn.Conv3d(4, 8, 3, groups=2), None, granularity="input_channel_blocks")
    with pytest.raises(ValueError, match="positive int"):
        sf.masks.InputChannelBlocks(0)
    with pytest.raises(TypeError, match="bound to its layer"):
        sf.masks.InputChannelBlocks(2).groups_shape((4, 3))


def pool_limit(mask: torch.Tensor, pool: float, input_dim: int) -> tuple[int, int]:
    """(inputs some block reads, the pool's size) of a pooled per-block group mask."""
    blocks_dim = 1 - input_dim
    read = int(mask.any(blocks_dim).sum())
    return read, min(mask.shape[input_dim], math.ceil(pool * int(mask.sum()) / mask.shape[blocks_dim]))


@PROPERTY
@given(
    kind=st.sampled_from(["linear", "conv2d", "conv3d", "convT3d"]),
    c_in=st.integers(4, 24),
    per_block=st.integers(1, 3),
    blocks=st.integers(2, 4),
    density=st.floats(0.05, 0.5),
    pool=st.sampled_from([1.5, 2.0, 3.0]),
    drop_fraction=st.floats(0.05, 0.5),
    growth=growths,
)
def test_pooled_blocks_read_no_more_inputs_than_the_pool_holds(
    kind, c_in, per_block, blocks, density, pool, drop_fraction, growth
):
    """With a pool of at least 1 + the drop fraction, the union of the blocks' inputs never exceeds the pool's size,
    at the first mask and after every update, while the density stays exact and the topology keeps changing."""
    schedule = sf.schedules.Constant(every=1, drop_fraction=drop_fraction)
    granularity = sf.masks.InputChannelBlocks(blocks, pool=pool)
    specs = [(kind, c_in, blocks * per_block, 1)]
    model, optimizer, sparsity = build(specs, granularity, "sgd", density, schedule, sf.scorers.L1(), growth)
    name, input_dim = "layers.0.weight", 0 if kind == "convT3d" else 1
    active = int(sparsity.masks[name].sum())
    read, size = pool_limit(sparsity.masks[name], pool, input_dim)
    assert read <= size
    changed = 0
    for step in range(1, 9):
        before = sparsity.masks[name]
        train_step(model, optimizer, sparsity, step)
        mask = sparsity.masks[name]
        changed += int((mask != before).any())
        assert int(mask.sum()) == active
        read, size = pool_limit(mask, pool, input_dim)
        assert read <= size, f"step {step}: the blocks read {read} inputs, the pool holds {size}"
    exchanged = int(drop_fraction * active) > 0 and active < mask.numel()
    assert changed > 0 or not exchanged


def test_pooled_blocks_named_and_refused():
    named = sf.masks.get_granularity("input_channel_pool")
    assert repr(named) == "InputChannelBlocks(blocks=4, pool=2.0)"
    layer = nn.ConvTranspose3d(6, 8, 2, stride=2)
    assert repr(named.bind("weight", layer.weight, layer)) == "PooledBlock(1, 2, pool=2.0, input_dim=0)"
    for bad in (0.5, True, "2", float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"pool=\.\.\.\) needs a finite number >= 1"):
            sf.masks.InputChannelBlocks(4, pool=bad)
    with pytest.raises(ValueError, match=r"PooledBlock\(pool=\.\.\.\) needs a finite number >= 1"):
        sf.masks.PooledBlock(2, 1, pool=0.1, input_dim=1)


def test_the_pool_keeps_the_growth_policys_order_however_small_the_scores():
    """Gradient growth's scores can be tiny: within the pool the largest must still come first, then the rest of
    the pool, then the groups outside it."""
    granularity = sf.masks.PooledBlock(1, 1, pool=2.0, input_dim=1)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 0] = mask[1, 1] = True  # inputs 0 and 1 are read; a pool of ceil(2 * 4 / 2) = 4 inputs after growing 2
    scores = torch.tensor([[1e-9, 3e-9, 2e-9, 5e-9, 7e-9, 6e-9], [4e-9, 8e-9, 9e-9, 1e-12, 1e-10, 2e-10]])
    ranked = granularity.confine(mask, scores, count=2)
    # The refill takes inputs 2 (best 9e-9) and 4 (best 7e-9); input 5 (6e-9) and 3 (5e-9) stay out.
    order = ranked.flatten().argsort(descending=True).tolist()
    in_pool = [(1, 2), (1, 1), (0, 4), (1, 0), (0, 1), (0, 2), (0, 0), (1, 4)]
    assert [divmod(i, 6) for i in order[:8]] == in_pool
    assert {divmod(i, 6) for i in order[8:]} == {(0, 3), (0, 5), (1, 3), (1, 5)}
