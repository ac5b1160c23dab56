"""``[debug] check_plugins``: the silent mistakes of plugin authors stop a run with the
contract's message naming the component, and the built-in methods pass the checks."""

from __future__ import annotations

import attrs
import pytest
import torch

from sparsefw import config as config_mod
from sparsefw.engine import Trainer
from sparsefw.hookspecs import hookimpl
from sparsefw.plugin_checks import PluginCheckError
from sparsefw.plugins import load_catalogue
from sparsefw.state import TopologyChange, UpdateInterval

from .conftest import TINY, merge

RAW = merge(TINY, {"train": {"max_steps": 6}, "sparsity": {"density": 0.3},
                   "debug": {"check_plugins": True}})


@attrs.define(eq=False)
class InPlacePerturb:
    """Edits the weights itself and never restores them."""

    cfg: object

    @hookimpl
    def sparsefw_perturb(self, state):
        with torch.no_grad():
            state.masks.params[state.masks.names[0]].add_(1e-3)
        return None


@attrs.define(eq=False)
class GrowsTooMany:
    """Grows one more weight than it drops."""

    cfg: UpdateInterval

    @hookimpl
    def sparsefw_topology_update(self, state):
        name = state.masks.names[0]
        mask = state.masks.masks[name].clone()
        mask.view(-1)[torch.nonzero(~mask.view(-1))[0]] = True
        state.masks.update(name, mask)
        return TopologyChange(dropped={name: 0}, grown={name: 1})


@attrs.define(eq=False)
class CopiesIntoTheMask:
    """Edits the mask in place (mask.copy_) instead of through masks.update."""

    cfg: UpdateInterval

    @hookimpl
    def sparsefw_topology_update(self, state):
        name = state.masks.names[0]
        mask = state.masks.masks[name]
        flat = mask.view(-1)
        on, off = torch.nonzero(flat)[0], torch.nonzero(~flat)[0]
        new = mask.clone()
        new.view(-1)[on], new.view(-1)[off] = False, True
        mask.copy_(new)
        return TopologyChange(dropped={name: 1}, grown={name: 1})


@attrs.define(eq=False)
class SyncsPerLayer:
    """Reads a count to the host for every layer (a sync per layer per update)."""

    cfg: UpdateInterval

    @hookimpl
    def sparsefw_topology_update(self, state):
        for name in state.masks.names:
            int(state.masks.masks[name].sum().item())
        return None


@attrs.define(eq=False)
class SyncsEveryStep:
    """Logs a Python float every step: a host sync in the step."""

    cfg: object

    @hookimpl
    def sparsefw_gradient_correct(self, state):
        p = state.masks.params[state.masks.names[0]]
        state.metrics["mine/norm"] = float(p.grad.norm())


class Mistakes:
    @hookimpl
    def sparsefw_register(self, registry):
        registry.add("perturb", "in_place", factory=InPlacePerturb)
        registry.add("topology_update", "grows_too_many", config=UpdateInterval,
                     factory=GrowsTooMany)
        registry.add("topology_update", "copies_mask", config=UpdateInterval,
                     factory=CopiesIntoTheMask)
        registry.add("topology_update", "syncs", config=UpdateInterval, factory=SyncsPerLayer)
        registry.add("gradient_correct", "syncs", factory=SyncsEveryStep)


@pytest.fixture(scope="module")
def mistakes_catalogue():
    return load_catalogue(autoload=False, extra=[("mistakes", Mistakes())])


def _fit(catalogue, tmp_path, **over):
    raw = merge(RAW, over)
    cfg = config_mod.structure(raw, catalogue.registry)
    trainer = Trainer(cfg, catalogue, run_dir=tmp_path, raw_config=raw)
    trainer.fit()
    return trainer


EVERY = {"every": 2, "end": 1.0}


@pytest.mark.parametrize("sections, expected", [
    ({"perturb": [{"name": "in_place"}]},
     r"perturb component 'in_place' .* fails the perturb contract: the hook changed the weights "
     r"of \['1.weight'\] itself"),
    ({"topology_update": {"name": "grows_too_many", **EVERY}},
     r"'grows_too_many' .* fails the topology_update contract: at step 0 layer 1.weight .* a "
     r"topology update must keep each layer's count"),
    ({"topology_update": {"name": "copies_mask", **EVERY}},
     r"'copies_mask' .* mask of 1.weight was edited in place.* state.masks.update"),
    ({"topology_update": {"name": "syncs", **EVERY}},
     r"'syncs' .* sparsefw_topology_update read tensors back to the host 2 time\(s\)"),
    ({"gradient_correct": [{"name": "syncs"}]},
     r"gradient_correct component 'syncs' .* read tensors back to the host 1 time\(s\) "
     r"\(__float__ in tests.test_plugin_checks"),
])
def test_each_silent_mistake_stops_the_run(mistakes_catalogue, tmp_path, sections, expected):
    with pytest.raises(PluginCheckError, match=expected):
        _fit(mistakes_catalogue, tmp_path, **sections)
    # without the checks the same run trains on silently
    _fit(mistakes_catalogue, tmp_path / "off", debug={"check_plugins": False}, **sections)


def test_the_environment_switch_turns_the_checks_on(mistakes_catalogue, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFW_CHECK", "1")
    with pytest.raises(PluginCheckError):
        _fit(mistakes_catalogue, tmp_path, debug={"check_plugins": False},
             perturb=[{"name": "in_place"}])


BUILTIN_RUNS = {
    "rigl+s2sam": {"topology_update": {"name": "rigl", **EVERY}, "perturb": [{"name": "s2sam"}]},
    "set+sam": {"topology_update": {"name": "set", **EVERY}, "perturb": [{"name": "sam"}]},
    "dsr": {"topology_update": {"name": "dsr", **EVERY}},
    "snfs+agent": {"topology_update": {"name": "snfs", **EVERY},
                   "gradient_correct": [{"name": "agent"}]},
    "granet": {"topology_update": {"name": "granet", **EVERY}},
    "nm+srste": {"sparsity": {"kind": "forward", "density": 0.5, "distribution": "uniform"},
                 "mask_init": {"name": "nm"},
                 "topology_update": {"name": "nm", "n": 2, "m": 4, "every": 1, "end": 1.0},
                 "gradient_correct": [{"name": "srste"}]},
    "mdgf": {"sparsity": {"kind": "forward", "density": 0.5, "distribution": "uniform"},
             "mask_init": {"name": "nm"},
             "topology_update": {"name": "nm", "n": 2, "m": 4, "every": 1, "end": 1.0},
             "schedule": [{"name": "mask_decay"}]},
}


@pytest.mark.parametrize("run", list(BUILTIN_RUNS))
def test_built_in_methods_pass_the_checks(catalogue, tmp_path, run):
    trainer = _fit(catalogue, tmp_path, **BUILTIN_RUNS[run])
    assert trainer.sparsifier.checker is not None
    assert trainer.state.step == 6
