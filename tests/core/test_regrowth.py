"""Property tests of the regrowth bookkeeping: the grace period, survival of regrown groups, exploration."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsefuse as sf
from tests.core import strategies
from tests.core.strategies import (
    assert_same_run,
    densities,
    granularities,
    growths,
    layer_specs,
    scorers,
    train_and_resume,
    train_step,
)

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STEPS = 10


def build(specs, granularity, density, scorer, growth, grace_updates, drop_fraction=0.5, seed=0):
    """SGD, an update every step; ``seed`` draws the weights and seeds the sparsity."""
    schedule = sf.schedules.Constant(every=1, drop_fraction=drop_fraction)
    return strategies.build(
        specs,
        granularity,
        "sgd",
        density,
        schedule,
        scorer,
        growth,
        init_seed=seed,
        seed=seed,
        grace_updates=grace_updates,
    )


@PROPERTY
@given(
    data=st.data(),
    density=densities,
    scorer=scorers,
    growth=growths,
    grace=st.integers(0, 3),
    drop_fraction=st.floats(0.1, 1.0),
)
def test_grace_protects_regrown_groups_and_counts_are_true(data, density, scorer, growth, grace, drop_fraction):
    granularity = data.draw(granularities())
    specs = data.draw(layer_specs(granularity))
    model, optimizer, sparsity = build(specs, granularity, density, scorer, growth, grace, drop_fraction=drop_fraction)
    start = sparsity.masks
    active_counts = {n: int(m.sum()) for n, m in start.items()}
    explored = {n: m.reshape(-1).clone() for n, m in start.items()}
    grown_history: list[dict[str, torch.Tensor]] = []  # per update: the groups it grew
    for step in range(1, STEPS + 1):
        before = sparsity.masks
        report = train_step(model, optimizer, sparsity, step)
        after = sparsity.masks
        assert report is not None  # every=1: every step updates
        grown_now = {}
        for name in before:
            b, a = before[name].reshape(-1), after[name].reshape(-1)
            grown, dropped = a & ~b, b & ~a
            layer = report.layers[name]
            assert int(a.sum()) == active_counts[name]  # density never changes
            assert layer.dropped == layer.grown == int(grown.sum()) == int(dropped.sum())
            for earlier in grown_history[-grace:] if grace else []:  # nothing grown in the grace window dropped
                assert not (dropped & earlier[name]).any(), name
            previous = grown_history[-1][name] if grown_history else torch.zeros_like(b)
            assert layer.regrown_before == int(previous.sum())
            assert layer.regrown_kept == int((previous & a).sum())
            if grace >= 1:
                assert layer.regrown_kept == layer.regrown_before
            explored[name] |= a
            assert layer.ever_active == int(explored[name].sum())
            assert layer.groups == b.numel()
            grown_now[name] = grown
        grown_history.append(grown_now)
        total_before = sum(u.regrown_before for u in report.layers.values())
        if total_before:
            assert report.survival == pytest.approx(sum(u.regrown_kept for u in report.layers.values()) / total_before)
        else:
            assert report.survival is None
        assert 0.0 <= report.exploration <= 1.0


@PROPERTY
@given(data=st.data(), density=densities, growth=growths, grace=st.integers(1, 2), stop_at=st.integers(0, STEPS))
def test_resume_keeps_the_grace_period_bit_identical(data, density, growth, grace, stop_at):
    granularity = data.draw(granularities())
    specs = data.draw(layer_specs(granularity))
    scorer = sf.scorers.L1()
    reference, resumed = train_and_resume(
        lambda **seeds: build(specs, granularity, density, scorer, growth, grace, **seeds), stop_at, STEPS, seed=7
    )
    assert_same_run(reference, resumed)


def test_zero_initialised_regrowth_survives_only_with_grace():
    """The failure mode the grace period exists for: updates every step, magnitude scoring, zero regrowth.

    Without grace, groups regrown at zero are the weakest at the next update and are dropped again at once."""
    torch.manual_seed(0)
    survival = {}
    for grace in (0, 1):
        model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        sparsity = sf.DynamicSparsity(
            model,
            optimizer,
            density=0.3,
            schedule=sf.schedules.Constant(every=1, drop_fraction=0.3),
            grace_updates=grace,
        )
        x = torch.randn(2, 8, 6, 6)
        reports = []
        for _ in range(6):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
            reports.append(sparsity.step())
        survival[grace] = [r.survival for r in reports[1:]]
    assert max(survival[0]) < 0.2
    assert survival[1] == [1.0] * 5


def test_bad_grace_is_refused():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="grace_updates must be a non-negative int"):
        sf.DynamicSparsity(model, torch.optim.SGD(model.parameters(), lr=0.1), grace_updates=-1)


def test_state_dict_without_regrowth_records_loads():
    """Checkpoints written before regrowth was tracked still resume: nothing counts as regrown."""
    model = torch.nn.Linear(6, 6)
    sparsity = sf.DynamicSparsity(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.5)
    old = {k: v for k, v in sparsity.state_dict().items() if k not in ("grown_at", "ever_active")}
    sparsity.load_state_dict(old)
    assert sparsity.state_dict()["grown_at"]["weight"].sum() == 0
    assert torch.equal(sparsity.state_dict()["ever_active"]["weight"], sparsity.masks["weight"].reshape(-1))
