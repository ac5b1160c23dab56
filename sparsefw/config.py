"""Run configuration: TOML files structured into frozen attrs classes by one cattrs converter.

* ``extends = "base.toml"`` (a path relative to the file's directory; ``..`` may reach up, an
  absolute path is refused) merges a base file under this one: tables merge
  key by key, anything else (values, arrays of tables) is replaced.
* ``--set section.key=value`` overrides are applied after ``extends``; the value is parsed as a
  TOML value and falls back to a plain string.
* Unknown keys are rejected; every problem is collected and reported together in one
  :class:`ConfigError` (type errors and range errors alike), each line naming the file, the
  section and the key, and unknown names listing the valid choices. Offending values are shown
  cut to about 80 characters.
* Numbers are strict: a float must be finite (NaN and infinities are refused; TOML's ``1e400``
  reads as infinity) and an integer must fit in 64 bits, in every section and every component's
  options.

Sections that select a component (``[model]``, ``[data]``, ``[mask_init]``,
``[topology_update]``, ``[[gradient_correct]]``, ``[[perturb]]``, ``[[schedule]]``) carry a
``name`` plus that component's own options, structured into the component's config class.
"""

from __future__ import annotations

import copy
import math
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
from sparsefw.registry import Registry

#: ``[sparsity] kind``: hard masks (pruned weights exactly zero) or forward masks (dense
#: weights, the forward pass sees ``w ⊙ m``); :class:`sparsefw.masks.MaskSet` implements both.
#: Defined here, not in :mod:`sparsefw.masks`, so that reading a config needs no torch.
MASK_KINDS = ("hard", "forward")
#: the values of ``[sparsity] init`` (:mod:`sparsefw.initialisation` implements them; kept here so
#: that reading a config needs no torch)
INITS = ("dense", "sparse_fan_in")
#: the values of ``[sparsity] compute`` (:mod:`sparsefw.sparse_compute` implements them)
COMPUTE_MODES = ("dense", "sparse", "auto")
#: the values of ``[optimizer] implementation`` (:func:`sparsefw.engine.optim.build_optimizer`)
OPTIMIZER_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop", "fused_masked")
#: longest value shown in an error message (:func:`short`)
SHOWN = 80
#: longest problem line; a longer one (a plugin's message echoing a huge value) is cut
MAX_PROBLEM = 400
#: integers must fit in a signed 64-bit integer (what torch and numpy take)
INT_LIMIT = 2**63


def short(value: Any, limit: int = SHOWN) -> str:
    """``repr(value)`` cut to about ``limit`` characters (saying how long it was)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


class ConfigError(ValueError):
    """One or more problems in a configuration; ``problems`` holds one line per problem."""

    def __init__(self, problems: Iterable[str]):
        self.problems = [p if len(p) <= MAX_PROBLEM else f"{p[:MAX_PROBLEM]}… (cut)"
                         for p in problems]
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the configuration:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


# ------------------------------------------------------------------------------ validators
def one_of(*choices: str):
    """attrs validator: the value is one of ``choices`` (the message lists them)."""

    def check(_inst, attribute, value):
        if value not in choices:
            raise ValueError(
                f"{attribute.name} = {short(value)} is not one of: {', '.join(map(str, choices))}"
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
            raise ValueError(f"{attribute.name} must be in {rng}, got {short(value)}")

    return check


def each(check):
    """attrs validator: ``check`` (another validator) holds for every item of a sequence."""

    def run(inst, attribute, value):
        for i, item in enumerate(value):
            check(inst, _Named(f"{attribute.name}[{i}]"), item)

    return run


def increasing(_inst, attribute, value):
    """attrs validator: a sequence in strictly increasing order."""
    if any(b <= a for a, b in zip(value, value[1:], strict=False)):
        raise ValueError(f"{attribute.name} must be strictly increasing, got {short(value)}")


def unique(_inst, attribute, value):
    """attrs validator: no item of a sequence appears twice."""
    twice = sorted({v for v in value if list(value).count(v) > 1}, key=str)
    if twice:
        raise ValueError(f"{attribute.name} lists {', '.join(map(short, twice))} more than once")


def plain_path(_inst, attribute, value):
    """attrs validator: a string usable as a file name or path (no NUL, not empty)."""
    if value is not None and (not value or "\0" in value):
        raise ValueError(f"{attribute.name} must be a non-empty path without NUL characters, "
                         f"got {short(value)}")


def device_name(_inst, attribute, value):
    """attrs validator: ``"auto"`` or a device torch understands (``cpu``, ``cuda``,
    ``cuda:1``, …). torch is imported only for a value other than ``"auto"`` (reading the
    defaults, as ``sparsefw --help`` does, must not pay torch's import)."""
    if value == "auto":
        return
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{attribute.name} = {short(value)} is not a device: use \"auto\", "
                         f"\"cpu\", \"cuda\" or \"cuda:N\"") from None


@attrs.frozen
class _Named:
    """Stands in for an attrs attribute in messages about one item of a sequence."""

    name: str


# ------------------------------------------------------------------------------ sections
@attrs.frozen
class TrainConfig:
    """``[train]``: budget, device and bookkeeping of a run."""

    epochs: int = attrs.field(default=10, validator=in_range(0))
    batch_size: int = attrs.field(default=64, validator=in_range(0))
    eval_batch_size: int = attrs.field(default=512, validator=in_range(0))
    device: str = attrs.field(default="auto", validator=device_name)
    amp: str = attrs.field(default="off", validator=one_of("off", "bf16", "fp16"))
    compile: bool = False
    channels_last: bool = False
    num_workers: int = attrs.field(default=0, validator=in_range(0, lo_open=False))
    log_every: int = attrs.field(default=20, validator=in_range(0))
    #: also checkpoint every this many steps (0: only at the end of each epoch)
    checkpoint_every: int = attrs.field(default=0, validator=in_range(0, lo_open=False))
    out_dir: str = attrs.field(default="runs", validator=plain_path)
    name: str | None = attrs.field(default=None, validator=plain_path)
    #: train this many rounds of ``epochs`` each (round hooks run between them)
    rounds: int = attrs.field(default=1, validator=in_range(0))
    #: the iteration every round after the first starts from: later rounds replay iterations
    #: ``round_start .. epochs·steps_per_epoch − 1`` of the first (learning-rate schedule and
    #: data position), as training after weight rewinding to iteration k does
    round_start: int = attrs.field(default=0, validator=in_range(0, lo_open=False))
    #: stop after this many steps in total (None: ``rounds · epochs`` full epochs)
    max_steps: int | None = attrs.field(default=None, validator=in_range(0))
    #: a non-finite loss or gradient: ``stop`` the run with an error naming the step, or
    #: ``skip`` that step's update (counted; see ``max_nonfinite_skips``)
    on_nonfinite: str = attrs.field(default="stop", validator=one_of("stop", "skip"))
    #: with ``on_nonfinite = "skip"``: stop once more steps than this were skipped
    max_nonfinite_skips: int = attrs.field(default=10, validator=in_range(0, lo_open=False))
    #: under torchrun: ``ddp`` replicates the model on every rank; ``fsdp`` shards parameters,
    #: masks and optimizer state over the ranks (FSDP2 ``fully_shard``; docs/distributed.md)
    parallel: str = attrs.field(default="ddp", validator=one_of("ddp", "fsdp"))


@attrs.frozen
class OptimizerConfig:
    """``[optimizer]``: SGD (momentum, Nesterov, weight decay) or AdamW."""

    name: str = attrs.field(default="sgd", validator=one_of("sgd", "adamw"))
    lr: float = attrs.field(default=0.1, validator=in_range(0, lo_open=False))
    momentum: float = attrs.field(default=0.9, validator=in_range(0, 1, lo_open=False, hi_open=True))
    nesterov: bool = False
    weight_decay: float = attrs.field(default=5e-4, validator=in_range(0, lo_open=False))
    betas: tuple[float, float] = attrs.field(
        default=(0.9, 0.999), validator=each(in_range(0, 1, lo_open=False, hi_open=True)))
    eps: float = attrs.field(default=1e-8, validator=in_range(0))
    #: torch's kernels for the update: ``auto`` takes ``fused`` where torch has it for the
    #: device (CPU and CUDA), else ``foreach``; ``for_loop`` is torch's per-tensor default on CPU;
    #: ``fused_masked`` (SGD, hard masks, x86-64 CPU) is torch's fused SGD with the gradient
    #: masking folded into its pass, a kernel of sparsefw's built on first use
    #: (:mod:`sparsefw.kernels`; needs a C++ compiler and ``ninja``), same results bit for bit
    implementation: str = attrs.field(default="auto",
                                      validator=one_of(*OPTIMIZER_IMPLEMENTATIONS))


@attrs.frozen
class LRScheduleConfig:
    """``[lr_schedule]``: a multiplier of the base learning rate over training."""

    name: str = attrs.field(default="cosine", validator=one_of("constant", "cosine", "step", "linear"))
    warmup_epochs: float = attrs.field(default=0.0, validator=in_range(0, lo_open=False))
    #: ``step``: fractions of training at which the rate is multiplied by ``gamma``
    milestones: tuple[float, ...] = attrs.field(
        default=(0.5, 0.75), validator=[each(in_range(0, 1, hi_open=True)), increasing])
    gamma: float = attrs.field(default=0.1, validator=in_range(0))
    #: ``cosine``/``linear``: multiplier reached at the end
    final_scale: float = attrs.field(default=0.0, validator=in_range(0, 1, lo_open=False))


@attrs.frozen
class SparsityConfig:
    """``[sparsity]``: global density, its layer-wise allocation, the masking kind and how masked
    layers compute (``compute``: ``dense``, ``sparse`` kernels, or ``auto``, measured per layer)."""

    density: float = attrs.field(default=1.0, validator=in_range(0, 1))
    distribution: str = attrs.field(default="erk", validator=one_of(*DISTRIBUTIONS))
    #: ER/ERK: a convolution's kernel size counts in its layer score (false: channels only, as
    #: google-research/rigl's ``erdos_renyi``); see docs/methods/erk.md
    er_kernel: bool = True
    #: fnmatch patterns of parameter or module names kept dense (by default none: every
    #: Linear/Conv weight is sparsified, the first layer's included)
    dense_layers: tuple[str, ...] = ()
    #: also keep the model's input layer (its first Linear/Conv: a ResNet's stem, a ViT's patch
    #: embedding) dense, as google-research/rigl's ImageNet runs do; see docs/methods/erk.md
    first_layer_dense: bool = False
    kind: str = attrs.field(default="hard", validator=one_of(*MASK_KINDS))
    #: ``sparse_fan_in``: after ``mask_init``, scale each masked layer's weights for the
    #: fan-in each unit keeps (Evci et al. 2022, arXiv 2010.03533); ``dense``: as the model
    #: initialised them
    init: str = attrs.field(default="dense", validator=one_of(*INITS))

    #: how masked Linear layers compute in training (:mod:`sparsefw.sparse_compute`)
    compute: str = attrs.field(default="dense", validator=one_of(*COMPUTE_MODES))
    #: sparsefw's compiled CPU kernels for the mask arithmetic (:mod:`sparsefw.kernels`, built
    #: on first use; needs a C++ compiler and ``ninja``): topology updates pre-filter their
    #: exact selection in one pass, and the engine's ``[optimizer] implementation = "auto"``
    #: takes ``fused_masked`` where it applies. The same results bit for bit, only faster;
    #: nothing is built or changed for a run on a GPU
    cpu_kernels: bool = False


@attrs.frozen
class DebugConfig:
    """``[debug]``: checks for plugin authors, off by default."""

    #: check the hook contract's cheap invariants during training and stop with the
    #: contract's message naming the component (also ``SPARSEFW_CHECK=1``); costs time
    check_plugins: bool = False


@attrs.frozen
class LoggingConfig:
    """``[logging]``: which observer components run."""

    observers: tuple[str, ...] = attrs.field(default=("jsonl", "tensorboard", "progress"),
                                             validator=unique)


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
    debug: DebugConfig = DebugConfig()


#: plain sections and their classes
PLAIN_SECTIONS = {
    "train": TrainConfig,
    "optimizer": OptimizerConfig,
    "lr_schedule": LRScheduleConfig,
    "sparsity": SparsityConfig,
    "logging": LoggingConfig,
    "debug": DebugConfig,
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
#: seeds are in [0, 2**32): the engine derives further seeds from them by arithmetic
MAX_SEED = 2**32


# ------------------------------------------------------------------------------ converter
def _strict(kind: type):
    """Structure hook: exactly ``kind`` (an integer is a float too), finite floats and 64-bit
    integers only."""

    def hook(value, _type):
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 2**1023:
                raise ValueError(f"{short(value)} is too large for a float")
            return float(value)
        if not ok:
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__} {short(value)}")
        if kind is float and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        if kind is int and not -INT_LIMIT <= value < INT_LIMIT:
            raise ValueError(f"{short(value)} does not fit in a 64-bit integer")
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


def _message(exc: BaseException) -> str:
    """An exception's message; attrs' own validators (``attrs.validators.in_``, ...) raise
    with the message first and the ``Attribute`` object after it, which is not shown."""
    if len(exc.args) > 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


def _format_exception(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, ForbiddenExtraKeysError):
        valid = ", ".join(a.name for a in attrs.fields(exc.cl)) or "(none)"
        return f"unknown key {', '.join(sorted(exc.extra_fields))}; valid keys: {valid}"
    if isinstance(exc, KeyError):
        return f"required key missing{f' ({exc})' if exc.args else ''}"
    return _message(exc)


def _problems(exc: ClassValidationError, where: str) -> list[str]:
    lines = cattrs.transform_error(exc, path="$", format_exception=_format_exception)
    out = []
    for line in lines:
        msg, _, path = line.rpartition(" @ ")
        key = path[2:] if path.startswith("$.") else ""
        out.append(f"{where} {key + ': ' if key else ''}{msg}")
    return out


def _validator_problems(obj: Any, where: str, prefix: str = "",
                        only: Iterable[str] | None = None) -> list[str]:
    """Run every field validator of ``obj`` (and of nested attrs values), collecting failures;
    ``only``: just these fields."""
    out = []
    for a in attrs.fields(type(obj)):
        if only is not None and a.name not in only:
            continue
        value = getattr(obj, a.name)
        if a.validator is not None:
            try:
                a.validator(obj, a, value)
            except (ValueError, TypeError) as e:
                msg = _message(e)
                named = msg.startswith((a.name, repr(a.name)))
                out.append(f"{where} {prefix if named else prefix + a.name + ': '}{msg}")
        if attrs.has(type(value)):
            out.extend(_validator_problems(value, where, f"{prefix}{a.name}."))
    return out


def _failed_keys(exc: ClassValidationError) -> set[str]:
    """The keys of a section whose values could not be structured (wrong type, unknown)."""
    with_notes, without = exc.group_exceptions()
    keys = {note.name for _e, note in with_notes}
    for e in without:
        if isinstance(e, ForbiddenExtraKeysError):
            keys |= set(e.extra_fields)
    return keys


def _structure_section(raw: Any, cls: type, where: str, problems: list[str]) -> Any:
    """``raw`` structured into ``cls``, or ``None`` with every problem added to ``problems``.

    attrs validators stop at the first failing field, and a type error stops structuring; so on
    a failure the keys that structured are structured again with validators off and each
    checked: type errors and range errors of one section are reported together."""
    if not isinstance(raw, Mapping):
        problems.append(f"{where} must be a table, got {type(raw).__name__} {short(raw)}")
        return None
    failed: set[str] = set()
    try:
        return CONVERTER.structure(raw, cls)
    except ClassValidationError as e:
        first = _problems(e, where)
        failed = _failed_keys(e)
    except (ValueError, TypeError) as e:
        first = [f"{where} {_message(e)}"]
    typed = {k: v for k, v in raw.items() if k not in failed}
    try:
        with attrs.validators.disabled():
            obj = CONVERTER.structure(typed, cls)
        found = _validator_problems(obj, where, only=typed)
    except Exception:  # a required key missing, or a post-init check: the first report says it
        found = []
    problems.extend(first + [f for f in found if f not in first] if failed else found or first)
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
            data = tomllib.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a config file"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text (byte {e.start}: {e.reason})"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot be read: {e.strerror or e}"]) from None
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base or "\0" in base:
        raise ConfigError([f"{path}: extends must be a path string, got {short(base)}"])
    rel = Path(base)
    if rel.is_absolute() or base.startswith("~"):
        raise ConfigError([f"{path}: extends = {short(base)} must be a path relative to this "
                           f"file's directory (an absolute path would tie the config to one "
                           f"machine)"])
    return merge_tables(read_toml(path.parent / rel, (*_seen, path)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=1"`` -> (["a", "b"], 1). The value is TOML, else a string."""
    if "=" not in text:
        raise ConfigError([f"--set {short(text)}: expected section.key=value"])
    key, raw = text.split("=", 1)
    keys = [k.strip() for k in key.split(".")]
    if not all(keys):
        raise ConfigError([f"--set {short(text)}: expected section.key=value (an empty name "
                           f"in {short(key)})"])
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return keys, value


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
            raise ConfigError([f"--set {short(text)}: no such place in the config"]) from None
    return out


def _structure_selected(
    raw: Any, slot: str, where: str, registry: Registry, problems: list[str]
) -> Selected | None:
    if not isinstance(raw, Mapping):
        problems.append(f"{where} must be a table with a 'name' key, got {short(raw)}")
        return None
    raw = dict(raw)
    name = raw.pop("name", None)
    choices = ", ".join(registry.names(slot)) or "(none registered)"
    if name is None:
        problems.append(f"{where} name: required key missing; choices: {choices}")
        return None
    try:
        entry = registry.get(slot, name)
    except (KeyError, TypeError) as exc:
        known = isinstance(exc, KeyError) and isinstance(name, str) and (
            (slot, name) in getattr(registry, "clashes", {})
            or (slot, name) in getattr(registry, "rejected", {}))
        problems.append(f"{where} name: {exc.args[0]}" if known
                        else f"{where} name: unknown {slot} {short(name)}; choices: {choices}")
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
            problems.append(f"{source}: unknown section or key {short(key)}; "
                            f"valid: {', '.join(TOP_LEVEL)}")
    kwargs: dict[str, Any] = {}
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        problems.append(f"{source}: seed must be an integer, got {short(seed)}")
    elif not 0 <= seed < MAX_SEED:
        problems.append(f"{source}: seed must be in [0, 2**32), got {short(seed)}")
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
                    f"{source}: [logging] observers: unknown observer {short(obs)}; "
                    f"choices: {', '.join(registry.names('observer'))}"
                )
    problems.extend(_across_sections(kwargs, source))
    if problems:
        raise ConfigError(problems)
    return RunConfig(**kwargs)


def _across_sections(kwargs: Mapping[str, Any], source: str) -> list[str]:
    """Checks that involve two sections (each section itself already valid)."""
    out = []
    train, lr = kwargs.get("train", TrainConfig()), kwargs.get("lr_schedule", LRScheduleConfig())
    if lr.warmup_epochs > train.epochs:
        out.append(f"{source}: [lr_schedule] warmup_epochs: {lr.warmup_epochs!r} is longer "
                   f"than the run ([train] epochs = {train.epochs})")
    return out


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
