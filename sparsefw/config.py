"""Run configuration: TOML files structured into frozen attrs classes by one cattrs converter.

* ``extends = "base.toml"`` (relative to the file) merges a base file under this one: tables merge
  key by key, anything else (values, arrays of tables) is replaced.
* ``--set section.key=value`` overrides are applied after ``extends``; the value is parsed as a
  TOML value and falls back to a plain string.
* Unknown keys are rejected; every problem is collected and reported together in one
  :class:`ConfigError`, each line naming the file, the section and the key, and unknown names
  listing the valid choices.

Sections that select a component (``[model]``, ``[data]``, ``[mask_init]``,
``[topology_update]``, ``[[gradient_correct]]``, ``[[perturb]]``, ``[[schedule]]``) carry a
``name`` plus that component's own options, structured into the component's config class.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

import attrs
import cattrs
import tomllib
from cattrs.cols import (
    homogenous_tuple_structure_factory,
    is_mutable_sequence,
    is_sequence,
    list_structure_factory,
)
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError

from sparsefw.distributions import DISTRIBUTIONS
from sparsefw.masks import MASK_KINDS
from sparsefw.registry import Registry
from sparsefw.sparse_compute import COMPUTE_MODES


class ConfigError(ValueError):
    """One or more problems in a configuration; ``problems`` holds one line per problem."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the configuration:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


# ------------------------------------------------------------------------------ validators
def one_of(*choices: str):
    """attrs validator: the value is one of ``choices`` (the message lists them)."""

    def check(_inst, attribute, value):
        if value not in choices:
            raise ValueError(
                f"{attribute.name} = {value!r} is not one of: {', '.join(map(str, choices))}"
            )

    return check


def in_range(lo: float | None = None, hi: float | None = None, *, lo_open=True, hi_open=False):
    """attrs validator: ``lo < value <= hi`` by default (open/closed ends configurable)."""

    def check(_inst, attribute, value):
        if value is None:
            return
        bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
            hi is not None and (value >= hi if hi_open else value > hi)
        )
        if bad:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
            raise ValueError(f"{attribute.name} must be in {rng}, got {value!r}")

    return check


# ------------------------------------------------------------------------------ sections
@attrs.frozen
class TrainConfig:
    """``[train]``: budget, device and bookkeeping of a run."""

    epochs: int = attrs.field(default=10, validator=in_range(0))
    batch_size: int = attrs.field(default=64, validator=in_range(0))
    eval_batch_size: int = attrs.field(default=512, validator=in_range(0))
    device: str = "auto"
    amp: str = attrs.field(default="off", validator=one_of("off", "bf16", "fp16"))
    compile: bool = False
    channels_last: bool = False
    num_workers: int = attrs.field(default=0, validator=in_range(0, lo_open=False))
    log_every: int = attrs.field(default=20, validator=in_range(0))
    #: also checkpoint every this many steps (0: only at the end of each epoch)
    checkpoint_every: int = attrs.field(default=0, validator=in_range(0, lo_open=False))
    out_dir: str = "runs"
    name: str | None = None
    #: train this many rounds of ``epochs`` each (round hooks run between them)
    rounds: int = attrs.field(default=1, validator=in_range(0))
    #: the iteration every round after the first starts from: later rounds replay iterations
    #: ``round_start .. epochs·steps_per_epoch − 1`` of the first (learning-rate schedule and
    #: data position), as training after weight rewinding to iteration k does
    round_start: int = attrs.field(default=0, validator=in_range(0, lo_open=False))
    #: stop after this many steps in total (None: ``rounds · epochs`` full epochs)
    max_steps: int | None = attrs.field(default=None, validator=in_range(0))


@attrs.frozen
class OptimizerConfig:
    """``[optimizer]``: SGD (momentum, Nesterov, weight decay) or AdamW."""

    name: str = attrs.field(default="sgd", validator=one_of("sgd", "adamw"))
    lr: float = attrs.field(default=0.1, validator=in_range(0, lo_open=False))
    momentum: float = attrs.field(default=0.9, validator=in_range(0, 1, lo_open=False, hi_open=True))
    nesterov: bool = False
    weight_decay: float = attrs.field(default=5e-4, validator=in_range(0, lo_open=False))
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = attrs.field(default=1e-8, validator=in_range(0))


@attrs.frozen
class LRScheduleConfig:
    """``[lr_schedule]``: a multiplier of the base learning rate over training."""

    name: str = attrs.field(default="cosine", validator=one_of("constant", "cosine", "step", "linear"))
    warmup_epochs: float = attrs.field(default=0.0, validator=in_range(0, lo_open=False))
    #: ``step``: fractions of training at which the rate is multiplied by ``gamma``
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = attrs.field(default=0.1, validator=in_range(0))
    #: ``cosine``/``linear``: multiplier reached at the end
    final_scale: float = attrs.field(default=0.0, validator=in_range(0, 1, lo_open=False))


@attrs.frozen
class SparsityConfig:
    """``[sparsity]``: global density, its layer-wise allocation, the masking kind and how masked
    layers compute (``compute``: ``dense``, ``sparse`` kernels, or ``auto``, measured per layer)."""

    density: float = attrs.field(default=1.0, validator=in_range(0, 1))
    distribution: str = attrs.field(default="erk", validator=one_of(*DISTRIBUTIONS))
    #: fnmatch patterns of parameter or module names kept dense
    dense_layers: tuple[str, ...] = ()
    kind: str = attrs.field(default="hard", validator=one_of(*MASK_KINDS))
    #: how masked Linear layers compute in training (:mod:`sparsefw.sparse_compute`)
    compute: str = attrs.field(default="dense", validator=one_of(*COMPUTE_MODES))


@attrs.frozen
class LoggingConfig:
    """``[logging]``: which observer components run."""

    observers: tuple[str, ...] = ("jsonl", "tensorboard", "progress")


@attrs.frozen
class Selected:
    """A component chosen by name, with its options (an instance of its config class)."""

    name: str
    options: Any


@attrs.frozen
class RunConfig:
    """A whole run."""

    data: Selected
    model: Selected
    mask_init: Selected
    seed: int = 0
    train: TrainConfig = TrainConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    lr_schedule: LRScheduleConfig = LRScheduleConfig()
    sparsity: SparsityConfig = SparsityConfig()
    topology_update: Selected | None = None
    gradient_correct: tuple[Selected, ...] = ()
    perturb: tuple[Selected, ...] = ()
    schedule: tuple[Selected, ...] = ()
    logging: LoggingConfig = LoggingConfig()


#: plain sections and their classes
PLAIN_SECTIONS = {
    "train": TrainConfig,
    "optimizer": OptimizerConfig,
    "lr_schedule": LRScheduleConfig,
    "sparsity": SparsityConfig,
    "logging": LoggingConfig,
}
#: component sections: section -> (registry slot, many?)
COMPONENT_SECTIONS = {
    "data": ("dataset", False),
    "model": ("model", False),
    "mask_init": ("mask_init", False),
    "topology_update": ("topology_update", False),
    "gradient_correct": ("gradient_correct", True),
    "perturb": ("perturb", True),
    "schedule": ("schedule", True),
}
DEFAULTS = {"data": {"name": "digits"}, "model": {"name": "mlp"}, "mask_init": {"name": "random"}}
TOP_LEVEL = ("extends", "seed", *PLAIN_SECTIONS, *COMPONENT_SECTIONS)


# ------------------------------------------------------------------------------ converter
def _strict(kind: type):
    def hook(value, _type):
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return value

    return hook


def _is_array(t: Any) -> bool:
    return is_sequence(t) or (get_origin(t) is tuple and bool(get_args(t)))


def _strict_array(t: Any, conv: cattrs.Converter):
    """Arrays only from TOML arrays: a string or a table is not silently iterated."""
    args = get_args(t)
    if get_origin(t) is tuple and args and args[-1] is not Ellipsis:
        inner = conv.gen_structure_hetero_tuple(t)
    elif is_mutable_sequence(t):
        inner = list_structure_factory(t, conv)
    else:
        inner = homogenous_tuple_structure_factory(t, conv)

    def hook(value, type_):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected an array, got {type(value).__name__} {value!r}")
        return inner(value, type_)

    return hook


def make_converter() -> cattrs.Converter:
    """The one converter: unknown keys rejected, no silent coercion of TOML scalars."""
    conv = cattrs.Converter(forbid_extra_keys=True)
    for kind in (str, int, float, bool):
        conv.register_structure_hook(kind, _strict(kind))
    conv.register_structure_hook_factory(_is_array, _strict_array)
    return conv


CONVERTER = make_converter()


def _format_exception(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, ForbiddenExtraKeysError):
        valid = ", ".join(a.name for a in attrs.fields(exc.cl)) or "(none)"
        return f"unknown key {', '.join(sorted(exc.extra_fields))}; valid keys: {valid}"
    if isinstance(exc, KeyError):
        return f"required key missing{f' ({exc})' if exc.args else ''}"
    return str(exc)


def _problems(exc: ClassValidationError, where: str) -> list[str]:
    lines = cattrs.transform_error(exc, path="$", format_exception=_format_exception)
    out = []
    for line in lines:
        msg, _, path = line.rpartition(" @ ")
        key = path[2:] if path.startswith("$.") else ""
        out.append(f"{where} {key + ': ' if key else ''}{msg}")
    return out


def _validator_problems(obj: Any, where: str, prefix: str = "") -> list[str]:
    """Run every field validator of ``obj`` (and of nested attrs values), collecting failures."""
    out = []
    for a in attrs.fields(type(obj)):
        value = getattr(obj, a.name)
        if a.validator is not None:
            try:
                a.validator(obj, a, value)
            except (ValueError, TypeError) as e:
                msg = str(e)
                named = msg.startswith((a.name, repr(a.name)))
                out.append(f"{where} {prefix if named else prefix + a.name + ': '}{msg}")
        if attrs.has(type(value)):
            out.extend(_validator_problems(value, where, f"{prefix}{a.name}."))
    return out


def _structure_section(raw: Any, cls: type, where: str, problems: list[str]) -> Any:
    """``raw`` structured into ``cls``, or ``None`` with every problem added to ``problems``.

    attrs validators stop at the first failing field; on a failure the section is structured
    again with validators off and each field checked, so that all bad values are reported."""
    if not isinstance(raw, Mapping):
        problems.append(f"{where} must be a table, got {type(raw).__name__} {raw!r}")
        return None
    try:
        return CONVERTER.structure(raw, cls)
    except ClassValidationError as e:
        first = _problems(e, where)
    except (ValueError, TypeError) as e:
        first = [f"{where} {e}"]
    try:
        with attrs.validators.disabled():
            found = _validator_problems(CONVERTER.structure(raw, cls), where)
    except Exception:  # wrong types, or a post-init check: the first report says it
        found = []
    problems.extend(found or first)
    return None


# ------------------------------------------------------------------------------ loading
def merge_tables(base: dict, over: Mapping) -> dict:
    """``base`` with ``over`` merged in: tables merge key by key, anything else (values, arrays
    of tables) is replaced. Neither argument is modified. What ``extends`` does."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_tables(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_toml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read ``path`` with its ``extends`` chain merged in (base first)."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(p.name for p in (*_seen, path))
        raise ConfigError([f"{path}: extends loops: {chain}"])
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError([f"{path}: extends must be a path string, got {base!r}"])
    return merge_tables(read_toml(path.parent / base, (*_seen, path)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=1"`` -> (["a", "b"], 1). The value is TOML, else a string."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected section.key=value"])
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return [k.strip() for k in key.split(".")], value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply ``--set`` overrides to a raw config dict (returns a new dict).

    Arrays of tables are indexed by number: ``--set perturb.0.rho=0.1``.
    """
    out = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = out
        try:
            for k in keys[:-1]:
                node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
            last = keys[-1]
            node[int(last) if isinstance(node, list) else last] = value
        except (ValueError, IndexError, TypeError, AttributeError):
            raise ConfigError([f"--set {text!r}: no such place in the config"]) from None
    return out


def _structure_selected(
    raw: Any, slot: str, where: str, registry: Registry, problems: list[str]
) -> Selected | None:
    if not isinstance(raw, Mapping):
        problems.append(f"{where} must be a table with a 'name' key, got {raw!r}")
        return None
    raw = dict(raw)
    name = raw.pop("name", None)
    choices = ", ".join(registry.names(slot)) or "(none registered)"
    if name is None:
        problems.append(f"{where} name: required key missing; choices: {choices}")
        return None
    try:
        entry = registry.get(slot, name)
    except (KeyError, TypeError):
        problems.append(f"{where} name: unknown {slot} {name!r}; choices: {choices}")
        return None
    options = _structure_section(raw, entry.config, where, problems)
    return None if options is None else Selected(name, options)


def structure(data: Mapping, registry: Registry, source: str = "<config>") -> RunConfig:
    """Turn a raw (merged, overridden) config dict into a :class:`RunConfig`.

    Every problem is collected; one :class:`ConfigError` lists them all.
    """
    problems: list[str] = []
    data = dict(data)
    data.pop("extends", None)
    for key in data:
        if key not in TOP_LEVEL:
            problems.append(f"{source}: unknown section or key {key!r}; valid: {', '.join(TOP_LEVEL)}")
    kwargs: dict[str, Any] = {}
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        problems.append(f"{source}: seed must be an integer, got {seed!r}")
    kwargs["seed"] = seed
    for section, cls in PLAIN_SECTIONS.items():
        if section not in data:
            continue
        value = _structure_section(data[section], cls, f"{source}: [{section}]", problems)
        if value is not None:
            kwargs[section] = value
    for section, (slot, many) in COMPONENT_SECTIONS.items():
        raw = data.get(section, DEFAULTS.get(section))
        if raw is None:
            continue
        if many:
            items = raw if isinstance(raw, list) else [raw]
            sel = [
                _structure_selected(r, slot, f"{source}: [[{section}]] #{i}", registry, problems)
                for i, r in enumerate(items)
            ]
            kwargs[section] = tuple(s for s in sel if s is not None)
            continue
        if isinstance(raw, list):
            names = [r.get("name", "?") for r in raw if isinstance(r, Mapping)]
            problems.append(
                f"{source}: [{section}] at most one {slot} component per run, got "
                f"{len(raw)} ({', '.join(map(str, names))})"
            )
            for i, item in enumerate(raw):  # their own problems are reported too
                _structure_selected(item, slot, f"{source}: [[{section}]] #{i}", registry,
                                    problems)
            continue
        selected = _structure_selected(raw, slot, f"{source}: [{section}]", registry, problems)
        if selected is not None:
            kwargs[section] = selected
    if "logging" in kwargs:
        for obs in kwargs["logging"].observers:
            if obs not in registry.names("observer"):
                problems.append(
                    f"{source}: [logging] observers: unknown observer {obs!r}; "
                    f"choices: {', '.join(registry.names('observer'))}"
                )
    if problems:
        raise ConfigError(problems)
    return RunConfig(**kwargs)


def load(
    path: str | Path, registry: Registry, overrides: Iterable[str] = ()
) -> tuple[RunConfig, dict]:
    """Read, merge ``extends``, apply ``--set`` overrides and structure a config file.

    Returns the config and the raw merged dict it was built from.
    """
    data = apply_overrides(read_toml(path), overrides)
    return structure(data, registry, source=Path(path).name), data


def to_dict(cfg: RunConfig) -> dict:
    """Plain-data form of a config (what ``structure`` reads back to an equal config)."""

    def sel(s: Selected) -> dict:
        return {"name": s.name, **CONVERTER.unstructure(s.options)}

    out: dict[str, Any] = {"seed": cfg.seed}
    for section in PLAIN_SECTIONS:
        out[section] = CONVERTER.unstructure(getattr(cfg, section))
    for section, (_slot, many) in COMPONENT_SECTIONS.items():
        value = getattr(cfg, section)
        if many:
            out[section] = [sel(s) for s in value]
        elif value is not None:
            out[section] = sel(value)
    return out
