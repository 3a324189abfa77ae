"""sparsefuse.compaction.CompactedTraining: training the compacted layers between topology updates gives what masked
training gives (weights, masks, optimizer state, checkpoints), resumes bit-identically, and refuses what it cannot do.

Tolerance: the compacted layers add the same nonzero terms as the masked ones in another order, so float32 runs
agree to ``ATOL`` over a few updates; a run resumed from a checkpoint repeats the same operations, bit for bit.
"""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsefuse as sf
from sparsefuse.compaction import TrainableCompactLayer
from tests.core.strategies import OPTIMIZERS, growths, keeping_a_group, optimizers, schedules, scorers

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ATOL = 1e-5
STEPS = 8
SPATIAL = {"conv2d": (5, 5), "conv3d": (3, 4, 4), "shift3d": (3, 4, 4)}
CHANNELS_LAST = {"conv2d": torch.channels_last, "conv3d": torch.channels_last_3d, "shift3d": torch.channels_last_3d}


class Stack(nn.Module):
    """Convolutions (Conv2d, Conv3d or DepthShiftConv3d) with LeakyReLU between them, pooled into a Linear head."""

    def __init__(self, kind: str, widths: list[int], kernel: int, bias: bool, groups: int):
        super().__init__()
        self.kind, self.widths = kind, widths
        convs = []
        for c_in, c_out in zip(widths, widths[1:], strict=False):
            if kind == "shift3d":
                conv = sf.nn.DepthShiftConv3d(c_in, c_out, (1, kernel, kernel), groups=groups, bias=bias)
            else:
                conv = getattr(nn, f"Conv{kind[-2]}d")(
                    c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=bias
                )
            convs += [conv, nn.LeakyReLU(0.01)]
        self.convs = nn.Sequential(*convs)
        self.head = nn.Linear(widths[-1], 4)

    def inputs(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(2, self.widths[0], *SPATIAL[self.kind], generator=generator, dtype=self.head.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x).flatten(2).mean(2))


@st.composite
def runs(draw):
    """Everything one training run needs but the optimizer: model, sparsifier options and thresholds."""
    kind = draw(st.sampled_from(sorted(SPATIAL)))
    granularity = draw(st.sampled_from(["input_channel", "channel", "input_channel_blocks", "input_channel_pool"]))
    per_block = granularity.startswith("input_channel_")
    groups = 1 if per_block else draw(st.sampled_from([1, 1, 2]))
    multiple = 4 if per_block else groups  # 4 blocks divide the outputs
    widths = [multiple * draw(st.integers(1, 10 // multiple + 1)) for _ in range(draw(st.integers(2, 4)))]
    return dict(
        model=(kind, widths, draw(st.sampled_from([1, 3])), draw(st.booleans()), groups),
        channels_last=draw(st.booleans()),
        sparsity=dict(
            granularity=granularity,
            density=draw(st.floats(0.1, 0.8)),
            schedule=draw(schedules()),
            scorer=draw(scorers),
            growth=draw(growths),
            regrow_init=draw(st.sampled_from(["zeros", "reinit"])),
        ),
        thresholds=draw(st.sampled_from([dict(min_dead_inputs=0.0, min_dead_outputs=0.0), {}])),
    )


def build(run: dict, opt_kind: str, init_seed: int = 0, seed: int = 0):
    """(model, optimizer, sparsity) of ``run``, weights drawn from ``init_seed``."""
    torch.manual_seed(init_seed)
    model = Stack(*run["model"])
    if run["channels_last"]:
        model = model.to(memory_format=CHANNELS_LAST[model.kind])
    optimizer = optimizers(model.parameters(), opt_kind)
    sparsity = keeping_a_group(lambda: sf.DynamicSparsity(model, optimizer, seed=seed, **run["sparsity"]))
    return model, optimizer, sparsity


def train_step(module: nn.Module, model: Stack, optimizer, stepper, step: int):
    """One step of ``module`` (the model or the compacted training's copy) on a batch fixed by ``step``."""
    x = model.inputs(torch.Generator().manual_seed(step)).contiguous(memory_format=input_layout(model))
    optimizer.zero_grad()
    module(x).sin().sum().backward()
    optimizer.step()
    return stepper.step()


def input_layout(model: Stack) -> torch.memory_format:
    """The memory format of the model's first weight, for its input: channels-last models get channels-last
    batches."""
    weight = model.convs[0].weight
    fmt = CHANNELS_LAST[model.kind]
    return fmt if not weight.is_contiguous() and weight.is_contiguous(memory_format=fmt) else torch.contiguous_format


def assert_close_runs(masked, compacted, atol: float = ATOL) -> None:
    """Same masks, update history, weights and optimizer state (to ``atol``; 0 asks for bit equality), with the
    optimizer's state dict in the same order."""
    (model_a, optimizer_a, sparsity_a), (model_b, optimizer_b, sparsity_b) = masked, compacted
    assert all(torch.equal(sparsity_a.masks[n], sparsity_b.masks[n]) for n in sparsity_a.target_names)
    assert sparsity_a.history == sparsity_b.history
    weights_a, weights_b = model_a.state_dict(), model_b.state_dict()
    assert list(weights_a) == list(weights_b)
    for name, value in weights_a.items():
        assert_tensors_close(value, weights_b[name], atol, name)
    state_a, state_b = optimizer_a.state_dict(), optimizer_b.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    assert list(state_a["state"]) == list(state_b["state"])
    for index, values in state_a["state"].items():
        assert list(values) == list(state_b["state"][index])
        for key, value in values.items():
            assert_tensors_close(value, state_b["state"][index][key], atol, (index, key))


def assert_tensors_close(a, b, atol: float, where) -> None:
    if not torch.is_tensor(a):
        assert a == b, where
        return
    assert a.shape == b.shape and a.dtype == b.dtype, where
    if atol == 0:
        assert torch.equal(a, b), where
    else:
        assert (a.double() - b.double()).abs().max().item() <= atol, where


@PROPERTY
@given(run=runs(), opt_kind=st.sampled_from(OPTIMIZERS))
def test_compacted_training_equals_masked_training(run, opt_kind):
    masked = build(run, opt_kind)
    compacted = build(run, opt_kind)
    training = sf.CompactedTraining(compacted[0], compacted[2], **run["thresholds"])
    for step in range(1, STEPS + 1):
        want = train_step(masked[0], masked[0], masked[1], masked[2], step)
        got = train_step(training.model, compacted[0], compacted[1], training, step)
        assert want == got
        assert_close_runs(masked, compacted)
    training.close()
    trained = [p for group in compacted[1].param_groups for p in group["params"]]
    assert all(a is b for a, b in zip(trained, compacted[0].parameters(), strict=True))
    assert_close_runs(masked, compacted)


def conv_stack_run(granularity: str, growth: str = "random", **options) -> dict:
    """A Conv3d stack whose updates come every 3 steps, in the shape ``runs()`` draws."""
    return dict(
        model=("conv3d", [8, 12, 8], 3, True, 1),
        channels_last=False,
        sparsity=dict(
            granularity=granularity,
            density=0.4,
            schedule=sf.schedules.Constant(every=3, drop_fraction=0.5),
            growth=growth,
            **options,
        ),
        thresholds={},
    )


def save(parts) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save([part.state_dict() for part in parts], buffer)  # model, optimizer, sparsity
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("opt_kind", ["sgd", "adamw"])
@pytest.mark.parametrize("growth", ["random", "gradient"])
@pytest.mark.parametrize("granularity", ["input_channel", "channel"])
def test_checkpoint_mid_interval_resumes_bit_identically(granularity, growth, opt_kind):
    run = conv_stack_run(granularity, growth)
    reference = build(run, opt_kind)
    reference_training = sf.CompactedTraining(reference[0], reference[2])
    for step in range(1, 11):
        train_step(reference_training.model, reference[0], reference[1], reference_training, step)

    first, masked = build(run, opt_kind), build(run, opt_kind)
    training = sf.CompactedTraining(first[0], first[2])
    for step in range(1, 5):  # updates at 3, 6, 9: step 4 is inside an interval
        train_step(training.model, first[0], first[1], training, step)
        train_step(masked[0], masked[0], masked[1], masked[2], step)
    assert training.compacted and any(p.compacted for p in training.plan.values())
    # The checkpoint is masked training's: full weights, full optimizer state, in the same order.
    assert_close_runs(masked, first)
    checkpoint = torch.load(save(first))

    resumed = build(run, opt_kind, init_seed=1, seed=5)  # everything must come from the checkpoint
    for part, state in zip(resumed, checkpoint, strict=True):
        part.load_state_dict(state)
    resumed_training = sf.CompactedTraining(resumed[0], resumed[2])
    for step in range(5, 11):
        train_step(resumed_training.model, resumed[0], resumed[1], resumed_training, step)
    assert_close_runs(reference, resumed, atol=0)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0)])
def test_a_checkpoint_loads_into_a_running_compacted_training(order):
    """Loads land in the full model and optimizer, in any order; the step after them runs on the full layers."""
    run = conv_stack_run("input_channel")
    masked = build(run, "sgd")
    for step in range(1, 11):
        train_step(masked[0], masked[0], masked[1], masked[2], step)

    compacted = build(run, "sgd")
    training = sf.CompactedTraining(compacted[0], compacted[2])
    for step in range(1, 5):
        train_step(training.model, compacted[0], compacted[1], training, step)
    checkpoint = torch.load(save(compacted))
    for step in range(100, 104):  # steps the checkpoint rolls back, across an update
        train_step(training.model, compacted[0], compacted[1], training, step)
    for index in order:
        compacted[index].load_state_dict(checkpoint[index])
    assert not training.compacted
    for step in range(5, 11):
        train_step(training.model, compacted[0], compacted[1], training, step)
        assert training.compacted
    assert_close_runs(masked, compacted)


def test_gradient_growth_runs_the_step_before_each_update_on_the_full_layers():
    for growth, full_before_update in (("gradient", True), ("random", False)):
        model, optimizer, sparsity = build(conv_stack_run("input_channel", growth), "sgd")
        training = sf.CompactedTraining(model, sparsity)
        for step in range(1, 8):
            train_step(training.model, model, optimizer, training, step)
            next_is_update = (step + 1) % 3 == 0
            assert training.compacted == (not (full_before_update and next_is_update))
            cut = [m for m in training.model.modules() if isinstance(m, TrainableCompactLayer)]
            assert len(cut) == (3 if training.compacted else 0)  # two convs and the head


def test_layers_with_too_few_dead_channels_stay_as_they_are():
    torch.manual_seed(0)
    model = Stack("conv2d", [10, 12, 8], 3, True, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    density = {"convs.0.weight": 0.9, "default": 0.5}  # 1 of 10 inputs dead: under min_dead_inputs=0.2
    sparsity = sf.DynamicSparsity(model, optimizer, density=density, granularity="input_channel")
    training = sf.CompactedTraining(model, sparsity)
    kept, cut = training.model.convs[0], training.model.convs[2]
    assert type(kept) is nn.Conv2d and kept.weight is model.convs[0].weight
    assert isinstance(cut, TrainableCompactLayer) and cut.layer.weight.shape == (8, 6, 3, 3)
    assert "min_dead_inputs" in training.plan["convs.0"].note and training.plan["convs.2"].compacted
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    assert any(p is model.convs[0].weight for p in trained) and any(p is cut.layer.weight for p in trained)
    assert not any(p is model.convs[2].weight for p in trained)
    assert cut.layer.bias is model.convs[2].bias  # shared, not copied
    training.close()
    assert type(sf.CompactedTraining(model, sparsity, min_dead_inputs=0.0).model.convs[0]) is TrainableCompactLayer


def test_close_hands_the_full_weights_back_to_the_optimizer():
    run = conv_stack_run("channel")
    masked, compacted = build(run, "adamw"), build(run, "adamw")
    with sf.CompactedTraining(compacted[0], compacted[2]) as training:
        for step in range(1, 5):
            train_step(training.model, compacted[0], compacted[1], training, step)
            train_step(masked[0], masked[0], masked[1], masked[2], step)
    assert not training.compacted
    trained = [p for group in compacted[1].param_groups for p in group["params"]]
    assert all(a is b for a, b in zip(trained, compacted[0].parameters(), strict=True))
    for step in range(5, 8):  # masked training goes on
        train_step(compacted[0], compacted[0], compacted[1], compacted[2], step)
        train_step(masked[0], masked[0], masked[1], masked[2], step)
    assert_close_runs(masked, compacted)
    with pytest.raises(RuntimeError, match="is closed"):
        training.step()


def test_unsupported_uses_are_refused_with_the_fix():
    torch.manual_seed(0)
    model = Stack("conv2d", [6, 8], 3, True, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsity = sf.DynamicSparsity(model, optimizer, density=0.5, granularity="input_channel")
    with pytest.raises(TypeError, match="must be a sparsefuse.DynamicSparsity"):
        sf.CompactedTraining(model, sparsity.masks)
    with pytest.raises(ValueError, match="wrapped in DataParallel.*Train the masked model under DDP"):
        sf.CompactedTraining(nn.DataParallel(model), sparsity)
    with pytest.raises(ValueError, match="not the model the sparsifier masks"):
        sf.CompactedTraining(Stack("conv2d", [6, 8], 3, True, 1), sparsity)
    with pytest.raises(ValueError, match="min_dead_outputs must be a number >= 0"):
        sf.CompactedTraining(model, sparsity, min_dead_outputs=-1)
    with pytest.raises(ValueError, match="has no optimizer"):
        sf.CompactedTraining(model, sf.DynamicSparsity(model, None, granularity="input_channel"))
    lbfgs = sf.DynamicSparsity(model, torch.optim.LBFGS(model.parameters()), granularity="input_channel")
    with pytest.raises(TypeError, match="does not support LBFGS.*keep their state per weight"):
        sf.CompactedTraining(model, lbfgs)
    layer = nn.Conv2d(6, 8, 3)
    alone = sf.DynamicSparsity(layer, torch.optim.SGD(layer.parameters(), lr=0.1), granularity="input_channel")
    with pytest.raises(ValueError, match="itself a masked layer.*nn.Sequential"):
        sf.CompactedTraining(layer, alone)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    tied_sparsity = sf.DynamicSparsity(tied, torch.optim.SGD(tied.parameters(), lr=0.1), granularity="input_channel")
    with pytest.raises(ValueError, match=r"shared by the modules \['0', '1'\].*untie"):
        sf.CompactedTraining(tied, tied_sparsity)


def test_stepping_the_sparsifier_directly_is_caught():
    model, optimizer, sparsity = build(conv_stack_run("input_channel"), "sgd")
    training = sf.CompactedTraining(model, sparsity)
    train_step(training.model, model, optimizer, sparsity, 1)  # sparsity.step(), not training.step()
    optimizer.step()
    with pytest.raises(RuntimeError, match="sparsity.step\\(\\) was called directly.*training.step\\(\\) instead"):
        training.step()


class UpAndMix(nn.Module):
    """A transposed conv (E2ENet's up path) and a 1x1x1 conv: compacted training covers ConvTranspose too."""

    kind = "conv3d"

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(nn.ConvTranspose3d(8, 6, 2, stride=2), nn.LeakyReLU(0.01), nn.Conv3d(6, 4, 1))

    def inputs(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(2, 8, 2, 3, 3, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x).flatten(2).mean(2)


@pytest.mark.parametrize("granularity", ["input_channel", "channel"])
def test_transposed_convs_train_compacted_as_masked(granularity):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = UpAndMix()
        optimizer = optimizers(model.parameters(), "sgd")
        schedule = sf.schedules.Constant(every=3, drop_fraction=0.5)
        sparsity = sf.DynamicSparsity(model, optimizer, density=0.5, granularity=granularity, schedule=schedule)
        runs.append((model, optimizer, sparsity))
    training = sf.CompactedTraining(runs[1][0], runs[1][2], min_dead_inputs=0.0, min_dead_outputs=0.0)
    assert isinstance(training.model.convs[0], TrainableCompactLayer)
    for step in range(1, 9):
        train_step(runs[0][0], runs[0][0], runs[0][1], runs[0][2], step)
        train_step(training.model, runs[1][0], runs[1][1], training, step)
        assert_close_runs(*runs)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.NAdam(p, lr=0.01, weight_decay=0.1),
        lambda p: torch.optim.RAdam(p, lr=0.01),
        lambda p: torch.optim.Adamax(p, lr=0.01),
        lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, centered=True),
        lambda p: torch.optim.Adagrad(p, lr=0.05),
        lambda p: torch.optim.Adadelta(p, lr=0.5),
    ],
    ids=["nadam", "radam", "adamax", "rmsprop", "adagrad", "adadelta"],
)
def test_every_supported_optimizer_trains_compacted_as_masked(make):
    """In float64: RMSprop's and Adagrad's normalised steps turn float32 rounding in near-zero gradients into
    visible differences within a few steps; float64 shows that only rounding differs."""
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Stack("conv2d", [8, 12, 8], 3, True, 1).double()
        optimizer = make(model.parameters())
        schedule = sf.schedules.Constant(every=3, drop_fraction=0.5)
        sparsity = sf.DynamicSparsity(model, optimizer, density=0.4, granularity="channel", schedule=schedule)
        runs.append((model, optimizer, sparsity))
    training = sf.CompactedTraining(runs[1][0], runs[1][2])
    for step in range(1, 9):
        train_step(runs[0][0], runs[0][0], runs[0][1], runs[0][2], step)
        train_step(training.model, runs[1][0], runs[1][1], training, step)
        assert_close_runs(*runs, atol=1e-9)
