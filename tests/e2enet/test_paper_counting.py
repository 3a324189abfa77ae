"""The E2ENet paper's counting rules (e2enet.experiments.paper_counting): eq. 5 FLOPs by hand, its "+1" term,
its relation to the true cost, and the eq. 7 PT score against the paper's Table 1."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsefuse as sf
from e2enet.experiments.paper_counting import Eq5LayerFlops, eq5_flops, pt_score
from tests.core.helpers import FakeSparsity, ShiftLikeConv3d, first_k


# ----------------------------------------------------------------------------------------------- eq. 5
def test_conv3d_by_hand():
    model = nn.Conv3d(2, 4, 3, padding=1)
    x = (1, 2, 4, 4, 4)  # output (1, 4, 4, 4, 4): V_out = 64
    assert eq5_flops(model, x) == (2 * 27 * 2 + 1) * 4 * 64
    assert eq5_flops(model, x, bias_term=False) == 2 * 27 * 2 * 4 * 64


def test_grouped_strided_conv2d_counts_batch_and_channels_per_group():
    model = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    assert eq5_flops(model, (2, 4, 8, 8)) == (2 * 9 * 2 + 1) * 6 * 16 * 2


def test_conv1d_unbatched_input_counts_one_sample():
    assert eq5_flops(nn.Conv1d(3, 5, 3), (3, 10)) == (2 * 3 * 3 + 1) * 5 * 8


def test_transposed_conv_is_charged_at_its_output_size():
    model = nn.ConvTranspose3d(4, 2, 2, stride=2, bias=False)
    x = (1, 4, 3, 3, 3)  # output (1, 2, 6, 6, 6): V_out = 216
    assert eq5_flops(model, x) == (2 * 8 * 4 + 1) * 2 * 216
    assert eq5_flops(model, x, bias_term=False) == sf.count_flops(model, x) * 8  # stride volume x the true cost
    assert eq5_flops(nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), (1, 4, 5)) == (2 * 3 * 2 + 1) * 6 * 11


def test_linear_counts_every_leading_row():
    model = nn.Linear(5, 3)
    assert eq5_flops(model, (2, 7, 5)) == (2 * 5 + 1) * 3 * 14
    assert eq5_flops(model, (5,)) == (2 * 5 + 1) * 3


def test_density_scales_the_input_channel_term_only():
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), ShiftLikeConv3d(4, 4, 1))
    sparsity = FakeSparsity(model, {"0.weight": first_k(4, 2, 2)})  # density 0.25
    flops = eq5_flops(model, (1, 2, 4, 4, 4), sparsity)
    assert flops == (2 * 27 * 2 * 0.25 + 1) * 4 * 64 + (2 * 4 + 1) * 4 * 64
    assert [(layer.kind, layer.density) for layer in flops.layers] == [("Conv3d", 0.25), ("ShiftLikeConv3d", 1.0)]


def test_bias_term_predicate_receives_qualified_names_once_per_module():
    inner = nn.Conv2d(2, 2, 1)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Sequential(inner, inner))
    seen = []

    def only_inner(name, module):
        seen.append((name, type(module).__name__))
        return name == "1.0"

    flops = eq5_flops(model, (1, 1, 3, 3), bias_term=only_inner)
    assert sorted(seen) == [("0", "Conv2d"), ("1.0", "Conv2d")]
    assert [layer.bias_term for layer in flops.layers] == [False, True, True]
    assert all(isinstance(layer, Eq5LayerFlops) for layer in flops.layers)
    assert flops == (2 * 1) * 2 * 9 + 2 * (2 * 2 + 1) * 2 * 9
    restored = pickle.loads(pickle.dumps(flops))
    assert restored == flops and restored.layers == flops.layers


def test_bad_bias_term_is_refused():
    with pytest.raises(TypeError, match="bias_term must be a bool or a callable"):
        eq5_flops(nn.Conv2d(1, 1, 1), (1, 1, 2, 2), bias_term=1)


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
def test_eq5_without_bias_is_the_true_cost_of_plain_convs(c_in, c_out, k, stride, size, batch, active):
    model = nn.Conv2d(c_in, c_out, k, stride=stride)
    sparsity = FakeSparsity(model, {"weight": first_k(c_out, c_in, min(active, c_in * c_out))})
    shape = (batch, c_in, size, size)
    eq5 = eq5_flops(model, shape, sparsity, bias_term=False)
    assert math.isclose(eq5, sf.count_flops(model, shape, sparsity), rel_tol=1e-12, abs_tol=1e-9)


def test_meta_model_and_tensor_input():
    with torch.device("meta"):
        model = nn.Conv3d(2, 3, 1)
    assert eq5_flops(model, torch.zeros(1, 2, 3, 3, 3)) == (2 * 2 + 1) * 3 * 27


# -------------------------------------------------------------------------------------------- pt_score
def test_pt_score_by_hand():
    # 80/90 = 32/36 and 10/20 + 100/300 = 5/6: PT = 32/36 + 15/36 = 47/36 (alpha 1, 0.5), 64/36 + 30/36 = 47/18 (2, 1).
    assert pt_score(80, 20, 300, mdice_max=90, params_min=10, flops_min=100) == pytest.approx(47 / 36)
    assert pt_score(80, 20, 300, mdice_max=90, params_min=10, flops_min=100, alpha1=2, alpha2=1) == pytest.approx(
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
    assert round(pt_score(mdice, params, flops, **amos), 2) == published


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
        pt_score(args.pop("mdice"), args.pop("params"), args.pop("flops"), **args)
