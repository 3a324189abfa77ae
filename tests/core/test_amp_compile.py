"""Mixed precision (GradScaler skips) and torch.compile with DynamicSparsity, on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsefuse as sf


def make(scaler=None, growth=None, every=2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsity = sf.DynamicSparsity(
        model,
        optimizer,
        density=0.4,
        growth=growth or sf.growth.Gradient(),
        schedule=sf.schedules.Constant(every=every, drop_fraction=0.5),
        scaler=scaler,
    )
    return model, optimizer, sparsity


def amp_step(model, optimizer, scaler, sparsity, poison: bool):
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().square().mean()
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    if poison:  # what an fp16 overflow looks like to the scaler
        model[0].weight.grad[0, 0, 0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    return sparsity.step()


def test_a_skipped_optimizer_step_does_not_count_or_change_the_topology():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model, optimizer, sparsity = make(scaler)
    reports = []
    for call in range(1, 7):
        poison = call in (1, 4)  # call 4 would have been update step 4 (every=2)
        before = sparsity.masks
        weights = [p.detach().clone() for p in model.parameters()]
        report = amp_step(model, optimizer, scaler, sparsity, poison)
        if poison:
            assert report is None
            assert all(torch.equal(before[n], sparsity.masks[n]) for n in before)
            # The optimizer skipped too.
            assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True))
        reports.append(report)
    # 6 calls, 2 skipped: the sparsifier counted 4 steps, updated at its steps 2 and 4 (calls 3 and 6).
    assert sparsity.step_count == 4
    assert [r.step for r in sparsity.history] == [2, 4]
    assert [call for call, r in enumerate(reports, 1) if r is not None] == [3, 6]


def test_scaler_state_survives_resume():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model, optimizer, sparsity = make(scaler)
    amp_step(model, optimizer, scaler, sparsity, poison=True)
    state = sparsity.state_dict()
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler2.load_state_dict(scaler.state_dict())
    _, _, restored = make(scaler2)
    restored.load_state_dict(state)
    # Without the saved scale, the restored sparsifier would compare against the initial scale and take the
    # backed-off scale for a fresh skip.
    assert restored._optimizer_step_skipped() is False


def test_gradient_growth_refuses_non_finite_gradients_without_a_scaler():
    model, optimizer, sparsity = make(every=1)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    model[3].weight.grad[0, 0] = float("nan")
    optimizer.step()
    with pytest.raises(RuntimeError, match="non-finite gradient at update step 1"):
        sparsity.step()


def test_compiled_model_is_not_recompiled_by_topology_updates():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model, optimizer, sparsity = make(growth=sf.growth.RandomGrowth(), every=1)
    eager = make(growth=sf.growth.RandomGrowth(), every=1)
    compiled = torch.compile(model, backend=counting_backend)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    for _ in range(5):
        for net, (_, opt, sp) in ((compiled, (model, optimizer, sparsity)), (eager[0], eager)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
            assert sp.step() is not None  # every step is an update step
    assert len(graphs) == 1  # masks live outside the graph: updates change values, not the graph
    assert all(torch.equal(sparsity.masks[n], eager[2].masks[n]) for n in sparsity.target_names)
    for a, b in zip(model.parameters(), eager[0].parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert torch.equal(compiled(x), eager[0](x))
