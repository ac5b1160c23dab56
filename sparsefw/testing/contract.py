"""The plugin contract suite: checks any component (built-in or third-party) against the rules
of :mod:`sparsefw.hookspecs`.

A plugin author runs it from pytest in one of two ways::

    # 1. a base test class: one test per check, named after it
    from sparsefw.testing.contract import ComponentContract
    import my_package.plugin as plugin

    class TestMyRule(ComponentContract):
        plugin = plugin                 # the module with `sparsefw_register`
        slot = "topology_update"
        name = "my_rule"
        config = None                   # None: the config class's defaults
        hints = {}                      # see Hints

    # 2. plain functions
    from sparsefw.testing import contract

    def test_my_rule():
        entry = contract.entry_from_plugin(plugin, "topology_update", "my_rule")
        contract.check_component(entry)

Every check builds a small harness run (:func:`make_state`: a conv + linear model whose layer
sizes are multiples of 16, random masks at a given density, dense gradients in ``.grad``) and
calls the component's hooks through a real pluggy manager, with keyword arguments, as the
engine does. A broken rule fails with a :class:`ContractError` (an ``AssertionError``) whose
message names the component, the check and what to fix.

What is checked, by slot (each check is a function ``check_<what>(entry, config=None, **hints)``):

* every entry: the config class is a frozen attrs class whose defaults build, that round-trips
  through the config converter and holds only TOML-able values (:func:`check_config`);
* every component: it builds from its config, its hook implementations match sparsefw's hook
  specifications and it implements its slot's hook (:func:`check_registration`); it runs in a
  real short training run (:func:`check_in_trainer`); a component with
  ``sparsefw_state_dict`` round-trips its state through ``torch.save`` (:func:`check_state_dict`);
* ``mask_init``: covers every layer with bool masks of the right shape and device, gives each
  layer its allocated count, and is reproducible from ``state.generator`` (:func:`check_mask_init`);
* ``topology_update``: keeps each layer's active count, edits masks only through
  ``MaskSet.update``, reports dropped/grown counts equal to the positions that changed (grown
  positions were inactive, dropped ones active), returns ``None`` only when nothing changed, and
  is reproducible (:func:`check_topology_update`);
* ``perturb``: returns ``None`` or a :class:`~sparsefw.state.Perturbation` of finite offsets of
  the parameters' shapes, never edits weights itself, and the engine's apply/restore leaves the
  weights bit-exact (:func:`check_perturb`);
* ``gradient_correct``: edits ``.grad`` in place, keeps it finite, returns ``None``, leaves
  weights and masks alone (:func:`check_gradient_correct`);
* ``schedule``: returns a ``dict`` of Python numbers with the same names at every step, each in
  its documented range (:data:`KNOWN_RANGES`, or ``hints["ranges"]``) (:func:`check_schedule`);
* ``observer``: survives a whole lifecycle of observer calls (:func:`check_observer`).

A component that needs something the harness does not provide declares it with a class (or
factory) attribute ``contract_hints`` — a dict of :class:`Hints` fields, e.g.
``contract_hints = {"mask_kind": "forward"}`` or ``{"skip": "needs a CUDA device"}`` — so that
sparsefw's own suite, which runs over every registered component, treats it right.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from pluggy import PluginValidationError
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from sparsefw import distributions
from sparsefw.config import (
    CONVERTER,
    LoggingConfig,
    RunConfig,
    Selected,
    SparsityConfig,
    TrainConfig,
)
from sparsefw.engine.checkpoint import SAFE_GLOBALS
from sparsefw.masks import MaskSet, sparsifiable_params, topk_mask
from sparsefw.plugins import new_manager
from sparsefw.registry import COMPONENT_SLOTS, EmptyConfig, Entry, Registry, hook_problems
from sparsefw.registry import SLOT_HOOKS as REGISTRY_SLOT_HOOKS
from sparsefw.state import Perturbation, TopologyChange, TrainState, UpdateInterval

__all__ = [
    "KNOWN_RANGES",
    "SLOT_HOOKS",
    "ComponentContract",
    "ContractError",
    "HintError",
    "Hints",
    "HarnessModel",
    "check_component",
    "check_config",
    "check_gradient_correct",
    "check_in_trainer",
    "check_mask_init",
    "check_observer",
    "check_perturb",
    "check_registration",
    "check_schedule",
    "check_state_dict",
    "check_topology_step",
    "check_topology_update",
    "checks_for",
    "entries",
    "entry_from_plugin",
    "make_state",
]

#: the hook a component of each slot must implement, and the hooks an observer may implement
#: (one definition: :data:`sparsefw.registry.SLOT_HOOKS`)
SLOT_HOOKS = {s: hooks[0] for s, hooks in REGISTRY_SLOT_HOOKS.items() if s != "observer"}
OBSERVER_HOOKS = REGISTRY_SLOT_HOOKS["observer"]

#: ranges of well-known schedule values: name -> (low, high), both inclusive (None: unbounded)
KNOWN_RANGES: dict[str, tuple[float | None, float | None]] = {
    "drop_fraction": (0.0, 1.0),
    "density": (0.0, 1.0),
    "sparsity": (0.0, 1.0),
    "mask_decay": (0.0, 1.0),
    "beta": (0.0, 1.0),
    "rho": (0.0, None),
    "lr_scale": (0.0, None),
}


class ContractError(AssertionError):
    """A component broke the hook contract; the message says which rule and how."""


class HintError(TypeError):
    """The test asked for a contract hint that does not exist."""


@attrs.frozen
class Hints:
    """What a component needs from the harness (``contract_hints`` on its class, or keyword
    arguments of the checks)."""

    #: skip every check, with this reason
    skip: str | None = None
    #: masking kind of the harness run ("hard" or "forward", for N:M/STE components)
    mask_kind: str = "hard"
    #: global density of the harness run
    density: float = 0.5
    #: mask_init/topology_update are also checked at these densities
    other_densities: tuple[float, ...] = (0.1,)
    #: mask_init: each layer gets exactly its allocated count (False: a global-threshold method)
    exact_counts: bool = True
    #: topology_update: each layer keeps its active count
    keeps_counts: bool = True
    #: topology_update: the total over all layers is kept (checked when ``keeps_counts`` is
    #: False, for methods that move weights between layers, like DSR)
    keeps_total: bool = True
    #: schedule values put in ``state.values`` before each hook call
    values: Mapping[str, float] = attrs.field(factory=dict)
    #: schedule: allowed (low, high) per value name, on top of KNOWN_RANGES
    ranges: Mapping[str, tuple[float | None, float | None]] = attrs.field(factory=dict)
    #: checks to leave out, by name ("in_trainer", "determinism", ...), with the reason
    skip_checks: Mapping[str, str] = attrs.field(factory=dict)
    #: run length of the harness state (schedules are probed over it)
    total_steps: int = 100
    #: options for the component's config class, used when no config instance is given
    #: (for a component whose defaults alone cannot run, e.g. ``{"n": 2, "m": 4}``)
    options: Mapping[str, Any] = attrs.field(factory=dict)


def _hints(entry: Entry, overrides: Mapping[str, Any]) -> Hints:
    declared = dict(getattr(entry.factory, "contract_hints", None) or {})
    declared.update(overrides)
    unknown = set(declared) - {a.name for a in attrs.fields(Hints)}
    if unknown:
        raise HintError(f"unknown contract hints {sorted(unknown)}; valid: "
                        f"{', '.join(a.name for a in attrs.fields(Hints))}")
    return Hints(**declared)


def _skip(reason: str) -> None:
    try:
        import pytest
    except ImportError:  # pragma: no cover - plain unittest
        import unittest

        raise unittest.SkipTest(reason) from None
    pytest.skip(reason)


def _who(entry: Entry) -> str:
    return f"{entry.slot} component {entry.name!r} ({entry.module}, {entry.source})"


def _fail(entry: Entry, check: str, message: str) -> ContractError:
    return ContractError(f"{_who(entry)} fails the {check} contract: {message}")


# ------------------------------------------------------------------------------ finding entries
def entry_from_plugin(plugin: Any, slot: str, name: str, *, source: str = "plugin-under-test"
                      ) -> Entry:
    """The entry ``plugin`` registers as ``slot``/``name``, without loading a catalogue.
    ``plugin`` is a module or object with ``sparsefw_register``, or that function itself."""
    registry = Registry(source=source, version="")
    register = getattr(plugin, "sparsefw_register", plugin)
    register(registry=registry)
    return registry.get(slot, name)


def entries(catalogue_or_registry: Any, slots: Iterable[str] = COMPONENT_SLOTS) -> list[Entry]:
    """Every entry of ``slots``, sorted by slot then name (for ``pytest.mark.parametrize``)."""
    registry = getattr(catalogue_or_registry, "registry", catalogue_or_registry)
    by_slot = registry.by_slot()
    return [e for s in slots for e in by_slot.get(s, [])]


# ------------------------------------------------------------------------------ the harness
class HarnessModel(nn.Module):
    """A small conv + MLP model whose sparsified weights have every dimension (and every input
    fan-in) a multiple of 16, so N:M components with M ≤ 16 work on it. Inputs ``(16, 4, 4)``,
    4 classes."""

    input_shape = (16, 4, 4)
    num_classes = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv(x))).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def _harness_config(density: float, kind: str, input_shape, num_classes, total_steps: int
                    ) -> RunConfig:
    from sparsefw.data import SyntheticConfig
    from sparsefw.models.mlp import MLPConfig

    return RunConfig(
        data=Selected("synthetic", SyntheticConfig(n_train=64, n_test=32, num_classes=num_classes,
                                                   input_shape=tuple(input_shape))),
        model=Selected("mlp", MLPConfig(hidden=(32,))),
        mask_init=Selected("random", EmptyConfig()),
        train=TrainConfig(device="cpu", epochs=max(total_steps // 8, 1), batch_size=8),
        sparsity=SparsityConfig(density=density, kind=kind),
        logging=LoggingConfig(observers=()),
    )


def make_state(
    *,
    density: float = 0.5,
    kind: str = "hard",
    seed: int = 0,
    total_steps: int = 100,
    step: int = 0,
    values: Mapping[str, float] | None = None,
    model: nn.Module | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    distribution: str = "erk",
    batch_size: int = 8,
    run_dir: str | Path | None = None,
    backward: bool = True,
) -> TrainState:
    """A :class:`TrainState` for calling hooks outside the engine, on CPU.

    ``model`` defaults to a seeded :class:`HarnessModel` (a model from
    :func:`sparsefw.testing.strategies.small_models` works too: its ``input_shape`` and
    ``num_classes`` attributes are read). Masks are random with each layer's allocated count at
    ``density`` (``distribution`` allocation), weights are masked, and with ``backward`` the
    step's batch has been run forward and backward so ``.grad`` holds the dense gradient.
    The lifecycle helpers ``forward``, ``forward_backward``, ``closure`` and ``train_batches``
    work.
    """
    from sparsefw.data import DataSplits

    if model is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = HarnessModel()
    input_shape = tuple(input_shape or model.input_shape)
    num_classes = num_classes or model.num_classes
    gen = torch.Generator().manual_seed(seed)
    n = 4 * batch_size
    xs = torch.randn((2 * n, *input_shape), generator=gen)
    ys = torch.randint(0, num_classes, (2 * n,), generator=gen)
    extra = {"input_range": (-4.0, 4.0)} if "input_range" in attrs.fields_dict(DataSplits) else {}
    data = DataSplits(train=TensorDataset(xs[:n].clamp(-4, 4), ys[:n]),
                      test=TensorDataset(xs[n:].clamp(-4, 4), ys[n:]), num_classes=num_classes,
                      input_shape=input_shape, in_memory=True, **extra)

    masks = MaskSet(sparsifiable_params(model), kind=kind)
    shapes = {k: tuple(p.shape) for k, p in masks.params.items()}
    if shapes:
        masks.targets = distributions.active_counts(shapes, density, distribution)
    for name, p in masks.params.items():
        masks.update(name, topk_mask(torch.rand(p.shape, generator=gen), masks.targets[name]))
    masks.apply_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    state = TrainState(
        model=model, optimizer=optimizer, masks=masks, loss_fn=F.cross_entropy,
        device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed + 1),
        run_dir=Path(run_dir) if run_dir is not None else Path(tempfile.gettempdir()),
        config=_harness_config(density, kind, input_shape, num_classes, total_steps),
        data=data, steps_per_epoch=4, total_steps=total_steps, step=step,
        steps_per_round=total_steps, values=dict(values or {}),
    )

    def forward(x):
        state.passes["forward"] += 1
        effective = masks.effective()
        return functional_call(model, effective, (x,)) if effective else model(x)

    def forward_backward(x, y, *, sync=True):
        loss = state.loss_fn(forward(x).float(), y)
        state.passes["backward"] += 1
        loss.backward()
        return loss.detach()

    def closure(*, sync=True):
        return forward_backward(*state.batch)

    def train_batches():
        for i in range(0, n, batch_size):
            yield xs[i:i + batch_size], ys[i:i + batch_size]

    state.forward, state.forward_backward, state.train_batches, state.closure = (
        forward, forward_backward, train_batches, closure)
    state.batch = (xs[:batch_size], ys[:batch_size])
    if backward:
        forward_backward(*state.batch)
    return state


def _batches_fn(state: TrainState) -> Callable[[int], list]:
    def batches(k: int) -> list:
        out: list = []
        while len(out) < k:
            out.extend(state.train_batches())
        return out[:k]

    return batches


def _manager(entry: Entry, instance: Any, check: str):
    pm = new_manager()
    try:
        pm.register(instance, name=f"{entry.slot}:{entry.name}")
        pm.check_pending()
    except (PluginValidationError, ValueError) as exc:
        raise _fail(entry, check, f"its hook implementations do not match sparsefw's hook "
                                  f"specifications: {exc}") from exc
    return pm


def _implements(pm, hook: str) -> bool:
    return bool(getattr(pm.hook, hook).get_hookimpls())


def _config(entry: Entry, config: Any, hints: Hints | None = None) -> Any:
    if config is not None:
        return config
    if hints is not None and hints.options:
        try:
            return CONVERTER.structure(dict(hints.options), entry.config)
        except Exception as exc:
            raise _fail(entry, "config", f"the hinted options {dict(hints.options)} do not "
                                         f"structure into {entry.config.__name__}: {exc}") from exc
    try:
        return entry.config()
    except Exception as exc:
        raise _fail(entry, "config", f"its config class {entry.config.__name__} cannot be built "
                                     f"from defaults ({exc}); pass a config instance") from exc


def _build(entry: Entry, config: Any, check: str) -> Any:
    try:
        return entry.build(config)
    except Exception as exc:
        raise _fail(entry, check, f"building it from {config!r} raised {exc!r}") from exc


def _weights(state: TrainState) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in state.model.named_parameters()}


def _changed_weights(state: TrainState, before: Mapping[str, torch.Tensor]) -> list[str]:
    now = dict(state.model.named_parameters())
    return [n for n, w in before.items() if not torch.equal(now[n].detach(), w)]


def perturb_moved_message(moved: list[str]) -> str:
    """The perturb contract's rule on weights edited by the hook itself."""
    return (f"the hook changed the weights of {moved} itself; return offsets in "
            "Perturbation.params and let the engine apply and restore them")


def host_sync_message(hook: str, calls: list[str], allowed: int) -> str:
    """The rule on host synchronisation inside a hook."""
    return (f"{hook} read tensors back to the host {len(calls)} time(s) "
            f"({', '.join(calls[:3])}{', ...' if len(calls) > 3 else ''}); at most {allowed} "
            f"{'is' if allowed == 1 else 'are'} allowed there. Keep values on the device "
            "(0-d tensors in state.metrics) and read counts once per update")


def _count(value: Any) -> int:
    return int(value.item()) if torch.is_tensor(value) else int(value)


# ------------------------------------------------------------------------------ checks
def _contract_check(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Resolve the check's hints (declared ``contract_hints`` plus keyword overrides; skip if
    they say so) and turn an unexpected exception inside the check (a hook that crashes on the
    harness) into a :class:`ContractError` that names the component and the check."""
    import functools

    name = fn.__name__.removeprefix("check_")

    @functools.wraps(fn)
    def wrapper(entry: Entry, *args: Any, **kwargs: Any) -> Any:
        # ``config`` and ``state`` are arguments; every other keyword is a hint
        known = {k: kwargs.pop(k) for k in ("config", "state") if k in kwargs}
        h = _hints(entry, kwargs)
        if h.skip:
            _skip(h.skip)
        try:
            return fn(entry, *args, h=h, **known)
        except (ContractError, HintError, *_skip_exceptions()):
            raise
        except Exception as exc:
            raise _fail(entry, name, f"it raised {type(exc).__name__}: {exc} (if it needs "
                                     "inputs the harness lacks, declare contract_hints)") from exc

    return wrapper


@_contract_check
def check_config(entry: Entry, config: Any = None, *, h: Hints) -> None:
    """The config class is a frozen attrs class, builds from defaults (or ``config`` is given),
    round-trips through :data:`sparsefw.config.CONVERTER`, and holds TOML-able values."""
    cls = entry.config
    if not attrs.has(cls):
        raise _fail(entry, "config", f"{cls!r} is not an attrs class")
    cfg = _config(entry, config, h)
    if cls.__setattr__ is object.__setattr__ and attrs.fields(cls):
        raise _fail(entry, "config", f"{cls.__name__} must be frozen (@attrs.frozen): a run's "
                                     "options must not change after they are read")
    if entry.slot == "topology_update" and not issubclass(cls, UpdateInterval):
        raise _fail(entry, "config", f"{cls.__name__} must subclass sparsefw.state.UpdateInterval "
                                     "(every/start/end)")
    try:
        raw = CONVERTER.unstructure(cfg)
        back = CONVERTER.structure(copy.deepcopy(raw), cls)
    except Exception as exc:
        raise _fail(entry, "config", f"{cfg!r} does not round-trip through the config "
                                     f"converter: {exc!r}") from exc
    if back != cfg:
        raise _fail(entry, "config", f"structure(unstructure(cfg)) != cfg: {back!r} vs {cfg!r}")

    def tomlable(value: Any, path: str) -> None:
        if value is None or isinstance(value, (str, bool, int, float)):
            return
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                tomlable(v, f"{path}[{i}]")
            return
        if isinstance(value, Mapping):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise _fail(entry, "config", f"{path}: TOML tables need string keys, got {k!r}")
                tomlable(v, f"{path}.{k}")
            return
        raise _fail(entry, "config", f"option {path} = {value!r} ({type(value).__name__}) is not "
                                     "a TOML value (use str, int, float, bool, lists, tables)")

    tomlable(raw, cls.__name__)


@_contract_check
def check_registration(entry: Entry, config: Any = None, *, h: Hints) -> None:
    """The component builds from its config, its hooks match the specifications (no misspelled
    hook, no unknown argument), it implements its slot's hook (as an ``@hookimpl`` method), and
    its name clashes with no component of another source in the installed catalogue."""
    problems = hook_problems(entry.factory, entry.slot)
    if problems:
        raise _fail(entry, "registration", "; ".join(problems))
    instance = _build(entry, _config(entry, config, h), "registration")
    pm = _manager(entry, instance, "registration")
    if entry.slot == "observer":
        if not any(_implements(pm, hook) for hook in OBSERVER_HOOKS):
            raise _fail(entry, "registration", f"an observer implements none of "
                                               f"{', '.join(OBSERVER_HOOKS)}")
    else:
        hook = SLOT_HOOKS.get(entry.slot)
        if hook is not None and not _implements(pm, hook):
            raise _fail(entry, "registration", f"a {entry.slot} component must implement {hook} "
                                               "as an @hookimpl method")
    _check_name_against_catalogue(entry)


def _check_name_against_catalogue(entry: Entry) -> None:
    """The installed catalogue (built-ins and entry points) has no component of this slot and
    name from another source: such a clash makes every config that selects the bare name fail."""
    import warnings

    from sparsefw.plugins import load_catalogue

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        installed = load_catalogue()
    reg = installed.registry
    key = (entry.slot, entry.name)
    others = [e for (slot, q), e in reg.qualified.items()
              if slot == entry.slot and q.split(":", 1)[1] == entry.name
              and e.factory is not entry.factory]
    if others or (key in reg.entries and reg.entries[key].factory is not entry.factory):
        first = others[0] if others else reg.entries[key]
        raise _fail(entry, "registration",
                    f"the name {entry.name!r} is already used for a {entry.slot} component by "
                    f"{first.source} ({first.module}); configs selecting {entry.name!r} would "
                    "fail with a name clash: choose another name")


@_contract_check
def check_mask_init(entry: Entry, config: Any = None, *, h: Hints) -> None:
    """Bool masks of the right shape/device for every sparsified layer, the allocated count per
    layer (``exact_counts``), at several densities, reproducible from the seed."""
    cfg = _config(entry, config, h)

    def run(density: float, seed: int) -> dict[str, torch.Tensor]:
        state = make_state(density=density, kind=h.mask_kind, seed=seed, values=h.values,
                           total_steps=h.total_steps, backward=False)
        pm = _manager(entry, _build(entry, cfg, "mask_init"), "mask_init")
        answer = pm.hook.sparsefw_mask_init(state=state, batches=_batches_fn(state))
        if not isinstance(answer, Mapping):
            raise _fail(entry, "mask_init", f"the answer must be a dict name -> bool mask, got "
                                            f"{type(answer).__name__}")
        missing = [n for n in state.masks.names if n not in answer]
        extra = [n for n in answer if n not in state.masks]
        if missing or extra:
            raise _fail(entry, "mask_init", f"the answer must cover exactly the sparsified "
                                            f"parameters: missing {missing}, unknown {extra}")
        for name, m in answer.items():
            p = state.masks.params[name]
            if not torch.is_tensor(m) or m.dtype != torch.bool or m.shape != p.shape:
                desc = f"{m.dtype} {tuple(m.shape)}" if torch.is_tensor(m) else type(m).__name__
                raise _fail(entry, "mask_init", f"mask of {name} must be a bool tensor of shape "
                                                f"{tuple(p.shape)}, got {desc}")
            if m.device != p.device:
                raise _fail(entry, "mask_init", f"mask of {name} is on {m.device}, its parameter "
                                                f"on {p.device}")
            if h.exact_counts and int(m.sum()) != state.masks.targets[name]:
                raise _fail(entry, "mask_init", (
                    f"layer {name} {tuple(p.shape)} got {int(m.sum())} active weights at density "
                    f"{density}, its allocation is {state.masks.targets[name]} "
                    f"(state.masks.targets[name]); a global-threshold method declares "
                    f"contract_hints = {{'exact_counts': False}}"))
        return {n: m.clone() for n, m in answer.items()}

    for i, density in enumerate((h.density, *h.other_densities)):
        first = run(density, seed=3)
        if i or "determinism" in h.skip_checks:
            continue
        again = run(density, seed=3)
        differ = [n for n in first if not torch.equal(first[n], again[n])]
        if differ:
            raise _fail(entry, "mask_init", f"two runs with the same seed chose different masks "
                                            f"for {differ}: draw randomness from state.generator")


@_contract_check
def check_topology_update(entry: Entry, config: Any = None, *, h: Hints) -> None:
    """Several updates at two densities: counts kept per layer, masks edited only through
    ``MaskSet.update``, reported dropped/grown counts equal the positions that changed (grown
    ones were inactive, dropped ones active), ``None`` only when nothing changed; reproducible."""
    cfg = _config(entry, config, h)
    values = {"drop_fraction": 0.3, **h.values}

    def run(density: float, seed: int) -> dict[str, torch.Tensor]:
        state = make_state(density=density, kind=h.mask_kind, seed=seed, values=values,
                           total_steps=h.total_steps)
        pm = _manager(entry, _build(entry, cfg, "topology_update"), "topology_update")
        for i, step in enumerate((0, 1, h.total_steps // 2)):
            if i:
                state.optimizer.zero_grad(set_to_none=True)
                state.forward_backward(*state.batch)
            state.step = step
            _topology_step(entry, h, pm, state)
        return {n: m.clone() for n, m in state.masks.masks.items()}

    for i, density in enumerate((h.density, *h.other_densities)):
        first = run(density, seed=5)
        if i or "determinism" in h.skip_checks:
            continue
        again = run(density, seed=5)
        differ = [n for n in first if not torch.equal(first[n], again[n])]
        if differ:
            raise _fail(entry, "topology_update", f"two runs with the same seed ended with "
                                                  f"different masks for {differ}: draw "
                                                  "randomness from state.generator")


@_contract_check
def check_topology_step(entry: Entry, state: TrainState, config: Any = None, *, h: Hints
                        ) -> TopologyChange | None:
    """One topology update on a state you built (e.g. :func:`make_state` with a model and a
    density drawn by :mod:`sparsefw.testing.strategies`), checked like
    :func:`check_topology_update`; returns the component's answer."""
    state.values = {"drop_fraction": 0.3, **h.values, **state.values}
    pm = _manager(entry, _build(entry, _config(entry, config, h), "topology_update"),
                  "topology_update")
    return _topology_step(entry, h, pm, state)


def _topology_step(entry: Entry, h: Hints, pm, state: TrainState) -> TopologyChange | None:
    before = {n: m.clone() for n, m in state.masks.masks.items()}
    answer = pm.hook.sparsefw_topology_update(state=state)
    _check_topology_answer(entry, h, state, before, answer, state.step)
    return answer


def _check_topology_answer(entry, h: Hints, state, before, answer, step) -> None:
    check = "topology_update"
    masks = state.masks
    if answer is not None and not isinstance(answer, TopologyChange):
        raise _fail(entry, check, f"answer must be a TopologyChange or None, got "
                                  f"{type(answer).__name__}")
    changed = []
    for name, old in before.items():
        new = masks.masks[name]
        p = masks.params[name]
        if new.dtype != torch.bool or new.shape != p.shape or new.device != p.device:
            raise _fail(entry, check, f"mask of {name} became {new.dtype} {tuple(new.shape)} on "
                                      f"{new.device}; edit masks with state.masks.update")
        if not torch.equal(masks._float[name], new.to(masks._float[name].dtype)):
            raise _fail(entry, check, f"mask of {name} was edited in place; the masking kernels "
                                      "did not see it. Edit masks only with "
                                      "state.masks.update(name, new_mask)")
        n_old, n_new = int(old.sum()), int(new.sum())
        dropped = int((old & ~new).sum())
        grown = int((new & ~old).sum())
        if h.keeps_counts and n_old != n_new:
            raise _fail(entry, check, (
                f"at step {step} layer {name} {tuple(p.shape)} had {n_old} active weights "
                f"before the update and {n_new} after (it dropped {dropped} and grew {grown}): "
                f"a topology update must keep each layer's count (grow as many as it drops)"))
        if dropped or grown:
            changed.append(name)
        if answer is None:
            continue
        for kind, reported_map, actual, was in (("dropped", answer.dropped, dropped, "active"),
                                                ("grown", answer.grown, grown, "inactive")):
            if name not in reported_map:
                continue
            reported = _count(reported_map[name])
            if reported != actual:
                raise _fail(entry, check, (
                    f"at step {step} it reports {reported} {kind} weights in {name}, but "
                    f"{actual} positions that were {was} changed; count {kind} as the positions "
                    f"whose mask changed (grown positions must have been inactive)"))
    if not h.keeps_counts and h.keeps_total:
        n_old = sum(int(m.sum()) for m in before.values())
        n_new = sum(int(m.sum()) for m in masks.masks.values())
        if n_old != n_new:
            raise _fail(entry, check, (
                f"at step {step} the model had {n_old} active weights before the update and "
                f"{n_new} after: an update that moves weights between layers must keep the "
                f"total (or declare contract_hints = {{'keeps_total': False}})"))
    if answer is None and changed:
        raise _fail(entry, check, f"at step {step} it returned None but changed the masks of "
                                  f"{changed}; return a TopologyChange with the counts")
    if answer is not None:
        unknown = [n for n in (*answer.dropped, *answer.grown) if n not in masks]
        if unknown:
            raise _fail(entry, check, f"it reports counts for unknown layers {unknown}")
        silent = [n for n in changed if n not in answer.dropped or n not in answer.grown]
        if silent:
            raise _fail(entry, check, f"at step {step} the masks of {silent} changed but the "
                                      "TopologyChange does not report their dropped/grown counts")


@_contract_check
def check_perturb(entry: Entry, config: Any = None, *, h: Hints) -> None:
    """``None`` or a :class:`Perturbation` with finite offsets shaped like their parameters
    (and inputs shaped like the batch); the hook leaves the weights as they were; the engine's
    apply / forward-backward / restore is bit-exact."""
    check = "perturb"
    cfg = _config(entry, config, h)
    state = make_state(density=h.density, kind=h.mask_kind, values=h.values,
                       total_steps=h.total_steps)
    pm = _manager(entry, _build(entry, cfg, check), check)
    for step in (0, 1, 2):
        state.step = step
        state.optimizer.zero_grad(set_to_none=True)
        before = _weights(state)
        answers = pm.hook.sparsefw_perturb(state=state)
        moved = _changed_weights(state, before)
        if moved:
            raise _fail(entry, check, perturb_moved_message(moved))
        named = dict(state.model.named_parameters())
        offsets: dict[str, torch.Tensor] = {}
        inputs = None
        for pert in answers:
            if pert is None:
                continue
            if not isinstance(pert, Perturbation):
                raise _fail(entry, check, f"answer must be a Perturbation or None, got "
                                          f"{type(pert).__name__}")
            scale = pert.scale
            if scale is not None and not (
                    isinstance(scale, (int, float)) and math.isfinite(scale)
                    or torch.is_tensor(scale) and scale.dim() == 0):
                raise _fail(entry, check, f"scale must be a finite number or a 0-dim tensor, "
                                          f"got {scale!r}")
            for name, delta in pert.params.items():
                if name not in named:
                    raise _fail(entry, check, f"offset for unknown parameter {name!r}")
                p = named[name]
                if not torch.is_tensor(delta) or delta.shape != p.shape or delta.dtype != p.dtype:
                    raise _fail(entry, check, f"offset of {name} must be a {p.dtype} tensor of "
                                              f"shape {tuple(p.shape)}")
                if delta.data_ptr() == p.data_ptr():
                    raise _fail(entry, check, f"offset of {name} is the parameter itself; "
                                              "return a new tensor")
                if scale is not None:
                    delta = delta * scale
                if not bool(torch.isfinite(delta).all()):
                    raise _fail(entry, check, f"offset of {name} is not finite")
                offsets[name] = delta
            if pert.inputs is not None:
                x = state.batch[0]
                if pert.inputs.shape != x.shape or not bool(torch.isfinite(pert.inputs).all()):
                    raise _fail(entry, check, f"inputs must be finite and shaped like the batch "
                                              f"{tuple(x.shape)}, got {tuple(pert.inputs.shape)}")
                inputs = pert.inputs
        # what the engine does: add offsets, forward/backward, copy the originals back
        params = [named[n] for n in offsets]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            if params:
                torch._foreach_add_(params, list(offsets.values()))
        state.optimizer.zero_grad(set_to_none=True)
        state.forward_backward(inputs if inputs is not None else state.batch[0], state.batch[1])
        with torch.no_grad():
            if params:
                torch._foreach_copy_(params, saved)
        moved = _changed_weights(state, before)
        if moved:
            raise _fail(entry, check, f"after apply and restore the weights of {moved} differ "
                                      "from before the step")


@_contract_check
def check_gradient_correct(entry: Entry, config: Any = None, *, h: Hints) -> None:
    """Gradients edited in place stay finite and shaped; the answer is ``None``; weights and
    masks are untouched."""
    check = "gradient_correct"
    cfg = _config(entry, config, h)
    state = make_state(density=h.density, kind=h.mask_kind, values=h.values,
                       total_steps=h.total_steps)
    pm = _manager(entry, _build(entry, cfg, check), check)
    for step in (0, 1, 2):
        state.step = step
        state.optimizer.zero_grad(set_to_none=True)
        state.forward_backward(*state.batch)
        weights = _weights(state)
        masks = {n: m.clone() for n, m in state.masks.masks.items()}
        answers = pm.hook.sparsefw_gradient_correct(state=state)
        if any(a is not None for a in answers):
            raise _fail(entry, check, "it must edit param.grad in place and return None")
        moved = _changed_weights(state, weights)
        if moved:
            raise _fail(entry, check, f"it changed the weights of {moved}; it may only edit "
                                      "gradients")
        remasked = [n for n, m in masks.items() if not torch.equal(m, state.masks.masks[n])]
        if remasked:
            raise _fail(entry, check, f"it changed the masks of {remasked}; that is a "
                                      "topology_update's job")
        for name, p in state.model.named_parameters():
            if p.grad is None:
                continue
            if p.grad.shape != p.shape:
                raise _fail(entry, check, f"gradient of {name} has shape {tuple(p.grad.shape)}")
            if not bool(torch.isfinite(p.grad).all()):
                raise _fail(entry, check, f"gradient of {name} is not finite after the "
                                          "correction")
        state.optimizer.step()
        state.masks.apply_()


@_contract_check
def check_schedule(entry: Entry, config: Any = None, *, h: Hints) -> None:
    """A dict of Python numbers (no tensors, no bools), the same names at every step, each
    value finite and within its range (:data:`KNOWN_RANGES` updated by ``hints["ranges"]``)."""
    check = "schedule"
    cfg = _config(entry, config, h)
    ranges = {**KNOWN_RANGES, **h.ranges}
    total = h.total_steps
    state = make_state(density=h.density, kind=h.mask_kind, values=h.values, total_steps=total,
                       backward=False)
    pm = _manager(entry, _build(entry, cfg, check), check)
    names = None
    for step in sorted({0, 1, total // 4, total // 2, (3 * total) // 4, total - 1, total}):
        state.step = step
        for answer in pm.hook.sparsefw_schedule(state=state):
            if answer is None:
                answer = {}
            if not isinstance(answer, Mapping):
                raise _fail(entry, check, f"answer must be a dict name -> number, got "
                                          f"{type(answer).__name__}")
            keys = set(answer)
            if names is None:
                names = keys
            elif keys != names:
                raise _fail(entry, check, f"step {step} answers {sorted(keys)}, earlier steps "
                                          f"{sorted(names)}: answer the same names every step")
            for key, value in answer.items():
                if not isinstance(key, str):
                    raise _fail(entry, check, f"value names must be strings, got {key!r}")
                if torch.is_tensor(value) or isinstance(value, bool) or not isinstance(
                        value, (int, float)):
                    raise _fail(entry, check, f"{key} at step {step} is {type(value).__name__}; "
                                              "values must be Python numbers (no tensors: no "
                                              "device sync)")
                if not math.isfinite(value):
                    raise _fail(entry, check, f"{key} at step {step} is {value}")
                lo, hi = ranges.get(key, (None, None))
                if (lo is not None and value < lo) or (hi is not None and value > hi):
                    raise _fail(entry, check, f"{key} = {value} at step {step} of {total} is "
                                              f"outside its range [{lo}, {hi}]")


@_contract_check
def check_observer(entry: Entry, config: Any = None, *, h: Hints) -> None:
    """A whole lifecycle of observer calls (run start, steps with and without metrics,
    evaluation, run end) into a temporary run directory."""
    cfg = _config(entry, config, h)
    with tempfile.TemporaryDirectory(prefix="sparsefw-contract-") as tmp:
        state = make_state(density=h.density, kind=h.mask_kind, run_dir=tmp, backward=False)
        pm = _manager(entry, _build(entry, cfg, "observer"), "observer")
        metrics = {"step": 2, "epoch": 0, "train/loss": 1.0, "train/acc": 0.5, "lr": 0.1}
        evals = {"step": 2, "epoch": 0, "test/loss": 1.0, "test/acc": 0.5,
                 **state.masks.summary()}
        try:
            pm.hook.sparsefw_run_start(state=state)
            for step in (1, 2):
                state.step = step
                pm.hook.sparsefw_step_end(state=state, metrics=None if step == 1 else metrics)
            pm.hook.sparsefw_eval_end(state=state, metrics=evals)
            pm.hook.sparsefw_run_end(state=state, metrics=evals)
        except Exception as exc:
            raise _fail(entry, "observer", f"the observer lifecycle raised {exc!r}") from exc


def _assert_same(entry: Entry, a: Any, b: Any, path: str) -> None:
    def bad(why: str) -> ContractError:
        return _fail(entry, "state_dict", f"after load_state_dict, {path} {why}")

    if torch.is_tensor(a):
        if not torch.is_tensor(b) or a.dtype != b.dtype or a.shape != b.shape or not torch.equal(
                a.cpu(), b.cpu()):
            raise bad("differs from the saved tensor")
    elif isinstance(a, Mapping):
        if not isinstance(b, Mapping) or set(a) != set(b):
            raise bad(f"has keys {sorted(map(str, b)) if isinstance(b, Mapping) else b!r}, "
                      f"saved {sorted(map(str, a))}")
        for k in a:
            _assert_same(entry, a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            raise bad(f"is {b!r}, saved {a!r}")
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(entry, x, y, f"{path}[{i}]")
    elif a != b:
        raise bad(f"is {b!r}, saved {a!r}")


@_contract_check
def check_state_dict(entry: Entry, config: Any = None, *, h: Hints) -> None:
    """For a component with ``sparsefw_state_dict``: after a few hook calls its state survives
    ``torch.save`` and a weights-only ``torch.load`` (what resuming uses), and a fresh instance
    that loads it saves the same state."""
    cfg = _config(entry, config, h)
    instance = _build(entry, cfg, "state_dict")
    pm = _manager(entry, instance, "state_dict")
    impls = pm.hook.sparsefw_state_dict.get_hookimpls()
    if not impls:
        _skip(f"{entry.slot}:{entry.name} keeps no resumable state (no sparsefw_state_dict)")
    if not pm.hook.sparsefw_load_state_dict.get_hookimpls():
        raise _fail(entry, "state_dict", "it implements sparsefw_state_dict but not "
                                         "sparsefw_load_state_dict")
    state = make_state(density=h.density, kind=h.mask_kind, values=h.values,
                       total_steps=h.total_steps)
    _exercise(entry, pm, state)
    saved = _one(pm.hook.sparsefw_state_dict(state=state))
    if saved is None:  # nothing to resume yet; the engine stores no entry for it
        return
    buf = io.BytesIO()
    try:
        torch.save(saved, buf)
    except Exception as exc:
        raise _fail(entry, "state_dict", f"its state cannot be torch.save'd: {exc!r}") from exc
    buf.seek(0)
    try:  # checkpoints are loaded weights-only: a state must not need code to unpickle
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            loaded = torch.load(buf, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _fail(entry, "state_dict", "its state does not load with weights_only=True "
                    "(keep it to tensors and plain data, or add its classes to "
                    f"sparsefw.engine.checkpoint.SAFE_GLOBALS): {exc}") from exc
    fresh_pm = _manager(entry, _build(entry, cfg, "state_dict"), "state_dict")
    fresh = make_state(density=h.density, kind=h.mask_kind, values=h.values,
                       total_steps=h.total_steps)
    fresh.step = state.step
    # the engine restores model, optimizer and masks before the components' states
    fresh.model.load_state_dict(state.model.state_dict())
    fresh.masks.load_state_dict(state.masks.state_dict())
    fresh.optimizer.load_state_dict(state.optimizer.state_dict())
    fresh.values = dict(state.values)
    fresh_pm.hook.sparsefw_load_state_dict(state=fresh, plugin_state=loaded)
    again = _one(fresh_pm.hook.sparsefw_state_dict(state=fresh))
    _assert_same(entry, saved, again, "state")


def _one(answers: list) -> Any:
    return answers[0] if answers else None


def _exercise(entry: Entry, pm, state: TrainState) -> None:
    """Two engine-like steps calling every hook the component implements, in the engine's
    order, so that stateful components have state."""
    hook = pm.hook
    if _implements(pm, "sparsefw_mask_init"):
        answer = hook.sparsefw_mask_init(state=state, batches=_batches_fn(state))
        for name, m in (answer or {}).items():
            state.masks.update(name, m)
        state.masks.apply_()
    hook.sparsefw_run_start(state=state)
    hook.sparsefw_epoch_start(state=state)
    for step in (0, 1):
        state.step = step
        for values in hook.sparsefw_schedule(state=state):
            state.values.update(values or {})
        perts = [p for p in hook.sparsefw_perturb(state=state) if p is not None]
        named = dict(state.model.named_parameters())
        saved = {n: named[n].detach().clone() for p in perts for n in p.params}
        with torch.no_grad():
            for p in perts:
                for n, d in p.params.items():
                    named[n].add_(d)
        state.optimizer.zero_grad(set_to_none=True)
        state.loss = state.forward_backward(*state.batch)
        with torch.no_grad():
            for n, w in saved.items():
                named[n].copy_(w)
        hook.sparsefw_topology_update(state=state)
        hook.sparsefw_gradient_correct(state=state)
        state.masks.mask_grads_()
        state.optimizer.step()
        state.masks.apply_()
        hook.sparsefw_step_end(state=state, metrics=None)
    state.step = 2


_BASE_CATALOGUE = None


def _catalogue_with(entry: Entry):
    """A catalogue of the built-ins (entry points not loaded) with ``entry`` in it."""
    global _BASE_CATALOGUE
    from sparsefw.plugins import Catalogue, load_catalogue

    if _BASE_CATALOGUE is None:
        _BASE_CATALOGUE = load_catalogue(autoload=False)
    base = _BASE_CATALOGUE
    registry = Registry(entries={**base.registry.entries, (entry.slot, entry.name): entry})
    return Catalogue(pm=base.pm, registry=registry, sources=dict(base.sources))


@_contract_check
def check_in_trainer(entry: Entry, config: Any = None, *, h: Hints) -> dict[str, float]:
    """A real short run (synthetic data, a small MLP, 6 steps over 2 epochs on CPU) with this component
    selected (a topology component updates every 2 steps): it finishes with a finite loss,
    hard-masked pruned weights are exactly zero and the density is the configured one (for
    components that keep counts). Returns the final metrics."""
    from sparsefw.data import SyntheticConfig
    from sparsefw.engine import Trainer
    from sparsefw.models.mlp import MLPConfig

    if "in_trainer" in h.skip_checks:
        _skip(h.skip_checks["in_trainer"])
    cfg = _config(entry, config, h)
    if entry.slot == "topology_update":
        cfg = attrs.evolve(cfg, every=2, start=0, end=1.0)
    sel = Selected(entry.name, cfg)
    catalogue = _catalogue_with(entry)
    random_init = catalogue.registry.get("mask_init", "random").config()
    kwargs: dict[str, Any] = {
        "data": Selected("synthetic", SyntheticConfig(n_train=64, n_test=32, num_classes=4,
                                                      input_shape=(32,))),
        "model": Selected("mlp", MLPConfig(hidden=(32,))),
        "mask_init": Selected("random", random_init),
        "train": TrainConfig(device="cpu", epochs=2, batch_size=16, eval_batch_size=64,
                             log_every=2, max_steps=6),
        "sparsity": SparsityConfig(density=h.density, kind=h.mask_kind),
        "logging": LoggingConfig(observers=(entry.name,) if entry.slot == "observer" else ()),
    }
    if entry.slot in ("mask_init", "topology_update"):
        kwargs[entry.slot] = sel
    elif entry.slot in ("gradient_correct", "perturb", "schedule"):
        kwargs[entry.slot] = (sel,)
    run_cfg = RunConfig(**kwargs)
    with tempfile.TemporaryDirectory(prefix="sparsefw-contract-") as tmp:
        try:
            trainer = Trainer(run_cfg, catalogue, run_dir=tmp)
            metrics = trainer.fit()
        except ContractError:
            raise
        except Exception as exc:
            raise _fail(entry, "in_trainer", f"a short training run with it raised "
                                             f"{exc!r}") from exc
        if not math.isfinite(metrics["test/loss"]):
            raise _fail(entry, "in_trainer", f"the run ended with test loss {metrics['test/loss']}")
        masks = trainer.masks
        if masks.kind == "hard":
            for name, p in masks.params.items():
                if bool((p.detach()[~masks.masks[name]] != 0).any()):
                    raise _fail(entry, "in_trainer", f"pruned weights of {name} are not zero at "
                                                     "the end of the run")
        if h.keeps_counts and h.exact_counts:
            for name, m in masks.masks.items():
                if int(m.sum()) != masks.targets[name]:
                    raise _fail(entry, "in_trainer", (
                        f"layer {name} ends the run with {int(m.sum())} active weights, its "
                        f"allocation is {masks.targets[name]}"))
        elif h.keeps_total and h.exact_counts:
            total = sum(int(m.sum()) for m in masks.masks.values())
            if total != sum(masks.targets.values()):
                raise _fail(entry, "in_trainer", (
                    f"the run ends with {total} active weights, the allocation is "
                    f"{sum(masks.targets.values())}"))
    return metrics


#: the checks that apply to each slot, in the order they run
_SLOT_CHECKS: dict[str, tuple[Callable[..., Any], ...]] = {
    "mask_init": (check_mask_init,),
    "topology_update": (check_topology_update,),
    "gradient_correct": (check_gradient_correct,),
    "perturb": (check_perturb,),
    "schedule": (check_schedule,),
    "observer": (check_observer,),
}


def checks_for(slot: str) -> tuple[Callable[..., Any], ...]:
    """Every check that applies to an entry of ``slot``, in order."""
    if slot not in _SLOT_CHECKS:
        return (check_config,)
    return (check_config, check_registration, *_SLOT_CHECKS[slot], check_state_dict,
            check_in_trainer)


def _skip_exceptions() -> tuple[type[BaseException], ...]:
    import unittest

    try:
        import pytest
    except ImportError:  # pragma: no cover
        return (unittest.SkipTest,)
    return (pytest.skip.Exception, unittest.SkipTest)


def check_component(entry: Entry, config: Any = None, **hints: Any) -> list[str]:
    """Run every check of ``entry``'s slot; returns the names of the checks that ran. A check
    that does not apply (state_dict of a stateless component, one named in
    ``skip_checks``) is left out; a component whose hints say ``skip`` is skipped."""
    h = _hints(entry, hints)
    if h.skip:
        _skip(h.skip)
    ran = []
    for check in checks_for(entry.slot):
        try:
            check(entry, config, **hints)
        except _skip_exceptions():
            continue
        ran.append(check.__name__)
    return ran


# ------------------------------------------------------------------------------ base test class
class ComponentContract:
    """Base class for pytest: subclass it as ``Test...`` and set :attr:`slot` and :attr:`name`
    plus either :attr:`plugin` (a module with ``sparsefw_register``) or :attr:`catalogue`
    (loads installed plugins when ``None`` and no plugin is given)."""

    plugin: Any = None
    slot: str = ""
    name: str = ""
    #: the component's config instance (None: its config class's defaults)
    config: Any = None
    #: keyword hints for the checks (see :class:`Hints`)
    hints: Mapping[str, Any] = {}

    def contract_entry(self) -> Entry:
        if not self.slot or not self.name:
            raise TypeError(f"{type(self).__name__}: set `slot` and `name`")
        plugin = type(self).plugin  # through the class: a plain function stays unbound
        if plugin is not None:
            return entry_from_plugin(plugin, self.slot, self.name)
        from sparsefw.plugins import load_catalogue

        return load_catalogue().registry.get(self.slot, self.name)

    def _run(self, check: Callable[..., Any]) -> None:
        entry = self.contract_entry()
        if check not in checks_for(entry.slot):
            _skip(f"{check.__name__} does not apply to {entry.slot} components")
        check(entry, self.config, **dict(self.hints))

    def test_config(self):
        self._run(check_config)

    def test_registration(self):
        self._run(check_registration)

    def test_slot_contract(self):
        entry = self.contract_entry()
        for check in _SLOT_CHECKS.get(entry.slot, ()):
            check(entry, self.config, **dict(self.hints))

    def test_state_dict(self):
        self._run(check_state_dict)

    def test_in_trainer(self):
        self._run(check_in_trainer)
