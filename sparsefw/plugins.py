"""The plugin catalogue (one per process) and the run manager (one per run).

Environment switches:

* ``SPARSEFW_DISABLE_PLUGIN_AUTOLOAD=1`` — load no entry points (built-ins only);
* ``SPARSEFW_PLUGINS=a,b`` — load only these entry points (by entry-point name);
* ``SPARSEFW_DISABLE=a,b`` — load none of these plugins: entry-point names, distribution names
  or built-in module names (``sparsefw_plugins.perturb.sam``), like pytest's ``-p no:NAME``;
* ``SPARSEFW_STRICT_PLUGINS=1`` — a plugin that fails to load raises instead of warning;
* ``SPARSEFW_TRACE=1`` — print every hook call of the run manager to stderr.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import pluggy

from sparsefw import hookspecs
from sparsefw.config import ConfigError, RunConfig, Selected
from sparsefw.registry import EmptyConfig, PluginLoadWarning, Registry
from sparsefw.state import UpdateInterval

ENTRY_POINT_GROUP = "sparsefw"
__all__ = ["Catalogue", "PluginLoadError", "PluginLoadWarning", "RunPlugins", "build_run",
           "load_catalogue", "new_manager"]

def builtin_modules() -> tuple[str, ...]:
    """Built-in plugin modules in registration order: the data and model registries, then each
    sub-package of ``sparsefw_plugins`` in ``PACKAGES`` order with its ``MODULES`` tuple."""
    root = importlib.import_module("sparsefw_plugins")
    mods = ["sparsefw_plugins.builtin_data", "sparsefw_plugins.builtin_models"]
    for pkg in root.PACKAGES:
        sub = importlib.import_module(f"sparsefw_plugins.{pkg}")
        mods.extend(f"sparsefw_plugins.{pkg}.{m}" for m in sub.MODULES)
    return tuple(mods)


#: Hooks whose answer is a single value: at most one provider per run.
SINGLE_ANSWER_HOOKS = ("sparsefw_mask_init", "sparsefw_topology_update")


class PluginLoadError(RuntimeError):
    """A third-party plugin could not be loaded (strict mode)."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def new_manager() -> pluggy.PluginManager:
    """A plugin manager that knows sparsefw's hook specifications."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if _flag("SPARSEFW_TRACE"):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    return pm


@attrs.define(eq=False)
class Catalogue:
    """Every available plugin and the components they registered."""

    pm: pluggy.PluginManager
    registry: Registry
    #: plugin name -> (distribution, version)
    sources: dict[str, tuple[str, str]]
    #: messages of plugins that failed to load
    failures: list[str] = attrs.field(factory=list)


def _sparsefw_version() -> str:
    from sparsefw import __version__

    return __version__


def _entry_points() -> list[md.EntryPoint]:
    return sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def load_catalogue(
    *,
    autoload: bool | None = None,
    only: Sequence[str] | None = None,
    strict: bool | None = None,
    extra: Iterable[tuple[str, Any]] = (),
) -> Catalogue:
    """Register the built-ins, then (unless disabled) each ``sparsefw`` entry point one by one.

    ``extra`` adds ``(name, plugin)`` pairs (for tests and embedding). A broken entry point is
    reported as a :class:`PluginLoadWarning` naming its distribution and skipped, unless
    ``strict`` (then :class:`PluginLoadError`). Duplicate component names always raise.
    """
    autoload = not _flag("SPARSEFW_DISABLE_PLUGIN_AUTOLOAD") if autoload is None else autoload
    disabled = {s.strip() for s in os.environ.get("SPARSEFW_DISABLE", "").split(",") if s.strip()}
    strict = _flag("SPARSEFW_STRICT_PLUGINS") if strict is None else strict
    if only is None and os.environ.get("SPARSEFW_PLUGINS"):
        only = [s.strip() for s in os.environ["SPARSEFW_PLUGINS"].split(",") if s.strip()]
    pm = new_manager()
    cat = Catalogue(pm=pm, registry=Registry(strict=strict), sources={})
    version = _sparsefw_version()

    def fail(what: str, exc: BaseException) -> None:
        if strict:
            raise PluginLoadError(f"sparsefw: plugin {what} failed to load (strict mode): "
                                  f"{exc!r}") from exc
        msg = f"sparsefw: plugin {what} failed to load and is skipped: {exc!r}"
        cat.failures.append(msg)
        warnings.warn(msg, PluginLoadWarning, stacklevel=3)

    def add(name: str, plugin: Any, dist: str, ver: str, what: str) -> None:
        try:
            pm.register(plugin, name=name)
            pm.check_pending()
        except Exception as exc:  # a misspelled hook, a bad signature
            if pm.is_registered(plugin):
                pm.unregister(plugin)
            fail(what, exc)
            return
        cat.sources[name] = (dist, ver)

    for modname in builtin_modules():
        if modname in disabled:
            continue
        add(modname, importlib.import_module(modname), "sparsefw", version, modname)
    for name, plugin in extra:
        add(name, plugin, getattr(plugin, "__name__", name), "", name)
    if autoload:
        for ep in _entry_points():
            if only is not None and ep.name not in only:
                continue
            dist = ep.dist.name if ep.dist else "?"
            if ep.name in disabled or dist in disabled:
                continue
            ver = ep.dist.version if ep.dist else "?"
            what = f"{ep.name!r} ({ep.value}) from distribution {dist} {ver}"
            try:
                plugin = ep.load()
            except Exception as exc:
                fail(what, exc)
                continue
            add(ep.name, plugin, dist, ver, what)

    for impl in pm.hook.sparsefw_register.get_hookimpls():
        dist, ver = cat.sources[impl.plugin_name]
        reg = cat.registry
        reg.source = f"{dist} ({impl.plugin_name})" if dist != "sparsefw" else "sparsefw"
        reg.version = ver
        reg.distribution = dist
        before = (dict(reg.entries), dict(reg.qualified), dict(reg.clashes), dict(reg.rejected))
        try:
            impl.function(registry=reg)
        except Exception as exc:
            if dist == "sparsefw":
                raise
            reg.entries, reg.qualified, reg.clashes, reg.rejected = before
            pm.unregister(name=impl.plugin_name)
            cat.sources.pop(impl.plugin_name, None)
            fail(f"{impl.plugin_name!r} from distribution {f'{dist} {ver}'.strip()}", exc)
    return cat


# ------------------------------------------------------------------------------ run manager
@attrs.define(eq=False)
class Component:
    """One configured component of a run."""

    key: str
    slot: str
    name: str
    instance: Any
    options: Any


@attrs.define(eq=False)
class RunPlugins:
    """The per-run plugin manager holding only the configured components, in config order."""

    pm: pluggy.PluginManager
    components: list[Component]

    @property
    def hook(self):
        return self.pm.hook

    def topology(self) -> Component | None:
        return next((c for c in self.components if c.slot == "topology_update"), None)

    def call_plan(self) -> dict[str, list[str]]:
        """For each hook, the component keys that answer it, in call order."""
        plan = {}
        for name in sorted(n for n in dir(hookspecs) if n.startswith("sparsefw_")):
            if name == "sparsefw_register":
                continue
            impls = getattr(self.pm.hook, name).get_hookimpls()
            plan[name] = [i.plugin_name for i in reversed(impls)]
        return plan

    def value_flow(self) -> list[str]:
        """``"name: producer -> readers"`` per schedule value, from the components'
        declarations (``produces_values``, ``reads_values``); the lifecycle reads
        ``mask_decay`` itself."""
        produced: dict[str, list[str]] = {}
        read: dict[str, list[str]] = {"mask_decay": ["the lifecycle (forward masks' β)"]}
        for comp in self.components:
            for name in getattr(comp.instance, "produces_values", ()):
                produced.setdefault(name, []).append(comp.key)
            for name in getattr(comp.instance, "reads_values", ()):
                read.setdefault(name, []).append(comp.key)
        lines = []
        for name in sorted(set(produced) | {n for n, r in read.items() if r and
                                              (n in produced or n != "mask_decay")}):
            src = ", ".join(produced.get(name, [])) or "not scheduled (readers use their options)"
            dst = ", ".join(read.get(name, [])) or "no component reads it"
            lines.append(f"{name}: {src} -> {dst}")
        return lines

    def states(self, state) -> dict[str, Any]:
        """Every component's ``sparsefw_state_dict`` answer, keyed by component key."""
        out = {}
        for impl in self.pm.hook.sparsefw_state_dict.get_hookimpls():
            value = impl.function(state=state)
            if value is not None:
                out[impl.plugin_name] = value
        return out

    def load_states(self, state, states: dict[str, Any]) -> None:
        """Hand each component the state it saved."""
        for impl in self.pm.hook.sparsefw_load_state_dict.get_hookimpls():
            if impl.plugin_name in states:
                impl.function(state=state, plugin_state=states[impl.plugin_name])


def selected(cfg: RunConfig) -> list[tuple[str, str, Selected]]:
    out = [("mask_init", "mask_init", cfg.mask_init)]
    if cfg.topology_update is not None:
        out.append(("topology_update", "topology_update", cfg.topology_update))
    for slot in ("gradient_correct", "perturb", "schedule"):
        for i, sel in enumerate(getattr(cfg, slot)):
            out.append((f"{slot}[{i}]", slot, sel))
    for name in cfg.logging.observers:
        out.append(("observer", "observer", Selected(name, EmptyConfig())))
    return out


def build_run(cfg: RunConfig, catalogue: Catalogue, *, observers: bool = True) -> RunPlugins:
    """Build each configured component from its options and register it in a fresh manager.

    ``observers=False`` leaves out the observer components (ranks other than 0 of a
    multi-process job log nothing)."""
    components = []
    for prefix, slot, sel in selected(cfg):
        if slot == "observer" and not observers:
            continue
        entry = catalogue.registry.get(slot, sel.name)
        options = sel.options
        if slot == "observer" and not isinstance(options, entry.config):
            options = entry.config()
        if slot == "topology_update" and not isinstance(options, UpdateInterval):
            raise ConfigError(
                [f"topology component {sel.name!r}: its config class must extend "
                 "sparsefw.state.UpdateInterval (every/start/end)"]
            )
        key = f"{prefix}:{sel.name}" if prefix != "observer" else f"observer:{sel.name}"
        components.append(Component(key, slot, sel.name, entry.build(options), options))
    pm = new_manager()
    try:
        for comp in reversed(components):  # last registered is called first
            pm.register(comp.instance, name=comp.key)
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) if exc.plugin is not None else "?"
        raise ConfigError([f"component {name}: {exc}"]) from exc
    problems = []
    for hook in SINGLE_ANSWER_HOOKS:
        keys = [i.plugin_name for i in getattr(pm.hook, hook).get_hookimpls()]
        if len(keys) > 1:
            problems.append(f"{hook} must have one provider per run, got {len(keys)}: {', '.join(keys)}")
    if not pm.hook.sparsefw_mask_init.get_hookimpls():
        problems.append("no component answers sparsefw_mask_init ([mask_init] name)")
    if problems:
        raise ConfigError(problems)
    return RunPlugins(pm=pm, components=components)
