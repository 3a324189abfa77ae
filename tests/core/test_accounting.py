"""sparsefuse.accounting: hand-computed counts, density scaling, conventions, meta-device safety, PT score."""

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


class FakeSparsity:
    """The duck-typed interface count_params / count_flops read: kernel masks given per weight."""

    def __init__(self, model: nn.Module, kernel_masks: dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        self._masks = {n: m.bool() for n, m in kernel_masks.items()}
        self._shapes = {n: params[n].shape for n in kernel_masks}

    @property
    def target_names(self):
        return tuple(self._masks)

    def weight_mask(self, name):
        shape = self._shapes[name]
        return self._masks[name].view(*self._masks[name].shape, *([1] * (len(shape) - 2))).expand(shape)

    def density(self, name):
        return self._masks[name].float().mean().item()


def first_k(rows: int, cols: int, k: int) -> torch.Tensor:
    return (torch.arange(rows * cols) < k).view(rows, cols)


class ShiftLikeConv3d(nn.Conv3d):
    """A Conv3d subclass (like DepthShiftConv3d): must be hooked and counted as a conv."""

    def forward(self, x):
        return super().forward(x.flip(2))


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
    with pytest.raises(TypeError, match="target_names, weight_mask"):
        sf.count_params(model, object())
    wrong_name = FakeSparsity(nn.Sequential(model), {"0.weight": first_k(2, 2, 1)})
    with pytest.raises(ValueError, match="'0.weight', which is not a parameter"):
        sf.count_params(model, wrong_name)

    class BadMask(FakeSparsity):
        def weight_mask(self, name):
            return torch.ones(2, 2, dtype=torch.bool)

    with pytest.raises(ValueError, match="shape"):
        sf.count_params(model, BadMask(model, {"weight": first_k(2, 2, 1)}))


# ------------------------------------------------------------------------------------------- count_flops
def test_conv3d_eq5_and_macs_by_hand():
    model = nn.Conv3d(2, 4, 3, padding=1)
    x = (1, 2, 4, 4, 4)  # output (1, 4, 4, 4, 4): V_out = 64
    assert sf.count_flops(model, x) == (2 * 27 * 2 + 1) * 4 * 64
    assert sf.count_flops(model, x, bias_term=False) == 2 * 27 * 2 * 4 * 64
    assert sf.count_flops(model, x, convention="macs") == 2 * 27 * 2 * 4 * 64


def test_grouped_strided_conv2d_counts_batch_and_channels_per_group():
    model = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    x = (2, 4, 8, 8)  # output (2, 6, 4, 4); C_in per group = 2
    assert sf.count_flops(model, x) == (2 * 9 * 2 + 1) * 6 * 16 * 2
    assert sf.count_flops(model, x, convention="macs") == 2 * 9 * 2 * 6 * 16 * 2


def test_conv1d_unbatched_input_counts_one_sample():
    model = nn.Conv1d(3, 5, 3)
    assert sf.count_flops(model, (3, 10)) == (2 * 3 * 3 + 1) * 5 * 8


def test_transposed_conv_eq5_charges_output_size_macs_charges_true_cost():
    model = nn.ConvTranspose3d(4, 2, 2, stride=2, bias=False)
    x = (1, 4, 3, 3, 3)  # output (1, 2, 6, 6, 6): V_out = 216, V_in = 27
    assert sf.count_flops(model, x) == (2 * 8 * 4 + 1) * 2 * 216
    # True cost: each of the 27 input voxels x 4 channels meets 8 taps x 2 output channels.
    assert sf.count_flops(model, x, convention="macs") == 2 * 8 * 4 * 2 * 27


def test_grouped_transposed_conv1d_macs():
    model = nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2)
    x = (1, 4, 5)  # output length (5-1)*2 + 3 = 11
    assert sf.count_flops(model, x) == (2 * 3 * 2 + 1) * 6 * 11
    assert sf.count_flops(model, x, convention="macs") == 2 * 3 * 4 * 3 * 5


def test_linear_counts_every_leading_row():
    model = nn.Linear(5, 3)
    assert sf.count_flops(model, (2, 7, 5)) == (2 * 5 + 1) * 3 * 14
    assert sf.count_flops(model, (5,)) == (2 * 5 + 1) * 3
    assert sf.count_flops(model, (2, 7, 5), convention="macs") == 2 * 5 * 3 * 14


def test_subclasses_are_counted_and_other_modules_are_free():
    model = nn.Sequential(ShiftLikeConv3d(1, 2, 1), nn.InstanceNorm3d(2), nn.LeakyReLU(), nn.MaxPool3d(2))
    flops = sf.count_flops(model, (1, 1, 2, 2, 2))
    assert flops == (2 * 1 * 1 + 1) * 2 * 8
    assert [layer.kind for layer in flops.layers] == ["ShiftLikeConv3d"]


def test_module_called_twice_is_counted_twice():
    lin = nn.Linear(4, 4)
    flops = sf.count_flops(nn.Sequential(lin, lin), (1, 4))
    assert flops == 2 * (2 * 4 + 1) * 4
    assert [layer.name for layer in flops.layers] == ["0", "0"]


def test_density_scales_the_input_channel_term_only():
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.Conv3d(4, 4, 1))
    sparsity = FakeSparsity(model, {"0.weight": first_k(4, 2, 2)})  # density 0.25
    x = (1, 2, 4, 4, 4)
    flops = sf.count_flops(model, x, sparsity)
    assert [layer.density for layer in flops.layers] == [0.25, 1.0]
    assert flops == (2 * 27 * 2 * 0.25 + 1) * 4 * 64 + (2 * 4 + 1) * 4 * 64
    assert sf.count_flops(model, x, sparsity, convention="macs") == 2 * 27 * 2 * 4 * 64 * 0.25 + 2 * 4 * 4 * 64


def test_bias_term_predicate_receives_qualified_names():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Sequential(nn.Conv2d(2, 2, 1)))
    seen = []

    def only_inner(name, module):
        seen.append((name, type(module).__name__))
        return name == "1.0"

    flops = sf.count_flops(model, (1, 1, 3, 3), bias_term=only_inner)
    assert sorted(seen) == [("0", "Conv2d"), ("1.0", "Conv2d")]
    assert [layer.bias_term for layer in flops.layers] == [False, True]
    assert flops == (2 * 1) * 2 * 9 + (2 * 2 + 1) * 2 * 9


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
def test_eq5_without_bias_equals_macs_for_plain_convs(c_in, c_out, k, stride, size, batch, active):
    model = nn.Conv2d(c_in, c_out, k, stride=stride)
    sparsity = FakeSparsity(model, {"weight": first_k(c_out, c_in, min(active, c_in * c_out))})
    shape = (batch, c_in, size, size)
    eq5 = sf.count_flops(model, shape, sparsity, bias_term=False)
    macs = sf.count_flops(model, shape, sparsity, convention="macs")
    assert math.isclose(eq5, macs, rel_tol=1e-12, abs_tol=1e-9)
    out = (size - k) // stride + 1
    assert math.isclose(
        macs, 2 * k * k * c_in * c_out * out * out * batch * sparsity.density("weight"), rel_tol=1e-12, abs_tol=1e-9
    )


def test_result_is_a_float_with_a_breakdown():
    model = nn.Sequential(nn.Conv3d(1, 2, 1), nn.Flatten(), nn.Linear(16, 3))
    flops = sf.count_flops(model, torch.zeros(1, 1, 2, 2, 2))
    assert isinstance(flops, float) and isinstance(flops, FlopCount)
    assert flops.convention == "eq5"
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
    assert flops == (2 * 27 * 1 + 1) * 32 * v + (2 * 27 * 32 + 1) * 32 * v


def test_channels_last_input_and_meta_model():
    with torch.device("meta"):
        model = nn.Conv3d(2, 3, 1)
    x = torch.randn(1, 2, 3, 3, 3).to(memory_format=torch.channels_last_3d)
    assert sf.count_flops(model, x) == (2 * 2 + 1) * 3 * 27


def test_count_flops_rejects_bad_input():
    model = nn.Conv2d(1, 1, 1)
    with pytest.raises(ValueError, match="convention must be one of"):
        sf.count_flops(model, (1, 1, 2, 2), convention="mac")
    with pytest.raises(ValueError, match="bias_term only applies"):
        sf.count_flops(model, (1, 1, 2, 2), convention="macs", bias_term=True)
    with pytest.raises(TypeError, match="bias_term must be a bool or a callable"):
        sf.count_flops(model, (1, 1, 2, 2), bias_term=1)
    with pytest.raises(ValueError, match="positive ints"):
        sf.count_flops(model, (1, 1, 0, 2))
    with pytest.raises(TypeError, match="example_input must be a tensor or a shape"):
        sf.count_flops(model, "1x1x2x2")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        sf.count_flops(None, (1, 1, 2, 2))

    class BadDensity(FakeSparsity):
        def density(self, name):
            return 1.5

    with pytest.raises(ValueError, match=r"density\('weight'\) must be in \[0, 1\]"):
        sf.count_flops(model, (1, 1, 2, 2), BadDensity(model, {"weight": first_k(1, 1, 1)}))


def test_data_dependent_forward_gets_a_clear_error():
    class ReadsValues(nn.Module):
        def forward(self, x):
            return x * x.sum().item()

    with pytest.raises(RuntimeError, match="meta device"):
        sf.count_flops(ReadsValues(), (1, 2))


# -------------------------------------------------------------------------------------------- pt_score
def test_pt_score_by_hand():
    # 80/90 = 32/36 and 10/20 + 100/300 = 5/6: PT = 32/36 + 15/36 = 47/36 (alpha 1, 0.5), 64/36 + 30/36 = 47/18 (2, 1).
    assert sf.pt_score(80, 20, 300, mdice_max=90, params_min=10, flops_min=100) == pytest.approx(47 / 36)
    assert sf.pt_score(80, 20, 300, mdice_max=90, params_min=10, flops_min=100, alpha1=2, alpha2=1) == pytest.approx(
        47 / 18
    )


@pytest.mark.parametrize(
    "mdice, params, flops, published",
    [
        (90.3, 11.23, 969.32, 1.54),  # E2ENet* s=0.7
        (90.3, 9.44, 778.74, 1.65),  # E2ENet* s=0.8
        (89.9, 7.64, 492.29, 1.89),  # E2ENet* s=0.9
        (77.1, 41.87, 1510.53, 1.07),  # CoTr
        (90.5, 30.76, 1067.89, 1.31),  # nnUNet with postprocessing
    ],
)
def test_pt_score_reproduces_paper_table1(mdice, params, flops, published):
    amos = dict(mdice_max=90.5, params_min=7.64, flops_min=391.03)
    assert round(sf.pt_score(mdice, params, flops, **amos), 2) == published


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(params=0), ValueError, "params must be a finite number > 0"),
        (dict(flops=-1.0), ValueError, "flops must be a finite number > 0"),
        (dict(mdice_max=float("nan")), ValueError, "mdice_max must be a finite number > 0"),
        (dict(mdice=-1), ValueError, "mdice must be a finite number >= 0"),
        (dict(alpha2=float("inf")), ValueError, "alpha2 must be a finite number >= 0"),
        (dict(params_min="7.64"), TypeError, "params_min must be a real number"),
        (dict(mdice=True), TypeError, "mdice must be a real number"),
    ],
)
def test_pt_score_rejects_bad_values(kwargs, error, message):
    args = dict(mdice=90.0, params=10.0, flops=100.0, mdice_max=91.0, params_min=5.0, flops_min=50.0)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        sf.pt_score(args.pop("mdice"), args.pop("params"), args.pop("flops"), **args)
