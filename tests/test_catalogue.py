"""The catalogue (built-ins + entry points, fail-soft, strict, env switches, duplicates,
misspelled hooks, tracing) and the run manager (single-answer hooks, config order).

Entry points come from a fake installed distribution: a ``fakedist-1.0.dist-info`` folder with
``METADATA`` and ``entry_points.txt`` next to the plugin modules, put on ``sys.path``.
"""

import importlib
import sys
import textwrap
import warnings

import attrs
import pytest

from sparsefw import config
from sparsefw.engine import Trainer
from sparsefw.hookspecs import hookimpl
from sparsefw.plugins import (
    PluginLoadError,
    PluginLoadWarning,
    build_run,
    load_catalogue,
)
from sparsefw.registry import DuplicateNameError, Registry

ENV = ("SPARSEFW_DISABLE_PLUGIN_AUTOLOAD", "SPARSEFW_PLUGINS", "SPARSEFW_STRICT_PLUGINS",
       "SPARSEFW_TRACE")

GOOD = '''
"""A working third-party plugin: a ``fake_ramp`` schedule."""
import attrs
from sparsefw.hookspecs import hookimpl

CALLS = []

@attrs.frozen
class RampConfig:
    value: str = "fake_ramp"
    scale: float = 1.0

@attrs.define(eq=False)
class Ramp:
    """Linear ramp from 0 to scale."""
    cfg: RampConfig

    @hookimpl
    def sparsefw_schedule(self, state):
        CALLS.append(state.step)
        return {self.cfg.value: self.cfg.scale * state.step / max(state.total_steps, 1)}

@hookimpl
def sparsefw_register(registry):
    registry.add("schedule", "fake_ramp", config=RampConfig, factory=Ramp)
'''
BROKEN = '''
import sparsefw_no_such_module  # noqa: F401
'''
DUPLICATE = '''
import attrs
from sparsefw.hookspecs import hookimpl

@attrs.define
class Cos:
    """Another cosine."""
    cfg: object = None

    @hookimpl
    def sparsefw_schedule(self, state):
        return {"other_cosine": 0.5}

@hookimpl
def sparsefw_register(registry):
    registry.add("schedule", "cosine", factory=Cos)
'''
TYPO = '''
from sparsefw.hookspecs import hookimpl

@hookimpl
def sparsefw_topolgy_update(state):
    return None

@hookimpl
def sparsefw_register(registry):
    registry.add("schedule", "fake_typo", factory=lambda cfg: None)
'''
MODULES = {"fake_good": GOOD, "fake_broken": BROKEN, "fake_dup": DUPLICATE, "fake_typo": TYPO}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fakedist(tmp_path, monkeypatch):
    """Install ``fakedist 1.0`` on the path with the given entry points (default: good and
    broken). Returns the plugin module names it declares."""

    def install(*names: str) -> list[str]:
        names = names or ("fake_good", "fake_broken")
        info = tmp_path / "fakedist-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakedist\nVersion: 1.0\n")
        lines = [f"{n} = sparsefw_test_{n}" for n in names]
        (info / "entry_points.txt").write_text("[sparsefw]\n" + "\n".join(lines) + "\n")
        for n in names:
            (tmp_path / f"sparsefw_test_{n}.py").write_text(textwrap.dedent(MODULES[n]))
            monkeypatch.delitem(sys.modules, f"sparsefw_test_{n}", raising=False)
        monkeypatch.syspath_prepend(str(tmp_path))
        importlib.invalidate_caches()
        return list(names)

    yield install
    for n in MODULES:
        sys.modules.pop(f"sparsefw_test_{n}", None)
    importlib.invalidate_caches()


def load_quietly(**kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cat = load_catalogue(**kwargs)
    return cat, [w for w in caught if issubclass(w.category, PluginLoadWarning)]


# ------------------------------------------------------------------------------ entry points
def test_working_and_broken_entry_points(fakedist, tmp_path, make_config):
    names = fakedist()
    cat, warned = load_quietly(autoload=True, only=names)
    (w,) = warned
    text = str(w.message)
    assert "'fake_broken'" in text and "fakedist 1.0" in text and "sparsefw_no_such_module" in text
    assert cat.failures == [text]
    entry = cat.registry.get("schedule", "fake_ramp")
    assert entry.source == "fakedist (fake_good)" and entry.version == "1.0"
    assert cat.sources["fake_good"] == ("fakedist", "1.0")
    assert "fake_broken" not in cat.sources

    # usable from a config, and a run trains with it
    _, raw = make_config(train={"epochs": 1})
    raw["schedule"] = [{"name": "fake_ramp", "value": "ramp", "scale": 2.0}]
    cfg = config.structure(raw, cat.registry, "fake.toml")
    trainer = Trainer(cfg, cat, run_dir=tmp_path / "run")
    metrics = trainer.fit()
    module = sys.modules["sparsefw_test_fake_good"]
    assert module.CALLS == list(range(trainer.state.total_steps))
    assert trainer.state.values["ramp"] == pytest.approx(2.0 * 3 / 4)
    assert 0.0 <= metrics["test/acc"] <= 1.0


def test_strict_mode_raises(fakedist, monkeypatch):
    names = fakedist()
    with pytest.raises(PluginLoadError, match="fake_broken.*fakedist"):
        load_catalogue(autoload=True, only=names, strict=True)
    monkeypatch.setenv("SPARSEFW_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="fake_broken"):
        load_catalogue(autoload=True, only=names)
    # an explicit strict=False wins over the environment
    _, warned = load_quietly(autoload=True, only=names, strict=False)
    assert len(warned) == 1


def test_disable_autoload(fakedist, monkeypatch):
    fakedist()
    monkeypatch.setenv("SPARSEFW_DISABLE_PLUGIN_AUTOLOAD", "1")
    cat, warned = load_quietly()
    assert warned == [] and "fake_ramp" not in cat.registry.names("schedule")
    assert "cosine" in cat.registry.names("schedule")  # built-ins still there
    cat, _ = load_quietly(autoload=False)
    assert "fake_ramp" not in cat.registry.names("schedule")


def test_only_named_plugins(fakedist, monkeypatch):
    fakedist()
    monkeypatch.setenv("SPARSEFW_PLUGINS", " fake_good ,")
    cat, warned = load_quietly()
    assert warned == []
    assert "fake_ramp" in cat.registry.names("schedule")
    monkeypatch.setenv("SPARSEFW_PLUGINS", "fake_broken")
    cat, warned = load_quietly()
    assert len(warned) == 1 and "fake_ramp" not in cat.registry.names("schedule")


def test_a_name_clash_breaks_nothing_until_the_bare_name_is_selected(fakedist, tmp_path):
    names = fakedist("fake_dup", "fake_good")
    cat, warned = load_quietly(autoload=True, only=names)
    (w,) = warned  # one warning, naming both sources and the qualified names
    text = str(w.message)
    assert "'cosine'" in text and "sparsefw_plugins.schedule.basic" in text
    assert "fakedist (fake_dup)" in text and "'fakedist:cosine'" in text
    assert "fake_ramp" in cat.registry.names("schedule")  # the rest of the plugin set loads
    # a config that does not use the name trains as before
    raw = config.read_toml("configs/quickstart.toml")
    raw = config.merge_tables(raw, {"train": {"epochs": 1, "max_steps": 2},
                                    "logging": {"observers": ["jsonl"]}})
    cfg = config.structure(raw, cat.registry, source="quickstart.toml")
    Trainer(cfg, cat, run_dir=tmp_path / "run").fit()
    # selecting the bare name is a clear error; the qualified names select either
    with pytest.raises(config.ConfigError) as err:
        config.structure({"schedule": [{"name": "cosine"}]}, cat.registry, source="c.toml")
    msg = str(err.value)
    assert "registered by several plugins" in msg and "'sparsefw:cosine'" in msg
    assert "'fakedist:cosine'" in msg
    ours = config.structure({"schedule": [{"name": "sparsefw:cosine"}]}, cat.registry)
    theirs = config.structure({"schedule": [{"name": "fakedist:cosine"}]}, cat.registry)
    assert cat.registry.get("schedule", ours.schedule[0].name).source == "sparsefw"
    assert cat.registry.get("schedule", theirs.schedule[0].name).source.startswith("fakedist")


def test_sparsefw_disable_leaves_plugins_out(fakedist, monkeypatch):
    names = fakedist("fake_dup", "fake_good")
    monkeypatch.setenv("SPARSEFW_DISABLE", "fake_dup,sparsefw_plugins.perturb.sam")
    cat, warned = load_quietly(autoload=True, only=names)
    assert warned == []
    assert "sam" not in cat.registry.names("perturb")
    assert cat.registry.get("schedule", "cosine").source == "sparsefw"
    monkeypatch.setenv("SPARSEFW_DISABLE", "fakedist")
    cat, _ = load_quietly(autoload=True, only=names)
    assert "fake_ramp" not in cat.registry.names("schedule")


def test_misspelled_hook_is_caught_and_warned(fakedist):
    names = fakedist("fake_typo", "fake_good")
    cat, warned = load_quietly(autoload=True, only=names)
    (w,) = warned
    assert "sparsefw_topolgy_update" in str(w.message) and "fakedist" in str(w.message)
    assert "fake_typo" not in cat.registry.names("schedule")  # the plugin was not registered
    assert "fake_ramp" in cat.registry.names("schedule")  # the others still load


def test_registry_rejects_duplicates_and_bad_slots():
    reg = Registry()

    @attrs.define
    class A:
        """First line."""

        cfg: object

        @hookimpl
        def sparsefw_schedule(self, state):
            return {}

        @hookimpl
        def sparsefw_perturb(self, state):
            return None

    reg.add("schedule", "a", factory=A)
    assert reg.get("schedule", "a").summary == "First line."
    reg.source = "otherdist (other)"
    with pytest.raises(DuplicateNameError, match=r"by sparsefw .* and by otherdist \(other\)"):
        reg.add("schedule", "a", factory=A)
    reg.add("perturb", "a", factory=A)  # the same name in another slot is fine
    with pytest.raises(ValueError, match="unknown slot 'schedules'"):
        reg.add("schedules", "b", factory=A)
    with pytest.raises(TypeError, match="attrs class"):
        reg.add("schedule", "b", config=dict, factory=A)
    with pytest.raises(KeyError, match="choices: a"):
        reg.get("schedule", "b")
    assert reg.by_slot()["perturb"][0].name == "a"


def test_listing_is_sorted(catalogue):
    for slot, entries in catalogue.registry.by_slot().items():
        assert [e.name for e in entries] == sorted(e.name for e in entries), slot


# ------------------------------------------------------------------------------ run manager
CALLS: list[str] = []


@attrs.frozen
class TagConfig:
    tag: str = "?"


@attrs.define(eq=False)
class RecordGradient:
    """Records its tag when asked to correct gradients."""

    cfg: TagConfig

    @hookimpl
    def sparsefw_gradient_correct(self, state):
        CALLS.append(f"grad:{self.cfg.tag}")


@attrs.define(eq=False)
class RecordPerturb:
    """Records its tag when asked for a perturbation."""

    cfg: TagConfig

    @hookimpl
    def sparsefw_perturb(self, state):
        CALLS.append(f"perturb:{self.cfg.tag}")


@attrs.define(eq=False)
class SneakyInit:
    """A gradient correction that also answers mask_init (not allowed next to mask_init)."""

    cfg: TagConfig

    @hookimpl
    def sparsefw_mask_init(self, state, batches):
        return {}

    @hookimpl
    def sparsefw_gradient_correct(self, state):
        pass


class RecorderPlugin:
    @hookimpl
    def sparsefw_register(self, registry):
        registry.add("gradient_correct", "record", config=TagConfig, factory=RecordGradient)
        registry.add("gradient_correct", "sneaky_init", config=TagConfig, factory=SneakyInit)
        registry.add("perturb", "record", config=TagConfig, factory=RecordPerturb)


@pytest.fixture(scope="module")
def recorder_catalogue():
    return load_catalogue(autoload=False, extra=[("recorder", RecorderPlugin())])


def test_extra_plugins_are_registered(recorder_catalogue):
    entry = recorder_catalogue.registry.get("gradient_correct", "record")
    assert entry.source == "recorder (recorder)" and entry.config is TagConfig


def test_two_providers_of_a_single_answer_hook(recorder_catalogue, make_config):
    _, raw = make_config()
    raw["gradient_correct"] = [{"name": "sneaky_init"}]
    cfg = config.structure(raw, recorder_catalogue.registry)
    with pytest.raises(config.ConfigError) as info:
        build_run(cfg, recorder_catalogue)
    (problem,) = info.value.problems
    assert "sparsefw_mask_init must have one provider per run, got 2" in problem
    assert "mask_init:random" in problem and "gradient_correct[0]:sneaky_init" in problem


def test_components_run_in_config_order(recorder_catalogue, tmp_path, make_config):
    order = ["z", "a", "m"]
    _, raw = make_config(train={"epochs": 1, "max_steps": 2})
    raw["gradient_correct"] = [{"name": "record", "tag": t} for t in order]
    raw["perturb"] = [{"name": "record", "tag": t} for t in reversed(order)]
    cfg = config.structure(raw, recorder_catalogue.registry)
    run = build_run(cfg, recorder_catalogue)
    plan = run.call_plan()
    assert plan["sparsefw_gradient_correct"] == [f"gradient_correct[{i}]:record" for i in range(3)]
    assert plan["sparsefw_perturb"] == [f"perturb[{i}]:record" for i in range(3)]
    assert plan["sparsefw_mask_init"] == ["mask_init:random"]

    CALLS.clear()
    Trainer(cfg, recorder_catalogue, run_dir=tmp_path).fit()
    one_step = [f"perturb:{t}" for t in reversed(order)] + [f"grad:{t}" for t in order]
    assert CALLS == one_step * 2


def test_trace_prints_hook_calls(monkeypatch, capsys, catalogue, make_config):
    monkeypatch.setenv("SPARSEFW_TRACE", "1")
    cfg, _ = make_config(schedule=[{"name": "constant", "value": "x", "constant": 0.5}])
    run = build_run(cfg, catalogue)
    assert run.hook.sparsefw_schedule(state=None) == [{"x": 0.5}]
    err = capsys.readouterr().err
    assert "sparsefw_schedule" in err
    monkeypatch.delenv("SPARSEFW_TRACE")
    run = build_run(cfg, catalogue)
    run.hook.sparsefw_schedule(state=None)
    assert "sparsefw_schedule" not in capsys.readouterr().err


@attrs.define(eq=False)
class TypoComponent:
    """A component whose hook name is misspelled."""

    cfg: TagConfig

    @hookimpl
    def sparsefw_gradient_corect(self, state):
        pass


class TypoPlugin:
    @hookimpl
    def sparsefw_register(self, registry):
        registry.add("gradient_correct", "typo", config=TagConfig, factory=TypoComponent)
        registry.add("perturb", "fine", config=TagConfig, factory=RecordPerturb)


def test_misspelled_component_hook_is_caught_at_registration():
    cat, warned = load_quietly(autoload=False, extra=[("typos", TypoPlugin())])
    (w,) = warned
    assert "sparsefw_gradient_corect (did you mean sparsefw_gradient_correct?)" in str(w.message)
    assert "plugin typos" in str(w.message)
    # the component is rejected, the plugin's valid components load
    assert "typo" not in cat.registry.names("gradient_correct")
    assert "fine" in cat.registry.names("perturb")
    # a config that selects it is told why
    with pytest.raises(config.ConfigError, match=r"did you mean sparsefw_gradient_correct\?\).*"
                                                 r"rejected when registered"):
        config.structure({"gradient_correct": [{"name": "typo"}]}, cat.registry)
    with pytest.raises(PluginLoadError, match="unknown hook"):
        load_catalogue(autoload=False, extra=[("typos", TypoPlugin())], strict=True)


@attrs.define(eq=False)
class WrongArgument:
    """A topology rule whose hook takes an argument the hook does not pass."""

    cfg: object

    @hookimpl
    def sparsefw_topology_update(self, train_state):
        return None


@attrs.define(eq=False)
class NoHookimpl:
    """A correction whose method lacks @hookimpl: it would never run."""

    cfg: object

    def sparsefw_gradient_correct(self, state):
        pass


class MistakesPlugin:
    @hookimpl
    def sparsefw_register(self, registry):
        from sparsefw.state import UpdateInterval

        registry.add("topology_update", "wrong_arg", config=UpdateInterval, factory=WrongArgument)
        registry.add("gradient_correct", "no_hookimpl", factory=NoHookimpl)


def test_hook_arguments_and_missing_hookimpl_are_rejected_at_registration():
    cat, warned = load_quietly(autoload=False, extra=[("mistakes", MistakesPlugin())])
    text = " ".join(str(w.message) for w in warned)
    assert "takes 'train_state', which hook sparsefw_topology_update does not have" in text
    assert "sparsefw_gradient_correct is defined but not marked @hookimpl" in text
    with pytest.raises(config.ConfigError) as err:
        config.structure({"topology_update": {"name": "wrong_arg"},
                          "gradient_correct": [{"name": "no_hookimpl"}]}, cat.registry,
                         source="mine.toml")
    msg = str(err.value)
    assert "mine.toml: [topology_update] name:" in msg and "'train_state'" in msg
    assert "not marked @hookimpl" in msg
