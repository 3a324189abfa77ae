"""sparsefuse.compaction: the compacted model computes what the masked model computes, saves, loads and exports.

Tolerance: float32 outputs agree to ``1e-5 * max(1, max |masked output|)``; the compacted layers add the same
nonzero terms as the masked dense ones, only in another order (and with other conv algorithms).
"""

from __future__ import annotations

import copy
import io
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsefuse as sf
from sparsefuse import load_sparse_state_dict, sparse_state_dict
from tests.core.helpers import FixedMasks, assert_matches
from tests.core.strategies import keeping_a_group

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = ("linear", "conv1d", "conv2d", "conv3d", "convT1d", "convT2d", "convT3d", "shift3d")
GRANULARITIES = ("element", "kernel", "channel", "input_channel")


def make_layer(kind: str, c_in: int, c_out: int, k: int, groups: int, bias: bool, extra: int) -> nn.Module:
    """``extra``: the shift groups of a DepthShiftConv3d, the stride (and output padding + 1) of a transposed
    conv, and for a conv 2 picks replicate padding."""
    if kind == "linear":
        return nn.Linear(c_in, c_out, bias=bias)
    if kind == "shift3d":
        return sf.nn.DepthShiftConv3d(c_in, c_out, (1, k, k), shift_groups=extra, groups=groups, bias=bias)
    dims = int(kind[-2])
    if kind.startswith("convT"):
        return getattr(nn, f"ConvTranspose{dims}d")(
            c_in, c_out, k, stride=extra, output_padding=extra - 1, groups=groups, bias=bias
        )
    padding_mode = "replicate" if extra == 2 else "zeros"
    return getattr(nn, f"Conv{dims}d")(
        c_in, c_out, k, padding=k // 2, groups=groups, bias=bias, padding_mode=padding_mode
    )


SPATIAL = {
    "linear": (),
    "conv1d": (5,),
    "conv2d": (4, 4),
    "conv3d": (3, 3, 3),
    "convT1d": (3,),
    "convT2d": (2, 3),
    "convT3d": (2, 2, 2),
}


class Bag(nn.Module):
    """Independent layers, each fed its own input and returning its own output."""

    def __init__(self, specs):
        super().__init__()
        self.specs = specs
        self.layers = nn.ModuleList(make_layer(*spec[:7]) for spec in specs)

    def inputs(self, generator: torch.Generator) -> list[torch.Tensor]:
        out = []
        for kind, c_in, _, _, _, _, _, batched, depth in self.specs:
            spatial = (depth, 3, 3) if kind == "shift3d" else SPATIAL[kind]
            batch = (2,) if batched or kind in ("shift3d", "linear") else ()  # DepthShift needs 5-D input
            out.append(torch.randn(*batch, c_in, *spatial, generator=generator))
        return out

    def forward(self, inputs):
        return [layer(x) for layer, x in zip(self.layers, inputs, strict=True)]


@st.composite
def layer_specs(draw, max_layers: int = 4):
    specs = []
    for _ in range(draw(st.integers(1, max_layers))):
        kind = draw(st.sampled_from(KINDS))
        groups = 1 if kind == "linear" else draw(st.sampled_from([1, 1, 2, 3]))
        c_in, c_out = groups * draw(st.integers(1, 5)), groups * draw(st.integers(1, 5))
        extra = draw(st.integers(1, 5)) if kind == "shift3d" else draw(st.integers(1, 2))
        specs.append(
            (
                kind,
                c_in,
                c_out,
                draw(st.integers(1, 3)),
                groups,
                draw(st.booleans()),
                extra,
                draw(st.booleans()),
                draw(st.integers(1, 4)),
            )
        )
    return specs


def random_masks(model: nn.Module, generator: torch.Generator, p_dead: float) -> FixedMasks:
    masks = {}
    for name, w in model.named_parameters():
        if name.endswith("weight"):
            alive = torch.rand(w.shape, generator=generator) > 0.3
            alive &= (torch.rand(w.shape[0], generator=generator) > p_dead).reshape(-1, *[1] * (w.dim() - 1))
            alive &= (torch.rand(w.shape[1], generator=generator) > p_dead).reshape(1, -1, *[1] * (w.dim() - 2))
            masks[name] = alive
    return FixedMasks(masks)


def masked_copy(model: nn.Module, sparsity) -> nn.Module:
    reference = Bag(model.specs)
    reference.load_state_dict(model.state_dict())
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name in sparsity.target_names:
            params[name].mul_(sparsity.weight_mask(name))
    return reference


def brute_force_live(module: nn.Module, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(live inputs, live outputs) from the dense (out, in) connectivity the layer's definition gives."""
    pairs = mask.flatten(2).any(2) if mask.dim() > 2 else mask
    groups = getattr(module, "groups", 1)
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    c_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
    c_out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    reads = torch.zeros(c_out, c_in, dtype=torch.bool)
    for o in range(c_out):
        for i in range(c_in):
            in_group, out_group = i // (c_in // groups), o // (c_out // groups)
            if in_group == out_group:
                local_i, local_o = i % (c_in // groups), o % (c_out // groups)
                reads[o, i] = pairs[i, local_o] if transposed else pairs[o, local_i]
    return reads.any(0), reads.any(1)


@PROPERTY
@given(
    specs=layer_specs(),
    granularity=st.sampled_from(GRANULARITIES + ("fixed",)),
    density=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
    thresholds=st.sampled_from(["always", "default"]),
    p_dead=st.floats(0.0, 0.8),
)
def test_compacted_model_equals_masked_model(specs, granularity, density, seed, thresholds, p_dead):
    torch.manual_seed(seed)
    model = Bag(specs)
    if granularity == "fixed":
        sparsity = random_masks(model, torch.Generator().manual_seed(seed), p_dead)
    else:
        sparsity = keeping_a_group(
            lambda: sf.DynamicSparsity(model, None, density=density, granularity=granularity, seed=seed)
        )
    with torch.no_grad():  # weights off the mask are not zero: compact must mask them itself
        for p in model.parameters():
            p.add_(0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    limits = dict(min_dead_inputs=0.0, min_dead_outputs=0.0) if thresholds == "always" else {}
    compacted = sf.compact(model, sparsity, **limits)
    plan = sf.compaction_plan(model, sparsity, **limits)

    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    x = model.inputs(torch.Generator().manual_seed(seed + 1))
    reference = masked_copy(model, sparsity)
    with torch.no_grad():
        for got, want in zip(compacted(x), reference(x), strict=True):
            assert_matches(got, want)
    for index, layer in enumerate(model.layers):
        entry = plan[f"layers.{index}"]
        live_in, live_out = brute_force_live(layer, sparsity.weight_mask(f"layers.{index}.weight"))
        assert (entry.live_in, entry.live_out) == (int(live_in.sum()), int(live_out.sum()))
        groups = getattr(layer, "groups", 1)
        # Every group keeps as many channels as the group with most live ones, at least one.
        padded_in = groups * max(1, int(live_in.reshape(groups, -1).sum(1).max()))
        padded_out = groups * max(1, int(live_out.reshape(groups, -1).sum(1).max()))
        if thresholds == "always":
            assert (entry.kept_in, entry.kept_out) == (padded_in, padded_out)
        else:
            assert entry.kept_in in (padded_in, entry.in_channels)
            assert entry.kept_out in (padded_out, entry.out_channels)
        assert isinstance(compacted.layers[index], sf.CompactLayer) == entry.compacted


def shift_and_fusion_model() -> nn.Sequential:
    """Conv -> depth-shift conv reading a concatenation-like input -> transposed conv -> linear head."""
    return nn.Sequential(
        nn.Conv3d(12, 8, (1, 3, 3), padding=(0, 1, 1)),
        nn.LeakyReLU(0.01),
        sf.nn.DepthShiftConv3d(8, 8, shift_groups=3),
        nn.LeakyReLU(0.01),
        nn.ConvTranspose3d(8, 6, 2, stride=2, bias=False),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def trained_masks(model: nn.Module, granularity: str) -> sf.DynamicSparsity:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsity = sf.DynamicSparsity(
        model,
        optimizer,
        density=0.3,
        granularity=granularity,
        schedule=sf.schedules.Constant(every=2, drop_fraction=0.5),
    )
    for step in range(4):
        optimizer.zero_grad()
        model(torch.randn(2, 12, 3, 4, 4, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        optimizer.step()
        sparsity.step()
    return sparsity


@pytest.mark.parametrize("granularity", ["input_channel", "channel"])
def test_state_dict_loads_into_a_compact_rebuilt_from_the_saved_masks(granularity):
    torch.manual_seed(0)
    model = shift_and_fusion_model()
    sparsity = trained_masks(model, granularity)
    compacted = sf.compact(model, sparsity, min_dead_inputs=0.0, min_dead_outputs=0.0)
    assert sum(isinstance(m, sf.CompactLayer) for m in compacted.modules()) == 4
    buffer = io.BytesIO()
    torch.save({"compacted": compacted.state_dict(), "sparsity": sparsity.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)

    torch.manual_seed(1)  # other weights: everything must come from the checkpoint
    fresh = shift_and_fusion_model()
    masks = sf.DynamicSparsity(fresh, None, granularity=granularity, seed=7)
    masks.load_state_dict(saved["sparsity"])
    rebuilt = sf.compact(fresh, masks, min_dead_inputs=0.0, min_dead_outputs=0.0)
    rebuilt.load_state_dict(saved["compacted"])
    x = torch.randn(2, 12, 3, 4, 4)
    assert torch.equal(rebuilt(x), compacted(x))
    with torch.no_grad():
        assert_matches(compacted(x), model(x))


def test_compacted_model_exports_with_smaller_layers():
    torch.manual_seed(0)
    model = shift_and_fusion_model().eval()
    sparsity = trained_masks(model, "input_channel")
    compacted = sf.compact(model, sparsity).eval()
    x = torch.randn(2, 12, 3, 4, 4)
    exported = torch.export.export(compacted, (x,))
    code = exported.graph_module.code
    assert "index_select" in code
    weights = {k: v.shape for k, v in exported.state_dict.items() if k.endswith("weight")}
    assert weights["0.layer.weight"][1] == round(0.3 * 12) and weights["2.layer.weight"][1] == round(0.3 * 8)
    with torch.no_grad():
        assert_matches(exported.module()(x), model(x))


def test_compacted_model_compiles_into_one_graph():
    """torch.compile with fullgraph=True: no graph break. The aot_eager backend captures the graph inductor would
    compile but skips inductor's code generation, which takes ~25 s on a CPU, too long for the suite."""
    torch.manual_seed(0)
    model = shift_and_fusion_model().eval()
    sparsity = trained_masks(model, "input_channel")
    compacted = sf.compact(model, sparsity).eval()
    torch._dynamo.reset()
    compiled = torch.compile(compacted, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 12, 3, 4, 4)
    with torch.no_grad():
        assert_matches(compiled(x), model(x))


def test_dead_outputs_hold_the_bias_and_unbatched_input_works():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    mask = torch.ones(6, 4, 3, 3, dtype=torch.bool)
    mask[[1, 4, 5]] = False  # three filters dead: their outputs are just the bias
    mask[:, 2] = False  # input 2 read by no filter
    compacted = sf.compact(conv, FixedMasks({"weight": mask}))
    assert isinstance(compacted, sf.CompactLayer) and compacted.layer.weight.shape == (3, 3, 3, 3)
    x = torch.randn(4, 5, 5)  # unbatched (C, H, W)
    want = nn.functional.conv2d(x[None], conv.weight * mask, conv.bias, padding=1)[0]
    assert_matches(compacted(x), want)
    assert torch.equal(compacted(x)[4], conv.bias[4].expand(5, 5).detach())


def test_transposed_conv_output_size_is_passed_on():
    up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1)
    mask = torch.ones(6, 4, 3, 3, dtype=torch.bool)
    mask[:4] = False
    compacted = sf.compact(up, FixedMasks({"weight": mask}))
    x = torch.randn(1, 6, 4, 4)
    assert compacted(x, output_size=(8, 8)).shape == (1, 4, 8, 8)
    want = nn.functional.conv_transpose2d(x, up.weight * mask, up.bias, stride=2, padding=1, output_padding=1)
    assert_matches(compacted(x, output_size=(8, 8)), want)


def test_thresholds_keep_layers_that_would_not_get_faster_and_say_so():
    model = nn.Sequential(nn.Conv3d(10, 12, 1), nn.Conv3d(12, 12, 1))
    masks = {
        "0.weight": torch.ones(12, 10, 1, 1, 1, dtype=torch.bool),
        "1.weight": torch.ones(12, 12, 1, 1, 1, dtype=torch.bool),
    }
    masks["0.weight"][:, 0] = False  # 1 of 10 inputs dead: under min_dead_inputs
    masks["1.weight"][:6] = False  # half the outputs dead: compacted
    plan = sf.compaction_plan(model, FixedMasks(masks))
    assert not plan["0"].compacted and "min_dead_inputs" in plan["0"].note
    assert plan["1"].compacted and plan["1"].kept_out == 6 and plan["1"].note == ""
    assert sf.compaction_plan(model, FixedMasks(masks), min_dead_inputs=0.0)["0"].kept_in == 9


def test_unknown_layers_and_attention_projections_stay_masked():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.scaled, self.attention = Scaled(4, 4), nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x):
            return self.attention(self.scaled(x), x, x)[0]

    net = Net()
    masks = {
        "scaled.weight": torch.zeros(4, 4, dtype=torch.bool),
        "attention.out_proj.weight": torch.zeros(4, 4, dtype=torch.bool),
    }
    masks["scaled.weight"][:, 0] = masks["attention.out_proj.weight"][:, 0] = True
    plan = sf.compaction_plan(net, FixedMasks(masks), min_dead_inputs=0.0)
    assert "Scaled.forward is not" in plan["scaled"].note and "MultiheadAttention" in plan["attention.out_proj"].note
    compacted = sf.compact(net, FixedMasks(masks), min_dead_inputs=0.0)
    assert not any(isinstance(m, sf.CompactLayer) for m in compacted.modules())
    reference = Net()
    reference.load_state_dict(net.state_dict())
    with torch.no_grad():
        reference.scaled.weight.mul_(masks["scaled.weight"])
        reference.attention.out_proj.weight.mul_(masks["attention.out_proj.weight"])
        x = torch.randn(2, 3, 4)
        assert_matches(compacted(x), reference(x))


def test_sparsity_for_another_model_is_refused():
    with pytest.raises(ValueError, match="not parameters of this model"):
        sf.compact(nn.Linear(3, 3), FixedMasks({"0.weight": torch.ones(3, 3, dtype=torch.bool)}))
    with pytest.raises(
        TypeError, match="the sparsefuse.Sparsity protocol.*dict lacks target_names, masks, weight_mask, granularity_of"
    ):
        sf.compact(nn.Linear(3, 3), {"weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"weight_mask\('weight'\) has shape \(3,\) but the weight has shape"):
        sf.compact(nn.Linear(3, 3), FixedMasks({"weight": torch.ones(3, dtype=torch.bool)}))


def test_targets_that_are_not_a_layer_weight_are_still_masked():
    class Projection(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return x @ self.kernel.T

    model = nn.Sequential(Projection(), nn.Linear(3, 2))
    sparsity = sf.DynamicSparsity(model, None, targets=["0.kernel", "1.weight"], density=0.5, granularity="element")
    with torch.no_grad():
        model[0].kernel.add_(1.0)  # off-mask values that the copy must not see
        model[1].weight.add_(1.0)
    x = torch.randn(5, 4)
    want = nn.functional.linear(
        x @ (model[0].kernel * sparsity.weight_mask("0.kernel")).T,
        model[1].weight * sparsity.weight_mask("1.weight"),
        model[1].bias,
    )
    with torch.no_grad():
        assert_matches(sf.compact(model, sparsity)(x), want)
    assert list(sf.compaction_plan(model, sparsity)) == ["1"]


@pytest.mark.parametrize("granularity", ["kernel", "input_channel", "element"])
def test_sparse_state_dict_round_trip_is_exact(granularity):
    torch.manual_seed(0)
    model = shift_and_fusion_model()
    sparsity = trained_masks(model, granularity)
    buffer = io.BytesIO()
    torch.save(sparse_state_dict(model, sparsity), buffer)
    sparse_bytes = buffer.tell()
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    torch.manual_seed(1)  # other weights and other masks: everything must come from the checkpoint
    fresh = shift_and_fusion_model()
    masks = sf.DynamicSparsity(fresh, None, density=0.7, granularity=granularity, seed=3)
    load_sparse_state_dict(fresh, masks, saved)
    want, got = model.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert all(torch.equal(sparsity.masks[k], masks.masks[k]) for k in sparsity.target_names)
    dense = io.BytesIO()
    torch.save(model.state_dict(), dense)
    assert sparse_bytes < dense.tell()


def test_sparse_state_dict_refuses_another_granularity_or_model():
    torch.manual_seed(0)
    model = shift_and_fusion_model()
    saved = sparse_state_dict(model, trained_masks(model, "kernel"))
    fresh = shift_and_fusion_model()
    with pytest.raises(ValueError, match="saved with another granularity"):
        load_sparse_state_dict(fresh, sf.DynamicSparsity(fresh, None, granularity="input_channel"), saved)
    # A state dict that records no granularity is still refused on the mask shapes.
    unrecorded = {k: v for k, v in saved.items() if k != "granularity"}
    with pytest.raises(ValueError, match="different model or granularity"):
        load_sparse_state_dict(fresh, sf.DynamicSparsity(fresh, None, granularity="input_channel"), unrecorded)
    with pytest.raises(ValueError, match="not a sparse state dict"):
        load_sparse_state_dict(fresh, sf.DynamicSparsity(fresh, None), fresh.state_dict())
    # A model of other widths is refused before anything is loaded: its weights and masks stay as they were.
    other = nn.Sequential(nn.Conv3d(12, 8, (1, 3, 3)), nn.Conv3d(8, 4, 1))
    other_masks = sf.DynamicSparsity(other, None, density=0.5)
    weights, masks = copy.deepcopy(other.state_dict()), copy.deepcopy(other_masks.masks)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_sparse_state_dict(other, other_masks, saved)
    assert all(torch.equal(weights[k], v) for k, v in other.state_dict().items())
    assert all(torch.equal(masks[k], other_masks.masks[k]) for k in masks)
    weight_masks_only = types.SimpleNamespace(
        target_names=("0.weight",), weight_mask=lambda name: torch.ones(8, 12, 1, 3, 3, dtype=torch.bool)
    )
    with pytest.raises(TypeError, match="lacks masks, granularity_of"):
        sparse_state_dict(model, weight_masks_only)
    with pytest.raises(TypeError, match="loads the saved masks into a sparsefuse.DynamicSparsity"):
        load_sparse_state_dict(fresh, FixedMasks({}), saved)


def test_masks_of_one_shape_but_another_granularity_are_refused():
    """On a square weight, output-channel and input-channel masks have the same shape and can hold the same
    number of active weights: only the recorded granularity tells them apart."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    rows = sf.DynamicSparsity(model, None, density=0.5, granularity=sf.masks.Channel(dim=0), seed=0)
    saved_sparse, saved_masks = sparse_state_dict(model, rows), rows.state_dict()
    fresh = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    columns = sf.DynamicSparsity(fresh, None, density=0.5, granularity="input_channel", seed=1)
    weights, masks = copy.deepcopy(fresh.state_dict()), copy.deepcopy(columns.masks)
    with pytest.raises(ValueError, match="was Channel\\(dim=0\\), this sparsifier has InputChannel"):
        load_sparse_state_dict(fresh, columns, saved_sparse)
    with pytest.raises(ValueError, match="saved with another granularity"):
        columns.load_state_dict(saved_masks)
    assert all(torch.equal(weights[k], v) for k, v in fresh.state_dict().items())
    assert all(torch.equal(masks[k], columns.masks[k]) for k in masks)
    # The same granularity loads, including a state dict saved before granularities were recorded.
    same = sf.DynamicSparsity(fresh, None, density=0.5, granularity=sf.masks.Channel(dim=0), seed=1)
    load_sparse_state_dict(fresh, same, {k: v for k, v in saved_sparse.items() if k != "granularity"})
    assert all(torch.equal(rows.masks[k], same.masks[k]) for k in rows.target_names)
