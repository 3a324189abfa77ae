"""Property tests of DynamicSparsity's invariants (mask counts, drop = grow, zeroed weights, resume) and its errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsefuse as sf
from sparsefuse.validation import positive_int
from tests.core.strategies import (
    OPTIMIZERS,
    assert_same_run,
    build,
    densities,
    granularities,
    growths,
    layer_specs,
    schedules,
    scorers,
    train_and_resume,
    train_step,
)

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STEPS = 8


def weights(model, sparsity):
    params = dict(model.named_parameters())
    return {name: params[name] for name in sparsity.target_names}


def assert_masked_exactly(model, optimizer, sparsity):
    """Invariant 3: inactive weights are exactly 0.0 and so is every weight-shaped optimizer state."""
    for name, w in weights(model, sparsity).items():
        inactive = ~sparsity.weight_mask(name)
        assert torch.all(w.detach()[inactive] == 0.0), name
        for key, value in optimizer.state.get(w, {}).items():
            if torch.is_tensor(value) and value.shape == w.shape:
                assert torch.all(value[inactive] == 0.0), (name, key)


def assert_groups_constant(sparsity):
    """Invariant 4: the weight-shaped mask is constant over each group (whole kernels, whole blocks)."""
    for name in sparsity.target_names:
        wm = sparsity.weight_mask(name)
        gran = sparsity.granularity_of(name)
        group_any = gran.group_sum(wm.float()) > 0
        group_all = gran.group_sum(wm.float()) == gran.group_size(wm.shape)
        assert torch.equal(group_any, group_all), name
        assert torch.equal(group_all, sparsity.masks[name])


@PROPERTY
@given(
    data=st.data(),
    opt_kind=st.sampled_from(OPTIMIZERS),
    density=densities,
    schedule=schedules(),
    scorer=scorers,
    growth=growths,
    distribution=st.sampled_from(["uniform", "er", "erk"]),
    regrow_init=st.sampled_from(["zeros", "reinit"]),
)
def test_invariants_hold_through_training(data, opt_kind, density, schedule, scorer, growth, distribution, regrow_init):
    granularity = data.draw(granularities())
    specs = data.draw(layer_specs(granularity))
    model, optimizer, sparsity = build(
        specs,
        granularity,
        opt_kind,
        density,
        schedule,
        scorer,
        growth,
        distribution=distribution,
        regrow_init=regrow_init,
    )
    shapes = {n: tuple(w.shape) for n, w in weights(model, sparsity).items()}
    layer_density = sf.distribution.layer_densities(shapes, density, distribution)
    expected = {n: round(layer_density[n] * sparsity.masks[n].numel()) for n in shapes}

    def check_counts():  # invariant 1
        for name, mask in sparsity.masks.items():
            assert int(mask.sum()) == expected[name], name

    check_counts()
    assert_masked_exactly(model, optimizer, sparsity)
    assert_groups_constant(sparsity)
    for step in range(1, STEPS + 1):
        before = sparsity.masks
        report = train_step(model, optimizer, sparsity, step)
        after = sparsity.masks
        check_counts()
        assert_masked_exactly(model, optimizer, sparsity)
        assert_groups_constant(sparsity)
        if not schedule.is_update(step):  # invariant 6: topology only changes on update steps
            assert report is None
            assert all(torch.equal(before[n], after[n]) for n in before)
            continue
        assert report is not None and report.step == step == sparsity.step_count
        assert report.fraction == pytest.approx(schedule.fraction(step))
        for name in before:  # invariant 2
            active = int(before[name].sum())
            count = min(int(schedule.fraction(step) * active), before[name].numel() - active)
            grown = after[name] & ~before[name]
            dropped = before[name] & ~after[name]
            assert report.layers[name].dropped == report.layers[name].grown == count
            assert int(grown.sum()) == int(dropped.sum()) == count, name
    assert sparsity.history == [r for r in sparsity.history if schedule.is_update(r.step)]


@PROPERTY
@given(data=st.data(), density=st.floats(0.02, 0.95), kind=st.sampled_from(["er", "erk"]))
def test_global_density_matches_target_with_er_and_erk(data, density, kind):
    """Invariant 6 (second half): the layer densities average exactly to the target; only rounding to whole
    groups moves the realised density, by at most half a group per layer."""
    specs = data.draw(layer_specs("element", max_layers=5))
    model, _, sparsity = build(specs, "element", "sgd", density, None, "l1", "random", distribution=kind)
    shapes = {n: tuple(w.shape) for n, w in weights(model, sparsity).items()}
    layer_density = sf.distribution.layer_densities(shapes, density, kind)
    total = sum(math.prod(s) for s in shapes.values())
    assert all(0.0 < d <= 1.0 + 1e-12 for d in layer_density.values())
    assert sum(layer_density[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx(density * total, rel=1e-9)
    assert abs(sparsity.density() - density) <= 0.5 * len(shapes) / total + 1e-12


@PROPERTY
@given(
    data=st.data(),
    opt_kind=st.sampled_from(OPTIMIZERS),
    density=densities,
    schedule=schedules(),
    scorer=scorers,
    growth=growths,
    stop_at=st.integers(0, STEPS),
    other_seed=st.integers(1, 1000),
)
def test_resume_is_bit_identical(data, opt_kind, density, schedule, scorer, growth, stop_at, other_seed):
    """Invariant 5: interrupt at any step, restore into fresh objects built with another seed, continue."""
    granularity = data.draw(granularities())
    specs = data.draw(layer_specs(granularity))
    reference, resumed = train_and_resume(
        lambda **seeds: build(specs, granularity, opt_kind, density, schedule, scorer, growth, **seeds),
        stop_at,
        STEPS,
        seed=other_seed,
        init_seed=other_seed,
    )
    assert_same_run(reference, resumed)


@PROPERTY
@given(data=st.data(), density=densities, schedule=schedules(), growth=growths, noise_seed=st.integers(0, 99))
def test_decisions_ignore_the_global_rng(data, density, schedule, growth, noise_seed):
    """Invariant 8: replicas whose global RNG differs (as DDP ranks may) still make identical decisions, and
    DynamicSparsity never consumes the global RNG."""
    granularity = data.draw(granularities())
    specs = data.draw(layer_specs(granularity))
    runs = []
    for global_seed in (noise_seed, noise_seed + 1):
        model, optimizer, sparsity = build(
            specs, granularity, "sgd", density, schedule, sf.scorers.RandomDrop(), growth
        )
        torch.manual_seed(global_seed)
        for step in range(1, STEPS + 1):
            state = torch.get_rng_state()
            train_step(model, optimizer, sparsity, step)
            assert torch.equal(state, torch.get_rng_state())
            torch.rand(global_seed + 1)  # replicas consume the global RNG differently
        runs.append(sparsity)
    assert all(torch.equal(runs[0].masks[n], runs[1].masks[n]) for n in runs[0].target_names)


def test_gradient_growth_picks_largest_dense_gradients_among_inactive():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the update sees exactly these weights
    sparsity = sf.DynamicSparsity(
        model,
        optimizer,
        density=0.25,
        granularity="kernel",
        growth=sf.growth.Gradient(),
        schedule=sf.schedules.Constant(every=1, drop_fraction=0.5),
    )
    model(torch.randn(2, 6, 5, 5)).square().sum().backward()
    grad = model[0].weight.grad.clone()
    weight = model[0].weight.detach().clone()
    before = sparsity.masks["0.weight"]
    optimizer.step()
    report = sparsity.step()
    after = sparsity.masks["0.weight"]
    count = report.layers["0.weight"].grown
    assert count == int(0.5 * before.sum()) > 0
    grad_score = grad.abs().sum((2, 3)).masked_fill(before, -1.0).flatten()
    assert set(torch.topk(grad_score, count).indices.tolist()) == set(
        (after & ~before).flatten().nonzero()[:, 0].tolist()
    )
    l1 = weight.abs().sum((2, 3)).masked_fill(~before, math.inf).flatten()
    dropped = set((before & ~after).flatten().nonzero()[:, 0].tolist())
    assert dropped == set(torch.topk(l1, count, largest=False).indices.tolist())
    # Inactive weights are zero, yet their gradient was dense: growth saw real signal there.
    assert grad[~sparsity.weight_mask("0.weight") & (weight == 0)].abs().sum() > 0


def test_regrow_init_reinit_gives_fresh_values_and_zeros_gives_zero():
    for init, expect_zero in (("zeros", True), ("reinit", False)):
        torch.manual_seed(0)
        model = nn.Linear(20, 20)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        sparsity = sf.DynamicSparsity(
            model,
            optimizer,
            density=0.5,
            granularity="element",
            regrow_init=init,
            schedule=sf.schedules.Constant(every=1, drop_fraction=0.5),
        )
        before = sparsity.masks["weight"]
        model(torch.randn(3, 20)).sum().backward()
        optimizer.step()
        sparsity.step()
        grown = sparsity.masks["weight"] & ~before
        values = model.weight.detach()[grown]
        assert grown.sum() == 100
        assert torch.all(values == 0) == expect_zero
        if not expect_zero:
            assert values.abs().max() <= 1 / math.sqrt(20) + 1e-6  # torch's default Linear init bound


def test_static_schedule_never_changes_topology_and_default_targets():
    model = nn.Sequential(
        nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.ConvTranspose3d(4, 2, 2), nn.Flatten(), nn.Linear(8, 3)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsity = sf.DynamicSparsity(model, optimizer, density=0.5)
    assert sparsity.target_names == ("0.weight", "2.weight", "4.weight")
    masks = sparsity.masks
    for _ in range(5):
        optimizer.step()
        assert sparsity.step() is None
    assert all(torch.equal(masks[n], sparsity.masks[n]) for n in masks)


def test_density_dict_with_default_and_overrides():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 10))
    sparsity = sf.DynamicSparsity(model, None, density={"default": 0.5, "1.weight": 0.2}, granularity="element")
    assert [sparsity.density(n) for n in sparsity.target_names] == [0.5, 0.2, 0.5]


# ------------------------------------------------------------------------------------------------- bad input
def _model_and_opt():
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.Linear(6, 6))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), True, "0.2"])
def test_bad_density_is_refused(density):
    model, opt = _model_and_opt()
    with pytest.raises(ValueError, match="density"):
        sf.DynamicSparsity(model, opt, density=density)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(targets=lambda name, module: False), ValueError, "targets matched no weight"),
        (dict(targets=["0.weight", "nope.weight"]), ValueError, "nope.weight"),
        (dict(targets="0.weight"), TypeError, "list of parameter names"),
        (dict(granularity="filter"), ValueError, "unknown granularity 'filter'"),
        (dict(granularity=sf.masks.Block(4, 4)), ValueError, r"Block\(4, 4\) does not tile '0.weight'"),
        (dict(targets=["0.bias"]), ValueError, "'0.bias' has shape"),
        (dict(distribution="erdos"), ValueError, "unknown distribution"),
        (dict(density={"0.weight": 0.5}), ValueError, r"no value for \['1.weight'\]"),
        (dict(density={"default": 0.5, "2.weight": 0.5}), ValueError, "not targets"),
        (dict(schedule="cosine"), TypeError, "schedule must be"),
        (dict(regrow_init="ones"), ValueError, "regrow_init"),
        (dict(seed=-1), ValueError, "seed"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, error, pattern):
    model, opt = _model_and_opt()
    with pytest.raises(error, match=pattern):
        sf.DynamicSparsity(model, opt, **kwargs)


def test_targets_outside_the_optimizer_are_refused():
    model, _ = _model_and_opt()
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"not in the optimizer: \['0.weight'\]"):
        sf.DynamicSparsity(model, opt)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(every=0, drop_fraction=0.5), "every must be a positive int"),
        (dict(every=-3, drop_fraction=0.5), "every must be a positive int"),
        (dict(every=10, drop_fraction=0.0), r"drop_fraction must be a number in \(0, 1\], got 0.0"),
        (dict(every=10, drop_fraction=1.5), r"drop_fraction must be a number in \(0, 1\], got 1.5"),
        (dict(every=10, drop_fraction=math.nan), r"drop_fraction must be a number in \(0, 1\], got nan"),
        (dict(every=10, drop_fraction=True), r"drop_fraction must be a number in \(0, 1\], got True"),
        (dict(every=10, drop_fraction="0.5"), r"drop_fraction must be a number in \(0, 1\], got '0.5'"),
        (dict(every=10, drop_fraction=None), r"drop_fraction must be a number in \(0, 1\], got None"),
        (dict(every=10, drop_fraction=0.5, total_steps=0), "total_steps"),
        (dict(every=10, drop_fraction=0.5, total_steps=100, stop=0), "stop"),
        (dict(every=10, drop_fraction=0.5, start=-1), r"start must be an int >= 0, got -1"),
        (dict(every=10, drop_fraction=0.5, start=5, stop=5), r"start=5 is not before stop=5"),
        (dict(every=10, drop_fraction=0.5, total_steps=100, start=100), r"start=100 is not before total_steps=100"),
    ],
)
def test_bad_schedules_are_refused(kwargs, pattern):
    cls = sf.schedules.CosineDecay if "total_steps" in kwargs else sf.schedules.Constant
    with pytest.raises(ValueError, match=pattern):
        cls(**kwargs)


@pytest.mark.parametrize("cls", [sf.schedules.CosineDecay, sf.schedules.Linear])
def test_a_start_delays_the_first_update_and_the_decay_begins_there(cls):
    delayed = cls(every=10, drop_fraction=0.4, total_steps=100, start=25)
    plain = cls(every=10, drop_fraction=0.4, total_steps=75)
    assert [t for t in range(1, 101) if delayed.is_update(t)] == [30, 40, 50, 60, 70, 80, 90, 100]
    for t in range(26, 101):
        assert delayed.fraction(t) == pytest.approx(plain.fraction(t - 25))  # the same decay, 25 steps later
    assert delayed.fraction(25) == pytest.approx(0.4) and delayed.fraction(100) == pytest.approx(0.0, abs=1e-12)


def test_a_sparsifier_keeps_its_first_mask_until_the_start():
    torch.manual_seed(0)
    model = nn.Linear(10, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = sf.schedules.Constant(every=2, drop_fraction=0.5, start=5)
    sparsity = sf.DynamicSparsity(model, opt, density=0.3, granularity="element", schedule=schedule)
    first = sparsity.weight_mask("weight").clone()
    changed_at = []
    for step in range(1, 9):
        model(torch.randn(4, 10)).sum().backward()
        opt.step()
        report = sparsity.step()
        if report is not None and report.layers["weight"].grown:
            changed_at.append(step)
        if step < 6:
            assert torch.equal(sparsity.weight_mask("weight"), first)
    assert changed_at == [6, 8]


@pytest.mark.parametrize("density, replaced", [(0.3, 30), (0.5, 50), (0.8, 20)])
def test_drop_fraction_one_replaces_every_group_it_can(density, replaced):
    """At density <= 0.5 an update keeps nothing of the old topology; above it, regrowth (inactive groups only)
    caps the exchange at the inactive count."""
    torch.manual_seed(0)
    model = nn.Linear(10, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = sf.schedules.Constant(every=1, drop_fraction=1.0)
    sparsity = sf.DynamicSparsity(model, opt, density=density, granularity="element", schedule=schedule)
    before = sparsity.weight_mask("weight").clone()
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    layer = sparsity.step().layers["weight"]
    after = sparsity.weight_mask("weight")
    assert layer.dropped == layer.grown == replaced
    assert int(after.sum()) == int(before.sum()) == round(100 * density)
    assert int((before & after).sum()) == round(100 * density) - replaced


def test_positive_int_names_the_argument_and_the_fix():
    assert positive_int("n", 3) == 3
    with pytest.raises(ValueError, match=r"^n must be a positive int, got True; a count$"):
        positive_int("n", True, "a count")
    with pytest.raises(ValueError, match=r"^n must be an int >= 2, got 1$"):
        positive_int("n", 1, minimum=2)


def test_state_dict_from_another_model_is_refused():
    model, opt = _model_and_opt()
    state = sf.DynamicSparsity(model, opt).state_dict()
    other = nn.Sequential(nn.Conv2d(4, 7, 3), nn.Linear(6, 6))
    sparsity = sf.DynamicSparsity(other, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="'0.weight' has shape"):
        sparsity.load_state_dict(state)
    renamed = nn.Sequential(nn.Identity(), nn.Conv2d(4, 6, 3), nn.Linear(6, 6))
    sparsity = sf.DynamicSparsity(renamed, torch.optim.SGD(renamed.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="different model"):
        sparsity.load_state_dict(state)
    with pytest.raises(ValueError, match="not a DynamicSparsity state dict"):
        sparsity.load_state_dict({"masks": {}})


def test_gradient_growth_without_gradient_says_when_to_call_step():
    model, opt = _model_and_opt()
    sparsity = sf.DynamicSparsity(
        model, opt, growth=sf.growth.Gradient(), schedule=sf.schedules.Constant(every=1, drop_fraction=0.5)
    )
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        sparsity.step()


def test_a_meta_device_model_gets_countable_masks():
    """Accounting builds full-size models on the meta device: their masks live on the CPU and count exactly."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv3d(96, 48, 3), nn.ConvTranspose3d(48, 24, 2, stride=2))
    sparsity = sf.DynamicSparsity(model, None, density=0.3)
    assert sparsity.density("0.weight") == round(0.3 * 96 * 48) / (96 * 48)
    assert sparsity.weight_mask("1.weight").device.type == "cpu"
    assert sf.count_params(model, sparsity) == (round(0.3 * 96 * 48) * 27 + 48 + round(0.3 * 48 * 24) * 8 + 24)
