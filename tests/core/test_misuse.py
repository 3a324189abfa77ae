"""Misuse that used to pass silently while ``density()`` reported the target: a layer too small for its density,
frozen weights, weights replaced after construction, and ``step()`` called more often than the optimizer steps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsefuse as sf


def train(model, optimizer, sparsity, steps: int) -> None:
    for step in range(steps):
        x = torch.randn(2, model[0].in_channels, 6, 6, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        sparsity.step()


# ------------------------------------------------------------------------------- a layer keeping no group
def test_a_layer_whose_density_rounds_to_no_group_is_refused():
    # 2 kernels at density 0.2: round(0.4) = 0, the layer would be masked off entirely.
    with pytest.raises(ValueError, match=r"density 0.2 keeps no group of 'weight'.*at least 1/2 = 0.5"):
        sf.DynamicSparsity(nn.Conv2d(1, 2, 3), None, density=0.2, granularity="kernel")
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 16, 3))
    with pytest.raises(ValueError, match=r"keeps no group of '0.weight'.*density=\{'0.weight': 0.5"):
        sf.DynamicSparsity(model, None, density=0.2, granularity="kernel")
    # The fix the message names works.
    sparsity = sf.DynamicSparsity(model, None, density={"0.weight": 0.5, "default": 0.2}, granularity="kernel")
    assert int(sparsity.masks["0.weight"].sum()) == 1


@settings(max_examples=60, deadline=None)
@given(
    c_in=st.integers(1, 4),
    c_out=st.integers(1, 4),
    density=st.floats(0.01, 1.0),
    granularity=st.sampled_from(["element", "kernel", "channel", "input_channel"]),
    distribution=st.sampled_from(["uniform", "erk"]),
)
def test_every_target_keeps_a_group_or_construction_is_refused(c_in, c_out, density, granularity, distribution):
    model = nn.Sequential(nn.Conv2d(c_in, c_out, 3), nn.Conv2d(c_out, 6, 1))
    try:
        sparsity = sf.DynamicSparsity(model, None, density=density, granularity=granularity, distribution=distribution)
    except ValueError as refusal:
        assert "keeps no group" in str(refusal)
        densities = sf.distribution.layer_densities(
            {name: tuple(p.shape) for name, p in model.named_parameters() if name.endswith("weight")},
            density,
            distribution,
        )
        groups = {
            name: sf.masks.get_granularity(granularity)
            .bind(name, model.get_parameter(name), model.get_submodule(name.rpartition(".")[0]))
            .groups_shape(model.get_parameter(name).shape)
            for name in densities
        }
        assert any(round(densities[n] * torch.Size(groups[n]).numel()) == 0 for n in densities)
        return
    assert all(int(mask.sum()) >= 1 for mask in sparsity.masks.values())


# ------------------------------------------------------------------------------------------ frozen weights
def frozen_net():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    model[1].weight.requires_grad_(False)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_a_frozen_target_of_a_dynamic_sparsifier_is_refused():
    model, optimizer = frozen_net()
    schedule = sf.schedules.Constant(every=1, drop_fraction=0.5)
    with pytest.raises(ValueError, match=r"frozen \(requires_grad=False\): \['1.weight'\].*regrows in them would stay"):
        sf.DynamicSparsity(model, optimizer, density=0.5, schedule=schedule)


def test_a_static_sparsifier_keeps_a_frozen_weight_masked_and_its_density_true():
    model, optimizer = frozen_net()
    sparsity = sf.DynamicSparsity(model, optimizer, density=0.5)
    train(model, optimizer, sparsity, 3)
    nonzero_kernels = (model[1].weight.detach() != 0).flatten(2).any(2)
    assert torch.equal(nonzero_kernels, sparsity.masks["1.weight"])
    assert sparsity.density("1.weight") == 0.5


@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_a_weight_frozen_after_construction_stops_the_next_update(growth):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = sf.schedules.Constant(every=2, drop_fraction=0.5)
    sparsity = sf.DynamicSparsity(model, optimizer, density=0.5, growth=growth, schedule=schedule)
    train(model, optimizer, sparsity, 1)
    model[1].weight.requires_grad_(False)
    # Gradient growth finds no gradient either: the message says why, not that step() came too late.
    with pytest.raises(RuntimeError, match=r"'1.weight' is frozen \(requires_grad=False\) at update step 2"):
        train(model, optimizer, sparsity, 1)


# ----------------------------------------------------------------------------------------- replaced weights
def test_a_weight_replaced_by_load_state_dict_assign_is_refused_at_step():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsity = sf.DynamicSparsity(model, optimizer, density=0.5)
    state = {k: v.clone() + 1.0 for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # copies into the masked tensors: fine
    train(model, optimizer, sparsity, 1)
    model.load_state_dict(state, assign=True)  # new tensors the sparsifier has never seen
    with pytest.raises(RuntimeError, match=r"\['0.weight', '1.weight'\] are no longer the tensors.*assign=False"):
        train(model, optimizer, sparsity, 1)


# -------------------------------------------------------------------------------- step() per optimizer step
def test_step_twice_per_optimizer_step_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsity = sf.DynamicSparsity(model, optimizer, schedule=sf.schedules.Constant(every=2, drop_fraction=0.5))
    train(model, optimizer, sparsity, 3)
    with pytest.raises(RuntimeError, match="called again without an optimizer.step"):
        sparsity.step()
    assert sparsity.step_count == 3  # the refused call did not count


@settings(max_examples=30, deadline=None)
@given(pattern=st.lists(st.sampled_from(["optimizer", "sparsity"]), min_size=1, max_size=12))
def test_step_is_refused_exactly_when_the_optimizer_has_not_stepped_since_the_last_call(pattern):
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsity = sf.DynamicSparsity(model, optimizer, density=0.5, schedule=sf.schedules.Constant(1, 0.5))
    stepped_since, called_before, counted = False, False, 0
    for call in pattern:
        if call == "optimizer":
            optimizer.step()
            stepped_since = True
            continue
        if called_before and not stepped_since:
            with pytest.raises(RuntimeError, match="without an optimizer.step"):
                sparsity.step()
        else:
            sparsity.step()
            counted += 1
        called_before, stepped_since = True, False
    assert sparsity.step_count == counted


def test_without_an_optimizer_step_drives_the_schedule_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    sparsity = sf.DynamicSparsity(model, None, density=0.5, schedule=sf.schedules.Constant(1, 0.5))
    assert all(sparsity.step() is not None for _ in range(3))


def test_frozen_weights_without_an_optimizer_matter_only_to_gradient_growth():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)).requires_grad_(False)
    schedule = sf.schedules.Constant(every=1, drop_fraction=0.5)
    assert sf.DynamicSparsity(model, None, density=0.5, schedule=schedule).step() is not None
    sparsity = sf.DynamicSparsity(model, None, density=0.5, growth="gradient", schedule=schedule)
    with pytest.raises(RuntimeError, match=r"'0.weight' is frozen \(requires_grad=False\) at update step 1"):
        sparsity.step()
