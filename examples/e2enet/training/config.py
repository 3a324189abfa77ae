"""The settings of a training run, typed: what a run is (its identity) and how this process runs it.

A :class:`RunConfig` holds every setting. Presets are :class:`Preset` instances (``PRESETS``); :func:`make_config`
starts from one and applies the settings given by name, whether they come from the command line (training/cli.py
fills only the flags given) or from Python::

    config = make_config(data=Path("raw/Dataset990_MNITissue"), out=Path("runs/a"), density=0.1, epochs=4)

Settings are named by their field, flat (``epochs``, ``drop_fraction``, ``granularity``, ...): every field name is
unique across the nested parts. What ``--resume`` compares is derived from the fields (:func:`identity_keys`), so a new
setting is part of a run's identity unless it is declared one of how a process runs it (``RUN_ONLY``).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import sparsefuse as sf
from e2enet.nets.registry import ARCHITECTURES
from e2enet.problems import Problem

AUGMENTATIONS = ("nnunet", "light", "none")
ALL_AXES = (0, 1, 2)
GRANULARITIES = ("kernel", "input_channel", "input_channel_blocks", "input_channel_pool")
# Masks that leave whole input channels dead: such runs train and predict cut down to their live channels. Kernel
# masks leave almost no channel dead.
CHANNEL_GRANULARITIES = ("input_channel", "input_channel_blocks", "input_channel_pool")
SPARSE_LAYERS = ("fusion", "fusion-convs")
# The library's own names, so a policy it adds is a choice here too.
DISTRIBUTIONS = tuple(sf.distribution.DISTRIBUTIONS)
GROWTHS = tuple(sf.growth.GROWTHS)
REGROW_INITS = tuple(sf.growth.REGROW_INITS)
FOLDS = ("0", "1", "2", "3", "4", "all")

# The authors' optimiser: SGD with Nesterov momentum, poly learning rate, clipped gradients.
MOMENTUM, WEIGHT_DECAY, POLY_EXPONENT, GRAD_CLIP = 0.99, 3e-5, 0.9, 12.0
# The paper makes about 208 topology updates in 250,000 iterations; a shorter run updates every 1/50 of its length.
PAPER_UPDATE_EVERY = 1200
UPDATES_PER_RUN = 50


@dataclass(frozen=True)
class Budget:
    """How long and on what a run trains: epochs, learning rate, augmentation, patch and batch size budgets."""

    epochs: int
    iters_per_epoch: int
    val_iters: int
    lr: float
    augment: str
    patch_voxel_budget: int
    batch_voxel_budget: int


@dataclass(frozen=True)
class TopologyUpdates:
    """When and how a dynamic mask changes (the paper's rules by default).

    ``update_every`` None means: from the run's length, ``min(1200, max(1, iterations // 50))``. The first mask trains
    unchanged for ``update_from`` of the run; from there the number of kernels exchanged starts at ``drop_fraction`` of
    the active ones and follows a cosine to 0 at ``update_until`` of the run; the mask is fixed after it.
    """

    update_every: int | None = None
    drop_fraction: float = 0.5
    update_from: float = 0.0
    update_until: float = 1.0
    growth: str = "random"
    regrow_init: str = "zeros"
    grace_updates: int = 0


@dataclass(frozen=True)
class Sparsity:
    """Dynamic sparse feature fusion: which fusion layers keep which fraction of what, and how the mask evolves."""

    density: float = 1.0
    static: bool = False
    granularity: str = "kernel"
    sparse_layers: str = "fusion"
    distribution: str = "uniform"
    updates: TopologyUpdates = TopologyUpdates()


@dataclass(frozen=True)
class Preset:
    """A network size with the budget it is meant for; ``low_density_updates`` applies below density 0.2."""

    budget: Budget
    low_density_updates: TopologyUpdates | None = None


PRESETS = {
    "paper": Preset(Budget(1000, 250, 50, 0.01, "nnunet", 128**3, 2 * 128**3)),
    # A few thousand iterations at most: no augmentation and 4x the paper's learning rate learnt best there; below
    # density 0.2 a smaller first exchange and a mask fixed for the last quarter measured better than the paper's
    # rules (the Results page's log).
    "cpu-demo": Preset(
        Budget(24, 25, 4, 0.04, "none", 48**3, 2 * 48**3),
        low_density_updates=TopologyUpdates(drop_fraction=0.2, update_until=0.75),
    ),
}
LOW_DENSITY = 0.2
DEFAULT_DENSITY = 0.2


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one training run of one fold."""

    data: Path
    out: Path
    budget: Budget
    fold: str = "0"
    arch: str = "e2enet"
    preset: str = "cpu-demo"
    model_options: dict = field(default_factory=dict)
    sparsity: Sparsity = Sparsity()
    mirror_axes: tuple[int, ...] = ALL_AXES
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    preprocessed: Path | None = None
    threads: int | None = None
    progress: bool = True
    amp: bool = True

    @property
    def total_iters(self) -> int:
        return self.budget.epochs * self.budget.iters_per_epoch

    @property
    def update_every(self) -> int:
        """Iterations between topology updates: as set, or from the run's length (1/50 of it, at most 1200)."""
        every = self.sparsity.updates.update_every
        return every or min(PAPER_UPDATE_EVERY, max(1, self.total_iters // UPDATES_PER_RUN))

    @property
    def update_window(self) -> tuple[int, int]:
        """(iterations that train the first mask unchanged, the last iteration that may change the topology)."""
        u = self.sparsity.updates
        return round(u.update_from * self.total_iters), max(1, round(u.update_until * self.total_iters))

    @property
    def sparse(self) -> bool:
        return self.sparsity.density < 1.0

    @property
    def fold_dir(self) -> Path:
        return self.out / f"fold_{self.fold}"


# How this process runs the experiment, not what the experiment is: --resume may change these.
RUN_ONLY = ("data", "out", "resume", "overwrite", "preprocessed", "threads", "progress", "amp")
SPARSE_ONLY = tuple(f.name for f in fields(Sparsity) if f.name not in ("density", "updates"))
UPDATE_ONLY = tuple(f.name for f in fields(TopologyUpdates))


def _leaves(cls) -> dict[str, tuple[str, ...]]:
    """Field name -> the path of nested field names leading to it, over the dataclass tree of ``cls``."""
    hints = typing.get_type_hints(cls)
    paths = {}
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            paths.update({name: (f.name, *path) for name, path in _leaves(hints[f.name]).items()})
        else:
            paths[f.name] = (f.name,)
    return paths


SETTINGS = _leaves(RunConfig)  # every setting's name -> where it lives in a RunConfig


def _set(obj, path: tuple, value):
    head, *rest = path
    return replace(obj, **{head: _set(getattr(obj, head), tuple(rest), value) if rest else value})


def make_config(
    *, data: Path, out: Path, preset: str = "cpu-demo", density: float | None = None, **settings
) -> RunConfig:
    """The run config of ``preset`` at ``density`` with ``settings`` (field names, see ``SETTINGS``) over it.

    ``density`` defaults to ``DEFAULT_DENSITY`` for E2ENet and to dense for the baselines. Settings that would change
    nothing are refused rather than ignored: mask settings of a dense run, topology-update settings of a static one,
    sparsity of DynUNet, mirror axes without augmentation.
    """
    if density is None:
        density = DEFAULT_DENSITY if settings.get("arch", "e2enet") == "e2enet" else 1.0
    if preset not in PRESETS:
        raise Problem(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise Problem(f"unknown run settings {unknown}; valid ones are {sorted(SETTINGS)}")
    _refuse_inert(settings, density, preset)
    updates = TopologyUpdates()
    if PRESETS[preset].low_density_updates and density < LOW_DENSITY:
        updates = PRESETS[preset].low_density_updates
    config = RunConfig(
        data=Path(data),
        out=Path(out),
        budget=PRESETS[preset].budget,
        preset=preset,
        sparsity=Sparsity(density=density, updates=updates if density < 1.0 else TopologyUpdates()),
    )
    for name, value in settings.items():
        config = _set(config, SETTINGS[name], value)
    config = replace(config, fold=str(config.fold), mirror_axes=tuple(config.mirror_axes))
    check(config)
    return config


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def as_flags(config: RunConfig) -> list[str]:
    """The train.py command line of ``config``: every setting that differs from its preset's value at its density."""
    preset = make_config(data=config.data, out=config.out, preset=config.preset, density=config.sparsity.density)
    given, default = settings_of(config), settings_of(preset)
    words = ["--data", str(config.data), "--out", str(config.out), "--preset", config.preset]
    words += ["--density", str(config.sparsity.density)]
    for name, value in given.items():
        if name in ("data", "out", "preset", "density") or value == default[name]:
            continue
        if isinstance(value, bool):
            words.append(flag(name) if value else {"progress": "--no-progress", "amp": "--no-amp"}[name])
        elif name == "model_options":
            words += [w for key, v in value.items() for w in ("--model-option", f"{key}={json.dumps(v)}")]
        elif isinstance(value, list):
            words += [flag(name), *map(str, value)]
        else:
            words += [flag(name), str(value)]
    return words


def _refuse_inert(settings: dict, density: float, preset: str) -> None:
    defaults = {**asdict(Sparsity()), **asdict(TopologyUpdates())}
    sparse_given = sorted(
        k for k in settings if (k in SPARSE_ONLY or k in UPDATE_ONLY) and settings[k] != defaults.get(k)
    )
    flags = ", ".join(map(flag, sparse_given))
    if settings.get("arch", "e2enet") != "e2enet" and (density < 1.0 or sparse_given):
        raise Problem(f"{flags or '--density < 1'} sparsify E2ENet's fusion layers; use them with --arch e2enet")
    if density >= 1.0 and sparse_given:
        raise Problem(f"{flags} only act on a sparse run; give --density below 1, or drop them")
    updates_given = [k for k in sparse_given if k in UPDATE_ONLY]
    if settings.get("static") and updates_given:
        unused = ", ".join(map(flag, updates_given))
        raise Problem(f"--static keeps the first mask, so {unused} would change nothing; drop them")
    augment = settings.get("augment", PRESETS[preset].budget.augment)
    if "mirror_axes" in settings and augment == "none":
        raise Problem(
            "--mirror-axes only acts with augmentation, and this run has none; give --augment light or nnunet"
        )


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise Problem(f"{flag(name)} must be one of {list(choices)}, got {value!r}")


def check(config: RunConfig) -> None:
    """Refuse settings out of range before anything is read or written: one sentence naming the setting."""
    b, s, u = config.budget, config.sparsity, config.sparsity.updates
    for name, value, choices in [
        ("fold", config.fold, FOLDS),
        ("arch", config.arch, ARCHITECTURES),
        ("augment", b.augment, AUGMENTATIONS),
        ("granularity", s.granularity, GRANULARITIES),
        ("sparse_layers", s.sparse_layers, SPARSE_LAYERS),
        ("distribution", s.distribution, DISTRIBUTIONS),
        ("growth", u.growth, GROWTHS),
        ("regrow_init", u.regrow_init, REGROW_INITS),
    ]:
        _choice(name, value, choices)
    if not 0.0 < s.density <= 1.0:
        raise Problem(f"--density must be in (0, 1], got {s.density}")
    if not b.lr > 0:
        raise Problem(f"--lr must be positive, got {b.lr}")
    if b.epochs < 1 or b.iters_per_epoch < 1 or b.val_iters < 1:
        raise Problem("--epochs, --iters-per-epoch and --val-iters must be positive")
    if not 0.0 < u.drop_fraction < 1.0:
        raise Problem(f"--drop-fraction must be in (0, 1), got {u.drop_fraction}")
    if not 0.0 < u.update_until <= 1.0:
        raise Problem(f"--update-until must be in (0, 1], got {u.update_until}")
    if not 0.0 <= u.update_from < u.update_until:
        raise Problem(
            f"--update-from must be in [0, --update-until) = [0, {u.update_until}), got {u.update_from}: the "
            "topology changes between the two"
        )
    if u.update_every is not None and u.update_every < 1:
        raise Problem(f"--update-every must be a positive number of iterations, got {u.update_every}")
    if config.sparse and not s.static:
        first, last = config.update_window
        if last // config.update_every * config.update_every <= first:
            raise Problem(
                f"no topology update falls between --update-from {u.update_from} (iteration {first}) and "
                f"--update-until {u.update_until} (iteration {last}) at one update every {config.update_every} "
                "iterations: widen the window, give a smaller --update-every, or train with --static"
            )
    if u.grace_updates < 0:
        raise Problem(f"--grace-updates must be >= 0, got {u.grace_updates}")
    axes = list(config.mirror_axes)
    if not set(axes) <= set(ALL_AXES) or len(set(axes)) != len(axes):
        raise Problem(f"--mirror-axes must be distinct axes among {list(ALL_AXES)}, got {axes}")
    if config.threads is not None and config.threads < 1:
        raise Problem(f"--threads must be a positive number of threads, got {config.threads}")
    if config.seed < 0:
        raise Problem(f"--seed must be >= 0, got {config.seed}")
    if config.model_options and config.arch != "e2enet":
        raise Problem("--model-option sets E2ENet arguments; use it with --arch e2enet")
    if config.resume and config.overwrite:
        raise Problem("--resume continues a fold and --overwrite replaces it: give one of them")


def settings_of(config: RunConfig) -> dict:
    """Every setting by name (``SETTINGS``), flat, as JSON-friendly values."""
    values = {}
    for name, path in SETTINGS.items():
        value = config
        for part in path:
            value = getattr(value, part)
        values[name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return values


def identity_keys(record: dict) -> list[str]:
    """The settings of a run record (``settings_of``) that make it one experiment: what a resumed run must share.

    A dense run has no masks and a static one no topology updates, so those settings are left out for them.
    """
    inert = set(RUN_ONLY)
    if record["density"] >= 1.0:
        inert |= {*SPARSE_ONLY, *UPDATE_ONLY}
    elif record["static"]:
        inert |= set(UPDATE_ONLY)
    return [k for k in SETTINGS if k not in inert]
