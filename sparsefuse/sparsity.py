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

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .distributed import unwrap_model, verify_ranks_agree
from .distribution import Distribution, get_distribution
from .growth import Growth, get_growth, get_regrow_init, zero_init
from .guards import OptimizerSteps, check_attached, check_keeps_a_group, check_not_frozen, frozen_error
from .masks import Granularity, get_granularity
from .reports import LayerUpdate, UpdateReport
from .schedules import Schedule, get_schedule
from .scorers import Scorer, get_scorer
from .targets import Target, check_in_optimizer, default_targets, resolve_densities, resolve_targets

# These lived here before their own modules; they stay importable from here.
__all__ = ["DynamicSparsity", "UpdateReport", "LayerUpdate", "default_targets"]


def _stable_seed(*keys: int) -> int:
    """A 64-bit seed that depends only on ``keys``: step-keyed randomness needs no state and no communication."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])


class DynamicSparsity:
    """Dynamic sparse training for any ``nn.Module``.

    Every policy argument takes a registered name or an object (see [`registry`][sparsefuse.registry]): names
    stand for the policies that need no parameter; schedules and ``Block`` granularities, which do, are objects.

    Args:
        model: the network. Its targeted weights are zeroed at construction outside the initial random mask.
        optimizer: the optimizer that updates ``model``; every targeted weight must be in it and trainable when
            the topology changes (a ``schedule``). ``None`` is allowed for fixed-mask uses without training
            (accounting, inference).
        density: fraction of groups kept, in (0, 1]; or a dict {parameter name: density}. A dict must cover every
            target, or give the rest through the key ``"default"`` (then ``distribution`` spreads that density over
            the layers not named). Every target must keep at least one group: ``round(density * groups) >= 1``.
        targets: ``None`` (the weight of every Conv1-3d, ConvTranspose1-3d and Linear), a callable
            ``(module_name, module) -> bool`` selecting modules whose ``weight`` is masked, or a list of parameter
            names.
        granularity: ``"element"`` (one group per weight), ``"kernel"`` (one per (dim0, dim1) pair, covering the
            spatial kernel), ``"channel"`` (one per output channel), ``"input_channel"`` (one per input channel),
            ``"input_channel_blocks"`` (input channels per block of outputs, 4 blocks); or a
            [`Granularity`][sparsefuse.masks.Granularity] such as ``Block(rows, cols)`` or
            ``InputChannelBlocks(8)``.
        scorer: importance of active groups (lowest dropped first): ``"l1"`` (default), ``"magnitude"``,
            ``"random"``, or a [`Scorer`][sparsefuse.scorers.Scorer].
        growth: which inactive groups to regrow: ``"random"`` (default; SET), ``"gradient"`` (RigL), or a
            [`Growth`][sparsefuse.growth.Growth].
        schedule: a [`Schedule`][sparsefuse.schedules.Schedule] object, or ``None`` for static sparse training
            (fixed random mask).
        distribution: ``"uniform"``, ``"er"``, ``"erk"``, or a callable ``(shapes, density) -> {name: density}``.
        regrow_init: ``"zeros"`` (RigL, and the E2ENet authors' code), ``"reinit"`` (fresh values from torch's default
            Conv/Linear init) or a callable ``(weight_like_tensor, generator) -> None`` that fills its argument.
        seed: every random draw is keyed by (seed, step, layer index), never the global RNG, so replicas (DDP ranks)
            make identical decisions and a resumed run continues bit-identically.
        scaler: the ``torch.amp.GradScaler`` of a mixed-precision run, or None. When the scaler skipped the
            optimizer step (non-finite gradients), ``step()`` neither advances the schedule nor changes the
            topology: the step does not count, exactly as for the optimizer. Skips are detected by the scale
            dropping in ``scaler.update()``, so call ``step()`` after ``scaler.step(optimizer)`` and
            ``scaler.update()``. Gradient growth then reads gradients that ``scaler.step`` already unscaled.
        grace_updates: groups grown at an update cannot be dropped at the next ``grace_updates`` updates (default
            0: RigL's and SET's rule, where any active group may be dropped). Zero-initialised regrowth scored by
            magnitude starts at the bottom of the ranking; when updates are close together (short runs) it is
            dropped again before it can learn, and the layer never holds its nominal density of trained groups.
            ``grace_updates=1`` gives every regrown group one full interval. Density and drop == grow still hold:
            when protected groups leave fewer than the scheduled number droppable, fewer are exchanged. The drop then
            falls on trained groups instead: with updates a few iterations apart that measured harmful (E2ENet guide,
            "Dynamic sparsity in short runs"), so use it where regrowth has hundreds of iterations to learn.

    Note:
        Under DistributedDataParallel, build it on every rank with the same arguments, from the DDP model or from
        ``ddp.module``: either works, because DDP and DataParallel wrappers are unwrapped, so target names,
        ``density`` keys and ``state_dict()`` keys never carry DDP's ``module.`` prefix (checkpoints move between
        wrapped and unwrapped runs). No communication is needed: every decision depends only on (seed, step, layer
        index) and on weights and gradients that DDP keeps identical across ranks. Gradient growth sees the
        DDP-averaged gradients: DDP all-reduces ``.grad`` during ``backward()``, before ``optimizer.step()`` and
        ``step()``. Call [`verify`][sparsefuse.DynamicSparsity.verify] now and then to check that the ranks still
        agree.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        density: float | Mapping[str, float] = 0.2,
        targets: None | Callable[[str, nn.Module], bool] | Iterable[str] = None,
        granularity: str | Granularity = "kernel",
        scorer: str | Scorer = "l1",
        growth: str | Growth = "random",
        schedule: Schedule | None = None,
        distribution: str | Distribution = "uniform",
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
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if isinstance(grace_updates, bool) or not isinstance(grace_updates, int) or grace_updates < 0:
            raise ValueError(f"grace_updates must be a non-negative int (0: no protection), got {grace_updates!r}")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        self.granularity = get_granularity(granularity)
        self.scorer, self.growth = get_scorer(scorer), get_growth(growth)
        self.schedule = get_schedule(schedule)
        self._regrow = get_regrow_init(regrow_init)
        spread = get_distribution(distribution)
        # The arguments as given, as state dicts and run records name them.
        self.distribution, self.regrow_init = distribution, regrow_init
        self.model, self.optimizer = unwrap_model(model), optimizer  # DDP's "module." prefix never shows
        self.seed, self.grace_updates, self.scaler = seed, grace_updates, scaler
        # The scale before the first update is the scaler's initial scale (get_scale() returns it until then).
        self._last_scale = scaler.get_scale() if scaler is not None else None
        self._optimizer_steps = OptimizerSteps(optimizer)
        self.history: list[UpdateReport] = []
        self._step = 0
        # An OrderedDict, not a dict: RemovableHandle keeps a weak reference to it.
        self._load_state_dict_pre_hooks: OrderedDict[int, Callable[[DynamicSparsity, Mapping], None]] = OrderedDict()

        found = resolve_targets(self.model, targets)
        check_in_optimizer(found, optimizer)
        densities = resolve_densities(density, {name: tuple(p.shape) for name, (p, _) in found.items()}, spread)
        self._targets = [
            Target(name, param, module, self.granularity.bind(name, param, module), densities[name])
            for name, (param, module) in found.items()
        ]
        self._by_name = {t.name: t for t in self._targets}
        check_not_frozen(self._targets, optimizer, dynamic=self.schedule is not None)
        for index, t in enumerate(self._targets):
            keep = round(t.target_density * t.num_groups)
            check_keeps_a_group(t, keep)
            if t.granularity.confines_growth:
                scores = torch.rand(t.groups_shape, generator=self._generator(0, index))
                empty = torch.zeros(t.groups_shape, dtype=torch.bool)
                chosen = t.granularity.confine(empty, scores, keep).reshape(-1).topk(keep).indices
            else:
                chosen = torch.randperm(t.num_groups, generator=self._generator(0, index))[:keep]
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
    def _apply_masks(self, targets: Iterable[Target] | None = None) -> None:
        state = self.optimizer.state if self.optimizer is not None else {}
        for t in self._targets if targets is None else targets:
            t.param.mul_(t.keep)
            for value in state.get(t.param, {}).values():
                if isinstance(value, Tensor) and value.shape == t.param.shape:
                    value.mul_(t.keep)

    def step(self) -> UpdateReport | None:
        """Call once after every ``optimizer.step()``. Re-zeroes inactive weights and their optimizer state; on an
        update step, drops and regrows groups and returns the [`UpdateReport`][sparsefuse.UpdateReport] (else
        ``None``).

        With a ``scaler`` that skipped this optimizer step, returns None and counts nothing (see ``scaler``).

        Raises:
            RuntimeError: the optimizer has not stepped since the previous call (the schedule would run faster
                than training); a targeted weight was replaced in the model after construction (e.g. by
                ``load_state_dict(..., assign=True)``) or, on an update step, frozen.
        """
        if self._optimizer_step_skipped():
            return None
        check_attached(self._targets)
        self._optimizer_steps.check()
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
            # Without an optimizer nothing trains, so a frozen weight matters only to gradient policies.
            if not t.param.requires_grad and (needs_grad or self.optimizer is not None):
                raise frozen_error(t.name, step)
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
        self, t: Target, count: int, grad: Tensor | None, generator: torch.Generator, protected: Tensor
    ) -> Tensor:
        """Drop the ``count`` lowest-scored active groups outside ``protected``, grow ``count`` inactive ones;
        returns the flat indices grown."""
        was_active = t.mask.reshape(-1)
        active, inactive = (was_active & ~protected).nonzero().squeeze(1), (~was_active).nonzero().squeeze(1)
        keep_score = self.scorer(t.param, grad, t.granularity, generator).reshape(-1)
        grow_score = self.growth(t.param, grad, t.granularity, generator).reshape(-1)
        drop = active[torch.topk(keep_score[active], count, largest=False).indices]
        mask = was_active.clone()
        mask[drop] = False
        if t.granularity.confines_growth:
            shape = t.groups_shape
            grow_score = t.granularity.confine(mask.reshape(shape), grow_score.reshape(shape), count).reshape(-1)
        grow = inactive[torch.topk(grow_score[inactive], count, largest=True).indices]
        mask[grow] = True
        t.set_mask(mask)
        self._apply_masks([t])
        if self._regrow is not zero_init:  # masking already zeroed them
            self._reinit(t, grow, generator)
        return grow

    def _reinit(self, t: Target, grown: Tensor, generator: torch.Generator) -> None:
        fresh = torch.empty(t.param.shape, dtype=t.param.dtype)
        self._regrow(fresh, generator)
        grown_groups = torch.zeros(t.num_groups, dtype=torch.bool, device=t.param.device)
        grown_groups[grown] = True
        where = t.granularity.expand(grown_groups.reshape(t.groups_shape), t.param.shape)
        t.param.copy_(torch.where(where, fresh.to(t.param.device), t.param))

    # ------------------------------------------------------------------------------------------ inspection
    @property
    def target_names(self) -> tuple[str, ...]:
        """The masked weights' names, as ``model.named_parameters()`` gives them (without DDP's prefix)."""
        return tuple(t.name for t in self._targets)

    @property
    def step_count(self) -> int:
        """Number of ``step()`` calls so far (the schedule position)."""
        return self._step

    @property
    def masks(self) -> dict[str, Tensor]:
        """{name: bool mask in its granularity's group shape} (copies)."""
        return {t.name: t.mask.clone() for t in self._targets}

    def _target(self, name: str) -> Target:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a sparsified weight; targets are {list(self._by_name)}") from None

    def weight_mask(self, name: str) -> Tensor:
        """Bool tensor shaped like the weight ``name``: True where the weight is active.

        Args:
            name: a target name (one of ``target_names``).
        """
        t = self._target(name)
        return t.granularity.to_weight(t.mask, t.param.shape)

    def granularity_of(self, name: str) -> Granularity:
        """The granularity bound to the weight ``name``: it maps ``masks[name]`` onto the weight.

        Args:
            name: a target name (one of ``target_names``).
        """
        return self._target(name).granularity

    def granularities(self) -> dict[str, str]:
        """{target name: repr of its bound granularity}, as state dicts record it."""
        return {t.name: repr(t.granularity) for t in self._targets}

    def check_granularities(self, saved: Mapping[str, str] | None) -> None:
        """Raise ValueError if a state dict's recorded granularities differ from this sparsifier's.

        Args:
            saved: the state dict's ``"granularity"`` entry; None (state dicts saved before it was recorded)
                passes.
        """
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
        """Active groups / all groups of one weight; without a name, active / all weights over every target.

        Args:
            name: a target name, or None for all targets together.
        """
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
    def verify(self, group: torch.distributed.ProcessGroup | None = None) -> None:
        """Check that every rank of ``group`` (default: all) holds the same masks and step count.

        Opt-in, for DDP runs: ranks never communicate about masks, they agree because their decisions are keyed
        by (seed, step, layer index) and DDP keeps weights and gradients identical. This checks it. A collective:
        every rank of ``group`` must call it at the same point, or the others wait until the process group's
        timeout. Cost: a CRC32 of every group mask on the CPU (a device-to-host copy of the masks, which are tiny
        for kernel granularity) and two ``all_gather`` of a few int64 per layer; call it every few hundred steps
        or once per epoch, not every step of a large model.

        If ``torch.distributed`` is not available or not initialised (single-process training) it does nothing.

        Args:
            group: the process group whose ranks are compared; None for all ranks.

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

    def register_load_state_dict_pre_hook(self, hook: Callable[[DynamicSparsity, Mapping], None]) -> RemovableHandle:
        """Call ``hook(sparsity, state)`` in every [`load_state_dict`][sparsefuse.DynamicSparsity.load_state_dict],
        once ``state`` is checked and before anything is loaded, as torch's optimizers and modules do: for code that
        keeps something built from the masks, such as [`CompactedTraining`][sparsefuse.compaction.CompactedTraining].

        Args:
            hook: called with this sparsifier and the state dict being loaded.

        Returns:
            A handle whose ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._load_state_dict_pre_hooks)
        self._load_state_dict_pre_hooks[handle.id] = hook
        return handle

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a [`state_dict`][sparsefuse.DynamicSparsity.state_dict]; re-zeroes inactive weights and optimizer
        state under the loaded masks.

        Args:
            state: what ``state_dict()`` returned, for the same model, targets and granularity.
        """
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
        for hook in self._load_state_dict_pre_hooks.values():
            hook(self, state)
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
        self._optimizer_steps.at_last_step = None  # the restored run's step() calls start afresh
        self._apply_masks()
