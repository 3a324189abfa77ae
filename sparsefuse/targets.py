"""Which weights a DynamicSparsity masks, and the density of each: its ``targets`` and ``density`` arguments
resolved against the model and checked against the optimizer; and each masked weight's mask state."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .distribution import Distribution, layer_densities
from .masks import Granularity

__all__ = [
    "default_targets",
    "DENSITY_DEFAULT_KEY",
    "resolve_targets",
    "check_in_optimizer",
    "resolve_densities",
    "Target",
]

_DEFAULT_TARGET_TYPES = (nn.Linear, nn.modules.conv._ConvNd)  # _ConvNd covers Conv1-3d and ConvTranspose1-3d
DENSITY_DEFAULT_KEY = "default"

ResolvedTargets = dict[str, tuple[nn.Parameter, nn.Module | None]]


def default_targets(name: str, module: nn.Module) -> bool:
    """The weights of every Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear (subclasses included).

    Args:
        name: the module's qualified name (unused: the choice is by type).
        module: the module whose ``weight`` would be masked.
    """
    return isinstance(module, _DEFAULT_TARGET_TYPES)


def resolve_targets(
    model: nn.Module, targets: None | Callable[[str, nn.Module], bool] | Iterable[str]
) -> ResolvedTargets:
    """{parameter name: (weight, owning module)} for ``DynamicSparsity(targets=...)``; tied weights appear once."""
    params = dict(model.named_parameters())
    found: ResolvedTargets = {}
    if targets is None or callable(targets):
        select = default_targets if targets is None else targets
        for module_name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and select(module_name, module):
                found[f"{module_name}.weight" if module_name else "weight"] = (weight, module)
    elif isinstance(targets, str) or not isinstance(targets, Iterable):
        raise TypeError(
            "targets must be None, a callable (module_name, module) -> bool, or a list of parameter "
            f"names, got {targets!r}"
        )
    else:
        names = list(targets)
        unknown = [n for n in names if n not in params]
        if unknown:
            hint = (
                "; DDP/DataParallel wrappers are unwrapped, so drop the 'module.' prefix"
                if any(n.startswith("module.") for n in unknown)
                else ""
            )
            raise ValueError(
                f"targets name parameters the model does not have: {unknown}; "
                f"valid names are those of model.named_parameters(), e.g. {list(params)[:5]}{hint}"
            )
        for name in names:
            owner = name.rpartition(".")[0]
            found[name] = (params[name], model.get_submodule(owner))
    # Tied weights are one tensor: mask it once.
    seen: set[int] = set()
    found = {n: pm for n, pm in found.items() if not (id(pm[0]) in seen or seen.add(id(pm[0])))}
    if not found:
        raise ValueError(
            "targets matched no weight: the model has no Conv/ConvTranspose/Linear weight, or the "
            "targets callable returned False for every module; check `targets`"
        )
    return found


def check_in_optimizer(found: ResolvedTargets, optimizer: torch.optim.Optimizer | None) -> None:
    """Refuse targets the optimizer does not update (``None``: a fixed mask without training, nothing to check)."""
    if optimizer is None:
        return
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, (p, _) in found.items() if id(p) not in in_optimizer]
    if missing:
        raise ValueError(
            f"these targeted weights are not in the optimizer: {missing}; build the optimizer "
            f"from model.parameters() (or add them), or leave them out of `targets`"
        )


def resolve_densities(
    density: float | Mapping[str, float], shapes: dict[str, tuple[int, ...]], distribution: str | Distribution
) -> dict[str, float]:
    """{target name: density} for ``DynamicSparsity(density=...)``: one number spread over the targets by
    ``distribution``, or a dict naming targets, the unnamed ones sharing its ``"default"`` entry."""

    def check(key, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ValueError(f"density{key} must be a number in (0, 1] (the fraction of groups kept), got {value!r}")
        return float(value)

    if not isinstance(density, Mapping):
        return layer_densities(shapes, check("", density), distribution)
    explicit = {k: check(f"[{k!r}]", v) for k, v in density.items() if k != DENSITY_DEFAULT_KEY}
    unknown = sorted(set(explicit) - set(shapes))
    if unknown:
        raise ValueError(f"density names weights that are not targets: {unknown}; targets are {list(shapes)}")
    rest = {n: s for n, s in shapes.items() if n not in explicit}
    if rest and DENSITY_DEFAULT_KEY not in density:
        raise ValueError(
            f"density dict gives no value for {list(rest)}; add them or a "
            f"'{DENSITY_DEFAULT_KEY}' entry for all the others"
        )
    spread = (
        layer_densities(rest, check(f"[{DENSITY_DEFAULT_KEY!r}]", density[DENSITY_DEFAULT_KEY]), distribution)
        if rest
        else {}
    )
    return {n: explicit.get(n, spread.get(n)) for n in shapes}


class Target:
    """One masked weight: its group mask and the cached 0/1 multiplier used on the hot path.

    ``owner`` is the module that holds the weight as its parameter ``leaf``: if the model's weight is replaced,
    ``owner`` holds another tensor than ``param``.
    """

    def __init__(self, name: str, param: nn.Parameter, owner: nn.Module, granularity: Granularity, density: float):
        self.name, self.param, self.owner = name, param, owner
        self.leaf = name.rpartition(".")[2]
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

    @property
    def attached(self) -> bool:
        """Whether the model still holds ``param`` (``load_state_dict(..., assign=True)`` replaces it)."""
        held = self.owner._parameters  # a dict lookup: getattr on a module costs ~8x more, on every step
        return (held[self.leaf] if self.leaf in held else getattr(self.owner, self.leaf, None)) is self.param
