"""DynamicSparsity under DistributedDataParallel: two gloo ranks on CPU, each on its shard of the global
batch, end with identical masks and weights, the same masks (and weights up to all-reduce rounding) as one process
training on the whole global batch, and verify() catches ranks that drifted apart."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsefuse as sf

WORLD = 2
STEPS = 8
GLOBAL_BATCH = 16
GROWTHS = {"rigl": sf.growth.Gradient, "set": sf.growth.RandomGrowth}


class Net(nn.Module):
    """Conv, conv, linear; no BatchNorm (per-rank batch statistics would make DDP differ from one process)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)


def build(model: nn.Module, growth: str, seed: int = 7, targets=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = sf.schedules.CosineDecay(every=2, drop_fraction=0.3, total_steps=10)
    sparsity = sf.DynamicSparsity(
        model, optimizer, density=0.3, growth=GROWTHS[growth](), schedule=schedule, seed=seed, targets=targets
    )
    return optimizer, sparsity


def train(model, optimizer, sparsity, rank: int | None):
    """STEPS steps; ``rank=None`` is one process on the global batch, else this rank's shard. Both use mean losses:
    DDP averages the ranks' gradients, which is the gradient of the global-batch mean."""
    shard = GLOBAL_BATCH // WORLD
    for step in range(1, STEPS + 1):
        x, y = global_batch(step)
        if rank is not None:
            x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsity.step()
        sparsity.verify()  # a no-op in the single process


def fresh_model() -> Net:
    torch.manual_seed(0)
    return Net()


def verify_error(sparsity) -> type[Exception] | None:
    """The type of the error verify() raises on this rank, or None when it passes. Any error is recorded rather
    than raised, so a rank that fails differently still reaches the next collective instead of stranding the other."""
    try:
        sparsity.verify()
    except Exception as error:
        return type(error)
    return None


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        result = {}
        for growth in GROWTHS:
            ddp = DDP(fresh_model())
            # Both ways of building it under DDP: from the DDP model and from ddp.module.
            optimizer, sparsity = build(ddp if growth == "rigl" else ddp.module, growth)
            train(ddp, optimizer, sparsity, rank)
            result[growth] = {
                "names": sparsity.target_names,
                "masks": sparsity.masks,
                "weights": {k: v.clone() for k, v in ddp.module.state_dict().items()},
                "history": [r.to_dict() for r in sparsity.history],
            }

        # Deliberate divergence; every rank must raise the same error (none is left waiting in a collective).
        errors = {}
        original = sparsity.state_dict()
        if rank == 1:
            flipped = {**original, "masks": dict(original["masks"])}
            mask = flipped["masks"]["conv2.weight"].clone()
            mask.view(-1)[3] = ~mask.view(-1)[3]
            flipped["masks"]["conv2.weight"] = mask
            sparsity.load_state_dict(flipped)
        result["flipped masks"] = sparsity.masks
        errors["flipped bit"] = verify_error(sparsity)
        sparsity.load_state_dict(original)
        errors["restored"] = verify_error(sparsity)
        if rank == 1:
            sparsity.step()  # one step more than rank 0
        errors["extra step"] = verify_error(sparsity)
        _, sparsity = build(fresh_model(), "set", seed=rank)
        errors["seed"] = verify_error(sparsity)
        _, sparsity = build(fresh_model(), "set", targets=None if rank == 0 else ["fc.weight"])
        errors["targets"] = verify_error(sparsity)
        result["errors"] = errors
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    context = mp.start_processes(
        _worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 180
    while not context.join(timeout=1):  # raises with the child's traceback if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("DDP workers did not finish in 180 s (a rank stuck in a collective?)")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process():
    result = {}
    for growth in GROWTHS:
        model = fresh_model()
        optimizer, sparsity = build(model, growth)
        train(model, optimizer, sparsity, rank=None)
        result[growth] = {
            "names": sparsity.target_names,
            "masks": sparsity.masks,
            "weights": {k: v.clone() for k, v in model.state_dict().items()},
            "history": [r.to_dict() for r in sparsity.history],
        }
    return result


@pytest.mark.parametrize("growth", list(GROWTHS))
def test_ranks_identical(ranks, growth):
    a, b = ranks[0][growth], ranks[1][growth]
    assert a["names"] == b["names"] == ("conv1.weight", "conv2.weight", "fc.weight")  # no "module." prefix
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), name
    for name in a["weights"]:  # DDP hands every rank the same averaged gradient: bit-identical weights
        assert torch.equal(a["weights"][name], b["weights"][name]), name
    assert [r["step"] for r in a["history"]] == [2, 4, 6, 8]
    assert all(r["layers"]["conv2.weight"]["grown"] > 0 for r in a["history"][:-1])


@pytest.mark.parametrize("growth", list(GROWTHS))
def test_ddp_matches_single_process_on_global_batch(ranks, single_process, growth):
    ddp, single = ranks[0][growth], single_process[growth]
    assert ddp["history"] == single["history"]
    for name in single["masks"]:  # the topology decisions are exactly the same
        assert torch.equal(ddp["masks"][name], single["masks"][name]), name
    for name in single["weights"]:  # weights up to float32 rounding of another summation order (measured < 1e-7)
        torch.testing.assert_close(ddp["weights"][name], single["weights"][name])


def test_verify_catches_diverged_ranks(ranks):
    flipped = [r["flipped masks"] for r in ranks]
    differing = [name for name in flipped[0] if not torch.equal(flipped[0][name], flipped[1][name])]
    assert differing == ["conv2.weight"]  # the drift verify() has to catch: one group of one layer
    assert int((flipped[0]["conv2.weight"] != flipped[1]["conv2.weight"]).sum()) == 1
    errors = [r["errors"] for r in ranks]
    # Every drift raises the same error type on every rank (none is left waiting in a collective); agreeing
    # ranks pass.
    assert (
        errors[0]
        == errors[1]
        == {
            "flipped bit": RuntimeError,
            "restored": None,
            "extra step": RuntimeError,
            "seed": RuntimeError,
            "targets": RuntimeError,
        }
    )


def test_verify_is_a_no_op_without_a_process_group():
    assert not dist.is_initialized()
    _, sparsity = build(fresh_model(), "rigl")
    assert sparsity.verify() is None


def test_wrapper_names_are_unwrapped():
    """DataParallel (usable without GPUs or a process group) stands in for DDP: same 'module.' prefix."""
    model = fresh_model()
    _, wrapped = build(nn.DataParallel(model), "rigl")
    _, plain = build(fresh_model(), "rigl")
    assert wrapped.target_names == plain.target_names == ("conv1.weight", "conv2.weight", "fc.weight")
    assert wrapped.model is model
    plain.load_state_dict(wrapped.state_dict())  # checkpoints move between wrapped and unwrapped runs
    with pytest.raises(ValueError, match="drop the 'module.' prefix"):
        build(nn.DataParallel(fresh_model()), "rigl", targets=["module.fc.weight"])
