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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from . import growth as growth_policies
from . import scorers
from .distributed import unwrap_model, verify_ranks_agree
from .distribution import DISTRIBUTIONS
from .masks import Granularity, get_granularity
from .schedules import Schedule
from .targets import check_in_optimizer, default_targets, resolve_densities, resolve_targets

# default_targets lives in targets.py; it stays importable from here, where it has always been public.
__all__ = ["DynamicSparsity", "UpdateReport", "LayerUpdate", "default_targets"]


@dataclass(frozen=True)
class LayerUpdate:
    """One layer's counts at one update.

    ``regrown_before`` groups were grown at the previous update; ``regrown_kept`` of them are still active after
    this one (their survival). ``ever_active`` of the layer's ``groups`` have been active at some point since the
    start (the in-time over-parameterisation, or exploration, rate of ITOP).
    """

    dropped: int
    grown: int
    regrown_before: int = 0
    regrown_kept: int = 0
    ever_active: int = 0
    groups: int = 0


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

    @property
    def survival(self) -> float | None:
        """Share of the groups grown at the previous update that this update kept (None: none were grown)."""
        before = sum(u.regrown_before for u in self.layers.values())
        return sum(u.regrown_kept for u in self.layers.values()) / before if before else None

    @property
    def exploration(self) -> float:
        """Share of all groups that have ever been active (ITOP's exploration rate)."""
        groups = sum(u.groups for u in self.layers.values())
        return sum(u.ever_active for u in self.layers.values()) / groups if groups else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> UpdateReport:
        layers = {name: LayerUpdate(**counts) for name, counts in data["layers"].items()}
        return cls(step=int(data["step"]), fraction=float(data["fraction"]), layers=layers)


class _Target:
    """One masked weight: its group mask and the cached 0/1 multiplier used on the hot path."""

    def __init__(
        self, name: str, param: nn.Parameter, module: nn.Module | None, granularity: Granularity, density: float
    ):
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
        # Flat, per group: the update that last grew it (0: never) and whether it was ever active.
        self.grown_at: Tensor = torch.zeros(self.num_groups, dtype=torch.int32, device=self.mask_device)
        self.ever_active: Tensor = torch.ones(self.num_groups, dtype=torch.bool, device=self.mask_device)

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
        grace_updates: groups grown at an update cannot be dropped at the next ``grace_updates`` updates (default
            0: RigL's and SET's rule, where any active group may be dropped). Zero-initialised regrowth scored by
            magnitude starts at the bottom of the ranking; when updates are close together (short runs) it is
            dropped again before it can learn, and the layer never holds its nominal density of trained groups.
            ``grace_updates=1`` gives every regrown group one full interval. Density and drop == grow still hold:
            when protected groups leave fewer than the scheduled number droppable, fewer are exchanged. The drop then
            falls on trained groups instead: with updates a few iterations apart that measured harmful (E2ENet guide,
            "Dynamic sparsity in short runs"), so use it where regrowth has hundreds of iterations to learn.
        scaler: the ``torch.amp.GradScaler`` of a mixed-precision run, or None. When the scaler skipped the
            optimizer step (non-finite gradients), ``step()`` neither advances the schedule nor changes the
            topology: the step does not count, exactly as for the optimizer. Skips are detected by the scale
            dropping in ``scaler.update()``, so call ``step()`` after ``scaler.step(optimizer)`` and
            ``scaler.update()``. Gradient growth then reads gradients that ``scaler.step`` already unscaled.

    Note:
        Under DistributedDataParallel, build it on every rank with the same arguments, from the DDP model or from
        ``ddp.module``: either works, because DDP and DataParallel wrappers are unwrapped, so target names,
        ``density`` keys and ``state_dict()`` keys never carry DDP's ``module.`` prefix (checkpoints move between
        wrapped and unwrapped runs). No communication is needed: every decision depends only on (seed, step, layer
        index) and on weights and gradients that DDP keeps identical across ranks. Gradient growth sees the
        DDP-averaged gradients: DDP all-reduces ``.grad`` during ``backward()``, before ``optimizer.step()`` and
        ``step()``. Call :meth:`verify` now and then to check that the ranks still agree.
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
        grace_updates: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer (or None for a fixed mask), got {type(optimizer).__name__}"
            )
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(
                f"schedule must be a sparsefuse.schedules.Schedule (e.g. CosineDecay(every=100, "
                f"alpha=0.5, total_steps=T)) or None for static sparsity, got {type(schedule).__name__}"
            )
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r}: use one of {DISTRIBUTIONS}")
        if not (regrow_init in ("zeros", "reinit") or callable(regrow_init)):
            raise ValueError(
                f"regrow_init must be 'zeros', 'reinit' or a callable (tensor, generator) -> None, got {regrow_init!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if isinstance(grace_updates, bool) or not isinstance(grace_updates, int) or grace_updates < 0:
            raise ValueError(f"grace_updates must be a non-negative int (0: no protection), got {grace_updates!r}")
        self.grace_updates = grace_updates
        self.model, self.optimizer = unwrap_model(model), optimizer  # DDP's "module." prefix never shows
        self.scorer = scorer if scorer is not None else scorers.L1()
        self.growth = growth if growth is not None else growth_policies.Random()
        for role, policy in (("scorer", self.scorer), ("growth", self.growth)):
            if not callable(policy):
                raise TypeError(
                    f"{role} must be callable (weight, grad, granularity, generator) -> group scores, "
                    f"got {type(policy).__name__}"
                )
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        self.schedule, self.distribution, self.regrow_init, self.seed = schedule, distribution, regrow_init, seed
        self.scaler = scaler
        # The scale before the first update is the scaler's initial scale (get_scale() returns it until then).
        self._last_scale = scaler.get_scale() if scaler is not None else None
        self.granularity = get_granularity(granularity)
        self.history: list[UpdateReport] = []
        self._step = 0

        found = resolve_targets(self.model, targets)
        check_in_optimizer(found, optimizer)
        shapes = {name: tuple(p.shape) for name, (p, _) in found.items()}
        densities = resolve_densities(density, shapes, distribution)
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
            t.ever_active = mask.to(t.mask_device)
        self._apply_masks()

    # ---------------------------------------------------------------------------------------- keyed randomness
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
        update = len(self.history) + 1  # updates are numbered from 1; grown_at 0 means never grown
        needs_grad = getattr(self.scorer, "needs_grad", False) or getattr(self.growth, "needs_grad", False)
        for index, t in enumerate(self._targets):
            grad = t.param.grad
            if needs_grad and grad is None:
                raise RuntimeError(
                    f"{t.name!r} has no gradient at update step {step}, but {self.scorer!r}/{self.growth!r} needs "
                    f"one; call sparsity.step() after optimizer.step() and before optimizer.zero_grad()"
                )
            if needs_grad and not bool(torch.isfinite(grad).all()):
                raise RuntimeError(
                    f"{t.name!r} has a non-finite gradient at update step {step}; gradient growth cannot rank it. "
                    f"With mixed precision pass scaler=GradScaler to DynamicSparsity so skipped steps are skipped "
                    f"here too; otherwise the run has diverged (lower the learning rate, clip gradients)"
                )
            was_active = t.mask.reshape(-1)
            protected = (t.grown_at > 0) & (update - t.grown_at <= self.grace_updates) & was_active
            droppable = int(was_active.sum()) - int(protected.sum())
            # Truncation as in RigL; capped so every regrown group was inactive before the update.
            count = min(int(fraction * t.active), t.num_groups - t.active, droppable)
            regrown_before = (t.grown_at == update - 1) & (t.grown_at > 0)
            if count > 0:
                grown = self._drop_and_grow(t, count, grad, self._generator(step, index), protected)
                t.grown_at[grown] = update
            now_active = t.mask.reshape(-1)
            t.ever_active |= now_active
            layers[t.name] = LayerUpdate(
                dropped=count,
                grown=count,
                regrown_before=int(regrown_before.sum()),
                regrown_kept=int((regrown_before & now_active).sum()),
                ever_active=int(t.ever_active.sum()),
                groups=t.num_groups,
            )
        return UpdateReport(step=step, fraction=fraction, layers=layers)

    def _drop_and_grow(
        self, t: _Target, count: int, grad: Tensor | None, generator: torch.Generator, protected: Tensor
    ) -> Tensor:
        """Drop the ``count`` lowest-scored active groups outside ``protected``, grow ``count`` inactive ones;
        returns the flat indices grown."""
        was_active = t.mask.reshape(-1)
        active, inactive = (was_active & ~protected).nonzero().squeeze(1), (~was_active).nonzero().squeeze(1)
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
        return grow

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

    def granularities(self) -> dict[str, str]:
        """{target name: repr of its bound granularity}, as state dicts record it."""
        return {t.name: repr(t.granularity) for t in self._targets}

    def check_granularities(self, saved: Mapping[str, str] | None) -> None:
        """Raise ValueError if a state dict's recorded granularities differ from this sparsifier's (state dicts
        saved before they were recorded carry none and pass)."""
        if saved is None:
            return
        here = self.granularities()
        differ = {name: (saved[name], now) for name, now in here.items() if name in saved and saved[name] != now}
        if differ:
            name, (was, now) = next(iter(differ.items()))
            raise ValueError(
                f"state dict masks were saved with another granularity: {name!r} was {was}, this sparsifier has "
                f"{now} ({len(differ)} target(s) differ); build DynamicSparsity with the granularity of the run "
                f"that saved it"
            )

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
        return (
            f"DynamicSparsity({len(self._targets)} weights, density={self.density():.4f}, "
            f"granularity={self.granularity!r}, scorer={self.scorer!r}, growth={self.growth!r}, "
            f"schedule={self.schedule!r}, step={self._step})"
        )

    # ----------------------------------------------------------------------------------------- distributed
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
        verify_ranks_agree(self, group)

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Masks, step (schedule position), seed (all randomness is keyed by it and the step) and history."""
        return {
            "step": self._step,
            "seed": self.seed,
            "masks": {t.name: t.mask.cpu().clone() for t in self._targets},
            # Two granularities can share a group shape (Channel(dim=0) and InputChannel on a square weight): the
            # shape alone cannot tell a mask's meaning, so the granularity travels with it.
            "granularity": self.granularities(),
            "grown_at": {t.name: t.grown_at.cpu().clone() for t in self._targets},
            "ever_active": {t.name: t.ever_active.cpu().clone() for t in self._targets},
            "history": [r.to_dict() for r in self.history],
            "last_scale": self._last_scale,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict`; re-zeroes inactive weights and optimizer state under the loaded masks."""
        if not isinstance(state, Mapping) or not {"step", "seed", "masks"} <= set(state):
            raise ValueError(
                "not a DynamicSparsity state dict: expected keys 'step', 'seed', 'masks' "
                "(save it with sparsity.state_dict())"
            )
        masks = state["masks"]
        missing = sorted(set(self._by_name) - set(masks))
        unexpected = sorted(set(masks) - set(self._by_name))
        if missing or unexpected:
            raise ValueError(
                f"sparsity state dict is from a different model or targets: missing {missing}, "
                f"unexpected {unexpected}; build DynamicSparsity with the same model and targets "
                f"as the run that saved it"
            )
        self.check_granularities(state.get("granularity"))
        for name, mask in masks.items():
            t = self._by_name[name]
            if tuple(mask.shape) != t.groups_shape:
                raise ValueError(
                    f"sparsity state dict mask {name!r} has shape {tuple(mask.shape)}, but this "
                    f"model's weight needs {t.groups_shape} ({t.granularity!r}); the state dict comes "
                    f"from a different model or granularity"
                )
        for name, mask in masks.items():
            t = self._by_name[name]
            t.set_mask(mask)
            # State dicts saved before these were tracked: nothing counts as regrown, the active set as explored.
            grown_at = state.get("grown_at", {}).get(name)
            ever_active = state.get("ever_active", {}).get(name)
            t.grown_at = (
                grown_at.to(t.mask_device, torch.int32).reshape(-1).clone()
                if grown_at is not None
                else torch.zeros(t.num_groups, dtype=torch.int32, device=t.mask_device)
            )
            t.ever_active = (
                ever_active.to(t.mask_device, torch.bool).reshape(-1).clone()
                if ever_active is not None
                else t.mask.reshape(-1).clone()
            )
        self._step, self.seed = int(state["step"]), int(state["seed"])
        self.history = [UpdateReport.from_dict(r) for r in state.get("history", [])]
        self._last_scale = state.get("last_scale", self._last_scale)
        self._apply_masks()
