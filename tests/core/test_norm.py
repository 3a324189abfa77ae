"""sf.nn.ChannelsLastInstanceNorm3d: nn.InstanceNorm3d's values and gradients, with the input's layout kept."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsefuse.nn import ChannelsLastInstanceNorm3d

SETTINGS = settings(max_examples=60, deadline=None)
CHANNELS_LAST = torch.channels_last_3d


def pair(channels: int, affine: bool, seed: int) -> tuple[nn.InstanceNorm3d, ChannelsLastInstanceNorm3d]:
    torch.manual_seed(seed)
    norm = ChannelsLastInstanceNorm3d(channels, eps=1e-5, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.normal_()
    reference = nn.InstanceNorm3d(channels, eps=1e-5, affine=affine)
    reference.load_state_dict(norm.state_dict())
    return reference, norm


@SETTINGS
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 9),
    shape=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(2, 5)),
    channels_last=st.booleans(),
    affine=st.booleans(),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_equals_instance_norm_and_keeps_the_layout(batch, channels, shape, channels_last, affine, training, seed):
    reference, norm = pair(channels, affine, seed)
    reference.train(training)
    norm.train(training)
    x = (3 * torch.randn(batch, channels, *shape) + 1).contiguous(
        memory_format=CHANNELS_LAST if channels_last else torch.contiguous_format
    )
    grad_out = torch.randn(batch, channels, *shape)
    x_ref, x_new = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ref, y_new = reference(x_ref), norm(x_new)
    y_ref.backward(grad_out)
    y_new.backward(grad_out)

    torch.testing.assert_close(y_new, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_new.grad, x_ref.grad, rtol=1e-3, atol=1e-3)
    if affine:
        torch.testing.assert_close(norm.weight.grad, reference.weight.grad, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(norm.bias.grad, reference.bias.grad, rtol=1e-3, atol=1e-3)
    # A channels-last input stays channels-last: the point of the layer.
    assert y_new.is_contiguous(memory_format=CHANNELS_LAST) == x.is_contiguous(memory_format=CHANNELS_LAST)


def test_running_statistics_and_unbatched_inputs_take_instance_norms_path():
    reference, norm = pair(4, affine=True, seed=0)
    tracking = ChannelsLastInstanceNorm3d(4, affine=True, track_running_stats=True)
    tracking.load_state_dict(norm.state_dict(), strict=False)
    x = torch.randn(2, 4, 3, 4, 5).contiguous(memory_format=CHANNELS_LAST)
    tracking(x)
    # The parent's path updated the running statistics (the per-sample path would leave them at zero).
    torch.testing.assert_close(tracking.running_mean, 0.1 * x.mean(dim=(0, 2, 3, 4)))
    unbatched = torch.randn(4, 3, 4, 5)
    torch.testing.assert_close(norm(unbatched), reference(unbatched))


def test_loads_an_instance_norm_state_dict_and_then_computes_the_same():
    torch.manual_seed(1)
    reference = nn.InstanceNorm3d(6, affine=True)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2.0)
        reference.bias.normal_()
    norm = ChannelsLastInstanceNorm3d(6, affine=True)
    norm.load_state_dict(reference.state_dict())  # strict: the same keys and shapes
    x = torch.randn(2, 6, 3, 4, 5).contiguous(memory_format=CHANNELS_LAST)
    torch.testing.assert_close(norm(x), reference(x), rtol=1e-4, atol=1e-4)
