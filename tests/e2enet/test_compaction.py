"""E2ENet-wide compaction (examples/e2enet/inference/compaction.py): the compacted network computes what the masked
one computes, holds only the channels something reads, saves, loads, exports and compiles.

Tolerance: float32 outputs agree to ``1e-5 * max(1, max |masked output|)``. Both networks add the same nonzero
terms, in another order and with other conv algorithms (oneDNN against torch's choice); the instance norms
normalise by statistics computed in another order too.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsefuse as sf
from e2enet.inference.compaction import CompactNode, CompactUnit, compact_e2enet, e2enet_compaction_plan
from e2enet.nets.e2enet import build_e2enet, e2enet_fusion_targets
from tests.core.helpers import FixedMasks, assert_matches
from tests.core.strategies import keeping_a_group

PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


def masked_reference(model: nn.Module, sparsity) -> nn.Module:
    reference = copy.deepcopy(model).eval()
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name in sparsity.target_names:
            params[name].mul_(sparsity.weight_mask(name))
    return reference


def random_dead_channels(model: nn.Module, generator: torch.Generator, p_dead: float) -> FixedMasks:
    """Element masks on every conv weight, with whole input and output channels dead at rate ``p_dead``."""
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            w = module.weight
            alive = torch.rand(w.shape, generator=generator) > 0.3
            alive &= (torch.rand(w.shape[0], generator=generator) > p_dead).reshape(-1, 1, 1, 1, 1)
            alive &= (torch.rand(w.shape[1], generator=generator) > p_dead).reshape(1, -1, 1, 1, 1)
            masks[f"{name}.weight"] = alive
    return FixedMasks(masks)


@st.composite
def e2enet_settings(draw):
    num_pools = draw(st.sampled_from([2, 3]))
    first = draw(st.sampled_from([(2, 2, 2), (1, 2, 2)]))
    options = dict(
        base_channels=draw(st.sampled_from([4, 8])),
        max_channels=draw(st.sampled_from([16, 32, 64])),
        num_pools=num_pools,
        strides=[first] + [(2, 2, 2)] * (num_pools - 1),
        fusion_units=draw(st.integers(1, 2)),
        last_diagonal_units=draw(st.integers(1, 2)),
        # The cpu-demo preset has no shift: ask for it, so that shift_groups decides.
        shift=True,
        shift_groups=draw(st.sampled_from([1, 3, 5])),
        shift_dim=draw(st.sampled_from([2, 2, 3, 4])),
        min_shift_group_channels=draw(st.sampled_from([1, 4])),
        stem=draw(st.sampled_from(["shift", "plain", "full"])),
        head_bias=draw(st.booleans()),
        downsampling=draw(st.sampled_from(["unit", "shift", "full"])),
    )
    if options["downsampling"] == "shift":
        # Shifted strided convs in a network otherwise unshifted (with the shift on, "shift" is "unit").
        options.update(shift=False, shift_groups=draw(st.sampled_from([3, 5])))
    stride = [2**num_pools // (2 if first[0] == 1 and axis == 0 else 1) for axis in range(3)]
    patch = [s * draw(st.integers(2, max(2, 32 // s))) for s in stride]
    return options, patch


@PROPERTY
@given(
    setting=e2enet_settings(),
    masks=st.sampled_from(
        ["input_channel", "input_channel_blocks", "input_channel_pool", "kernel", "element", "dead channels"]
    ),
    targets=st.sampled_from(["fusion", "all convs"]),
    density=st.floats(0.03, 1.0),
    p_dead=st.floats(0.0, 0.9),
    memory_format=st.sampled_from(sorted(FORMATS)),
    in_channels=st.integers(1, 2),
    batch=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_compacted_e2enet_equals_the_masked_model(
    setting, masks, targets, density, p_dead, memory_format, in_channels, batch, seed
):
    options, patch = setting
    torch.manual_seed(seed)
    model = build_e2enet("cpu-demo", in_channels=in_channels, num_classes=3, **options).eval()
    if masks == "dead channels":
        sparsity = random_dead_channels(model, torch.Generator().manual_seed(seed), p_dead)
    else:
        chosen = e2enet_fusion_targets if targets == "fusion" else None
        granularity = masks
        if masks.startswith("input_channel_"):  # fusion widths are multiples of 4, the heads' 3 classes are not
            pool = 2.0 if masks == "input_channel_pool" else None
            chosen, granularity = e2enet_fusion_targets, sf.masks.InputChannelBlocks(2, pool=pool)
        sparsity = keeping_a_group(  # drawn densities that keep no group of some layer are refused, not tested here
            lambda: sf.DynamicSparsity(model, None, density=density, targets=chosen, granularity=granularity, seed=seed)
        )
    with torch.no_grad():  # weights off the masks are not zero: compact_e2enet must apply the masks itself
        for p in model.parameters():
            p.add_(0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compacted = compact_e2enet(model, sparsity, FORMATS[memory_format])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched

    x = torch.randn(batch, in_channels, *patch, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        assert_matches(compacted(x), masked_reference(model, sparsity)(x))

    # The layers hold exactly what the plan says they keep.
    plan = e2enet_compaction_plan(model, sparsity)
    for level, units in enumerate(compacted.encoder):
        for u, unit in enumerate(units):
            entry = plan[f"encoder.{level}.{u}.conv"]
            assert tuple(unit.conv.weight.shape[:2]) == (entry.kept_out, entry.kept_in)
    for key in model.fusion:
        if key not in compacted.fusion:
            assert plan[f"fusion.{key}.convs.0.conv"].kept_out == 0
            continue
        node = compacted.fusion[key]
        for u, unit in enumerate(node.units):
            entry = plan[f"fusion.{key}.convs.{u}.conv"]
            assert tuple(unit.conv.weight.shape[:2]) == (entry.kept_out, entry.kept_in)
        up = plan[f"fusion.{key}.up"]
        kept = (0, 0) if node.up is None else tuple(node.up.weight.shape[:2])
        assert (up.kept_in, up.kept_out) == kept


def sparse_demo(density: float = 0.2, seed: int = 0):
    torch.manual_seed(seed)
    model = build_e2enet("cpu-demo", in_channels=1, num_classes=3).eval()
    sparsity = sf.DynamicSparsity(
        model, None, density=density, targets=e2enet_fusion_targets, granularity="input_channel", seed=seed
    )
    return model, sparsity


def test_nodes_compute_only_what_is_read():
    model, sparsity = sparse_demo(0.2)
    compacted = compact_e2enet(model, sparsity)
    plan = e2enet_compaction_plan(model, sparsity)
    first = sparsity.weight_mask("fusion.1_1.convs.0.conv.weight")[0, :, 0, 0, 0]  # one bit per input channel
    c = model.channels[1]
    node = compacted.fusion["1_1"]
    # up computes exactly the upsampled channels the first conv reads, from the below channels it has weights for
    assert node.up.weight.shape[1] == int(first[c : 2 * c].sum()) < c
    assert node.units[0].conv.in_channels == int(first.sum())
    # x(i, j) is computed with the union of what its three consumers read, never more
    assert plan["fusion.1_1.convs.0.conv"].kept_out < c
    # the last node feeds the head, which reads all of it
    assert plan["fusion.0_3.convs.1.conv"].kept_out == model.channels[0]
    assert plan["heads.1"].note.startswith("deep-supervision head")


def test_unread_nodes_are_not_computed():
    model, _ = sparse_demo()
    masks = {
        f"{n}.weight": torch.ones_like(m.weight, dtype=torch.bool)
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))
    }
    # Nothing reads x(1, 1): not x(1, 2) (same level), not x(0, 2) through its up (x(2, 2) does not exist).
    c0, c1 = model.channels[:2]
    masks["fusion.1_2.convs.0.conv.weight"][:, :c1] = False
    masks["fusion.0_2.convs.0.conv.weight"][:, c0 : 2 * c0] = False
    sparsity = FixedMasks(masks)
    compacted = compact_e2enet(model, sparsity)
    plan = e2enet_compaction_plan(model, sparsity)
    assert "1_1" not in compacted.fusion and "0_2" in compacted.fusion and compacted.fusion["0_2"].up is None
    assert plan["fusion.1_1.convs.0.conv"].note.startswith("not computed")
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert_matches(compacted(x), masked_reference(model, sparsity)(x))


def test_zero_weights_are_the_masks_when_no_sparsifier_is_given():
    model, sparsity = sparse_demo(0.3)  # DynamicSparsity zeroed the weights off its masks
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        want = model(x)
        assert_matches(compact_e2enet(model)(x), want)
        assert_matches(compact_e2enet(model, sparsity, torch.contiguous_format)(x), want)
    assert (
        e2enet_compaction_plan(model)["fusion.0_1.up"].kept_out
        == e2enet_compaction_plan(model, sparsity)["fusion.0_1.up"].kept_out
    )


@pytest.mark.parametrize("memory_format", sorted(FORMATS))
def test_in_place_instance_norm_equals_torchs(monkeypatch, memory_format):
    monkeypatch.setattr(sf.nn.norm, "IN_PLACE_NORM_MIN", 0)
    monkeypatch.setattr(sf.nn.norm, "NORM_SLAB", 3000)  # several slabs
    norm = nn.InstanceNorm3d(6, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    x = (torch.randn(2, 6, 7, 9, 10) * 3 + 5).contiguous(memory_format=FORMATS[memory_format])
    want = F.instance_norm(x.double(), weight=norm.weight.double(), bias=norm.bias.double(), eps=norm.eps)
    with torch.no_grad():  # inference: written over its input
        got = sf.nn.instance_norm_in_place(norm, x.clone(memory_format=torch.preserve_format))
    assert got.is_contiguous(memory_format=FORMATS[memory_format])
    assert (got - want).abs().max().item() < 1e-5


def test_whole_network_with_in_place_norms(monkeypatch):
    monkeypatch.setattr(sf.nn.norm, "IN_PLACE_NORM_MIN", 0)
    monkeypatch.setattr(sf.nn.norm, "NORM_SLAB", 5000)
    model, sparsity = sparse_demo(0.3)
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        want = model(x)
        for fmt in FORMATS.values():
            assert_matches(compact_e2enet(model, sparsity, fmt)(x), want)


def test_state_dict_loads_into_a_compaction_rebuilt_from_the_saved_masks():
    model, sparsity = sparse_demo(0.2)
    compacted = compact_e2enet(model, sparsity)
    buffer = io.BytesIO()
    torch.save({"compacted": compacted.state_dict(), "sparsity": sparsity.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    torch.manual_seed(1)  # other weights: everything must come from the checkpoint
    fresh = build_e2enet("cpu-demo", in_channels=1, num_classes=3)
    masks = sf.DynamicSparsity(fresh, None, targets=e2enet_fusion_targets, granularity="input_channel", seed=5)
    masks.load_state_dict(saved["sparsity"])
    rebuilt = compact_e2enet(fresh, masks)
    rebuilt.load_state_dict(saved["compacted"])
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), compacted(x))


def test_compacted_e2enet_exports():
    model, sparsity = sparse_demo(0.2)
    compacted = compact_e2enet(model, sparsity)
    x = torch.randn(1, 1, 32, 32, 32)
    exported = torch.export.export(compacted, (x,))
    with torch.no_grad():
        assert_matches(exported.module()(x), model(x))
    computed = sum(v.shape[1] for k, v in exported.state_dict.items() if k.endswith("up.weight"))
    assert 0 < computed < sum(node.up.out_channels for node in model.fusion.values())


def test_compacted_e2enet_compiles_into_one_graph():
    """aot_eager captures the graph inductor would compile without inductor's code generation (minutes here)."""
    model, sparsity = sparse_demo(0.2)
    compacted = compact_e2enet(model, sparsity)
    torch._dynamo.reset()
    compiled = torch.compile(compacted, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert_matches(compiled(x), model(x))


def test_layer_types():
    model, sparsity = sparse_demo(0.2)
    compacted = compact_e2enet(model, sparsity)
    assert all(isinstance(node, CompactNode) for node in compacted.fusion.values())
    assert all(isinstance(unit, CompactUnit) for units in compacted.encoder for unit in units)
    assert compacted.total_stride == model.total_stride
    with pytest.raises(ValueError, match="not divisible"):
        compacted(torch.randn(1, 1, 30, 32, 32))


def test_refuses_other_models_and_other_sparsifiers():
    with pytest.raises(TypeError, match="takes an E2ENet"):
        compact_e2enet(nn.Conv3d(1, 1, 1))
    model, _ = sparse_demo()
    other = nn.Sequential(nn.Conv3d(2, 2, 1))
    with pytest.raises(ValueError, match="not parameters of this model"):
        compact_e2enet(model, sf.DynamicSparsity(other, None, density=0.5))
