"""The step lifecycle of sparse training as one object, :class:`Sparsifier`, that every front
door drives: the :class:`~sparsefw.engine.Trainer`, a user's own PyTorch loop, and the Hugging
Face and Lightning callbacks in :mod:`sparsefw.integrations`.

It owns the masks, the run's plugin manager, the schedule values, perturbation save/restore and
the order of the hooks, and wraps the user's optimizer the way ``torch.optim.LBFGS`` or SAM
does: ``sparsifier.step(closure)`` runs one whole sparse step around ``optimizer.step()``::

    pre_forward()      schedule hooks (merged into state.values); before-forward topology (N:M)
    perturb            perturb hooks (config order); w + offsets written into second buffers,
                       the parameters' storage swapped to them
    closure()          zeroed gradients, then the user's forward + backward (all micro-batches)
    restore            the untouched original storage swapped back (bit-exact)
    post_backward()    unscale (GradScaler); after-backward topology (dense .grad: RigL);
                       gradient_correct hooks (config order); hard masks zero pruned gradients
    optimizer.step()   (through the GradScaler when one is given)
    after_step()       step counter; step_end observers; implicit epoch boundary

Without a closure (``loss.backward(); sparsifier.step()``) the pre-forward phase and the
gradient-free perturbations run from a forward pre-hook at the first training forward of each
step, so a plain loop needs no extra call; a component that needs a pass of its own on the
step's batch says so (``needs``) and gets a clear error naming it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch.func import functional_call

from sparsefw import distributions, initialisation, kernels, sharding
from sparsefw.config import ConfigError, RunConfig, apply_overrides, read_toml, structure
from sparsefw.cost import DENSE_GRAD_PASSES
from sparsefw.engine import distributed
from sparsefw.kernels.masked_sgd import MaskedSGD
from sparsefw.masks import MaskSet, sparsifiable_params
from sparsefw.plugins import Catalogue, RunPlugins, build_run, load_catalogue
from sparsefw.state import Perturbation, TrainState, offset_into

__all__ = ["METHOD_SECTIONS", "Sparsifier", "SparsifierError", "method_config"]

#: the sections of a run config that describe the method (what a Sparsifier takes)
METHOD_SECTIONS = ("sparsity", "mask_init", "topology_update", "gradient_correct", "perturb",
                   "schedule", "debug")
#: the schedule value the lifecycle reads as the forward masks' β (``MaskSet.decay``)
MASK_DECAY = "mask_decay"
#: when a topology component runs within a step (its class attribute ``phase``)
TOPOLOGY_PHASES = ("after_backward", "before_forward")
#: hooks that run before the first backward only: a component implementing no others cannot
#: read a gradient after an optimizer step
GRADIENT_FREE_HOOKS = frozenset({"sparsefw_mask_init", "sparsefw_register"})

#: what a component may declare in its class attribute ``needs``
NEEDS = {
    "closure": "a closure: call sparsifier.step(closure)",
    "batch": "the step's batch: call sparsifier.step(..., batch=(inputs, targets))",
    "inputs": "to replace the step's inputs, which only the Trainer can do",
    "train_batches": "training batches outside the step: pass Sparsifier(..., batches=...)",
    "dense_momentum": "the dense gradient momentum (kept by the lifecycle for it)",
}
_AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@attrs.define(eq=False)
class _Applied:
    """A perturbation in place: each parameter's storage holds ``w + e``; ``originals`` are
    the untouched storages of ``w``."""

    names: list[str]
    params: list[torch.Tensor]
    originals: list[torch.Tensor]
    #: FSDP2: ``w + e`` written into the parameters' own (local shard) storage, which FSDP
    #: all-gathers from; ``originals`` are copies of ``w`` that are copied back
    in_place: bool = False


class SparsifierError(RuntimeError):
    """A front door cannot give a component what it needs (a closure, the batch, ...)."""


# ------------------------------------------------------------------------------ configuration
@functools.cache
def default_catalogue() -> Catalogue:
    """The process's catalogue (built-ins and entry points), loaded once."""
    return load_catalogue()


def _shortcut_tables(shortcuts: Mapping[str, Any]) -> dict:
    """Keyword shortcuts (``density``, ``distribution``, ``dense_layers``, ``kind``,
    ``first_layer_dense``, ``er_kernel``, ``init``, ``compute``, ``mask_init``, ``topology``) as config
    tables."""
    out: dict[str, Any] = {}
    sparsity = {k: shortcuts[k] for k in ("density", "distribution", "dense_layers", "kind",
                                          "first_layer_dense", "er_kernel", "init", "compute")
                if shortcuts.get(k) is not None}
    if sparsity:
        out["sparsity"] = sparsity
    for key, section in (("mask_init", "mask_init"), ("topology", "topology_update")):
        value = shortcuts.get(key)
        if value is not None:
            out[section] = {"name": value} if isinstance(value, str) else dict(value)
    return out


def method_config(
    config: RunConfig | Mapping | str | Path | None,
    catalogue: Catalogue,
    **shortcuts: Any,
) -> RunConfig:
    """A :class:`RunConfig` from the method sections of ``config`` (a TOML path, a TOML string,
    a dict, or a RunConfig), with keyword shortcuts merged over it. Sections other than the
    method sections (and ``seed``) are refused; every problem is reported in one
    :class:`ConfigError`, as for ``sparsefw train``."""
    from sparsefw.config import merge_tables

    if isinstance(config, RunConfig):
        if shortcuts and any(v is not None for v in shortcuts.values()):
            raise ConfigError(["keyword shortcuts cannot be combined with a RunConfig"])
        return config
    source = "<config>"
    if config is None:
        raw: dict = {}
    elif isinstance(config, Mapping):
        raw = dict(config)
    else:
        text = str(config)
        path = Path(text)
        if "\n" not in text and (text.endswith(".toml") or path.is_file()):
            raw, source = read_toml(path), path.name
        else:
            import tomllib

            try:
                raw = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError([f"{source}: not valid TOML: {e}"]) from None
    raw = merge_tables(raw, _shortcut_tables(shortcuts))
    allowed = ("seed", "extends", *METHOD_SECTIONS)
    problems = [f"{source}: [{k}] is not a method section; a Sparsifier takes: "
                f"{', '.join(allowed)}" for k in raw if k not in allowed]
    if problems:
        raise ConfigError(problems)
    return structure(apply_overrides(raw, ()), catalogue.registry, source=source)


# ------------------------------------------------------------------------------ helpers
def _unwrap_model(model: torch.nn.Module):
    """``(local module, DDP wrapper or None)`` beneath ``torch.compile`` and DDP wrappers."""
    ddp = None
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            ddp, model = model, model.module
        else:
            return model, ddp


def _unwrap_optimizer(opt):
    """The torch optimizer inside Accelerate's and Lightning's wrappers."""
    for attr in ("optimizer", "_optimizer"):
        inner = getattr(opt, attr, None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not opt:
            return _unwrap_optimizer(inner)
    return opt


def _dist_context() -> distributed.DistContext:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return distributed.DistContext(rank=torch.distributed.get_rank(),
                                       world_size=torch.distributed.get_world_size())
    return distributed.DistContext()


def _total(counts: dict[str, Any], device: torch.device) -> torch.Tensor:
    values = [torch.as_tensor(v, device=device) for v in counts.values()]
    return torch.stack(values).sum() if values else torch.zeros((), device=device)


#: optimizers whose every parameter-shaped state tensor is zeroed where a mask changes, so
#: pruned weights stay exactly zero without re-masking the weights after each step
_MASK_SAFE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


# ------------------------------------------------------------------------------ the lifecycle
class Sparsifier:
    """Sparse training around any ``torch.optim.Optimizer``, in any training loop.

    ``model`` may be wrapped in DDP and/or ``torch.compile``; its sparsifiable parameters are
    the Linear/Conv weights that require grad, belong to ``optimizer`` and match no
    ``[sparsity] dense_layers`` pattern. ``config`` holds the method sections of a run config
    (a TOML path or string, a dict, or a :class:`~sparsefw.config.RunConfig`); keyword shortcuts
    (``density``, ``distribution``, ``dense_layers``, ``kind``, ``compute``, ``mask_init``,
    ``topology``) are merged over it. ``[sparsity] compute`` (``sparse``/``auto``) makes the
    masked Linear layers compute with sparse kernels (:mod:`sparsefw.sparse_compute`).
    ``total_steps`` is the number of optimizer steps of the run (topology schedules need it). ``steps_per_epoch`` makes epoch boundaries implicit; without
    it call :meth:`epoch_end`. ``batches`` (a re-iterable such as a DataLoader, or a callable
    returning an iterator) feeds components that need data outside the step (SNIP/GraSP
    scores, AGENT's statistics pass). ``loss_fn(output, target)`` is what those passes
    minimise (cross-entropy by default). ``scaler`` is the user's ``torch.amp.GradScaler``
    (closures then call ``scaler.scale(loss).backward()``; the Sparsifier unscales and steps
    through it); ``amp`` (``"off"``, ``"bf16"``, ``"fp16"``) the autocast of the
    components' own passes. The masks are initialised at construction (``init_masks``).
    ``check_plugins`` checks the hook contract around every hook call
    (:mod:`sparsefw.plugin_checks`; default: ``[debug] check_plugins`` or ``SPARSEFW_CHECK=1``).

    Front doors that own more of the run pass the rest: ``forward_model`` (the module the
    step's synchronised pass runs, e.g. a compiled DDP wrapper), ``dist``, ``observers`` (run
    the config's observer components), ``after_optimizer_step`` (the front door's bookkeeping
    after each optimizer step, returning the metrics handed to the ``step_end`` observers) and
    ``guard`` (a :class:`sparsefw.engine.guard.DivergenceGuard`, checked right before each
    optimizer step), and ``front_door``: ``"trainer"`` drives epochs itself, owns the run's inputs (``needs =
    ("inputs",)``) and its own forward masking; other values (``"loop"``, ``"huggingface"``,
    ``"lightning"``) get implicit epochs, the forward pre-hook and forward-masking hooks.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        config: RunConfig | Mapping | str | Path | None = None,
        *,
        total_steps: int,
        steps_per_epoch: int | None = None,
        batches: Iterable | Callable[[], Iterable] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        amp: str = "off",
        catalogue: Catalogue | None = None,
        init_masks: bool = True,
        forward_model: torch.nn.Module | None = None,
        dist: distributed.DistContext | None = None,
        observers: bool = False,
        front_door: str = "loop",
        after_optimizer_step: Callable[[], dict | None] | None = None,
        check_plugins: bool | None = None,
        guard: Any = None,
        **shortcuts: Any,
    ):
        if total_steps is None or int(total_steps) <= 0:
            raise ValueError(f"total_steps must be a positive number of optimizer steps, got "
                             f"{total_steps!r}")
        if amp not in _AMP:
            raise ValueError(f"amp = {amp!r} is not one of: {', '.join(_AMP)}")
        self.catalogue = catalogue or default_catalogue()
        cfg = method_config(config, self.catalogue, **shortcuts)
        if cfg.train.amp != amp and front_door != "trainer":
            cfg = attrs.evolve(cfg, train=attrs.evolve(cfg.train, amp=amp))
        self.cfg = cfg
        self.front_door = front_door
        self.model, found_ddp = _unwrap_model(model)
        self.forward_model = forward_model if forward_model is not None else model
        #: the module the components' own passes run (no DDP; the Trainer's compiled one)
        self.local_forward_model = self.model
        self.ddp = found_ddp if found_ddp is not None else _unwrap_model(self.forward_model)[1]
        self.optimizer = _unwrap_optimizer(optimizer)
        self.scaler = scaler
        self.amp_dtype = _AMP[cfg.train.amp]
        self.loss_fn = loss_fn or F.cross_entropy
        self.dist = dist if dist is not None else _dist_context()
        first = next(self.model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        if (cfg.sparsity.cpu_kernels and self.device.type == "cpu"
                and (reason := kernels.unavailable())):
            raise ConfigError([f"[sparsity] cpu_kernels = true: {reason}"])
        self.after_optimizer_step = after_optimizer_step
        #: a :class:`sparsefw.engine.guard.DivergenceGuard` run before each optimizer step
        self.guard = guard

        sp = cfg.sparsity
        in_optimizer = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        candidates = sparsifiable_params(self.model, sp.dense_layers, sp.first_layer_dense)
        params = {n: p for n, p in candidates.items()
                  if p.requires_grad and id(p) in in_optimizer}
        self.masks = MaskSet(params, kind=sp.kind)
        if sp.cpu_kernels and self.device.type == "cpu":  # (index edits in one compiled loop)
            self.masks.zero_kernel = kernels.load_kernels().zero_inactive_
        #: FSDP2: the masked parameters are sharded DTensors (see :mod:`sparsefw.sharding`)
        self.sharded = self.masks.sharded
        if self.sharded:
            sharding.check_supported(self.masks, cfg)
        shapes = {n: tuple(p.shape) for n, p in params.items()}  # global shapes under FSDP
        if shapes:
            self.masks.targets = distributions.active_counts(
                shapes, sp.density, sp.distribution, kernel=sp.er_kernel)

        self.plugins: RunPlugins = build_run(cfg, self.catalogue, observers=observers)
        topo = self.plugins.topology()
        self.interval = topo.options if topo is not None else None
        self.topology = topo.instance if topo is not None else None
        self.topology_phase = getattr(self.topology, "phase", "after_backward")
        if self.topology_phase not in TOPOLOGY_PHASES:
            raise ConfigError([f"topology component {topo.name!r}: phase "
                               f"{self.topology_phase!r} is not one of {TOPOLOGY_PHASES}"])
        self.needs = self._collect_needs()
        self._batches = batches
        if "train_batches" in self.needs and batches is None and front_door != "trainer":
            self._refuse("train_batches")
        if "inputs" in self.needs and front_door != "trainer":
            self._refuse("inputs")

        #: β of the dense gradient momentum the lifecycle keeps when a component needs it
        self.dense_momentum_beta = max(
            (float(getattr(c.instance, "dense_momentum_beta", 0.9)) for c in self.plugins.components
             if c.key in self.needs.get("dense_momentum", ())), default=None)

        generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        steps_per_epoch = int(steps_per_epoch) if steps_per_epoch else None
        self.state = TrainState(
            model=self.model, optimizer=self.optimizer, masks=self.masks, loss_fn=self.loss_fn,
            device=self.device, generator=generator, run_dir=None, config=cfg, data=None,
            steps_per_epoch=steps_per_epoch or int(total_steps), total_steps=int(total_steps),
            steps_per_round=int(total_steps), dist=self.dist,
        )
        st = self.state
        st.forward = self.forward
        st.forward_backward = self.forward_backward
        st.closure = self._missing("closure")
        st.train_batches = self._train_batches
        if self.sharded:  # FSDP2: take the parameters by name while they are the sharded
            # ones (after a forward without backward, the root's unsharded copies stand in)
            sharding.reshard(self.model)
            _ = st.named_params
        self._implicit_epochs = steps_per_epoch is not None
        self._manage_epochs = front_door != "trainer"
        self._epoch_started = False
        self._prepared_step: int | None = None
        self._pending: _Applied | None = None  # perturbation applied before a forward
        self._in_step = False
        self._own_pass = 0
        self._skip_optimizer = False
        self._schedule_owner: dict[str, str] = {}
        #: per perturbed parameter, the storage its perturbed weights were written into last
        self._spare: dict[str, torch.Tensor] = {}
        self._reapply_masks = not isinstance(self.optimizer, _MASK_SAFE_OPTIMIZERS)
        #: a MaskedSGD zeroes the pruned gradients in its own update (sparsefw.kernels), so
        #: ``step`` leaves that pass to it (not under a loss scaler, which may skip the step)
        masked_sgd = (isinstance(self.optimizer, MaskedSGD) and self.masks.kind == "hard"
                      and not self.sharded)  # (sharded: the masks are the shards')
        self._optimizer_masks = masked_sgd and (scaler is None or not scaler.is_enabled())
        if masked_sgd:
            self.optimizer.mask_source = self.masks.hard_mask_lists
        #: inside ``step``: the next ``post_backward`` leaves the gradient masking to the
        #: optimizer; after it, whether it did
        self._fold_masking = False
        self._grads_unmasked = False
        self.counts_closure_passes = front_door != "trainer"
        self.last_output: torch.Tensor | None = None
        self._handles: list = []
        if front_door != "trainer":
            from sparsefw import forward_masking

            if self.masks.kind == "forward":
                self._handles += forward_masking.install(self.model, self.masks)
            hook = self._on_forward
            if hasattr(self.forward_model, "_orig_mod") or hasattr(model, "_orig_mod"):
                hook = torch.compiler.disable(hook)  # runs eagerly before the compiled graph
            # FSDP2's own pre-hook all-gathers the root's parameters: perturb them before it
            self._handles.append(self.model.register_forward_pre_hook(hook,
                                                                      prepend=self.sharded))
        self.compute = self._sparse_compute(sp.compute)
        if check_plugins is None:
            check_plugins = cfg.debug.check_plugins or os.environ.get(
                "SPARSEFW_CHECK", "").strip().lower() in ("1", "true", "yes", "on")
        self.checker = None
        if check_plugins:
            from sparsefw.plugin_checks import PluginChecker

            self.checker = PluginChecker(self)
        if self._optimizer_masks:
            self.optimizer.keep_masked_grads = self._gradients_read_after_step(check_plugins)
        if init_masks:
            self.init_masks()

    # ------------------------------------------------------------------ requirements
    def _collect_needs(self) -> dict[str, list[str]]:
        """``need -> [component keys]`` from each component's class attribute ``needs``."""
        out: dict[str, list[str]] = {}
        for comp in self.plugins.components:
            needs = getattr(comp.instance, "needs", ())
            if callable(needs):
                needs = needs()
            for need in needs:
                if need not in NEEDS:
                    raise ConfigError([f"component {comp.key}: unknown need {need!r}; "
                                       f"choices: {', '.join(NEEDS)}"])
                out.setdefault(need, []).append(comp.key)
        return out

    def _sparse_compute(self, mode: str):
        """The model's sparse layers (``[sparsity] compute``), or ``None`` for dense compute;
        ``sparse`` refuses a configuration it cannot run, ``auto`` then stays dense."""
        from sparsefw import sparse_compute

        if mode == "dense":
            return None
        why = sparse_compute.unsupported(
            self.masks, perturb=bool(self.cfg.perturb),
            gradient_correct=bool(self.cfg.gradient_correct), ddp=self.ddp is not None,
            compiled=hasattr(self.forward_model, "_orig_mod"), amp=self.amp_dtype is not None)
        if why is None and "dense_momentum" in self.needs:
            why = (f"{', '.join(self.needs['dense_momentum'])} reads the dense gradient at every "
                   "step, which sparse compute does not form")
        if why is not None:
            if mode == "sparse":
                raise ConfigError([f"[sparsity] compute = \"sparse\": {why}"])
            return None
        return sparse_compute.SparseCompute(self.model, self.masks, mode)

    def _sparse_compute_active(self, active: bool) -> None:
        """Mark the step's own forward/backward, where sparse compute runs (see
        :mod:`sparsefw.sparse_compute`)."""
        if self.compute is not None:
            self.compute.active = active

    def _refuse(self, need: str):
        who = ", ".join(self.needs.get(need, ["a component"]))
        raise SparsifierError(f"{who} needs {NEEDS[need]}")

    def _missing(self, need: str):
        def missing(*_args, **_kwargs):
            self._refuse(need)
        return missing

    def _train_batches(self):
        if self._batches is None:
            self._refuse("train_batches")
        source = self._batches() if callable(self._batches) else self._batches
        for batch in source:
            yield self._to_device(batch)

    def _to_device(self, batch):
        x, y = batch
        return (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))

    # ------------------------------------------------------------------ passes
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward(self, x: torch.Tensor, *, model: torch.nn.Module | None = None) -> torch.Tensor:
        """The model's output for ``x`` as the masks define it (forward masking substitutes
        ``w ⊙ m_eff``), under the run's autocast; counts one forward pass. Components' own
        passes run on the local model (no DDP synchronisation)."""
        self.state.passes["forward"] += 1
        model = self.local_forward_model if model is None else model
        self._own_pass += 1
        try:
            with self._autocast():
                effective = self.masks.effective()
                if effective:
                    synced = self.ddp is not None and model is self.forward_model
                    prefix = "module." if synced else ""
                    return functional_call(model, {prefix + n: w for n, w in effective.items()},
                                           (x,))
                return model(x)
        finally:
            self._own_pass -= 1

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, *, sync: bool = True):
        """Forward, loss and (scaled) backward into ``.grad``; returns the detached loss.
        ``sync``: through the DDP-wrapped model (gradients all-reduced); ``sync=False`` runs
        the pass on this rank alone (``no_sync``). Counts one forward and one backward."""
        ctx = self.ddp.no_sync() if (not sync and self.ddp is not None) else contextlib.nullcontext()
        with ctx:
            out = self.forward(x, model=self.forward_model if sync else self.local_forward_model)
            loss = self.loss_fn(out.float(), y)
            self.state.passes["backward"] += 1
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self.last_output = out.detach()
        return loss.detach()

    def _run_closure(self, closure: Callable, *, sync: bool = True):
        """Evaluate the user's closure (``no_sync`` under DDP when ``sync`` is False)."""
        ctx = self.ddp.no_sync() if (not sync and self.ddp is not None) else contextlib.nullcontext()
        with ctx:
            loss = closure()
        if self.counts_closure_passes:
            self.state.passes["forward"] += 1
            self.state.passes["backward"] += 1
        return loss.detach() if torch.is_tensor(loss) else loss

    # ------------------------------------------------------------------ masks
    def init_masks(self, batches: Callable[[int], list] | None = None) -> None:
        """Ask the ``mask_init`` component for the first masks and apply them.
        ``batches(n)`` returns ``n`` training batches (default: from ``batches`` of the
        constructor, cycling)."""
        if batches is None:
            batches = self._cycling_batches
        with self._whole_layers() as masks:
            answer = self.plugins.hook.sparsefw_mask_init(state=self.state, batches=batches)
            self.model.zero_grad(set_to_none=True)
            for name in self.masks.names:
                if answer is None or name not in answer:
                    raise RuntimeError(f"mask_init answer lacks a mask for {name}")
                masks.update(name, answer[name])
            distributed.check_in_sync(masks.masks, self.dist, "the initial mask")
        self._take_whole_masks(masks)
        self.masks.refresh_sparse_layers()
        self.masks.apply_()
        self.masks.zero_pruned(self.optimizer)  # (state of a dense warm-up in the user's loop)
        initialisation.apply(self.masks, self.cfg.sparsity.init)

    @contextlib.contextmanager
    def _whole_layers(self):
        """The masks components see during a whole-layer decision: the run's own MaskSet, or
        under FSDP a gathered view of whole layers (:func:`sparsefw.sharding.gathered_view`)
        put in ``state.masks`` for the duration of the block."""
        if not self.sharded:
            yield self.masks
            return
        view = sharding.gathered_view(self.masks)
        self.state.masks = view
        try:
            yield view
        finally:
            self.state.masks = self.masks

    def _take_whole_masks(self, masks: MaskSet) -> None:
        """After a whole-layer decision on a gathered view: keep this rank's shard of it."""
        if masks is not self.masks:
            self.masks.targets = dict(masks.targets)  # e.g. N:M's exact counts
            for name in self.masks.names:
                self.masks.update(name, masks.masks[name])

    def _cycling_batches(self, n: int) -> list:
        if self._batches is None:
            who = self.plugins.components[0].key
            raise SparsifierError(f"{who} needs training batches to score the first mask: "
                                  "pass Sparsifier(..., batches=...)")
        out: list = []
        while len(out) < n:
            before = len(out)
            for batch in self._train_batches():
                out.append(batch)
                if len(out) == n:
                    break
            if len(out) == before:
                raise SparsifierError("batches yielded no batch")
        return out

    def topology_due(self) -> bool:
        """Whether the topology component runs at this step: its own ``topology_due(state)``
        if it has one, else its update interval."""
        if self.interval is None:
            return False
        ask = getattr(self.topology, "topology_due", None)
        if ask is not None:
            return bool(ask(self.state))
        return self.interval.due(self.state.step, self.state.total_steps)

    def update_topology(self) -> bool:
        """Run the topology hook and enforce what the lifecycle owns; returns whether the
        component asked to skip this step's optimizer update."""
        st = self.state
        hard = self.masks.kind == "hard"
        # (no copies: a bool mask is never edited in place — MaskSet.update keeps a new one and
        # update_at edits the stored 0/1 mask and drops the bool — so these stay as they were)
        before = dict(self.masks.masks.items()) if hard else {}
        self.masks.take_edits()  # (forget edits made outside an update)
        with self._whole_layers() as masks:
            change = (self.checker.topology_update() if self.checker is not None
                      else self.plugins.hook.sparsefw_topology_update(state=st))
            distributed.check_in_sync(masks.masks, self.dist, "the mask")
        self._take_whole_masks(masks)
        edits = self.masks.take_edits()
        # hard masks: dropped and grown entries restart at zero with zero optimizer state;
        # forward masks keep the dense weights as they are. A layer edited at indices only
        # (MaskSet.update_at) is fixed up at those indices; any other layer whole.
        # With SGD/Adam/AdamW pruned entries already hold zero weight and state (masked
        # gradients; MaskSet.zero_pruned when masks come from outside), so of an index edit only
        # the entries dropped for good need writing.
        grown_zero = not self._reapply_masks
        whole = []
        for n, old in before.items():
            edited = edits.get(n)
            if edited is None or not self.masks.zero_at(n, edited, old, self.optimizer,
                                                     grown_zero=grown_zero):
                self.masks.zero_where(n, old ^ self.masks.masks[n], self.optimizer)
                whole.append(n)
        self.masks.apply_(whole)  # (a no-op for forward masks)
        if self.compute is not None:
            self.compute.repack()
        if change is None:
            return False
        for key, counts in (("topology/dropped", change.dropped), ("topology/grown", change.grown)):
            total = _total(counts, self.device)  # summed over the logging window
            st.metrics[key] = st.metrics[key] + total if key in st.metrics else total
        return change.skip_optimizer_step

    # ------------------------------------------------------------------ perturbations
    def _schedule_values(self) -> dict[str, float]:
        values: dict[str, float] = {}
        answers = (self.checker.schedule() if self.checker is not None
                   else self.plugins.hook.sparsefw_schedule(state=self.state))
        if not self._schedule_owner and answers:  # first step: who answers which name
            impls = self.plugins.hook.sparsefw_schedule.get_hookimpls()
            owners = [i.plugin_name for i in reversed(impls)]
            for owner, ans in zip(owners, answers, strict=False):
                for k in ans or {}:
                    if k in self._schedule_owner:
                        raise ConfigError([f"schedule value {k!r} is produced by both "
                                           f"{self._schedule_owner[k]} and {owner}"])
                    self._schedule_owner[k] = owner
        for ans in answers:
            values.update(ans or {})
        return values

    @torch.no_grad()
    def _apply_perturbations(self, perts: list[Perturbation]) -> _Applied | None:
        """Put the perturbed weights in place for the forward/backward: ``w + Σ offsets`` is
        written into a second buffer per parameter (kept across steps; one pass, the scale
        folded in), and the parameter's storage is swapped to it. The original storage is
        left untouched, so :meth:`_put_back` restores the weights bit-exactly by swapping
        back — no copy of the weights and no copy back (``w + e − e`` is not always ``w`` in
        floating point, so subtracting would not do). Identity, ``.grad`` and optimizer state
        of the parameters are unchanged; only what ``param.data`` points at. Under FSDP2 the
        shards' own storage is what FSDP all-gathers from, so ``w`` is copied into the second
        buffer and ``w + e`` written into the shard in place; :meth:`_put_back` copies ``w``
        back (bit-exact as well)."""
        names = list(dict.fromkeys(n for p in perts for n in p.params))
        if not names:
            return None
        named = self.state.named_params
        params = [named[n] for n in names]
        bufs = [self._spare_buffer(n, named[n]) for n in names]
        if self.sharded:  # FSDP2 all-gathers from the shard's own storage: perturb it in place
            sharding.reshard(self.model)  # no unsharded copy left to miss it
            params = [sharding.local(p.detach()) for p in params]
            torch._foreach_copy_(bufs, params)
            bufs, saved = params, bufs
        if sum(len(p.params) for p in perts) == len(names):  # each name in one perturbation
            at = {n: i for i, n in enumerate(names)}
            for p in perts:
                if p.params:
                    ix = [at[n] for n in p.params]
                    offset_into([bufs[i] for i in ix], [params[i] for i in ix],
                                list(p.params.values()), p.scale)
        else:
            offsets: dict[str, torch.Tensor] = {}
            for p in perts:
                for name, delta in p.params.items():
                    if p.scale is not None:
                        delta = delta * p.scale
                    offsets[name] = offsets[name] + delta if name in offsets else delta
            offset_into(bufs, params, [offsets[n] for n in names])
        if self.sharded:
            return _Applied(names, [named[n] for n in names], saved, in_place=True)
        originals = [p.data for p in params]
        for p, b in zip(params, bufs, strict=True):
            p.data = b
        return _Applied(names, params, originals)

    def _spare_buffer(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """A buffer like ``param`` (the perturbed storage of earlier steps, reused)."""
        buf = self._spare.pop(name, None)
        param = sharding.local(param.detach())
        if (buf is None or buf.shape != param.shape or buf.dtype != param.dtype
                or buf.device != param.device or buf.stride() != param.stride()):
            buf = torch.empty_like(param)
        return buf

    def _put_back(self, applied: _Applied | None) -> None:
        """The original weights back in place (bit-exact: their storage was never written)."""
        if applied is None:
            return
        with torch.no_grad():
            if applied.in_place:
                torch._foreach_copy_([sharding.local(p.detach()) for p in applied.params],
                                     applied.originals)
                self._spare.update(zip(applied.names, applied.originals, strict=True))
                return
            for name, p, o in zip(applied.names, applied.params, applied.originals,
                                  strict=True):
                self._spare[name] = p.data
                p.data = o

    def _restore(self) -> None:
        pending, self._pending = self._pending, None
        self._put_back(pending)

    @contextlib.contextmanager
    def unperturbed(self):
        """Within the block the weights are exactly the unperturbed ones (a perturbation
        applied before this step's forward is taken off and put back afterwards)."""
        pending = self._pending
        if pending is None:
            yield
            return
        if pending.in_place:  # FSDP2: swap the contents (the storage FSDP reads stays)
            shards = [sharding.local(p.detach()) for p in pending.params]
            with torch.no_grad():
                perturbed = [s.clone() for s in shards]
                torch._foreach_copy_(shards, pending.originals)
            try:
                yield
            finally:
                with torch.no_grad():
                    sharding.reshard(self.model)  # a forward in the block left w unsharded
                    torch._foreach_copy_(shards, perturbed)
            return
        with torch.no_grad():
            perturbed = [p.data for p in pending.params]
            for p, o in zip(pending.params, pending.originals, strict=True):
                p.data = o
        try:
            yield
        finally:
            with torch.no_grad():
                for p, q in zip(pending.params, perturbed, strict=True):
                    p.data = q

    def _perturb(self) -> list[Perturbation]:
        answers = (self.checker.perturb() if self.checker is not None
                   else self.plugins.hook.sparsefw_perturb(state=self.state))
        return [p for p in answers if p is not None]

    # ------------------------------------------------------------------ the three halves
    def epoch_start(self) -> None:
        """Begin epoch ``state.epoch``: the ``epoch_start`` hooks (statistics passes)."""
        self._epoch_started = True
        self.plugins.hook.sparsefw_epoch_start(state=self.state)

    def epoch_end(self) -> None:
        """End the current epoch (``epoch_end`` hooks); the next step starts the next one.
        Implicit every ``steps_per_epoch`` steps when that was given."""
        self.plugins.hook.sparsefw_epoch_end(state=self.state)
        self.state.epoch += 1
        self._epoch_started = False

    def pre_forward(self) -> None:
        """Schedule values and a before-forward topology update for the step about to run
        (once per step; later calls in the same step do nothing)."""
        st = self.state
        if self._prepared_step == st.step:
            return
        self._prepared_step = st.step
        if self._manage_epochs and not self._epoch_started:
            self.epoch_start()
        st.values = self._schedule_values()
        if MASK_DECAY in st.values:  # β of forward masks (MDGF) is a schedule value
            self.masks.decay = float(st.values[MASK_DECAY])
        self._skip_optimizer = False
        if self.compute is not None:  # an after-backward topology update reads dense gradients
            self.compute.dense_gradient = (self.topology_phase == "after_backward"
                                           and self.topology_due())
        if self.topology_phase == "before_forward" and self.topology_due():
            self._skip_optimizer = self.update_topology()

    def begin_step(self) -> None:
        """The pre-forward phase of a step driven without a closure: :meth:`pre_forward`,
        then the perturbations that need no pass of their own (S²-SAM), applied to the
        weights until :meth:`post_backward` restores them. Once per step; the forward
        pre-hook calls it at the first training forward, callbacks call it explicitly."""
        if self._prepared_step == self.state.step:
            return
        self.pre_forward()
        self._sparse_compute_active(True)
        if "closure" not in self.needs:
            self._pending = self._apply_perturbations(self._perturb())

    def _on_forward(self, module, args):
        """Forward pre-hook of the user's model: the first training forward of a step outside
        ``step(closure)`` begins the step."""
        if (self._in_step or self._own_pass or not module.training
                or not torch.is_grad_enabled() or self._prepared_step == self.state.step):
            return None
        self.begin_step()
        return None

    def post_backward(self, loss: torch.Tensor | None = None) -> None:
        """After the backward: restore a perturbation applied before the forward, unscale
        the gradients, run an after-backward topology update if due, the gradient
        corrections, and zero the pruned gradients (hard masks)."""
        st = self.state
        if self.sharded:  # a forward since the backward (evaluation) left unsharded copies
            sharding.reshard(self.model)
        self._restore()
        self._sparse_compute_active(False)
        if self._prepared_step != st.step:  # no forward seen (compiled hooks): prepare late
            self.pre_forward()
        if loss is not None:
            st.loss = loss
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.dense_momentum_beta is not None:
            self._update_dense_momentum()
        if self.topology_phase == "after_backward" and self.topology_due():
            self._skip_optimizer = self.update_topology() or self._skip_optimizer
        if self.checker is not None:
            self.checker.gradient_correct()
        else:
            self.plugins.hook.sparsefw_gradient_correct(state=st)
        self._grads_unmasked = self._fold_masking and self._optimizer_masks
        if not self._grads_unmasked:
            self.masks.mask_grads_()
        if self.guard is not None:  # a non-finite loss or gradient: stop (or skip the update)
            self._skip_optimizer = (self.guard.after_backward(st.step, st.loss,
                                                              self.model.parameters())
                                    or self._skip_optimizer)

    @torch.no_grad()
    def _update_dense_momentum(self) -> None:
        """``m ← β·m + g`` over every masked parameter with the *dense* gradient (pruned
        entries included, before the hard masks zero them): ``state.dense_momentum``, what
        momentum-based growth (SNFS) reads; the optimizer's own momentum is zero at pruned
        entries. Kept only when a component declares ``needs = ("dense_momentum",)``."""
        st = self.state
        if st.dense_momentum is None:
            st.dense_momentum = {n: torch.zeros_like(p) for n, p in self.masks.params.items()}
        pairs = [(st.dense_momentum[n], p.grad) for n, p in self.masks.params.items()
                 if p.grad is not None]
        if pairs:
            bufs, grads = (list(t) for t in zip(*pairs, strict=True))
            torch._foreach_mul_(bufs, self.dense_momentum_beta)
            torch._foreach_add_(bufs, grads)
        # a backward whose weight gradients were read densely (cost accounting, sparsefw.cost)
        st.passes[DENSE_GRAD_PASSES] = st.passes.get(DENSE_GRAD_PASSES, 0) + 1

    def optimizer_step(self) -> None:
        """``optimizer.step()`` (through the GradScaler when one was given), unless a topology
        component asked to skip it."""
        if self._grads_unmasked and self._skip_optimizer:  # the optimizer will not mask them
            self.masks.mask_grads_()
        self._grads_unmasked = False
        if not self._skip_optimizer:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()

    def after_step(self) -> None:
        """After the optimizer step: re-mask for optimizers without a masking rule, advance
        the step counter, call the ``step_end`` observers and close an implicit epoch."""
        st = self.state
        if self._reapply_masks:
            self.masks.apply_()
        self.masks.masks.release()  # bool masks built during the step: none outlives it
        st.step += 1
        metrics = self.after_optimizer_step() if self.after_optimizer_step is not None else None
        self.plugins.hook.sparsefw_step_end(state=st, metrics=metrics)
        if self._implicit_epochs and self._manage_epochs and st.step % st.steps_per_epoch == 0:
            self.epoch_end()

    def step(self, closure: Callable[[], Any] | None = None, *, batch=None):
        """One whole sparse training step; returns the closure's loss (or ``None``).

        With ``closure`` (it computes the loss, calls ``backward()`` — ``scaler.scale(loss)
        .backward()`` with a scaler — and returns the loss; it need not zero gradients: the
        Sparsifier does): every component works, SAM's extra pass included. Without one, call it
        after your own ``backward()``; components that need a pass of their own raise
        :class:`SparsifierError`. ``batch=(inputs, targets)`` is handed to components that read
        the step's batch (``agent``)."""
        st = self.state
        if batch is not None:
            st.batch = self._to_device(batch) if self.front_door != "trainer" else batch
        elif "batch" in self.needs:
            self._refuse("batch")
        if closure is None:
            if "closure" in self.needs:
                self._refuse("closure")
            self._post_backward_before_step(None)
        else:
            st.closure = functools.partial(self._run_closure, closure)
            self._in_step = True
            applied = None
            try:
                self._restore()
                self.pre_forward()
                perts = self._perturb()
                self.zero_grad()
                st.inputs = next((p.inputs for p in reversed(perts) if p.inputs is not None), None)
                applied = self._apply_perturbations(perts)
                perts = None  # the offsets' memory (S²-SAM: last step's gradient) is free again
                self._sparse_compute_active(True)
                loss = self._run_closure(closure)
            finally:
                self._put_back(applied)
                self._in_step = False
                self._sparse_compute_active(False)
                st.closure = self._missing("closure")
            self._post_backward_before_step(loss)
        self.optimizer_step()
        self.after_step()
        return st.loss if closure is not None else None

    def _gradients_read_after_step(self, check_plugins: bool | None) -> bool:
        """Can anything read ``.grad`` between an optimizer step and the next step's
        ``zero_grad``? Only the Trainer owns its gradients; there, a component may read them
        unless its only hooks are ``mask_init``/``register`` or it declares
        ``reads_gradients_after_step = False`` (the built-in observers). Under the run-time
        plugin checks, assumed yes."""
        if self.front_door != "trainer" or check_plugins:
            return True
        pm = self.plugins.pm
        for comp in self.plugins.components:
            if getattr(comp.instance, "reads_gradients_after_step", True) is False:
                continue
            hooks = {caller.name for caller in pm.get_hookcallers(comp.instance) or ()}
            if hooks - GRADIENT_FREE_HOOKS:
                return True
        return False

    def _post_backward_before_step(self, loss: torch.Tensor | None) -> None:
        """``post_backward`` when ``optimizer_step`` follows at once: a :class:`MaskedSGD`
        then masks the gradients in its update instead of a pass of their own."""
        self._fold_masking = True
        try:
            self.post_backward(loss)
        finally:
            self._fold_masking = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``optimizer.zero_grad``: gradients of the model's parameters set to ``None``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ accounting
    @property
    def density(self) -> float:
        """Global density over the masked parameters (one host sync)."""
        return float(self.masks.density())

    def densities(self) -> dict[str, float]:
        """Global (``"density"``) and per-layer (``"density/NAME"``) densities."""
        return self.masks.summary()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: masks, component states, counters, the
        components' random generator, and a perturbation still applied to the weights."""
        st = self.state
        pending = None
        if self._pending is not None:
            pending = {n: o.clone() for n, o in zip(self._pending.names, self._pending.originals,
                                                    strict=True)}
        return {
            "step": st.step,
            "epoch": st.epoch,
            "epoch_started": self._epoch_started,
            "prepared_step": self._prepared_step,
            "values": dict(st.values),
            "masks": self.masks.state_dict(),
            "plugins": self.plugins.states(st),
            "generator": st.generator.get_state(),
            "passes": dict(st.passes),
            "pending": pending,
            **self.lifecycle_state(),
        }

    def lifecycle_state(self) -> dict[str, Any]:
        """What the lifecycle itself keeps for components (the dense gradient momentum)."""
        dm = self.state.dense_momentum
        return {"dense_momentum": None if dm is None else {n: t.clone() for n, t in dm.items()}}

    def load_lifecycle_state(self, sd: Mapping[str, Any]) -> None:
        dm = sd.get("dense_momentum")
        self.state.dense_momentum = None if dm is None else {
            n: t.to(self.masks.params[n].device).clone() for n, t in dm.items()}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (after the model and optimizer)."""
        st = self.state
        self.masks.load_state_dict(sd["masks"])
        self.masks.refresh_sparse_layers()
        # (a no-op for optimizer state saved beside these masks; the weights are left alone:
        # a checkpoint taken with a perturbation pending holds perturbed ones)
        self.masks.zero_pruned(self.optimizer, weights=False)
        st.step, st.epoch = sd["step"], sd["epoch"]
        self._epoch_started = sd["epoch_started"]
        self._prepared_step = sd["prepared_step"]
        st.values = dict(sd["values"])
        if MASK_DECAY in st.values:
            self.masks.decay = float(st.values[MASK_DECAY])
        st.passes.update(sd["passes"])
        st.generator.set_state(sd["generator"])
        self.load_lifecycle_state(sd)
        self.plugins.load_states(st, sd["plugins"])
        pending = sd.get("pending")
        if pending:
            named = st.named_params
            names = list(pending)
            params = [named[n] for n in names]
            originals = [self._spare_buffer(n, named[n]) for n in names]
            with torch.no_grad():
                torch._foreach_copy_(originals, [t.to(p.device) for t, p in
                                                 zip(pending.values(), params, strict=True)])
            self._pending = _Applied(names, params, originals, in_place=self.sharded)

    def remove_hooks(self) -> None:
        """Detach the forward hooks this Sparsifier put on the model (and the sparse-compute
        forwards)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.compute is not None:
            self.compute.remove()
            self.compute = None

    @torch.no_grad()
    def finalize(self) -> None:
        """End of training: take off a pending perturbation, write the binary masks into the
        weights (forward masks too: the trained dense weights become ``w ⊙ m``) and detach
        the hooks, so the plain model is the sparse model (for ``save_pretrained``, export)."""
        self._restore()
        self.masks.decay = 0.0
        params = [self.masks.params[n] for n in self.masks.names]
        if params:
            torch._foreach_mul_(params, [self.masks.float_mask(n) for n in self.masks.names])
        self.remove_hooks()
