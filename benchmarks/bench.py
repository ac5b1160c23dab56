#!/usr/bin/env python
"""Step time and memory of sparsefw, side by side with a plain PyTorch training loop.

One run measures, on the same model, the same fixed batch and the same optimizer settings
(SGD, momentum 0.9, weight decay 5e-4; the engine's default ``[optimizer] implementation =
"auto"``: fused kernels where torch has them):

  (a) ``plain``   a hand-written loop: ``model(x)``, cross-entropy, backward, SGD step — the
                  fastest of three such loops timed in the same interleaved blocks, with
                  torch's per-tensor default, ``foreach=True`` and ``fused=True`` SGD (the table
                  says which won and the other two's times)
  (b) ``dense``   the sparsefw engine at density 1.0 (all-ones hard masks)
  (c) ``hard90``  hard masks at 90% sparsity (random masks, ERK allocation, static);
                  (c') ``loop_hard90`` the same through a Sparsifier in the plain loop; (c")
                  ``hard90_masked`` the same with ``[optimizer] implementation =
                  "fused_masked"`` (the gradient masking folded into the SGD update by
                  sparsefw's compiled kernel; CPU only, "not available" where it cannot build)
  (d) ``nm24``    forward masking with a 2:4 mask (the ``nm`` mask_init when registered, else a
                  forward MaskSet whose 2:4 masks the benchmark builds itself); ``nm24_every``
                  recomputes the mask every step (``nm`` topology, SR-STE style) when registered
  (e) ``rigl``    RigL on top of (c): a regular step, an update step, and the cost amortised
                  over ΔT = 100 steps; (e') ``rigl_kernels`` the same with ``[sparsity]
                  cpu_kernels = true`` (compiled selection pre-filter, fused_masked SGD; against
                  (c"); CPU only); (e2)-(e6) ``set``, ``granet``, ``dsr``, ``snfs``, ``mest`` the
                  same for the other drop-and-grow methods, and (e2')-(e6') ``set_kernels`` …
                  ``mest_kernels`` those with ``cpu_kernels`` (only when ``--only`` names them)
  (f) ``s2sam``, (g) ``sam``, (h) ``agent``  on top of (c); AGENT also per epoch (its epoch hooks
                  run a statistics pass over the training data); (h') ``agent_prev`` its
                  ``mean_grad = "previous_epoch"`` variant (no statistics pass); (h'')
                  ``agent_every3`` that variant with the correction on every third step
                  (``correct_every = 3``; its timed blocks hold whole cycles of 3 steps)

Components that are not registered are reported as "not available". sparsefw steps are timed
through the real engine: a :class:`sparsefw.engine.Trainer` built from a config dict (synthetic
in-memory data, no observers), ``trainer._init_masks()`` once, then ``trainer.step(x, y)`` on a
fixed batch, never on a logging step. Timings are interleaved (one block of every variant per
repeat) so that drifting machine load spreads over all variants; each figure is the median of
the repeats with its inter-quartile range. CUDA is synchronised around every timed block, which
is timed with CUDA events (``timing.BlockTimer``).

Memory: ``state MB`` counts the bytes of every persistent tensor a variant holds (parameters,
gradients, optimizer state, masks, plugin buffers), exactly, on any device. ``peak MB`` is, on
CUDA, ``torch.cuda.max_memory_allocated()`` during one step minus the memory allocated before the
variant was built (its data set excluded); on CPU, the persistent state without gradients plus
the peak of the tensor memory allocated during one step, read from ``torch.profiler``'s memory
events (the process RSS is useless here: the allocator keeps and reuses freed memory).

Usage::

    python benchmarks/bench.py                     # MLP + ResNet-32 (+ ViT), every device
    python benchmarks/bench.py --quick             # CI: MLP + a small ResNet, few repeats
    python benchmarks/bench.py --sweep             # also scaling with width and masked layers
    python benchmarks/bench.py --profile           # also where the time goes (torch.profiler)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import gc
import importlib
import io
import json
import math
import os
import platform
import pstats
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from sparsefw import config as config_mod
from sparsefw.engine import Trainer
from sparsefw.engine.optim import kernel_options
from sparsefw.masks import sparsifiable_params
from sparsefw.plugins import load_catalogue
from sparsefw.sparsifier import Sparsifier

from timing import BlockTimer
from timing import stats as _stats
from timing import sync as _sync

#: ``[train] log_every`` of every benchmarked run: no step is a logging step
LOG_NEVER = 10**9
#: RigL's update interval ΔT for the amortised figure
RIGL_EVERY = 100
#: the other drop-and-grow rows beside RigL's: (topology name, label, note)
TOPOLOGY_ROWS = (
    ("set", "SET", ""),
    ("granet", "GraNet", "ERK 90% start and target: after its pruning phase (regrowth only)"),
    ("dsr", "DSR", ""),
    ("snfs", "SNFS", ""),
    ("mest", "MEST", "drop by |w| + λ|∇L|, random growth"),
)
#: acceptance targets (issues "A fast training engine, measured" and "Speed, second pass"):
#: variant -> (base, limit); a limit may depend on the batch size (``None``: any other)
TARGETS = {"hard90": ("plain", 1.05), "hard90_masked": ("plain", 1.05),
           "s2sam": ("hard90", {32: 1.10, None: 1.05})}
#: a topology update step costs at most this many of its own regular steps
UPDATE_TARGETS = {"rigl": 2.0, "rigl_kernels": 2.0}
#: a timed block lasts about this long (at most ``steps`` steps, at least one)
BLOCK_S = 0.25
#: variants whose step is shorter than this get an untimed step before each timed block
REWARM_BELOW_S = 0.05
OPTIM = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False}


# ------------------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class Sizes:
    """How big and how long: one preset per mode (full, quick, tiny)."""

    batch: int
    mlp_hidden: tuple[int, ...]
    image: tuple[int, int, int]
    resnet_width: int
    default_models: tuple[str, ...]
    warmup: int
    repeats: int
    steps: int  # most timed steps per repeat (fewer when a step is long: see BLOCK_S)
    epoch_batches: int  # batches per epoch of the synthetic training set
    epoch_repeats: int
    sweep_widths: tuple[int, ...]
    sweep_depth: int
    sweep_depth_width: int
    sweep_masked: tuple[int, ...]


PRESETS = {
    "full": Sizes(128, (1024, 512), (3, 32, 32), 16, ("mlp", "resnet32", "vit"), 2, 5, 10, 2, 3,
                  (256, 512, 1024, 2048), 16, 256, (0, 1, 4, 8, 17)),
    "quick": Sizes(32, (512, 256), (3, 32, 32), 8, ("mlp", "resnet20"), 2, 3, 5, 2, 2,
                   (128, 256), 8, 64, (0, 1, 9)),
    "tiny": Sizes(8, (32,), (3, 8, 8), 4, ("mlp", "resnet20"), 1, 2, 2, 2, 1,
                  (16, 32), 4, 16, (0, 5)),
}


@dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark: registry name, options, one sample's shape and the batch size."""

    key: str
    name: str
    options: dict
    input_shape: tuple[int, ...]
    batch: int
    num_classes: int = 10
    #: token-id inputs and per-position targets (a language model) over this vocabulary
    #: (``num_classes`` is then the vocabulary size); None: float inputs, one label per sample
    vocab: int | None = None
    #: the ``[data]`` section of the engine's runs; None: ``synthetic`` data shaped like the spec
    data: dict | None = None

    @property
    def label(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        shape = "x".join(map(str, self.input_shape))
        return f"{self.name}({opts}) on {shape}, batch {self.batch}"


def batch_tensors(spec: ModelSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed batch every variant of ``spec`` is timed on (seeded)."""
    gen = torch.Generator().manual_seed(1)
    if spec.vocab is not None:
        x = torch.randint(0, spec.vocab, (spec.batch, *spec.input_shape), generator=gen)
        y = torch.randint(0, spec.vocab, (spec.batch, *spec.input_shape), generator=gen)
    else:
        x = torch.randn(spec.batch, *spec.input_shape, generator=gen)
        y = torch.randint(0, spec.num_classes, (spec.batch,), generator=gen)
    return x.to(device), y.to(device)


def autocast(device: torch.device, amp: str):
    """The engine's mixed precision (``[train] amp``) for the plain loop."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def model_spec(key: str, sizes: Sizes) -> ModelSpec:
    """The benchmarked configuration of ``key`` (``mlp``, ``resnet20/32/56``, ``vit``)."""
    if key == "mlp":
        return ModelSpec("mlp", "mlp", {"hidden": list(sizes.mlp_hidden)}, sizes.image,
                         sizes.batch)
    if key.startswith("resnet"):
        return ModelSpec(key, key, {"width": sizes.resnet_width}, sizes.image, sizes.batch)
    return ModelSpec(key, key, {}, sizes.image, sizes.batch)


# ------------------------------------------------------------------------------ variants
@dataclass
class Variant:
    """One benchmarked way of training: the plain loop or an engine config."""

    key: str
    label: str
    base: str | None = "plain"
    #: engine config sections merged over the base config; None: the plain loop
    sections: dict | None = None
    #: (slot, name) pairs that must be registered
    requires: tuple[tuple[str, str], ...] = ()
    #: called as ``post_init(trainer)`` after ``_init_masks``
    post_init: Callable[[Trainer], None] | None = None
    note: str = ""
    #: a topology variant: an update step is timed beside its regular step, and the cost
    #: amortised over ``RIGL_EVERY`` steps
    updates: bool = False
    #: ``"trainer"``: the sections run in a Trainer; ``"loop"``: in the plain loop, through a
    #: :class:`sparsefw.Sparsifier` wrapping its optimizer
    front_door: str = "trainer"
    #: steps of the variant's cycle (AGENT's ``correct_every``): each timed block holds a
    #: multiple of it, so every block times the same mix of step kinds
    period: int = 1
    #: ``unavailable(device)``: why the variant cannot run there (None: it can)
    unavailable: Callable[[torch.device], str | None] | None = None
    #: measured only when ``--only`` names it (not part of the default table)
    opt_in: bool = False


def _hard90(sparsity: dict | None = None, **extra) -> dict:
    return {"sparsity": {"density": 0.1, "distribution": "erk", "kind": "hard",
                         **(sparsity or {})},
            "mask_init": {"name": "random"}, **extra}


def cpu_kernels_unavailable(device: torch.device) -> str | None:
    """Why ``[sparsity] cpu_kernels = true`` cannot run on ``device`` (its kernels are built
    here on first use), or None."""
    if device.type != "cpu":
        return "sparsefw's CPU kernels are for CPUs"
    try:
        from sparsefw.kernels import unavailable
    except ImportError:
        return "this sparsefw has no [sparsity] cpu_kernels"
    return unavailable()


def masked_sgd_unavailable(device: torch.device) -> str | None:
    """Why ``[optimizer] implementation = "fused_masked"`` cannot run on ``device`` (its
    kernel is built here on first use), or None."""
    if device.type != "cpu":
        return "the fused_masked kernel is for CPUs"
    try:
        from sparsefw import kernels
    except ImportError:
        return "this sparsefw has no fused_masked kernel"
    # (load_masked_sgd: the name before the compare-and-compact kernel joined the module)
    load = getattr(kernels, "load_kernels", None) or kernels.load_masked_sgd
    KernelUnavailable = kernels.KernelUnavailable
    try:
        load()
    except KernelUnavailable as exc:
        return str(exc)
    return None


def nm_mask_2_4(w: torch.Tensor) -> torch.Tensor:
    """2:4 mask of ``w``: the 2 largest ``|w|`` of every 4 consecutive entries along the input
    dimension (``w`` flattened row-major; the benchmark's own fallback when no ``nm``)."""
    groups = w.detach().abs().reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(2, dim=1).indices, True)
    return keep.view_as(w)


def _fallback_2_4(trainer: Trainer) -> None:
    for name, p in trainer.masks.params.items():
        trainer.masks.update(name, nm_mask_2_4(p))


def _nm_dense_layers(spec: ModelSpec, registry) -> list[str]:
    """Sparsifiable layers whose grouped dimension is not a multiple of 4 (kept dense)."""
    entry = registry.get("model", spec.name)
    model = entry.factory(config_mod.CONVERTER.structure(spec.options, entry.config),
                          input_shape=spec.input_shape, num_classes=spec.num_classes)
    try:
        from sparsefw.nm import check_divisible
    except ImportError:  # the fallback groups the flattened weight
        def check_divisible(shape, m, mode, name):
            if math.prod(shape) % m:
                raise ValueError(name)
    bad = []
    for name, p in sparsifiable_params(model).items():
        try:
            check_divisible(tuple(p.shape), 4, "row", name)
        except ValueError:
            bad.append(name)
    return bad


def variants(spec: ModelSpec, registry, names: set[str]) -> list[Variant]:
    """Every variant, in table order (availability is checked when measured)."""
    out = [
        Variant("plain", "(a) plain PyTorch loop", base=None),
        Variant("dense", "(b) sparsefw dense (density 1.0)",
                sections={"sparsity": {"density": 1.0, "kind": "hard"},
                          "mask_init": {"name": "random"}}),
        Variant("hard90", "(c) sparsefw hard-masked 90% (random, ERK)", sections=_hard90()),
        Variant("loop_hard90", "(c') plain loop + Sparsifier, hard-masked 90%", base="hard90",
                sections=_hard90(), front_door="loop"),
        Variant("hard90_masked", "(c\") hard-masked 90%, fused_masked SGD kernel",
                base="hard90", sections=_hard90(optimizer={"implementation": "fused_masked"}),
                unavailable=masked_sgd_unavailable),
    ]
    nm_dense = _nm_dense_layers(spec, registry)
    sp = {"density": 0.5, "distribution": "uniform", "kind": "forward", "dense_layers": nm_dense}
    note = f"dense: {', '.join(nm_dense)}" if nm_dense else ""
    if ("mask_init", "nm") in names:
        out.append(Variant("nm24", "(d) forward-masked 2:4 (nm)", sections={
            "sparsity": sp, "mask_init": {"name": "nm", "n": 2, "m": 4}}, note=note))
    else:
        out.append(Variant("nm24", "(d) forward-masked 2:4 (built directly)", sections={
            "sparsity": sp, "mask_init": {"name": "random"}}, post_init=_fallback_2_4, note=note))
    if ("topology_update", "nm") in names:
        out.append(Variant("nm24_every", "(d') 2:4 recomputed every step (nm topology)",
                           base="nm24", sections={
                               "sparsity": sp, "mask_init": {"name": "random"},
                               "topology_update": {"name": "nm", "every": 1, "n": 2, "m": 4,
                                                   "end": 1.0}}, note=note))
    out += [
        Variant("rigl", "(e) RigL, regular step", base="hard90",
                sections=_hard90(topology_update={"name": "rigl", "every": RIGL_EVERY}),
                requires=(("topology_update", "rigl"),), updates=True),
        Variant("rigl_kernels", "(e') RigL, cpu_kernels, regular step",
                base="hard90_masked",
                sections=_hard90(sparsity={"cpu_kernels": True},
                                 topology_update={"name": "rigl", "every": RIGL_EVERY}),
                requires=(("topology_update", "rigl"),), updates=True,
                unavailable=cpu_kernels_unavailable,
                note="compiled selection pre-filter and the fused_masked SGD kernel"),
        *(Variant(name, f"(e{i}) {label}, regular step", base="hard90",
                  sections=_hard90(topology_update={"name": name, "every": RIGL_EVERY}),
                  requires=(("topology_update", name),), updates=True, note=note)
          for i, (name, label, note) in enumerate(TOPOLOGY_ROWS, start=2)),
        *(Variant(f"{name}_kernels", f"(e{i}') {label}, cpu_kernels, regular step",
                  base="hard90_masked",
                  sections=_hard90(sparsity={"cpu_kernels": True},
                                   topology_update={"name": name, "every": RIGL_EVERY}),
                  requires=(("topology_update", name),), updates=True,
                  unavailable=cpu_kernels_unavailable, opt_in=True)
          for i, (name, label, _) in enumerate(TOPOLOGY_ROWS, start=2)),
        Variant("s2sam", "(f) S2-SAM", base="hard90",
                sections=_hard90(perturb=[{"name": "s2sam"}]), requires=(("perturb", "s2sam"),)),
        Variant("sam", "(g) SAM", base="hard90",
                sections=_hard90(perturb=[{"name": "sam"}]), requires=(("perturb", "sam"),)),
        Variant("agent", "(h) AGENT, training step", base="hard90",
                sections=_hard90(gradient_correct=[{"name": "agent"}]),
                requires=(("gradient_correct", "agent"),)),
        Variant("agent_prev", "(h') AGENT, previous_epoch variant", base="hard90",
                sections=_hard90(gradient_correct=[{"name": "agent",
                                                    "mean_grad": "previous_epoch"}]),
                requires=(("gradient_correct", "agent"),),
                note="no statistics pass: the mean gradient of the previous epoch's steps"),
        Variant("agent_every3", "(h'') AGENT, previous_epoch, correct_every = 3",
                base="hard90",
                sections=_hard90(gradient_correct=[{"name": "agent",
                                                    "mean_grad": "previous_epoch",
                                                    "correct_every": 3}]),
                requires=(("gradient_correct", "agent"),), period=3,
                note="(h') with the correction and its snapshot pass on every third step"),
    ]
    return out


# ------------------------------------------------------------------------------ memory
@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ warnings) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_step_allocation_peak(fn: Callable[[], None]) -> int:
    """Peak bytes of CPU tensor memory allocated during ``fn()`` (frees of memory allocated
    before it are not seen, so memory freed and re-allocated within — gradients — counts once),
    from the memory events of ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        with _quiet_stderr():
            prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    mem = [e["args"] for e in events
           if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    if not mem:
        return 0
    mem.sort(key=lambda a: a.get("Ev Idx", 0))
    # the reporter's running total outlives a profiling session: start from its value before
    start = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(a["Total Allocated"] for a in mem) - start


def tensor_bytes(*roots: Any) -> int:
    """Bytes of every distinct tensor storage reachable from ``roots`` through modules
    (parameters, their gradients, buffers), optimizers (state), containers and attrs/plain
    objects. Objects that reference the whole run (the train state, data sets) are not walked."""
    from sparsefw.state import TrainState

    seen_obj: set[int] = set()
    seen_storage: set[tuple[str, int]] = set()
    total = 0
    stack = list(roots)
    while stack:
        o = stack.pop()
        if o is None or isinstance(o, (str, bytes, int, float, bool)) or id(o) in seen_obj:
            continue
        seen_obj.add(id(o))
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            key = (str(o.device), s.data_ptr())
            if s.nbytes() and key not in seen_storage:
                seen_storage.add(key)
                total += s.nbytes()
            if isinstance(o, nn.Parameter) and o.grad is not None:
                stack.append(o.grad)
        elif isinstance(o, nn.Module):
            stack.extend(o.parameters())
            stack.extend(o.buffers())
        elif isinstance(o, torch.optim.Optimizer):
            stack.extend(o.state.values())
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        elif isinstance(o, (TrainState, Trainer, torch.utils.data.Dataset, torch.Generator)):
            continue
        elif attrs.has(type(o)):
            stack.extend(getattr(o, a.name, None) for a in attrs.fields(type(o)))
        elif hasattr(o, "__dict__") and not isinstance(o, type):
            stack.extend(vars(o).values())
    return total


# ------------------------------------------------------------------------------ runners
#: the plain loop's optimizer kernels, each timed; the fastest is the baseline
PLAIN_IMPLEMENTATIONS = ("for_loop", "foreach", "fused")


class PlainRunner:
    """The reference: a hand-written loop with the engine's optimizer settings and the
    optimizer kernels of ``implementation`` (an ``[optimizer] implementation`` value)."""

    def __init__(self, spec: ModelSpec, registry, device: torch.device, compile: bool,
                 amp: str = "off", implementation: str = "auto"):
        torch.manual_seed(0)
        self.device = device
        self.amp = amp
        entry = registry.get("model", spec.name)
        opts = config_mod.CONVERTER.structure(spec.options, entry.config)
        self.model = entry.factory(opts, input_shape=spec.input_shape,
                                   num_classes=spec.num_classes).to(device)
        self.forward = torch.compile(self.model) if compile else self.model
        fast = kernel_options(implementation, device)
        o = OPTIM
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=o["lr"],
                                         momentum=o["momentum"], nesterov=o["nesterov"],
                                         weight_decay=o["weight_decay"], **fast)
        self.data_bytes = 0
        self.steps_per_epoch = 1
        self.has_epoch_hooks = False

    def step(self, x, y) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp):
            out = self.forward(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        self.optimizer.step()

    def state_bytes(self) -> int:
        return tensor_bytes(self.model, self.optimizer)


class SparsifierRunner(PlainRunner):
    """The plain loop with a :class:`sparsefw.Sparsifier` around its optimizer: a user's own
    loop running the variant's method sections (``sparsifier.step(closure)``)."""

    def __init__(self, spec: ModelSpec, variant: Variant, catalogue, device: torch.device,
                 compile: bool, amp: str = "off"):
        super().__init__(spec, catalogue.registry, device, compile, amp)
        self.sparsifier = Sparsifier(self.forward, self.optimizer, variant.sections,
                                     catalogue=catalogue, total_steps=10**9, amp=amp)

    def step(self, x, y) -> None:
        def closure():
            with autocast(self.device, self.amp):
                out = self.forward(x)
            loss = F.cross_entropy(out.float(), y)
            loss.backward()
            return loss

        self.sparsifier.step(closure)

    def state_bytes(self) -> int:
        sp = self.sparsifier
        return tensor_bytes(self.model, self.optimizer, sp.masks,
                            [c.instance for c in sp.plugins.components])


class EngineRunner:
    """A real :class:`Trainer` whose ``step`` is called on the fixed batch."""

    def __init__(self, spec: ModelSpec, variant: Variant, catalogue, device: torch.device,
                 compile: bool, sizes: Sizes, run_dir: Path, amp: str = "off"):
        raw = engine_config(spec, variant.sections or {}, device, compile, sizes, amp)
        cfg = config_mod.structure(raw, catalogue.registry, source=f"bench:{variant.key}")
        self.trainer = Trainer(cfg, catalogue, run_dir=run_dir, raw_config=raw)
        tr = self.trainer
        self.model = tr.model
        tr._init_masks()
        if variant.post_init is not None:
            variant.post_init(tr)
        st = tr.state
        tr.plugins.hook.sparsefw_run_start(state=st)
        hooks = tr.plugins.hook
        self.has_epoch_hooks = bool(hooks.sparsefw_epoch_start.get_hookimpls()
                                    or hooks.sparsefw_epoch_end.get_hookimpls())
        hooks.sparsefw_epoch_start(state=st)
        self.steps_per_epoch = tr.steps_per_epoch
        self.interval = tr.interval
        self.data_bytes = sum(t.untyped_storage().nbytes()
                              for src in (tr.train_source, tr.test_source)
                              for t in (src.tensors or ()) if t.device.type == device.type)

    def _skip_due(self) -> None:
        st = self.trainer.state
        iv = self.interval
        if iv is not None and iv.every > 1:
            while iv.due(st.step, st.total_steps):
                st.step += 1

    def step(self, x, y) -> None:
        """A step that is neither a logging step nor (when the interval allows) a topology
        update step."""
        self._skip_due()
        self.trainer.step(x, y)

    def update_step(self, x, y) -> None:
        """A topology update step."""
        st = self.trainer.state
        every = self.interval.every
        st.step = (st.step // every + 1) * every
        self.trainer.step(x, y)

    def epoch(self, x, y) -> None:
        """The epoch-boundary hooks: ``epoch_end`` of one epoch, ``epoch_start`` of the next."""
        st = self.trainer.state
        hooks = self.trainer.plugins.hook
        hooks.sparsefw_epoch_end(state=st)
        st.epoch += 1
        hooks.sparsefw_epoch_start(state=st)

    def state_bytes(self) -> int:
        tr = self.trainer
        return tensor_bytes(tr.model, tr.optimizer, tr.masks, tr._acc,
                            [c.instance for c in tr.plugins.components])


def engine_config(spec: ModelSpec, sections: dict, device: torch.device, compile: bool,
                  sizes: Sizes, amp: str = "off") -> dict:
    """A raw run config: synthetic in-memory data shaped like ``spec`` (or ``spec.data``), no
    observers, no logging step, constant learning rate, the benchmark's optimizer, mixed
    precision ``amp``; ``sections`` merged in."""
    data = spec.data or {"name": "synthetic", "n_train": spec.batch * sizes.epoch_batches,
                         "n_test": spec.batch, "num_classes": spec.num_classes,
                         "input_shape": list(spec.input_shape)}
    raw: dict[str, Any] = {
        "seed": 0,
        "train": {"epochs": 10**6, "batch_size": spec.batch, "eval_batch_size": spec.batch,
                  "device": str(device), "log_every": LOG_NEVER, "compile": compile,
                  "amp": amp},
        "data": dict(data),
        "model": {"name": spec.name, **spec.options},
        "optimizer": dict(OPTIM),
        "lr_schedule": {"name": "constant"},
        "logging": {"observers": []},
    }
    for k, v in sections.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    return raw


# ------------------------------------------------------------------------------ measuring
def missing_components(variant: Variant, names: set[str]) -> str | None:
    """Why ``variant`` cannot run (the components it requires that are not registered), or
    None."""
    miss = [f"{slot} {name!r}" for slot, name in variant.requires if (slot, name) not in names]
    return f"not registered: {', '.join(miss)}" if miss else None


def measure_memory(runner, x, y, device: torch.device, base_alloc: int) -> dict:
    """A runner's state size and its step's allocation peak, in MB."""
    gc.collect()
    state = runner.state_bytes()
    out = {"state_mb": state / 2**20}
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner.step(x, y)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base_alloc - runner.data_bytes
        out["peak_mb"] = peak / 2**20
        out["peak_how"] = "torch.cuda.max_memory_allocated during one step, minus what was " \
                          "allocated before the variant was built and its data set"
    else:
        grads = tensor_bytes([p.grad for p in runner.model.parameters()])
        step_peak = cpu_step_allocation_peak(lambda: runner.step(x, y))
        out["step_alloc_peak_mb"] = step_peak / 2**20
        out["peak_mb"] = (state - grads + step_peak) / 2**20
        out["peak_how"] = "persistent state without gradients + peak CPU tensor memory " \
                          "allocated during one step (torch.profiler memory events)"
    return out


def measure_model(spec: ModelSpec, vlist: list[Variant], catalogue, device: torch.device,
                  sizes: Sizes, args, run_dir: Path, log=print) -> dict:
    """Build every available variant, warm each up and measure its memory, then time them in
    interleaved repeats. Returns the model's result record."""
    names = set(catalogue.registry.entries) if hasattr(catalogue.registry, "entries") else set()
    amp = getattr(args, "amp", "off")
    x, y = batch_tensors(spec, device)
    results: dict[str, dict] = {}
    runners: dict[str, Any] = {}
    estimate: dict[str, float] = {}
    for v in vlist:
        rec: dict[str, Any] = {"label": v.label, "base": v.base, "note": v.note}
        results[v.key] = rec
        missing = missing_components(v, names) or (v.unavailable and v.unavailable(device))
        if missing:
            rec.update(status="not available", reason=missing)
            continue
        try:
            gc.collect()
            if device.type == "cuda":
                _sync(device)
                torch.cuda.empty_cache()
            base_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            if v.sections is None:  # one plain loop per optimizer kernel; the fastest wins
                for impl in PLAIN_IMPLEMENTATIONS[:-1]:
                    other = PlainRunner(spec, catalogue.registry, device, args.compile, amp,
                                        implementation=impl)
                    for _ in range(sizes.warmup):
                        other.step(x, y)
                    runners[f"{v.key}@{impl}"] = other
                runner = PlainRunner(spec, catalogue.registry, device, args.compile, amp,
                                     implementation=PLAIN_IMPLEMENTATIONS[-1])
            elif v.front_door == "loop":
                runner = SparsifierRunner(spec, v, catalogue, device, args.compile, amp)
            else:
                runner = EngineRunner(spec, v, catalogue, device, args.compile, sizes,
                                      run_dir / f"{spec.key}-{v.key}", amp)
            for _ in range(sizes.warmup):
                _sync(device)
                t0 = time.perf_counter()
                runner.step(x, y)
                _sync(device)
                estimate[v.key] = time.perf_counter() - t0
            if v.updates:
                runner.update_step(x, y)
                runner.step(x, y)
            _sync(device)
            if getattr(args, "memory", True):  # callers may skip it (CPU profiling is slow)
                rec.update(measure_memory(runner, x, y, device, base_alloc))
            runners[f"{v.key}@{PLAIN_IMPLEMENTATIONS[-1]}" if v.sections is None
                    else v.key] = runner
            rec["status"] = "ok"
        except Exception as exc:  # report and go on with the other variants
            rec.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0])
            if args.strict:
                raise
            log(f"  ! {v.key}: {rec['reason']}")

    # timed blocks: (result key, untimed warm-up, timed function, steps per block, repeats);
    # the untimed step re-warms caches after the previous variant's block
    blocks: list[tuple[str, Callable | None, Callable, int, int]] = []
    periods = {v.key: v.period for v in vlist}
    updating = {v.key for v in vlist if v.updates}
    for key, runner in runners.items():
        est = estimate.get(key.partition("@")[0], 0.0)
        k = max(1, min(sizes.steps, math.ceil(BLOCK_S / max(est, 1e-6))))
        period = periods.get(key.partition("@")[0], 1)
        k = period * math.ceil(k / period)
        warm = runner.step if est < REWARM_BELOW_S else None
        blocks.append((key, warm, runner.step, k, sizes.repeats))
        if key in updating:
            blocks.append((f"{key}@update", warm, runner.update_step, 1, sizes.repeats))
        if getattr(runner, "has_epoch_hooks", False):
            runner.epoch(x, y)  # warm-up
            blocks.append((f"{key}@epoch", None, runner.epoch, 1, sizes.epoch_repeats))
    samples: dict[str, list[float]] = {b[0]: [] for b in blocks}
    cpu_samples: dict[str, list[float]] = {b[0]: [] for b in blocks}
    timer = BlockTimer(device)
    for r in range(max(b[4] for b in blocks) if blocks else 0):
        for key, warm, fn, k, reps in blocks:
            if r >= reps:
                continue
            if warm is not None:
                warm(x, y)
            with timer:
                for _ in range(k):
                    fn(x, y)
            samples[key].append(timer.seconds / k)
            cpu_samples[key].append(timer.cpu_seconds / k)

    for key, s in samples.items():
        main, _, what = key.partition("@")
        rec = results[main]
        wall, cpu = _stats(s), _stats(cpu_samples[key])
        stats = dict(cpu if args.clock == "cpu" else wall)
        stats.update(clock=args.clock, wall_ms=wall["median_ms"], cpu_ms=cpu["median_ms"],
                     wall=wall, cpu=cpu)
        if not what:
            rec.update(stats)
        else:
            rec[what] = stats
    pick_fastest_plain(results, runners)
    derive_ratios(results, runners)
    out = {"model": spec.key, "arch": spec.label, "batch": spec.batch,
           "params": sum(p.numel() for p in runners["plain"].model.parameters())
           if "plain" in runners else None,
           "variants": results}
    if args.profile and runners:
        out["profile"] = profile_runners(runners, x, y, device, spec, args, log)
    runners.clear()
    gc.collect()
    return out


def pick_fastest_plain(results: dict[str, dict], runners: dict) -> None:
    """The plain baseline is the fastest of its optimizer kernels (``plain@<kernel>``
    measurements): its figures become ``plain``'s, the others stay beside them."""
    rec = results.get("plain")
    timed = {impl: rec[impl] for impl in PLAIN_IMPLEMENTATIONS
             if rec is not None and isinstance(rec.get(impl), dict)}
    if not timed:
        return
    best = min(timed, key=lambda impl: timed[impl]["median_ms"])
    rec.update(timed[best])
    rec["implementation"] = best
    rec["implementations_ms"] = {impl: t["median_ms"] for impl, t in timed.items()}
    for impl in timed:
        del rec[impl]
    runners["plain"] = runners[f"plain@{best}"]
    others = ", ".join(f"{impl} {t['median_ms']:.2f} ms" for impl, t in timed.items()
                       if impl != best)
    rec["note"] = f"fastest SGD kernels: {best}; {others}"


def derive_ratios(results: dict[str, dict], runners: dict) -> None:
    """Ratios to the plain loop and to each variant's base; topology updates amortised; AGENT
    per epoch."""
    plain = results.get("plain", {}).get("median_ms")

    def ratio(a, b):
        return a / b if a is not None and b else None

    for key, rec in results.items():
        t = rec.get("median_ms")
        rec["x_plain"] = ratio(t, plain)
        base = rec.get("base")
        rec["x_base"] = ratio(t, results.get(base, {}).get("median_ms")) if base else None
        if "update" in rec and t is not None:
            upd = rec["update"]["median_ms"]
            amort = ((RIGL_EVERY - 1) * t + upd) / RIGL_EVERY
            rec["amortised"] = {"every": RIGL_EVERY, "median_ms": amort,
                                "x_plain": ratio(amort, plain),
                                "x_base": ratio(amort, results[base].get("median_ms"))}
        if "epoch" in rec and t is not None:
            b = runners[key].steps_per_epoch
            per_batch = t + rec["epoch"]["median_ms"] / b
            rec["per_epoch"] = {"batches": b, "epoch_hooks_ms": rec["epoch"]["median_ms"],
                                "per_batch_ms": per_batch, "x_plain": ratio(per_batch, plain),
                                "x_base": ratio(per_batch,
                                                results.get(rec["base"], {}).get("median_ms"))}


# ------------------------------------------------------------------------------ profiling
def profile_runners(runners: dict, x, y, device, spec: ModelSpec, args, log) -> dict:
    """torch.profiler op table and cProfile Python table of the plain loop, dense, hard90 and
    hard90_masked;
    the text goes to ``<out dir>/profile-<device>-<model>.txt``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    text = io.StringIO()
    summary = {}
    for key in ("plain", "dense", "hard90", "hard90_masked"):
        if key not in runners:
            continue
        run = runners[key]
        with profile(activities=acts) as prof:
            for _ in range(3):
                run.step(x, y)
            _sync(device)
        table = prof.key_averages().table(sort_by=sort, row_limit=18)
        text.write(f"\n==== torch.profiler: {key} ({spec.label}), 3 steps ====\n{table}\n")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(3):
            run.step(x, y)
        _sync(device)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
        text.write(f"\n==== cProfile (tottime): {key}, 3 steps ====\n{s.getvalue()}\n")
        summary[key] = [
            {"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / 3, "calls": e.count}
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
        ]
    path = Path(args.out).parent / f"profile-{device.type}-{spec.key}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue())
    log(f"  profile written to {path}")
    return {"file": str(path), "top_ops": summary}


# ------------------------------------------------------------------------------ sweeps
def run_sweep(catalogue, device, sizes: Sizes, args, run_dir: Path, log) -> dict:
    """Step time and memory of plain vs hard90 as the MLP widens, and as more of a deep MLP's
    layers are masked (the per-layer cost of the masking machinery)."""
    vs = [Variant("plain", "plain", base=None),
          Variant("hard90", "hard 90%", sections=_hard90())]
    width_rows = []
    for w in sizes.sweep_widths:
        spec = ModelSpec(f"mlp-w{w}", "mlp", {"hidden": [w, w]}, sizes.image, sizes.batch)
        r = measure_model(spec, vs, catalogue, device, sizes, args, run_dir, log)
        width_rows.append(_sweep_row({"width": w, "params": r["params"]}, r["variants"]))
    depth_rows = []
    d, w = sizes.sweep_depth, sizes.sweep_depth_width
    linear = [str(1 + 2 * i) for i in range(d + 1)]  # Linear modules of MLP (Flatten at 0)
    for m in sizes.sweep_masked:
        m = min(m, len(linear))
        dense = linear[m:]
        v = Variant("hard90", f"hard 90%, {m} masked", sections=_hard90(
            sparsity={"density": 0.1, "distribution": "erk", "kind": "hard",
                      "dense_layers": dense}))
        spec = ModelSpec(f"mlp-d{d}-m{m}", "mlp", {"hidden": [w] * d}, sizes.image, sizes.batch)
        r = measure_model(spec, [vs[0], v], catalogue, device, sizes, args, run_dir, log)
        depth_rows.append(_sweep_row({"masked_layers": m, "layers": d + 1}, r["variants"]))
    return {"width": {"model": f"mlp hidden [w, w] on {'x'.join(map(str, sizes.image))}, "
                               f"batch {sizes.batch}", "rows": width_rows},
            "masked_layers": {"model": f"mlp hidden [{w}] x {d} ({d + 1} Linear layers), "
                                       f"batch {sizes.batch}", "rows": depth_rows}}


def _sweep_row(head: dict, res: dict) -> dict:
    p, h = res["plain"], res["hard90"]
    return {**head, "plain_ms": p.get("median_ms"), "hard90_ms": h.get("median_ms"),
            "x_plain": h.get("x_plain"), "plain_peak_mb": p.get("peak_mb"),
            "hard90_peak_mb": h.get("peak_mb"), "plain_state_mb": p.get("state_mb"),
            "hard90_state_mb": h.get("state_mb"), "status": h.get("status")}


# ------------------------------------------------------------------------------ output
def _f(v, fmt="{:.2f}", none="—"):
    return none if v is None else fmt.format(v)


def format_model_table(device: str, res: dict) -> str:
    clock = next((r.get("clock") for r in res["variants"].values() if r.get("clock")), "wall")
    other = "cpu" if clock == "wall" else "wall"
    head = (f"{'variant':<48} {clock + ' ms':>10} {'IQR ms':>8} {other + ' ms':>9} "
            f"{'x plain':>8} {'x base':>7} {'state MB':>9} {'peak MB':>8}")
    lines = [f"== {device} · {res['arch']} ==", head, "-" * len(head)]
    for r in res["variants"].values():
        if r.get("status") != "ok":
            lines.append(f"{r['label']:<48} {r.get('status', '?')}: {r.get('reason', '')}")
            continue
        base = f"{_f(r['x_base'])}x" if r.get("x_base") is not None else "—"
        lines.append(
            f"{r['label']:<48} {_f(r.get('median_ms')):>10} {_f(r.get('iqr_ms')):>8} "
            f"{_f(r.get(other + '_ms')):>9} "
            f"{_f(r.get('x_plain')) + 'x':>8} {base:>7} {_f(r.get('state_mb')):>9} "
            f"{_f(r.get('peak_mb')):>8}")
        if "update" in r:
            u = r["update"]
            label = f"    update step ({_f(u['median_ms'] / r['median_ms'])}x its regular)"
            lines.append(f"{label:<48} {_f(u['median_ms']):>10} "
                         f"{_f(u['iqr_ms']):>8} {_f(u.get(other + '_ms')):>9} "
                         f"{_f(u['median_ms'] / results_plain(res)):>7}x")
            a = r["amortised"]
            label = f"    amortised at dT={a['every']}"
            lines.append(f"{label:<48} {_f(a['median_ms']):>10} {'':>8} {'':>9} "
                         f"{_f(a['x_plain']) + 'x':>8} {_f(a['x_base']) + 'x':>7}")
        if "per_epoch" in r:
            e = r["per_epoch"]
            label = f"    epoch hooks ({e['batches']} batches/epoch)"
            lines.append(f"{label:<48} {_f(e['epoch_hooks_ms']):>10} "
                         f"{_f(r['epoch']['iqr_ms']):>8} {_f(r['epoch'].get(other + '_ms')):>9}")
            lines.append(f"{'    per epoch, per batch (step + hooks/B)':<48} "
                         f"{_f(e['per_batch_ms']):>10} {'':>8} {'':>9} "
                         f"{_f(e['x_plain']) + 'x':>8} {_f(e['x_base']) + 'x':>7}")
        if r.get("note"):
            lines.append(f"    ({r['note']})")
    return "\n".join(lines)


def results_plain(res: dict) -> float:
    return res["variants"]["plain"].get("median_ms") or float("nan")


def format_sweep(sweep: dict) -> str:
    lines = [f"== sweep: width · {sweep['width']['model']} ==",
             f"{'width':>6} {'params':>10} {'plain ms':>9} {'hard90 ms':>10} {'x plain':>8} "
             f"{'plain peak':>11} {'hard90 peak':>12} {'plain state':>12} {'hard90 state':>13}"]
    for r in sweep["width"]["rows"]:
        lines.append(f"{r['width']:>6} {r['params'] or 0:>10} {_f(r['plain_ms']):>9} "
                     f"{_f(r['hard90_ms']):>10} {_f(r['x_plain']) + 'x':>8} "
                     f"{_f(r['plain_peak_mb']):>11} {_f(r['hard90_peak_mb']):>12} "
                     f"{_f(r['plain_state_mb']):>12} {_f(r['hard90_state_mb']):>13}")
    lines += [f"== sweep: masked layers · {sweep['masked_layers']['model']} ==",
              f"{'masked':>6} {'plain ms':>9} {'hard90 ms':>10} {'x plain':>8} "
              f"{'plain peak':>11} {'hard90 peak':>12} {'hard90 state':>13}"]
    for r in sweep["masked_layers"]["rows"]:
        lines.append(f"{r['masked_layers']:>6} {_f(r['plain_ms']):>9} {_f(r['hard90_ms']):>10} "
                     f"{_f(r['x_plain']) + 'x':>8} {_f(r['plain_peak_mb']):>11} "
                     f"{_f(r['hard90_peak_mb']):>12} {_f(r['hard90_state_mb']):>13}")
    return "\n".join(lines)


def acceptance(results: list[dict]) -> list[dict]:
    """The issues' targets, checked on every measured model and device: :data:`TARGETS`
    (a variant's step against its base's) and :data:`UPDATE_TARGETS` (an update step against
    the same variant's regular step, reported as variant ``<key>.update``)."""
    out = []

    def check(res, key, base, limit, r, b):
        if r.get("status", "ok") != "ok" or b.get("status") != "ok" or "median_ms" not in r:
            verdict, value = "not measured", None
        else:
            value = r["median_ms"] / b["median_ms"]
            verdict = "met" if value <= limit else "MISSED"
        out.append({"device": res["device"], "model": res["model"], "batch": res.get("batch"),
                    "variant": key, "base": base, "limit": limit, "ratio": value,
                    "verdict": verdict})

    for res in results:
        v = res["variants"]
        for key, (base, limit) in TARGETS.items():
            if isinstance(limit, dict):
                limit = limit.get(res.get("batch"), limit[None])
            check(res, key, base, limit, v.get(key, {}), v.get(base, {}))
        for key, limit in UPDATE_TARGETS.items():
            r = v.get(key, {})
            check(res, f"{key}.update", key, limit, r.get("update", {"status": r.get("status")}),
                  r)
    return out


def machine_info() -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info


# ------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CI size: MLP + a small ResNet-20, batch 32, few repeats (< 1 min on CPU)")
    p.add_argument("--tiny", action="store_true",
                   help="smoke-test sizes (tests only: figures are meaningless)")
    p.add_argument("--device", default="all",
                   help="cpu, cuda, or all (CPU and, when present, CUDA); default all")
    p.add_argument("--models", default=None,
                   help="comma-separated: mlp, resnet20, resnet32, resnet56, vit "
                        "(default: mlp,resnet32,vit; --quick: mlp,resnet20)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 128; quick 32)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant")
    p.add_argument("--steps", type=int, default=None,
                   help="most steps per timed repeat (long steps: fewer, at least one)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant")
    p.add_argument("--only", default=None,
                   help="comma-separated variant keys to run (plain is always run)")
    p.add_argument("--sweep", action="store_true",
                   help="also the scaling sweep (MLP width, number of masked layers)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model, in the engine ([train] compile) and in the "
                        "plain loop alike")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                   help="mixed precision, in the engine ([train] amp) and the plain loop alike")
    p.add_argument("--profile", action="store_true",
                   help="also profile plain/dense/hard90 (torch.profiler + cProfile)")
    p.add_argument("--plugin", action="append", default=[],
                   help="import path of an extra plugin module to register (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="which clock the medians and ratios use: wall (default) or the "
                        "process CPU time (steadier on a shared CPU; meaningless on CUDA)")
    p.add_argument("--strict", action="store_true", help="re-raise a variant's error")
    p.add_argument("--out", default="benchmarks/out/results.json", help="JSON output path")
    return p.parse_args(argv)


def build_catalogue(extra_modules: list[str]):
    """The component catalogue, with the plugin modules ``extra_modules`` registered too."""
    extra = []
    for mod in extra_modules:
        extra.append((mod, importlib.import_module(mod)))
    cat = load_catalogue(extra=extra)
    return cat


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    sizes = PRESETS[preset]
    over = {k: getattr(args, k) for k in ("batch", "repeats", "steps", "warmup")
            if getattr(args, k) is not None}
    if over:
        sizes = Sizes(**{**sizes.__dict__, **over})
    catalogue = build_catalogue(args.plugin)
    registry = catalogue.registry
    names = set(registry.entries)
    models = args.models.split(",") if args.models else list(sizes.default_models)
    if args.models is None and ("model", "vit") not in names:
        models = [m for m in models if m != "vit"]
    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA: not available on this machine", file=sys.stderr)
        return 2

    info = machine_info()
    started = time.perf_counter()
    command = " ".join(["python", *sys.argv]) if argv is None else " ".join(["bench.py", *argv])
    print(f"sparsefw benchmark ({preset}) · {info['cpu']} · {info['cores']} cores · "
          f"torch {info['torch']} ({info['torch_threads']} threads) · "
          f"{'CUDA: ' + info['cuda'] if info['cuda'] else 'CUDA: not available'}")
    results = []
    sweep = {}
    with tempfile.TemporaryDirectory(prefix="sparsefw-bench-") as tmp:
        for device in devices:
            for key in models:
                if ("model", key) not in names:
                    print(f"== {device.type} · {key}: not available (no model {key!r})")
                    results.append({"device": device.type, "model": key, "variants": {},
                                    "status": "not available"})
                    continue
                spec = model_spec(key, sizes)
                vlist = variants(spec, registry, names)
                if args.only:
                    keep = {"plain", *args.only.split(",")}
                    keep |= {v.base for v in vlist if v.key in keep and v.base}
                    vlist = [v for v in vlist if v.key in keep]
                else:
                    vlist = [v for v in vlist if not v.opt_in]
                res = measure_model(spec, vlist, catalogue, device, sizes, args, Path(tmp),
                                    log=print)
                res["device"] = device.type
                results.append(res)
                print(format_model_table(device.type, res), flush=True)
            if args.sweep:
                sweep[device.type] = run_sweep(catalogue, device, sizes, args, Path(tmp), print)
                print(format_sweep(sweep[device.type]), flush=True)
    checks = acceptance([r for r in results if r.get("variants")])
    print("== acceptance ==")
    for c in checks:
        print(f"{c['device']:>4} {c['model']:<9} {c['variant']:<11} / {c['base']:<7} "
              f"{_f(c['ratio'])}x (target <= {c['limit']:.2f}x): {c['verdict']}")
    if "cuda" not in [d.type for d in devices]:
        print("CUDA: not measured (no GPU on this machine)")
    info["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    payload = {
        "meta": {**info, "date": dt.datetime.now().isoformat(timespec="seconds"),
                 "command": command, "preset": preset, "sizes": sizes.__dict__,
                 "compile": args.compile, "amp": args.amp, "clock": args.clock,
                 "optimizer": OPTIM,
                 "wall_s": None,
                 "registered": sorted(f"{s}:{n}" for s, n in names
                                      if s in ("mask_init", "topology_update", "perturb",
                                               "gradient_correct", "model"))},
        "results": results,
        "acceptance": checks,
        "sweep": sweep,
    }
    payload["meta"]["wall_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {out} ({payload['meta']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
