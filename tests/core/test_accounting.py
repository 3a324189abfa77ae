"""sparsefuse.accounting: hand-computed counts, density scaling, per-layer records, meta-device safety."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsefuse as sf
from sparsefuse.accounting import FlopCount
from tests.core.helpers import FakeSparsity, ShiftLikeConv3d, first_k


# ------------------------------------------------------------------------------------------ count_params
def test_count_params_dense_counts_every_parameter_including_zero_biases():
    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.InstanceNorm3d(4, affine=True), nn.Linear(5, 3))
    nn.init.zeros_(model[0].bias)
    expected = (4 * 2 * 27 + 4) + (4 + 4) + (5 * 3 + 3)
    assert sf.count_params(model) == expected


def test_count_params_counts_tied_parameters_once():
    lin = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert sf.count_params(model) == 16


def test_count_params_counts_active_elements_of_targets_only():
    model = nn.Sequential(nn.Conv3d(3, 4, 3), nn.ConvTranspose3d(4, 2, 2, stride=2, bias=False))
    # conv: 5 of 12 kernels active (x27 each); tconv weight is (C_in=4, C_out=2): 3 of 8 active (x8).
    sparsity = FakeSparsity(model, {"0.weight": first_k(4, 3, 5), "1.weight": first_k(4, 2, 3)})
    assert sf.count_params(model, sparsity) == 5 * 27 + 4 + 3 * 8


def test_count_params_works_on_meta_models():
    with torch.device("meta"):
        model = nn.Conv3d(8, 16, (1, 3, 3))
    sparsity = FakeSparsity(model, {"weight": first_k(16, 8, 10)})
    assert sf.count_params(model) == 16 * 8 * 9 + 16
    assert sf.count_params(model, sparsity) == 10 * 9 + 16


def test_count_params_rejects_bad_input():
    model = nn.Conv2d(2, 2, 3)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        sf.count_params("not a model")
    with pytest.raises(TypeError, match="sparsefuse.Sparsity protocol.*object lacks target_names, masks"):
        sf.count_params(model, object())
    wrong_name = FakeSparsity(nn.Sequential(model), {"0.weight": first_k(2, 2, 1)})
    with pytest.raises(ValueError, match=r"\['0.weight'\], which are not parameters of this model"):
        sf.count_params(model, wrong_name)

    class BadMask(FakeSparsity):
        def weight_mask(self, name):
            return torch.ones(2, 2, dtype=torch.bool)

    with pytest.raises(ValueError, match="shape"):
        sf.count_params(model, BadMask(model, {"weight": first_k(2, 2, 1)}))


# ------------------------------------------------------------------------------------------- count_flops
def test_conv3d_by_hand():
    model = nn.Conv3d(2, 4, 3, padding=1)
    x = (1, 2, 4, 4, 4)  # output (1, 4, 4, 4, 4): V_out = 64
    assert sf.count_flops(model, x) == 2 * 27 * 2 * 4 * 64


def test_grouped_strided_conv2d_counts_batch_and_channels_per_group():
    model = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    x = (2, 4, 8, 8)  # output (2, 6, 4, 4); C_in per group = 2
    assert sf.count_flops(model, x) == 2 * 9 * 2 * 6 * 16 * 2


def test_conv1d_unbatched_input_counts_one_sample():
    model = nn.Conv1d(3, 5, 3)
    assert sf.count_flops(model, (3, 10)) == 2 * 3 * 3 * 5 * 8


def test_transposed_conv_counts_its_true_cost():
    model = nn.ConvTranspose3d(4, 2, 2, stride=2, bias=False)
    x = (1, 4, 3, 3, 3)  # output (1, 2, 6, 6, 6), input V_in = 27
    # Each of the 27 input voxels x 4 channels meets 8 taps x 2 output channels.
    assert sf.count_flops(model, x) == 2 * 8 * 4 * 2 * 27


def test_grouped_transposed_conv1d():
    model = nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2)
    assert sf.count_flops(model, (1, 4, 5)) == 2 * 3 * 4 * 3 * 5


def test_linear_counts_every_leading_row():
    model = nn.Linear(5, 3)
    assert sf.count_flops(model, (2, 7, 5)) == 2 * 5 * 3 * 14
    assert sf.count_flops(model, (5,)) == 2 * 5 * 3


def test_subclasses_are_counted_and_other_modules_are_free():
    model = nn.Sequential(ShiftLikeConv3d(1, 2, 1), nn.InstanceNorm3d(2), nn.LeakyReLU(), nn.MaxPool3d(2))
    flops = sf.count_flops(model, (1, 1, 2, 2, 2))
    assert flops == 2 * 1 * 1 * 2 * 8
    assert [layer.kind for layer in flops.layers] == ["ShiftLikeConv3d"]


def test_module_called_twice_is_counted_twice():
    lin = nn.Linear(4, 4)
    flops = sf.count_flops(nn.Sequential(lin, lin), (1, 4))
    assert flops == 2 * (2 * 4 * 4)
    assert [layer.name for layer in flops.layers] == ["0", "0"]


def test_density_scales_each_targeted_layer():
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.Conv3d(4, 4, 1))
    sparsity = FakeSparsity(model, {"0.weight": first_k(4, 2, 2)})  # density 0.25
    flops = sf.count_flops(model, (1, 2, 4, 4, 4), sparsity)
    assert [layer.density for layer in flops.layers] == [0.25, 1.0]
    assert flops == 2 * 27 * 2 * 4 * 64 * 0.25 + 2 * 4 * 4 * 64


@settings(max_examples=25, deadline=None)
@given(
    c_in=st.integers(1, 6),
    c_out=st.integers(1, 6),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    size=st.integers(3, 6),
    batch=st.integers(1, 3),
    active=st.integers(0, 36),
)
def test_plain_conv_costs_its_active_multiply_accumulates(c_in, c_out, k, stride, size, batch, active):
    model = nn.Conv2d(c_in, c_out, k, stride=stride)
    active = min(active, c_in * c_out)
    sparsity = FakeSparsity(model, {"weight": first_k(c_out, c_in, active)})
    flops = sf.count_flops(model, (batch, c_in, size, size), sparsity)
    out = (size - k) // stride + 1
    assert math.isclose(flops, 2 * k * k * active * out * out * batch, rel_tol=1e-12, abs_tol=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    granularity=st.sampled_from(["element", "kernel", "channel", "input_channel"]),
    density=st.floats(0.3, 1.0),
    seed=st.integers(0, 100),
)
def test_recorded_density_is_the_sparsifiers_exactly(granularity, density, seed):
    """The records' density, active weights / all weights, is ``DynamicSparsity.density(name)`` to the bit."""
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ConvTranspose2d(5, 4, 2), nn.Flatten(), nn.Linear(324, 7))
    sparsity = sf.DynamicSparsity(model, None, density=density, granularity=granularity, seed=seed)
    flops = sf.count_flops(model, (1, 3, 10, 10), sparsity)
    assert {f"{layer.name}.weight": layer.density for layer in flops.layers} == {
        name: sparsity.density(name) for name in sparsity.target_names
    }


def test_result_is_a_float_with_a_breakdown():
    model = nn.Sequential(nn.Conv3d(1, 2, 1), nn.Flatten(), nn.Linear(16, 3))
    flops = sf.count_flops(model, torch.zeros(1, 1, 2, 2, 2))
    assert isinstance(flops, float) and isinstance(flops, FlopCount)
    assert [(layer.name, layer.output_shape) for layer in flops.layers] == [("0", (1, 2, 2, 2, 2)), ("2", (1, 3))]
    assert float(flops) == math.fsum(layer.flops for layer in flops.layers)
    assert json.loads(json.dumps({"flops": flops})) == {"flops": float(flops)}
    restored = pickle.loads(pickle.dumps(flops))
    assert restored == flops and restored.layers == flops.layers
    assert flops / 2 == float(flops) / 2


# ---------------------------------------------------------------------------------------- meta device
def test_counting_changes_no_parameter_buffer_or_mode():
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.Dropout(0.5))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sf.count_flops(model, torch.randn(2, 1, 4, 4, 4))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:  # BatchNorm's running stats and counter included
        assert after[k].device.type == "cpu" and torch.equal(before[k], after[k]), k
    assert model.training and all(not hooks for m in model.modules() for hooks in (m._forward_hooks,))


def test_large_input_is_counted_without_arithmetic():
    # A real forward at 384^3 would need GBs and minutes; on meta it is shapes only.
    model = nn.Sequential(nn.Conv3d(1, 32, 3, padding=1), nn.Conv3d(32, 32, 3, padding=1))
    flops = sf.count_flops(model, (1, 1, 384, 384, 384))
    v = 384**3
    assert flops == 2 * 27 * 1 * 32 * v + 2 * 27 * 32 * 32 * v


def test_channels_last_input_and_meta_model():
    with torch.device("meta"):
        model = nn.Conv3d(2, 3, 1)
    x = torch.randn(1, 2, 3, 3, 3).to(memory_format=torch.channels_last_3d)
    assert sf.count_flops(model, x) == 2 * 2 * 3 * 27


def test_count_flops_rejects_bad_input():
    model = nn.Conv2d(1, 1, 1)
    with pytest.raises(ValueError, match="positive ints"):
        sf.count_flops(model, (1, 1, 0, 2))
    with pytest.raises(TypeError, match="example_input must be a tensor or a shape"):
        sf.count_flops(model, "1x1x2x2")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        sf.count_flops(None, (1, 1, 2, 2))
    with pytest.raises(TypeError, match="sparsefuse.Sparsity protocol"):
        sf.count_flops(model, (1, 1, 2, 2), {"weight": torch.ones(1, 1, 1, 1, dtype=torch.bool)})


def test_data_dependent_forward_gets_a_clear_error():
    class ReadsValues(nn.Module):
        def forward(self, x):
            return x * x.sum().item()

    with pytest.raises(RuntimeError, match="meta device"):
        sf.count_flops(ReadsValues(), (1, 2))
