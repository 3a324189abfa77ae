"""DynamicSparsity: ties masks, scorer, growth, schedule and distribution to a model and its optimizer.

Life cycle (borrowed from torch.ao.pruning): build it after the model and optimizer, call ``step()`` after every
``optimizer.step()``, save ``state_dict()`` beside the model's and optimizer's.

Nothing is masked inside forward: weights stay dense tensors whose inactive entries are exactly zero, so the
forward and backward cost what dense training costs, gradients are dense (gradient growth needs that), and the
model works unchanged with torch.compile, DDP and export. ``step()`` puts the zeros back after the optimizer wrote
into them and zeroes the optimizer state (momentum, Adam moments) at the same places, so neither momentum nor
weight decay can revive a dropped group.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import growth as growth_policies
from . import scorers
from .distribution import DISTRIBUTIONS, layer_densities
from .masks import Granularity, get_granularity
from .schedules import Schedule

__all__ = ["DynamicSparsity", "UpdateReport", "LayerUpdate", "default_targets"]

_DEFAULT_TARGET_TYPES = (nn.Linear, nn.modules.conv._ConvNd)  # _ConvNd covers Conv1-3d and ConvTranspose1-3d
DENSITY_DEFAULT_KEY = "default"


def default_targets(name: str, module: nn.Module) -> bool:
    """The weights of every Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear (subclasses included)."""
    return isinstance(module, _DEFAULT_TARGET_TYPES)


@dataclass(frozen=True)
class LayerUpdate:
    dropped: int
    grown: int


@dataclass(frozen=True)
class UpdateReport:
    """What one topology update did: the step, the scheduled fraction and per-layer counts."""

    step: int
    fraction: float
    layers: dict[str, LayerUpdate] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        return sum(u.dropped for u in self.layers.values())

    @property
    def grown(self) -> int:
        return sum(u.grown for u in self.layers.values())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "UpdateReport":
        layers = {name: LayerUpdate(**counts) for name, counts in data["layers"].items()}
        return cls(step=int(data["step"]), fraction=float(data["fraction"]), layers=layers)


class _Target:
    """One masked weight: its group mask and the cached 0/1 multiplier used on the hot path."""

    def __init__(self, name: str, param: nn.Parameter, module: nn.Module | None, granularity: Granularity,
                 density: float):
        self.name, self.param, self.module = name, param, module
        self.granularity = granularity
        self.groups_shape = granularity.groups_shape(param.shape)
        self.num_groups = math.prod(self.groups_shape)
        self.group_size = granularity.group_size(param.shape)
        self.target_density = density
        # A meta-device weight (a model built for accounting) keeps its mask on the CPU, where it can be counted.
        self.mask_device = torch.device("cpu") if param.device.type == "meta" else param.device
        self.mask: Tensor = torch.ones(self.groups_shape, dtype=torch.bool, device=self.mask_device)
        self.keep: Tensor = self.mask

    def set_mask(self, mask: Tensor) -> None:
        self.mask = mask.to(device=self.mask_device, dtype=torch.bool).reshape(self.groups_shape)
        # A 0/1 tensor in the weight's dtype, broadcastable rather than expanded (kernel and channel masks stay
        # tiny): an in-place multiply by it is ~20x faster on CPU than masked_fill_ with a bool mask.
        self.keep = self.granularity.expand(self.mask, self.param.shape).to(self.param.device, self.param.dtype)

    @property
    def active(self) -> int:
        return int(self.mask.sum())


def _stable_seed(*keys: int) -> int:
    """A 64-bit seed that depends only on ``keys``: step-keyed randomness needs no state and no communication."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])


def _default_reinit(weight: Tensor, generator: torch.Generator) -> None:
    # The init torch's Conv*/Linear reset_parameters() applies.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)


_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def _unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel wrappers: its names lack the wrappers' ``module.`` prefix."""
    while isinstance(model, _WRAPPERS):
        model = model.module
    return model


def _collective_device(group) -> torch.device | None:
    """Where ``group``'s backend wants collective tensors: CPU for gloo/mpi, the current GPU for nccl, else None
    (the caller then uses the weights' device)."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:  # "cpu:gloo,cuda:nccl" takes CPU tensors too
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _by_value(values: list, ranks: list[int], fmt: Callable = str) -> str:
    """'8 on ranks [0, 2]; 7 on rank [1]': which ranks hold which value, most common value first."""
    groups: dict = {}
    for value, rank in zip(values, ranks):
        groups.setdefault(value, []).append(rank)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[1]))
    return "; ".join(f"{fmt(v)} on rank{'s' if len(r) > 1 else ''} {r}" for v, r in ordered)


class DynamicSparsity:
    """Dynamic sparse training for any ``nn.Module``.

    Args:
        model: the network. Its targeted weights are zeroed at construction outside the initial random mask.
        optimizer: the optimizer that updates ``model``; every targeted weight must be in it. ``None`` is allowed for
            fixed-mask uses without training (accounting, inference).
        density: fraction of groups kept, in (0, 1]; or a dict {parameter name: density}. A dict must cover every
            target, or give the rest through the key ``"default"`` (then ``distribution`` spreads that density over
            the layers not named).
        targets: ``None`` (the weight of every Conv1-3d, ConvTranspose1-3d and Linear), a callable
            ``(module_name, module) -> bool`` selecting modules whose ``weight`` is masked, or a list of parameter
            names.
        granularity: ``"element"``, ``"kernel"`` (one bit per (dim0, dim1) pair, covering the spatial kernel),
            ``"channel"``, or a :class:`sparsefuse.masks.Granularity` such as ``Block(rows, cols)``.
        scorer: importance of active groups (lowest dropped first); default :class:`sparsefuse.scorers.L1`.
        growth: which inactive groups to regrow; default :class:`sparsefuse.growth.Random`.
        schedule: a :mod:`sparsefuse.schedules` object, or ``None`` for static sparse training (fixed random mask).
        distribution: ``"uniform"``, ``"er"`` or ``"erk"``.
        regrow_init: ``"zeros"`` (RigL, and the E2ENet authors' code), ``"reinit"`` (fresh values from torch's default
            Conv/Linear init) or a callable ``(weight_like_tensor, generator) -> None`` that fills its argument.
        seed: every random draw is keyed by (seed, step, layer index), never the global RNG, so replicas (DDP ranks)
            make identical decisions and a resumed run continues bit-identically.

    Under DistributedDataParallel, build it on every rank with the same arguments, from the DDP model or from
    ``ddp.module``: either works, because DDP and DataParallel wrappers are unwrapped, so target names, ``density``
    keys and ``state_dict()`` keys never carry DDP's ``module.`` prefix (checkpoints move between wrapped and
    unwrapped runs). No communication is needed: every decision depends only on (seed, step, layer index) and on
    weights and gradients that DDP keeps identical across ranks. Gradient growth sees the DDP-averaged gradients:
    DDP all-reduces ``.grad`` during ``backward()``, before ``optimizer.step()`` and ``step()``. Call
    :meth:`verify` now and then to check that the ranks still agree.
        scaler: the ``torch.amp.GradScaler`` of a mixed-precision run, or None. When the scaler skipped the
            optimizer step (non-finite gradients), ``step()`` neither advances the schedule nor changes the
            topology: the step does not count, exactly as for the optimizer. Skips are detected by the scale
            dropping in ``scaler.update()``, so call ``step()`` after ``scaler.step(optimizer)`` and
            ``scaler.update()``. Gradient growth then reads gradients that ``scaler.step`` already unscaled.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        density: float | Mapping[str, float] = 0.2,
        targets: None | Callable[[str, nn.Module], bool] | Iterable[str] = None,
        granularity: str | Granularity = "kernel",
        scorer: scorers.Scorer | None = None,
        growth: growth_policies.Growth | None = None,
        schedule: Schedule | None = None,
        distribution: str = "uniform",
        regrow_init: str | Callable[[Tensor, torch.Generator], None] = "zeros",
        seed: int = 0,
        scaler: torch.amp.GradScaler | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (or None for a fixed mask), "
                            f"got {type(optimizer).__name__}")
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a sparsefuse.schedules.Schedule (e.g. CosineDecay(every=100, "
                            f"alpha=0.5, total_steps=T)) or None for static sparsity, got {type(schedule).__name__}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r}: use one of {DISTRIBUTIONS}")
        if not (regrow_init in ("zeros", "reinit") or callable(regrow_init)):
            raise ValueError(f"regrow_init must be 'zeros', 'reinit' or a callable (tensor, generator) -> None, "
                             f"got {regrow_init!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.model, self.optimizer = _unwrap_model(model), optimizer  # DDP's "module." prefix never shows
        self.scorer = scorer if scorer is not None else scorers.L1()
        self.growth = growth if growth is not None else growth_policies.Random()
        for role, policy in (("scorer", self.scorer), ("growth", self.growth)):
            if not callable(policy):
                raise TypeError(f"{role} must be callable (weight, grad, granularity, generator) -> group scores, "
                                f"got {type(policy).__name__}")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        self.schedule, self.distribution, self.regrow_init, self.seed = schedule, distribution, regrow_init, seed
        self.scaler = scaler
        # The scale before the first update is the scaler's initial scale (get_scale() returns it until then).
        self._last_scale = scaler.get_scale() if scaler is not None else None
        self.granularity = get_granularity(granularity)
        self.history: list[UpdateReport] = []
        self._step = 0

        found = self._resolve_targets(targets)
        self._check_in_optimizer(found)
        densities = self._resolve_densities(density, {name: tuple(p.shape) for name, (p, _) in found.items()})
        self._targets = [
            _Target(name, param, module, self.granularity.bind(name, param, module), densities[name])
            for name, (param, module) in found.items()
        ]
        self._by_name = {t.name: t for t in self._targets}
        for index, t in enumerate(self._targets):
            generator = self._generator(0, index)
            keep = round(t.target_density * t.num_groups)
            chosen = torch.randperm(t.num_groups, generator=generator)[:keep]
            mask = torch.zeros(t.num_groups, dtype=torch.bool)
            mask[chosen] = True
            t.set_mask(mask)
        self._apply_masks()

    # ----------------------------------------------------------------------------------------------- set-up
    def _resolve_targets(self, targets) -> dict[str, tuple[nn.Parameter, nn.Module | None]]:
        params = dict(self.model.named_parameters())
        found: dict[str, tuple[nn.Parameter, nn.Module | None]] = {}
        if targets is None or callable(targets):
            select = default_targets if targets is None else targets
            for module_name, module in self.model.named_modules():
                weight = getattr(module, "weight", None)
                if isinstance(weight, nn.Parameter) and select(module_name, module):
                    found[f"{module_name}.weight" if module_name else "weight"] = (weight, module)
        elif isinstance(targets, str) or not isinstance(targets, Iterable):
            raise TypeError("targets must be None, a callable (module_name, module) -> bool, or a list of parameter "
                            f"names, got {targets!r}")
        else:
            names = list(targets)
            unknown = [n for n in names if n not in params]
            if unknown:
                hint = ("; DDP/DataParallel wrappers are unwrapped, so drop the 'module.' prefix"
                        if any(n.startswith("module.") for n in unknown) else "")
                raise ValueError(f"targets name parameters the model does not have: {unknown}; "
                                 f"valid names are those of model.named_parameters(), e.g. {list(params)[:5]}{hint}")
            for name in names:
                owner = name.rpartition(".")[0]
                found[name] = (params[name], self.model.get_submodule(owner))
        # Tied weights are one tensor: mask it once.
        seen: set[int] = set()
        found = {n: pm for n, pm in found.items() if not (id(pm[0]) in seen or seen.add(id(pm[0])))}
        if not found:
            raise ValueError("targets matched no weight: the model has no Conv/ConvTranspose/Linear weight, or the "
                             "targets callable returned False for every module; check `targets`")
        return found

    def _check_in_optimizer(self, found) -> None:
        if self.optimizer is None:
            return
        in_optimizer = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [name for name, (p, _) in found.items() if id(p) not in in_optimizer]
        if missing:
            raise ValueError(f"these targeted weights are not in the optimizer: {missing}; build the optimizer "
                             f"from model.parameters() (or add them), or leave them out of `targets`")

    def _resolve_densities(self, density, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
        def check(key, value):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"density{key} must be a number in (0, 1] (the fraction of groups kept), "
                                 f"got {value!r}")
            return float(value)

        if not isinstance(density, Mapping):
            return layer_densities(shapes, check("", density), self.distribution)
        explicit = {k: check(f"[{k!r}]", v) for k, v in density.items() if k != DENSITY_DEFAULT_KEY}
        unknown = sorted(set(explicit) - set(shapes))
        if unknown:
            raise ValueError(f"density names weights that are not targets: {unknown}; targets are {list(shapes)}")
        rest = {n: s for n, s in shapes.items() if n not in explicit}
        if rest and DENSITY_DEFAULT_KEY not in density:
            raise ValueError(f"density dict gives no value for {list(rest)}; add them or a "
                             f"'{DENSITY_DEFAULT_KEY}' entry for all the others")
        spread = layer_densities(rest, check(f"[{DENSITY_DEFAULT_KEY!r}]", density[DENSITY_DEFAULT_KEY]),
                                 self.distribution) if rest else {}
        return {n: explicit.get(n, spread.get(n)) for n in shapes}

    def _generator(self, step: int, layer_index: int) -> torch.Generator:
        return torch.Generator().manual_seed(_stable_seed(self.seed, step, layer_index))

    # ------------------------------------------------------------------------------------------- hot path
    @torch.no_grad()
    def _apply_masks(self, targets: Iterable[_Target] | None = None) -> None:
        state = self.optimizer.state if self.optimizer is not None else {}
        for t in self._targets if targets is None else targets:
            t.param.mul_(t.keep)
            for value in state.get(t.param, {}).values():
                if isinstance(value, Tensor) and value.shape == t.param.shape:
                    value.mul_(t.keep)

    def step(self) -> UpdateReport | None:
        """Call after every ``optimizer.step()``. Re-zeroes inactive weights and their optimizer state; on an
        update step, drops and regrows groups and returns the :class:`UpdateReport` (else ``None``).

        With a ``scaler`` that skipped this optimizer step, returns None and counts nothing (see ``scaler``)."""
        if self._optimizer_step_skipped():
            return None
        self._step += 1
        self._apply_masks()
        if self.schedule is None or not self.schedule.is_update(self._step):
            return None
        report = self._update(self._step, self.schedule.fraction(self._step))
        self.history.append(report)
        return report

    def _optimizer_step_skipped(self) -> bool:
        if self.scaler is None or not self.scaler.is_enabled():
            return False
        scale, previous = self.scaler.get_scale(), self._last_scale
        self._last_scale = scale
        return scale < previous  # update() backs the scale off exactly when it skipped the step

    @torch.no_grad()
    def _update(self, step: int, fraction: float) -> UpdateReport:
        layers: dict[str, LayerUpdate] = {}
        needs_grad = getattr(self.scorer, "needs_grad", False) or getattr(self.growth, "needs_grad", False)
        for index, t in enumerate(self._targets):
            grad = t.param.grad
            if needs_grad and grad is None:
                raise RuntimeError(
                    f"{t.name!r} has no gradient at update step {step}, but {self.scorer!r}/{self.growth!r} needs "
                    f"one; call sparsity.step() after optimizer.step() and before optimizer.zero_grad()")
            if needs_grad and not bool(torch.isfinite(grad).all()):
                raise RuntimeError(
                    f"{t.name!r} has a non-finite gradient at update step {step}; gradient growth cannot rank it. "
                    f"With mixed precision pass scaler=GradScaler to DynamicSparsity so skipped steps are skipped "
                    f"here too; otherwise the run has diverged (lower the learning rate, clip gradients)")
            active = t.active
            # Truncation as in RigL; capped so every regrown group was inactive before the update.
            count = min(int(fraction * active), t.num_groups - active)
            if count > 0:
                self._drop_and_grow(t, count, grad, self._generator(step, index))
            layers[t.name] = LayerUpdate(dropped=count, grown=count)
        return UpdateReport(step=step, fraction=fraction, layers=layers)

    def _drop_and_grow(self, t: _Target, count: int, grad: Tensor | None, generator: torch.Generator) -> None:
        was_active = t.mask.reshape(-1)
        active, inactive = was_active.nonzero().squeeze(1), (~was_active).nonzero().squeeze(1)
        keep_score = self.scorer(t.param, grad, t.granularity, generator).reshape(-1)
        grow_score = self.growth(t.param, grad, t.granularity, generator).reshape(-1)
        drop = active[torch.topk(keep_score[active], count, largest=False).indices]
        grow = inactive[torch.topk(grow_score[inactive], count, largest=True).indices]
        mask = was_active.clone()
        mask[drop] = False
        mask[grow] = True
        t.set_mask(mask)
        self._apply_masks([t])
        if self.regrow_init != "zeros":
            self._reinit(t, grow, generator)

    def _reinit(self, t: _Target, grown: Tensor, generator: torch.Generator) -> None:
        fresh = torch.empty(t.param.shape, dtype=t.param.dtype)
        init = _default_reinit if self.regrow_init == "reinit" else self.regrow_init
        init(fresh, generator)
        grown_groups = torch.zeros(t.num_groups, dtype=torch.bool, device=t.param.device)
        grown_groups[grown] = True
        where = t.granularity.expand(grown_groups.reshape(t.groups_shape), t.param.shape)
        t.param.copy_(torch.where(where, fresh.to(t.param.device), t.param))

    # ------------------------------------------------------------------------------------------ inspection
    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self._targets)

    @property
    def step_count(self) -> int:
        """Number of ``step()`` calls so far (the schedule position)."""
        return self._step

    @property
    def masks(self) -> dict[str, Tensor]:
        """{name: bool mask in its granularity's group shape} (copies)."""
        return {t.name: t.mask.clone() for t in self._targets}

    def _target(self, name: str) -> _Target:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a sparsified weight; targets are {list(self._by_name)}") from None

    def weight_mask(self, name: str) -> Tensor:
        """Bool tensor shaped like the weight ``name``: True where the weight is active."""
        t = self._target(name)
        return t.granularity.to_weight(t.mask, t.param.shape)

    def granularity_of(self, name: str) -> Granularity:
        return self._target(name).granularity

    def density(self, name: str | None = None) -> float:
        """Active groups / all groups of one weight; without a name, active / all weights over every target."""
        if name is not None:
            t = self._target(name)
            return t.active / t.num_groups
        active = sum(t.active * t.group_size for t in self._targets)
        return active / sum(t.param.numel() for t in self._targets)

    def __repr__(self) -> str:
        if not hasattr(self, "_targets"):  # __init__ refused its arguments; tracebacks still call repr
            return "DynamicSparsity(<not initialised>)"
        return (f"DynamicSparsity({len(self._targets)} weights, density={self.density():.4f}, "
                f"granularity={self.granularity!r}, scorer={self.scorer!r}, growth={self.growth!r}, "
                f"schedule={self.schedule!r}, step={self._step})")

    # ----------------------------------------------------------------------------------------- distributed
    def _fingerprint(self) -> tuple[Tensor, Tensor]:
        """(header, per-layer table) as int64: [step, seed, number of targets, CRC32 of names and group shapes]
        and one [active groups, CRC32 of the packed mask bits] row per target."""
        layout = repr([(t.name, tuple(t.groups_shape)) for t in self._targets]).encode()
        header = torch.tensor([self._step, self.seed % 2**63, len(self._targets), zlib.crc32(layout)],
                              dtype=torch.int64)
        rows = [[t.active, zlib.crc32(np.packbits(t.mask.reshape(-1).cpu().numpy()).tobytes())]
                for t in self._targets]
        return header, torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 2)

    def verify(self, group=None) -> None:
        """Check that every rank of ``group`` (default: all) holds the same masks and step count.

        Opt-in, for DDP runs: ranks never communicate about masks, they agree because their decisions are keyed
        by (seed, step, layer index) and DDP keeps weights and gradients identical. This checks it. A collective:
        every rank of ``group`` must call it at the same point, or the others wait until the process group's
        timeout. Cost: a CRC32 of every group mask on the CPU (a device-to-host copy of the masks, which are tiny
        for kernel granularity) and two ``all_gather`` of a few int64 per layer; call it every few hundred steps
        or once per epoch, not every step of a large model.

        If ``torch.distributed`` is not available or not initialised (single-process training) it does nothing.

        Raises:
            RuntimeError: on every rank alike (so no rank is left waiting), when the ranks disagree. It names the
                first layer whose mask differs and which ranks hold which mask, the step counts, seeds and targets
                where those differ, and the likely causes.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        world = group if group is not None else dist.group.WORLD
        ranks = list(dist.get_process_group_ranks(world))
        device = _collective_device(group)
        if device is None:
            device = self._targets[0].param.device

        def gather(local: Tensor) -> list[tuple[int, ...]]:
            out = [torch.empty_like(local, device=device) for _ in ranks]
            dist.all_gather(out, local.to(device), group=group)
            return [tuple(o.cpu().reshape(-1).tolist()) for o in out]

        header, table = self._fingerprint()
        headers = gather(header)
        problems = []
        steps, seeds = [h[0] for h in headers], [h[1] for h in headers]
        if len(set(steps)) > 1:
            problems.append(f"step counts differ: {_by_value(steps, ranks)}")
        if len(set(seeds)) > 1:
            problems.append(f"seeds differ: {_by_value(seeds, ranks)}")
        if len({h[2:] for h in headers}) > 1:  # the layer tables would not even line up
            problems.append(f"targets differ (names or group shapes): "
                            f"{_by_value([h[2] for h in headers], ranks, lambda n: f'{n} target' + 's' * (n != 1))}; "
                            f"this rank's targets are {list(self.target_names)}")
        else:
            n = len(self._targets)
            tables = [[row[2 * i:2 * i + 2] for i in range(n)] for row in gather(table)]
            differing = [i for i in range(n) if len({tuple(tab[i]) for tab in tables}) > 1]
            if differing:
                i = differing[0]
                masks = _by_value([tuple(tab[i]) for tab in tables], ranks,
                                  lambda v: f"{v[0]} active groups (crc32 {v[1]:#010x})")
                more = f" ({len(differing) - 1} more layers differ too)" if len(differing) > 1 else ""
                problems.append(f"mask of {self._targets[i].name!r} (target {i}) differs: {masks}{more}")
        if problems:
            when = f" at step {self._step}" if len(set(steps)) == 1 else ""
            raise RuntimeError(
                f"DynamicSparsity.verify(): ranks disagree{when}: " + "; ".join(problems)
                + ". Likely causes: DynamicSparsity built with different seeds, targets, density or granularity on "
                  "some rank; a rank that skipped or repeated sparsity.step() (a batch skipped on one rank only, "
                  "an early `continue`); gradients not all-reduced before an update step (model.no_sync(), a "
                  "parameter outside DDP); or masks changed on one rank only (load_state_dict on one rank).")

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Masks, step (schedule position), seed (all randomness is keyed by it and the step) and history."""
        return {
            "step": self._step,
            "seed": self.seed,
            "masks": {t.name: t.mask.cpu().clone() for t in self._targets},
            "history": [r.to_dict() for r in self.history],
            "last_scale": self._last_scale,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict`; re-zeroes inactive weights and optimizer state under the loaded masks."""
        if not isinstance(state, Mapping) or not {"step", "seed", "masks"} <= set(state):
            raise ValueError("not a DynamicSparsity state dict: expected keys 'step', 'seed', 'masks' "
                             "(save it with sparsity.state_dict())")
        masks = state["masks"]
        missing = sorted(set(self._by_name) - set(masks))
        unexpected = sorted(set(masks) - set(self._by_name))
        if missing or unexpected:
            raise ValueError(f"sparsity state dict is from a different model or targets: missing {missing}, "
                             f"unexpected {unexpected}; build DynamicSparsity with the same model and targets "
                             f"as the run that saved it")
        for name, mask in masks.items():
            t = self._by_name[name]
            if tuple(mask.shape) != t.groups_shape:
                raise ValueError(f"sparsity state dict mask {name!r} has shape {tuple(mask.shape)}, but this "
                                 f"model's weight needs {t.groups_shape} ({t.granularity!r}); the state dict comes "
                                 f"from a different model or granularity")
        for name, mask in masks.items():
            self._by_name[name].set_mask(mask)
        self._step, self.seed = int(state["step"]), int(state["seed"])
        self.history = [UpdateReport.from_dict(r) for r in state.get("history", [])]
        self._last_scale = state.get("last_scale", self._last_scale)
        self._apply_masks()
