"""The public surface: every module path the library names resolves, policies take names or objects by one rule,
old names keep working with a DeprecationWarning, and one Sparsity protocol is checked the same way everywhere."""

from __future__ import annotations

import ast
import importlib
import re
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsefuse as sf

PACKAGE = Path(sf.__file__).parent
PATH = re.compile(r"\bsparsefuse(?:\.[A-Za-z_]\w*)+")


def named_paths() -> set[str]:
    """Every ``sparsefuse.x.y`` in the library's string constants: error messages, warnings and docstrings."""
    found = set()
    for source in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.update(PATH.findall(node.value))
    return found


def resolve(path: str):
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(path)


@pytest.mark.parametrize("path", sorted(named_paths()))
def test_every_path_the_library_names_resolves(path):
    assert resolve(path) is not None


def test_compact_is_the_function_and_compaction_the_module():
    assert callable(sf.compact) and sf.compact is sf.compaction.compact
    assert sf.sparse_state_dict is sf.serialization.sparse_state_dict
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("sparsefuse.compact")


# ------------------------------------------------------------------------------------------ policy names
def _conv():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


NAMED = [
    ("granularity", sf.masks.GRANULARITIES, sf.masks.Granularity),
    ("scorer", sf.scorers.SCORERS, sf.scorers.Scorer),
    ("growth", sf.growth.GROWTHS, sf.growth.Growth),
    ("distribution", sf.distribution.DISTRIBUTIONS, object),
    ("regrow_init", sf.growth.REGROW_INITS, object),
]


@pytest.mark.parametrize("role, names, base", NAMED)
def test_each_name_builds_the_policy_its_object_would(role, names, base):
    for name, policy in names.items():
        model, opt = _conv()
        by_name = sf.DynamicSparsity(model, opt, density=0.5, **{role: name}, seed=1)
        model2, opt2 = _conv()
        model2.load_state_dict(model.state_dict())
        obj = policy() if isinstance(policy, type) else policy
        assert isinstance(obj, base)
        by_object = sf.DynamicSparsity(model2, opt2, density=0.5, **{role: obj}, seed=1)
        assert all(torch.equal(by_name.masks[n], by_object.masks[n]) for n in by_name.target_names), name


@pytest.mark.parametrize("role, names, base", NAMED)
def test_an_unknown_name_lists_the_valid_ones(role, names, base):
    model, opt = _conv()
    with pytest.raises(ValueError, match=rf"unknown {role} 'nope': use one of {re.escape(str(sorted(names)))}"):
        sf.DynamicSparsity(model, opt, **{role: "nope"})


@pytest.mark.parametrize(
    "role, cls", [("granularity", sf.masks.Kernel), ("scorer", sf.scorers.L1), ("growth", sf.growth.Gradient)]
)
def test_a_class_instead_of_an_instance_is_refused(role, cls):
    model, opt = _conv()
    with pytest.raises(TypeError, match=rf"{role} must be an instance, got the class {cls.__name__}"):
        sf.DynamicSparsity(model, opt, **{role: cls})


def test_schedules_take_objects_only_and_say_why():
    model, opt = _conv()
    with pytest.raises(TypeError, match="schedules take no names: each needs `every` and `drop_fraction`"):
        sf.DynamicSparsity(model, opt, schedule="cosine")
    with pytest.raises(TypeError, match="must be an instance, got the class CosineDecay"):
        sf.DynamicSparsity(model, opt, schedule=sf.schedules.CosineDecay)


def test_user_callables_are_policies_too():
    def halves(shapes, density):
        return {name: 0.5 for name in shapes}

    def ones(weight, generator):
        weight.fill_(1.0)

    model, opt = _conv()
    sparsity = sf.DynamicSparsity(model, opt, density=0.9, distribution=halves, regrow_init=ones)
    assert sparsity.density() == pytest.approx(0.5, abs=0.02)
    assert sf.distribution.layer_densities({"a": (4, 4)}, 0.3, halves) == {"a": 0.5}


# ------------------------------------------------------------------------------------------- deprecations
@pytest.mark.parametrize(
    "module, old, new",
    [(sf.scorers, "Random", sf.scorers.RandomDrop), (sf.growth, "Random", sf.growth.RandomGrowth)],
)
def test_old_random_names_warn_and_give_the_new_classes(module, old, new):
    with pytest.warns(DeprecationWarning, match=rf"{module.__name__}.Random is deprecated.*use .*{new.__name__}"):
        assert getattr(module, old) is new
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        module.Nope  # noqa: B018


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["constant", "cosine", "linear"]),
    fraction=st.floats(0.01, 1.0),
    step=st.integers(0, 200),
)
def test_alpha_keyword_still_works_and_warns(kind, fraction, step):
    cls = {"constant": sf.schedules.Constant, "cosine": sf.schedules.CosineDecay, "linear": sf.schedules.Linear}[kind]
    extra = {} if kind == "constant" else {"total_steps": 100}
    with pytest.warns(DeprecationWarning, match=rf"{cls.__name__}\(alpha=\.\.\.\) is deprecated.*drop_fraction="):
        old = cls(every=3, alpha=fraction, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = cls(every=3, drop_fraction=fraction, **extra)
    assert old.fraction(step) == new.fraction(step) and repr(old) == repr(new)


def test_alpha_and_drop_fraction_together_are_refused():
    with pytest.raises(TypeError, match="got both alpha= and drop_fraction="):
        sf.schedules.Constant(every=1, alpha=0.5, drop_fraction=0.5)


# ------------------------------------------------------------------------------------- the Sparsity protocol
class WeightMasks:
    """A minimal Sparsity from elsewhere: weight-shaped masks, element groups."""

    def __init__(self, masks):
        self.masks = masks
        self.target_names = tuple(masks)

    def weight_mask(self, name):
        return self.masks[name]

    def granularity_of(self, name):
        return sf.masks.Element()


USES = {
    "count_params": lambda model, s: sf.count_params(model, s),
    "count_flops": lambda model, s: sf.count_flops(model, (1, 4, 5, 5), s),
    "compact": lambda model, s: sf.compact(model, s),
    "compaction_plan": lambda model, s: sf.compaction_plan(model, s),
    "sparse_state_dict": lambda model, s: sf.sparse_state_dict(model, s),
}


@pytest.mark.parametrize("member", ["target_names", "masks", "weight_mask", "granularity_of"])
@pytest.mark.parametrize("use", sorted(USES))
def test_a_sparsity_missing_one_member_is_refused_by_name(use, member):
    model, _ = _conv()
    masks = {"0.weight": torch.rand(8, 4, 3, 3) > 0.5}
    members = {
        "target_names": tuple(masks),
        "masks": masks,
        "weight_mask": lambda self, name: masks[name],
        "granularity_of": lambda self, name: sf.masks.Element(),
    }
    USES[use](model, type("Complete", (), members)())
    del members[member]
    with pytest.raises(TypeError, match=rf"the sparsefuse.Sparsity protocol.*; Partial lacks {member}$"):
        USES[use](model, type("Partial", (), members)())


@pytest.mark.parametrize("use", sorted(USES))
def test_every_function_taking_a_sparsity_accepts_any_and_refuses_alike(use):
    model, _ = _conv()
    masks = {name: torch.rand(p.shape) > 0.5 for name, p in model.named_parameters() if name.endswith("weight")}
    USES[use](model, WeightMasks(masks))
    with pytest.raises(TypeError, match=r"the sparsefuse.Sparsity protocol.*dict lacks target_names, masks"):
        USES[use](model, masks)
    with pytest.raises(ValueError, match=r"\['9.weight'\], which are not parameters of this model"):
        USES[use](model, WeightMasks({"9.weight": masks["0.weight"]}))
    with pytest.raises(ValueError, match=r"weight_mask\('0.weight'\) has shape \(8,\) but the weight has shape"):
        USES[use](model, WeightMasks({"0.weight": torch.ones(8, dtype=torch.bool)}))
