"""Named components, models and data sets, as registered by plugins through ``sparsefw_register``.

A :class:`Registry` holds one :class:`Entry` per ``(slot, name)``; every entry can also be
selected by its qualified name ``distribution:name``. When a plugin from another distribution
registers a name that is already taken, the later one is kept only under its qualified name
(a :class:`NameClashWarning` names both sources) and selecting the bare name is an error
(:class:`NameClashError`); a name registered twice by the same source, or by sparsefw itself,
raises :class:`DuplicateNameError`. A component whose hook implementations do not match the
hook specifications (an unknown hook, an argument the hook does not have, none of its slot's
hooks) is rejected when registered: left out, with the reason kept in
:attr:`Registry.rejected` and reported by ``sparsefw plugins`` and by configs that select it.
Listings are sorted so that registration order never shows.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import attrs

#: Slots whose entries are training components selected by a config section.
COMPONENT_SLOTS = (
    "mask_init",
    "topology_update",
    "gradient_correct",
    "perturb",
    "schedule",
    "observer",
)
#: Every slot: the component slots plus the model and data-set registries.
SLOTS = (*COMPONENT_SLOTS, "model", "dataset")
#: the hook a component of each slot must implement (observers: any observer hook)
SLOT_HOOKS = {
    "mask_init": ("sparsefw_mask_init",),
    "topology_update": ("sparsefw_topology_update",),
    "gradient_correct": ("sparsefw_gradient_correct",),
    "perturb": ("sparsefw_perturb",),
    "schedule": ("sparsefw_schedule",),
    "observer": ("sparsefw_run_start", "sparsefw_step_end", "sparsefw_eval_end",
                 "sparsefw_run_end", "sparsefw_epoch_start", "sparsefw_epoch_end",
                 "sparsefw_evaluate"),
}


@attrs.frozen
class EmptyConfig:
    """Configuration of a component that takes no options."""


class DuplicateNameError(ValueError):
    """The same source (or sparsefw itself) registered one name twice in one slot."""


class NameClashError(KeyError):
    """A config selects a bare name that two distributions register."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PluginLoadWarning(UserWarning):
    """A third-party plugin (or one of its components) could not be loaded; the run goes on
    without it."""


class NameClashWarning(PluginLoadWarning):
    """A plugin registered a name another distribution already has; it is kept only under its
    qualified name."""


class ComponentRejected(ValueError):
    """A built-in component's hook implementations do not match the hook specifications."""


class RejectedComponentWarning(PluginLoadWarning):
    """A plugin's component was left out: its hooks do not match the specifications."""


def _hookimpls(factory: Any):
    """``(attribute, hook name, function)`` of every ``@hookimpl`` method of a class."""
    from sparsefw import hookspecs

    for attr in dir(factory):
        if attr.startswith("__"):
            continue
        fn = getattr(factory, attr, None)
        opts = getattr(fn, f"{hookspecs.PROJECT}_impl", None)
        if isinstance(opts, dict):
            yield attr, opts.get("specname") or attr, fn


def _required_args(fn: Callable) -> list[str]:
    """Arguments pluggy passes to a hook implementation: those without defaults, but self."""
    params = list(inspect.signature(fn).parameters.values())
    return [p.name for p in params
            if p.name != "self" and p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def hook_problems(factory: Any, slot: str | None = None) -> list[str]:
    """What is wrong with the ``@hookimpl`` methods of a component class: hooks that match no
    specification (with a "did you mean"), arguments a hook does not have, and — for a
    component ``slot`` — none of the slot's hooks implemented (a method without ``@hookimpl``
    never runs)."""
    if not isinstance(factory, type):
        return []
    from sparsefw import hookspecs

    out, implemented = [], set()
    for attr, spec, fn in _hookimpls(factory):
        spec_fn = getattr(hookspecs, spec, None)
        if not hasattr(spec_fn, f"{hookspecs.PROJECT}_spec"):
            close = difflib.get_close_matches(spec, dir(hookspecs), n=1)
            out.append(f"unknown hook {spec}{f' (did you mean {close[0]}?)' if close else ''}")
            continue
        implemented.add(spec)
        valid = [a for a in inspect.signature(spec_fn).parameters]
        bad = [a for a in _required_args(fn) if a not in valid]
        if bad:
            out.append(f"{attr} takes {', '.join(repr(b) for b in bad)}, which hook {spec} does "
                       f"not have (its arguments: {', '.join(valid)})")
    wanted = SLOT_HOOKS.get(slot or "", ())
    if wanted and not implemented & set(wanted):
        plain = [h for h in wanted if callable(getattr(factory, h, None))]
        hint = (f"; {plain[0]} is defined but not marked @hookimpl" if plain else "")
        out.append(f"implements none of its slot's hooks ({', '.join(wanted)}){hint}")
    return out


def unknown_hooks(factory: Any) -> list[str]:
    """Names of ``@hookimpl`` methods of a component class that match no hook specification
    (a misspelled hook would otherwise only fail when a run selects the component)."""
    return [p.removeprefix("unknown hook ") for p in hook_problems(factory)
            if p.startswith("unknown hook ")]


@attrs.frozen
class Entry:
    """One registered thing: its slot, name, frozen attrs config class, factory and source."""

    slot: str
    name: str
    config: type
    factory: Callable[[Any], Any]
    source: str
    version: str
    module: str
    summary: str

    def build(self, cfg: Any) -> Any:
        """Build the component (or model, or data set) from its config instance."""
        return self.factory(cfg)


@attrs.define
class Registry:
    """What plugins add to. ``source``/``version`` name the plugin being registered."""

    entries: dict[tuple[str, str], Entry] = attrs.field(factory=dict)
    source: str = "sparsefw"
    version: str = ""
    #: the distribution of the plugin being registered (qualified names: ``dist:name``)
    distribution: str = "sparsefw"
    #: ``(slot, "dist:name")`` -> entry, for every entry (clashing ones only here)
    qualified: dict[tuple[str, str], Entry] = attrs.field(factory=dict)
    #: ``(slot, name)`` -> the sources that registered it, when distributions clash
    clashes: dict[tuple[str, str], list[str]] = attrs.field(factory=dict)
    #: ``(slot, name)`` -> why the component was rejected when registered
    rejected: dict[tuple[str, str], str] = attrs.field(factory=dict)
    #: raise instead of rejecting with a warning (strict plugin loading)
    strict: bool = False

    def add(
        self,
        slot: str,
        name: str,
        *,
        config: type = EmptyConfig,
        factory: Callable[[Any], Any],
        summary: str | None = None,
    ) -> None:
        """Register ``factory(config_instance)`` under ``name`` in ``slot``.

        ``config`` must be an attrs class (frozen, with defaults for every optional field);
        ``summary`` defaults to the first line of the factory's docstring.
        """
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {slot!r}; choices: {', '.join(SLOTS)}")
        if not attrs.has(config):
            raise TypeError(f"{slot}.{name}: config must be an attrs class, got {config!r}")
        bad = hook_problems(factory, slot if slot in COMPONENT_SLOTS else None)
        if bad:
            where = f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', '?')}"
            why = (f"{slot} component {name!r} ({where}) of plugin {self.source}: "
                   f"{'; '.join(bad)}")
            if self.distribution == "sparsefw" or self.strict:
                raise ComponentRejected(why)
            self.rejected[(slot, name)] = why
            warnings.warn(f"sparsefw: rejected {why}", RejectedComponentWarning, stacklevel=3)
            return
        key = (slot, name)
        qualified = (slot, f"{self.distribution}:{name}")
        entry = self._entry(slot, name, config, factory, summary)
        if key in self.entries:
            old = self.entries[key]
            if old.source == self.source or self.distribution == "sparsefw":
                raise DuplicateNameError(
                    f"{slot} component {name!r} is registered twice: by {old.source} "
                    f"({old.module}) and by {self.source} ({factory.__module__})"
                )
            sources = self.clashes.setdefault(key, [f"{old.source} ({old.module})"])
            sources.append(f"{self.source} ({factory.__module__})")
            old_q = next(q for (s_, q), e in self.qualified.items() if e is old and s_ == slot)
            warnings.warn(
                f"sparsefw: {slot} component {name!r} of {self.source} ({factory.__module__}) "
                f"clashes with {old.source} ({old.module}); the later is skipped under the bare "
                f"name: select {old_q!r} or {qualified[1]!r}", NameClashWarning, stacklevel=3)
            self.qualified[qualified] = entry
            return
        self.entries[key] = entry
        self.qualified[qualified] = entry

    def _entry(self, slot, name, config, factory, summary) -> Entry:
        doc = (summary or (factory.__doc__ or "").strip().splitlines() or [""])[0]
        return Entry(
            slot=slot,
            name=name,
            config=config,
            factory=factory,
            source=self.source,
            version=self.version,
            module=getattr(factory, "__module__", "?"),
            summary=doc if isinstance(doc, str) else str(doc),
        )

    def get(self, slot: str, name: str) -> Entry:
        """The entry for a bare or qualified (``dist:name``) name; :class:`NameClashError` for
        a bare name two distributions register; ``KeyError`` listing the choices (and why a
        component of that name was rejected) otherwise."""
        if (slot, name) in self.clashes:
            options = [q for (s_, q), e in self.qualified.items()
                       if s_ == slot and q.split(":", 1)[1] == name]
            raise NameClashError(
                f"{slot} {name!r} is registered by several plugins: "
                f"{'; '.join(self.clashes[(slot, name)])}; select one by its qualified name: "
                f"{', '.join(repr(o) for o in options)}")
        entry = self.entries.get((slot, name)) or self.qualified.get((slot, name))
        if entry is not None:
            return entry
        if (slot, name) in self.rejected:
            raise KeyError(f"{self.rejected[(slot, name)]} (rejected when registered)")
        raise KeyError(
            f"unknown {slot} {name!r}; choices: {', '.join(self.names(slot)) or '(none)'}"
        ) from None

    def names(self, slot: str) -> list[str]:
        """Sorted names registered in ``slot``."""
        return sorted(n for (s, n) in self.entries if s == slot)

    def by_slot(self) -> dict[str, list[Entry]]:
        """Every entry grouped by slot, slots in :data:`SLOTS` order, names sorted."""
        return {s: [self.entries[(s, n)] for n in self.names(s)] for s in SLOTS}
