"""The plugin contract suite (sparsefw.testing.contract): every registered built-in component
passes it, and deliberately broken toy components fail it with messages that say what is wrong.
"""

from __future__ import annotations

import sys
from pathlib import Path

import attrs
import pytest
import torch
from hypothesis import given, settings

from sparsefw.hookspecs import hookimpl
from sparsefw.plugins import load_catalogue
from sparsefw.registry import EmptyConfig, Entry, Registry
from sparsefw.state import Perturbation, TopologyChange, UpdateInterval
from sparsefw.testing import contract
from sparsefw.testing import strategies as sst
from sparsefw.testing.contract import ComponentContract, ContractError

EXAMPLE_SRC = Path(__file__).resolve().parent.parent / "examples" / "sparsefw-example" / "src"
if str(EXAMPLE_SRC) not in sys.path:
    sys.path.insert(0, str(EXAMPLE_SRC))
import sparsefw_example.plugin as example_plugin  # noqa: E402

#: harness settings for N:M components: forward masks at the 2:4 pattern's density
NM = {"mask_kind": "forward", "density": 0.5, "other_densities": (), "options": {"n": 2, "m": 4}}
#: Harness needs of built-in components that do not (yet) declare ``contract_hints`` on their
#: class. A component's own ``contract_hints`` is read first; these are merged over it.
BUILTIN_HINTS: dict[tuple[str, str], dict] = {
    # the dense baseline keeps every weight, whatever the density
    ("mask_init", "dense"): {"exact_counts": False},
    # SNIP and GraSP keep the top scores under one global threshold (their papers' definition)
    ("mask_init", "snip"): {"exact_counts": False},
    ("mask_init", "grasp"): {"exact_counts": False},
    # N:M components: forward masking, an N:M pattern instead of the density allocation
    ("mask_init", "nm"): {**NM, "exact_counts": False},
    ("topology_update", "nm"): {**NM, "keeps_counts": False, "keeps_total": False},
    ("gradient_correct", "srste"): {**NM, "options": {}},
    ("schedule", "mask_decay"): {**NM, "options": {}},
    ("schedule", "structure_decay"): {
        **NM, "skip_checks": {"in_trainer": "runs only with [topology_update] name = 'nm'"}},
    # PGD's default budgets are in pixel units; the synthetic data set has no pixel range
    ("perturb", "pgd"): {"options": {"units": "input"}},
}

CATALOGUE = load_catalogue(autoload=False)
ENTRIES = contract.entries(CATALOGUE)


@pytest.mark.parametrize("entry", ENTRIES, ids=[f"{e.slot}:{e.name}" for e in ENTRIES])
def test_builtin_component_passes_contract(entry):
    ran = contract.check_component(entry, **BUILTIN_HINTS.get((entry.slot, entry.name), {}))
    assert "check_config" in ran and "check_registration" in ran


MODEL_DATA = contract.entries(CATALOGUE, slots=("model", "dataset"))


@pytest.mark.parametrize("entry", MODEL_DATA, ids=[f"{e.slot}:{e.name}" for e in MODEL_DATA])
def test_model_and_dataset_configs_round_trip(entry):
    contract.check_config(entry)


def test_every_component_slot_has_checks():
    from sparsefw.registry import COMPONENT_SLOTS

    for slot in COMPONENT_SLOTS:
        assert len(contract.checks_for(slot)) > 2, slot


# ------------------------------------------------------------------------------ the base class
class TestExampleRewireContract(ComponentContract):
    plugin = example_plugin
    slot = "topology_update"
    name = "random_rewire"


class TestExampleRampContract(ComponentContract):
    plugin = example_plugin
    slot = "schedule"
    name = "linear_ramp"
    hints = {"ranges": {"drop_fraction": (0.0, 0.3)}}


@settings(max_examples=10)
@given(model=sst.small_models(), density=sst.densities(min_value=0.05), seed=sst.seeds())
def test_example_rewire_property(model, density, seed):
    """random_rewire on drawn models and densities: the contract holds at every draw, and no
    layer drops more than round(0.3 · active)."""
    entry = contract.entry_from_plugin(example_plugin, "topology_update", "random_rewire")
    state = contract.make_state(model=model, density=density, seed=seed)
    active = {n: int(m.sum()) for n, m in state.masks.masks.items()}
    answer = contract.check_topology_step(entry, state)
    for name, n_active in active.items():
        if answer is not None and name in answer.dropped:
            assert int(answer.dropped[name]) <= round(0.3 * n_active)


# ------------------------------------------------------------------------------ broken toys
@attrs.frozen
class TopoCfg(UpdateInterval):
    pass


def _flip(mask: torch.Tensor, drop: int, grow: int) -> torch.Tensor:
    flat = mask.clone().reshape(-1)
    on = torch.nonzero(flat).flatten()
    off = torch.nonzero(~flat).flatten()
    if drop == grow:  # a balanced swap, as far as the layer has room
        drop = grow = min(drop, len(on), len(off))
    flat[on[:drop]] = False
    flat[off[:grow]] = True
    return flat.view_as(mask)


@attrs.define(eq=False)
class GrowsTooMany:
    """Drops 2, grows 3 per layer."""

    cfg: TopoCfg

    @hookimpl
    def sparsefw_topology_update(self, state):
        for n, m in state.masks.masks.items():
            state.masks.update(n, _flip(m, 2, 3))
        return TopologyChange(dropped={n: 2 for n in state.masks.names},
                              grown={n: 3 for n in state.masks.names})


@attrs.define(eq=False)
class EditsInPlace:
    """Swaps entries by writing into the mask tensor."""

    cfg: TopoCfg

    @hookimpl
    def sparsefw_topology_update(self, state):
        for m in state.masks.masks.values():
            m.copy_(_flip(m, 2, 2))
        return TopologyChange(dropped={n: 2 for n in state.masks.names},
                              grown={n: 2 for n in state.masks.names})


@attrs.define(eq=False)
class Miscounts:
    """Swaps 2 entries but reports 5."""

    cfg: TopoCfg

    @hookimpl
    def sparsefw_topology_update(self, state):
        for n, m in state.masks.masks.items():
            state.masks.update(n, _flip(m, 2, 2))
        return TopologyChange(dropped={n: 5 for n in state.masks.names},
                              grown={n: 5 for n in state.masks.names})


@attrs.define(eq=False)
class Silent:
    """Swaps entries and answers None."""

    cfg: TopoCfg

    @hookimpl
    def sparsefw_topology_update(self, state):
        for n, m in state.masks.masks.items():
            state.masks.update(n, _flip(m, 1, 1))


@attrs.define(eq=False)
class Unseeded:
    """Random swaps from the global RNG instead of state.generator."""

    cfg: TopoCfg

    @hookimpl
    def sparsefw_topology_update(self, state):
        out = {}
        for n, m in state.masks.masks.items():
            perm = torch.randperm(m.numel())
            new = m.reshape(-1)[perm].view_as(m).clone()
            state.masks.update(n, new)
            out[n] = (m & ~new).sum()
        return TopologyChange(dropped=out, grown={n: out[n] for n in out})


@attrs.define(eq=False)
class Misspelled:
    """A hook name with a typo."""

    cfg: TopoCfg

    @hookimpl
    def sparsefw_topology_updat(self, state):
        return None


@attrs.define(eq=False)
class AllOnes:
    """Ignores the allocation."""

    cfg: EmptyConfig

    @hookimpl
    def sparsefw_mask_init(self, state, batches):
        return {n: torch.ones_like(p, dtype=torch.bool) for n, p in state.masks.params.items()}


@attrs.define(eq=False)
class MovesWeights:
    """Perturbs the weights itself instead of returning offsets."""

    cfg: EmptyConfig

    @hookimpl
    def sparsefw_perturb(self, state):
        with torch.no_grad():
            for p in state.model.parameters():
                p.add_(0.01)
        return None


@attrs.define(eq=False)
class WrongShapeOffset:
    cfg: EmptyConfig

    @hookimpl
    def sparsefw_perturb(self, state):
        return Perturbation(params={"fc1.weight": torch.zeros(3)})


@attrs.define(eq=False)
class TensorSchedule:
    cfg: EmptyConfig

    @hookimpl
    def sparsefw_schedule(self, state):
        return {"drop_fraction": torch.tensor(0.3)}


@attrs.define(eq=False)
class OverOne:
    cfg: EmptyConfig

    @hookimpl
    def sparsefw_schedule(self, state):
        return {"drop_fraction": 0.5 + state.step / max(state.total_steps, 1)}


@attrs.define(eq=False)
class ReturnsGrads:
    cfg: EmptyConfig

    @hookimpl
    def sparsefw_gradient_correct(self, state):
        return {"oops": 1}


@attrs.define(eq=False)
class ForgetfulState:
    """Saves a counter but does not restore it."""

    cfg: EmptyConfig
    calls: int = 0

    @hookimpl
    def sparsefw_gradient_correct(self, state):
        self.calls += 1

    @hookimpl
    def sparsefw_state_dict(self, state):
        return {"calls": self.calls}

    @hookimpl
    def sparsefw_load_state_dict(self, state, plugin_state):
        pass


@attrs.define
class MutableCfg:
    rate: float = 0.1


@attrs.define(eq=False)
class Plain:
    cfg: MutableCfg

    @hookimpl
    def sparsefw_gradient_correct(self, state):
        return None


@attrs.define(eq=False)
class Crashes:
    cfg: EmptyConfig

    @hookimpl
    def sparsefw_gradient_correct(self, state):
        raise KeyError("needs_something")


class BrokenPlugin:
    """A toy third-party plugin module with one broken component per rule."""

    @staticmethod
    @hookimpl
    def sparsefw_register(registry):
        add = registry.add
        add("topology_update", "grows_too_many", config=TopoCfg, factory=GrowsTooMany)
        add("topology_update", "edits_in_place", config=TopoCfg, factory=EditsInPlace)
        add("topology_update", "miscounts", config=TopoCfg, factory=Miscounts)
        add("topology_update", "silent", config=TopoCfg, factory=Silent)
        add("topology_update", "unseeded", config=TopoCfg, factory=Unseeded)
        add("mask_init", "all_ones", factory=AllOnes)
        add("perturb", "moves_weights", factory=MovesWeights)
        add("perturb", "wrong_shape", factory=WrongShapeOffset)
        add("schedule", "tensor", factory=TensorSchedule)
        add("schedule", "over_one", factory=OverOne)
        add("gradient_correct", "returns", factory=ReturnsGrads)
        add("gradient_correct", "forgetful", factory=ForgetfulState)
        add("gradient_correct", "mutable_cfg", config=MutableCfg, factory=Plain)
        add("gradient_correct", "crashes", factory=Crashes)


BROKEN = [
    ("topology_update", "grows_too_many", contract.check_topology_update,
     r"had \d+ active weights before the update and \d+ after .*must keep each layer's count"),
    ("topology_update", "edits_in_place", contract.check_topology_update,
     r"edited in place.*state\.masks\.update"),
    ("topology_update", "miscounts", contract.check_topology_update,
     r"reports 5 dropped weights in .*, but 2 positions that were active changed"),
    ("topology_update", "silent", contract.check_topology_update,
     r"returned None but changed the masks"),
    ("topology_update", "unseeded", contract.check_topology_update,
     r"same seed .*state\.generator"),
    ("mask_init", "all_ones", contract.check_mask_init,
     r"got \d+ active weights at density .* its allocation is \d+"),
    ("perturb", "moves_weights", contract.check_perturb,
     r"changed the weights of .* itself; return offsets in Perturbation\.params"),
    ("perturb", "wrong_shape", contract.check_perturb,
     r"offset of fc1\.weight must be a torch\.float32 tensor of shape \(32, 64\)"),
    ("schedule", "tensor", contract.check_schedule, r"drop_fraction .* is Tensor; .*Python numbers"),
    ("schedule", "over_one", contract.check_schedule,
     r"drop_fraction = 1\.\d+ at step \d+ of 100 is outside its range \[0\.0, 1\.0\]"),
    ("gradient_correct", "returns", contract.check_gradient_correct, r"return None"),
    ("gradient_correct", "forgetful", contract.check_state_dict,
     r"after load_state_dict, state\['calls'\] is 0, saved 2"),
    ("gradient_correct", "mutable_cfg", contract.check_config, r"must be frozen"),
    ("gradient_correct", "crashes", contract.check_gradient_correct,
     r"it raised KeyError: 'needs_something'.*contract_hints"),
]


@pytest.mark.parametrize("slot,name,check,message", BROKEN, ids=[b[1] for b in BROKEN])
def test_broken_toy_component_fails_with_useful_message(slot, name, check, message):
    entry = contract.entry_from_plugin(BrokenPlugin, slot, name, source="broken-toys")
    with pytest.raises(ContractError, match=message) as info:
        check(entry)
    text = str(info.value)
    assert f"{slot} component {name!r}" in text and "broken-toys" in text


def test_misspelled_hook_fails_registration():
    """Registry.add already refuses it; an entry made another way still fails the check."""
    entry = Entry(slot="topology_update", name="misspelled", config=TopoCfg, factory=Misspelled,
                  source="broken-toys", version="", module=__name__, summary="")
    with pytest.raises(ContractError, match=r"unknown hook sparsefw_topology_updat \(did you mean"):
        contract.check_registration(entry)


def test_check_component_fails_on_the_first_broken_rule():
    entry = contract.entry_from_plugin(BrokenPlugin, "topology_update", "grows_too_many")
    with pytest.raises(ContractError, match="topology_update contract"):
        contract.check_component(entry)


def test_skip_hint_skips_with_its_reason():
    entry = contract.entry_from_plugin(BrokenPlugin, "perturb", "moves_weights")
    with pytest.raises(pytest.skip.Exception, match="needs a GPU"):
        contract.check_component(entry, skip="needs a GPU")


def test_hints_declared_on_the_component_class_are_read():
    AllOnes.contract_hints = {"exact_counts": False}
    try:
        entry = contract.entry_from_plugin(BrokenPlugin, "mask_init", "all_ones")
        contract.check_mask_init(entry)
    finally:
        del AllOnes.contract_hints


def test_unknown_hint_is_an_error():
    entry = contract.entry_from_plugin(example_plugin, "schedule", "linear_ramp")
    with pytest.raises(contract.HintError, match="unknown contract hints"):
        contract.check_schedule(entry, exact_count=False)


def test_entries_are_sorted_by_slot_then_name():
    reg = Registry()
    example_plugin.sparsefw_register(registry=reg)
    BrokenPlugin.sparsefw_register(registry=reg)
    names = [(e.slot, e.name) for e in contract.entries(reg)]
    slots = [s for s, _ in names]
    assert slots == sorted(slots, key=["mask_init", "topology_update", "gradient_correct",
                                       "perturb", "schedule", "observer"].index)
    assert ("topology_update", "random_rewire") in names
