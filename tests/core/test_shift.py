"""Behaviour of sf.nn.DepthShift / DepthShiftConv3d against slow, obviously-correct references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsefuse as sf
from sparsefuse.nn import DepthShift, DepthShiftConv3d

SETTINGS = settings(max_examples=100, deadline=None)


def reference_shift(x: torch.Tensor, shift_groups: int, dim: int) -> torch.Tensor:
    """torch.chunk groups, then slice-by-slice zero-filled shift: out[d] = in[d - s]."""
    out = []
    for g, chunk in enumerate(torch.chunk(x, shift_groups, dim=1)):
        s = g - shift_groups // 2
        shifted = torch.zeros_like(chunk)
        for d in range(chunk.size(dim)):
            if 0 <= d - s < chunk.size(dim):
                shifted.select(dim, d).copy_(chunk.select(dim, d - s))
        out.append(shifted)
    return torch.cat(out, dim=1)


def reference_full_conv(m: DepthShiftConv3d) -> nn.Conv3d:
    """The (2p+1, 3, 3) conv that DepthShiftConv3d (depth shift, p = shift_groups // 2) equals.

    Conv3d is a cross-correlation: with depth padding p, y[d] = sum_k W[k] x[d + k - p].
    The shift feeds the (1, 3, 3) conv x[d - s], so channel c's only non-zero
    depth tap is k = p - s (k = 1 - s for shift_groups=3).
    """
    p = m.shift_groups // 2
    full = nn.Conv3d(m.in_channels, m.out_channels, (2 * p + 1, 3, 3), padding=(p, 1, 1), dtype=m.weight.dtype)
    with torch.no_grad():
        full.weight.zero_()
        for g, idx in enumerate(torch.arange(m.in_channels).chunk(m.shift_groups)):
            s = g - p
            full.weight[:, idx, p - s] = m.weight[:, idx, 0]
        full.bias.copy_(m.bias)
    return full


shapes = st.tuples(
    st.integers(1, 2),  # B
    st.integers(1, 20),  # C
    st.integers(1, 6),  # D
    st.integers(1, 6),  # H
    st.integers(1, 6),  # W
)


@SETTINGS
@given(
    shape=shapes, shift_groups=st.sampled_from([1, 3, 5]), dim=st.sampled_from([2, 3, 4]), seed=st.integers(0, 2**16)
)
def test_shift_matches_chunk_reference(shape, shift_groups, dim, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(DepthShift(shift_groups, dim)(x), reference_shift(x, shift_groups, dim), rtol=0, atol=0)


def test_shift_direction_by_hand():
    # Channel 0 (s=-1) takes the next slice, channel 1 (s=0) stays, channel 2 (s=+1) the previous.
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]).view(1, 3, 3, 1, 1)
    out = DepthShift(3, dim=2)(x).view(3, 3)
    assert out.tolist() == [[2.0, 3.0, 0.0], [4.0, 5.0, 6.0], [0.0, 7.0, 8.0]]


@pytest.mark.parametrize(
    "channels, expected",
    [
        (1, [-1]),  # one chunk, still shifted by -1 like the authors' code
        (4, [-1, -1, 0, 0]),  # torch.chunk gives [2, 2]: only two groups
        (5, [-1, -1, 0, 0, 1]),
    ],
)
def test_channel_groups_follow_torch_chunk(channels, expected):
    # Put a marker in the middle of depth and read off where each channel moved it.
    x = torch.zeros(1, channels, 5, 1, 1)
    x[:, :, 2] = 1.0
    moved = DepthShift(3, dim=2)(x).view(channels, 5).argmax(dim=1) - 2
    assert moved.tolist() == expected


def test_320_channels_split_107_107_106():
    x = torch.zeros(1, 320, 3, 1, 1)
    x[:, :, 1] = 1.0
    moved = DepthShift(3)(x).view(320, 3).argmax(dim=1) - 1
    assert torch.bincount(moved + 1).tolist() == [107, 107, 106]


def test_shift_groups_one_is_identity():
    x = torch.randn(2, 7, 4, 3, 5)
    torch.testing.assert_close(DepthShift(1)(x), x, rtol=0, atol=0)


@SETTINGS
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 12), st.integers(1, 6), st.integers(1, 5), st.integers(1, 5)),
    out_ch=st.integers(1, 6),
    shift_groups=st.sampled_from([3, 5]),
    seed=st.integers(0, 2**16),
)
def test_conv_equals_3d_conv_with_one_depth_tap_per_channel(shape, out_ch, shift_groups, seed):
    """Invariant 7: shift + (1, 3, 3) conv == full-depth conv keeping tap p - s of each channel."""
    torch.manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64)
    m = DepthShiftConv3d(shape[1], out_ch, shift_groups=shift_groups, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference_full_conv(m)(x))


def test_conv_equivalence_is_sign_sensitive():
    # The mirrored taps (p + s) give a different result, so the test above pins the direction.
    torch.manual_seed(0)
    x = torch.randn(1, 6, 5, 4, 4, dtype=torch.float64)
    m = DepthShiftConv3d(6, 4, dtype=torch.float64)
    mirrored = reference_full_conv(m)
    with torch.no_grad():
        mirrored.weight.copy_(mirrored.weight.flip(2))
    assert not torch.allclose(m(x), mirrored(x))


@pytest.mark.parametrize("shift_groups, dim", [(3, 2), (5, 3), (3, 4), (2, 2)])
def test_gradcheck(shift_groups, dim):
    x = torch.randn(2, 5, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    shift = DepthShift(shift_groups, dim)
    assert torch.autograd.gradcheck(shift, (x,))
    assert torch.autograd.gradgradcheck(shift, (x,))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_conv_backward_matches_reference(memory_format):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4, 5, 5, dtype=torch.float64).to(memory_format=memory_format)
    m = DepthShiftConv3d(9, 4, shift_groups=3, dtype=torch.float64)
    conv = nn.Conv3d(9, 4, (1, 3, 3), padding=(0, 1, 1), dtype=torch.float64)
    conv.load_state_dict(m.state_dict())
    grad_out = torch.randn(2, 4, 4, 5, 5, dtype=torch.float64)

    x1 = x.clone().requires_grad_()
    m(x1).backward(grad_out)
    x2 = x.clone().requires_grad_()
    conv(reference_shift(x2, 3, 2)).backward(grad_out)

    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(m.weight.grad, conv.weight.grad)
    torch.testing.assert_close(m.bias.grad, conv.bias.grad)


@pytest.mark.parametrize("dim", [2, 3, 4])
def test_channels_last_3d_is_preserved(dim):
    x = torch.randn(2, 7, 4, 5, 6)
    x_cl = x.to(memory_format=torch.channels_last_3d)
    out = DepthShift(3, dim)(x_cl)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, DepthShift(3, dim)(x), rtol=0, atol=0)

    x_cl.requires_grad_()
    DepthShift(3, dim)(x_cl).backward(torch.ones_like(x_cl))
    assert x_cl.grad.is_contiguous(memory_format=torch.channels_last_3d)


def test_meta_device_gives_shapes():
    m = DepthShiftConv3d(8, 16, stride=(1, 2, 2), device="meta")
    out = m(torch.empty(2, 8, 6, 10, 10, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 16, 6, 5, 5)
    assert DepthShift(5, 4)(torch.empty(1, 3, 2, 2, 2, device="meta")).shape == (1, 3, 2, 2, 2)


def test_autocast_bf16_cpu():
    torch.manual_seed(0)
    m = DepthShiftConv3d(6, 4)
    x = torch.randn(1, 6, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), m(x), rtol=5e-2, atol=5e-2)


def test_default_padding_keeps_size_and_kwargs_pass_through():
    m = DepthShiftConv3d(4, 6, bias=False, groups=2, padding_mode="replicate")
    assert m.padding == (0, 1, 1) and m.bias is None and m.groups == 2 and m.padding_mode == "replicate"
    assert m(torch.randn(1, 4, 3, 7, 7)).shape == (1, 6, 3, 7, 7)
    assert DepthShiftConv3d(4, 4, kernel_size=3).padding == (1, 1, 1)
    assert DepthShiftConv3d(4, 4, padding=0)(torch.randn(1, 4, 3, 7, 7)).shape == (1, 4, 3, 5, 5)


def test_is_a_conv3d_with_plain_state_dict():
    m = DepthShiftConv3d(4, 8)
    assert isinstance(m, nn.Conv3d)
    assert m.weight.shape == (8, 4, 1, 3, 3)
    assert set(m.state_dict()) == {"weight", "bias"}
    assert "shift_groups=3" in repr(m)
    assert sf.nn.DepthShiftConv3d is DepthShiftConv3d


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda: DepthShift(shift_groups=0), "shift_groups"),
        (lambda: DepthShift(shift_groups=2.0), "shift_groups"),
        (lambda: DepthShift(dim=1), "dim"),
        (lambda: DepthShiftConv3d(4, 4, shift_dim=5), "shift_dim"),
        (lambda: DepthShiftConv3d(4, 4, shift_groups=-3), "shift_groups"),
        (lambda: DepthShift()(torch.randn(3, 4, 5, 6)), "input"),
        (lambda: DepthShiftConv3d(4, 4)(torch.randn(4, 5, 6, 7)), "input"),
    ],
)
def test_bad_arguments_raise_value_error(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()


def test_fx_symbolic_trace_records_one_shift_call():
    gm = torch.fx.symbolic_trace(nn.Sequential(DepthShift(3), nn.Identity()))
    assert sum("depth_shift" in str(n.target) for n in gm.graph.nodes) == 1
    x = torch.randn(1, 3, 4, 2, 2)
    torch.testing.assert_close(gm(x), DepthShift(3)(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.randn(2, 10, 5, 6, 7)
    m = DepthShiftConv3d(10, 4)
    expected = m(x)
    torch.testing.assert_close(m.cuda()(x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)
