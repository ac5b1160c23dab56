"""The training engine: builds a run from a :class:`~sparsefw.config.RunConfig` and drives the
step lifecycle (see ``docs/hooks.md``)::

    values = schedule hooks                 (merged into state.values)
    if topology due and its phase is "before_forward": topology_update hook (no gradient yet)
    perts  = perturb hooks                  (config order)
    forward + backward on perturbed weights/inputs, then restore the weights bit-exactly
    if topology due: topology_update hook   (dense gradient in .grad); changed entries zeroed
    gradient_correct hooks                  (config order)
    hard masks zero the pruned gradients; divergence guard; optimizer.step(); lr schedule
    step_end observers                      (metrics synced to the host every log_every steps)
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from sparsefw import distributions
from sparsefw.config import ConfigError, RunConfig
from sparsefw.engine import checkpoint, distributed
from sparsefw.engine.guard import DivergenceGuard
from sparsefw.engine.loaders import BatchSource
from sparsefw.engine.optim import build_lr_schedule, build_optimizer
from sparsefw.engine.rundir import make_run_dir, write_run_info
from sparsefw.masks import MaskSet, sparsifiable_params
from sparsefw.plugins import Catalogue, RunPlugins, build_run
from sparsefw.state import Perturbation, TrainState

#: the schedule value the engine reads as the forward masks' β (``MaskSet.decay``)
MASK_DECAY = "mask_decay"
#: when a topology component runs within a step (its class attribute ``phase``)
TOPOLOGY_PHASES = ("after_backward", "before_forward")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (backend is not None and backend.is_available()):
        raise ConfigError([f"[train] device = {name!r}: no {device.type} device on this machine"])
    return device


class Trainer:
    """One run: model, data, masks, optimizer, plugins and the loop."""

    def __init__(
        self,
        cfg: RunConfig,
        catalogue: Catalogue,
        *,
        run_dir: str | Path | None = None,
        raw_config: dict | None = None,
        config_source: str = "<config>",
    ):
        self.cfg = cfg
        self.catalogue = catalogue
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(cfg.train.device)
        self.dist = distributed.from_env(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        reg = catalogue.registry

        data_entry = reg.get("dataset", cfg.data.name)
        self.data = data_entry.build(cfg.data.options)
        tc = cfg.train
        if tc.batch_size % self.dist.world_size:
            raise ConfigError([f"{config_source}: [train] batch_size {tc.batch_size} (the global "
                               f"batch) must divide evenly over {self.dist.world_size} ranks"])
        ranks = {"rank": self.dist.rank, "world_size": self.dist.world_size}
        self.train_source = self._train_source(**ranks)
        self.test_source = BatchSource(
            self.data.test, tc.eval_batch_size, self.device, shuffle=False,
            in_memory=self.data.in_memory, num_workers=tc.num_workers, **ranks,
        )
        if len(self.train_source) == 0:
            raise ConfigError([f"{config_source}: [train] batch_size {tc.batch_size} is larger "
                               f"than the training set ({len(self.data.train)} samples)"])

        model_entry = reg.get("model", cfg.model.name)
        model = model_entry.factory(
            cfg.model.options, input_shape=tuple(self.data.input_shape),
            num_classes=self.data.num_classes,
        )
        model = model.to(self.device)
        if tc.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        wrapped = model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self._prefix = "module." if self.dist.enabled else ""
        self.forward_model = torch.compile(wrapped) if tc.compile else wrapped
        if self.dist.enabled:  # plugins' extra passes run on the local model, without DDP
            self.local_model = torch.compile(model) if tc.compile else model
        else:
            self.local_model = self.forward_model

        sp = cfg.sparsity
        self.masks = MaskSet(sparsifiable_params(model, sp.dense_layers), kind=sp.kind)
        shapes = {n: tuple(p.shape) for n, p in self.masks.params.items()}
        if shapes:
            self.masks.targets = distributions.active_counts(shapes, sp.density, sp.distribution)

        self.steps_per_epoch = len(self.train_source)
        self.steps_per_round = tc.epochs * self.steps_per_epoch
        if tc.rounds > 1 and tc.round_start >= self.steps_per_round:
            raise ConfigError([f"{config_source}: [train] round_start {tc.round_start} must be "
                               f"below the round's {self.steps_per_round} steps"])
        self.round_start = tc.round_start if tc.rounds > 1 else 0
        later = self.steps_per_round - self.round_start
        total = self.steps_per_round + (tc.rounds - 1) * later
        self.total_steps = min(total, tc.max_steps) if tc.max_steps else total
        self.optimizer = build_optimizer(cfg.optimizer, model.parameters(), self.device)
        self.lr_schedule = build_lr_schedule(
            cfg.lr_schedule, self.optimizer, min(self.steps_per_round, self.total_steps),
            self.steps_per_epoch, iteration=lambda s: self.position(s)[1],
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.amp == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.amp)

        self.plugins: RunPlugins = build_run(cfg, catalogue, observers=self.dist.is_main)
        topo = self.plugins.topology()
        self.interval = topo.options if topo is not None else None
        self.topology = topo.instance if topo is not None else None
        self.topology_phase = getattr(self.topology, "phase", "after_backward")
        if self.topology_phase not in TOPOLOGY_PHASES:
            raise ConfigError([f"topology component {topo.name!r}: phase "
                               f"{self.topology_phase!r} is not one of {TOPOLOGY_PHASES}"])

        self.run_dir = make_run_dir(cfg, run_dir, config_source, self.dist)
        self.guard = DivergenceGuard(tc.on_nonfinite, tc.max_nonfinite_skips, tc.log_every,
                                     self.device, gradients=tc.amp != "fp16")
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.state = TrainState(
            model=model, optimizer=self.optimizer, masks=self.masks,
            loss_fn=F.cross_entropy, device=self.device, generator=generator,
            run_dir=self.run_dir, config=cfg, data=self.data, steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps, steps_per_round=self.steps_per_round, dist=self.dist,
        )
        self.state.forward = self.forward
        self.state.forward_backward = self.forward_backward
        self.state.train_batches = lambda: self.train_source.epoch(self.state.epoch)
        self.raw_config = raw_config
        self._acc = self._zero_acc()
        self._schedule_owner: dict[str, str] = {}
        self._saved: dict[str, torch.Tensor] = {}
        self.resumed = False

    # ------------------------------------------------------------------ passes
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward(self, x: torch.Tensor, *, synced: bool = False) -> torch.Tensor:
        """Model output for ``x`` as the masks define it (forward masking substitutes
        ``w ⊙ m_eff``); counts one forward pass. ``state.forward`` runs the local model; only
        the training step's pass (``synced``) goes through DDP, whose backward all-reduces."""
        self.state.passes["forward"] += 1
        model, prefix = (self.forward_model, self._prefix) if synced else (self.local_model, "")
        with self._autocast():
            effective = self.masks.effective()
            if effective:
                named = {prefix + n: w for n, w in effective.items()}
                return functional_call(model, named, (x,))
            return model(x)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward, loss and backward into ``.grad`` (accumulating); returns the detached loss.
        Counts one forward and one backward pass; never syncs with the host."""
        out = self.forward(x, synced=True)
        loss = self.state.loss_fn(out.float(), y)
        self.state.passes["backward"] += 1
        self.scaler.scale(loss).backward()
        self._last_logits = out.detach()
        return loss.detach()

    # ------------------------------------------------------------------ one step
    def _schedule_values(self) -> dict[str, float]:
        values: dict[str, float] = {}
        answers = self.plugins.hook.sparsefw_schedule(state=self.state)
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
    def _apply_perturbations(self, perts: list[Perturbation]):
        offsets: dict[str, torch.Tensor] = {}
        for p in perts:
            for name, delta in p.params.items():
                offsets[name] = offsets[name] + delta if name in offsets else delta
        if not offsets:
            return None
        named = self.state.named_params
        params = [named[n] for n in offsets]
        saved = [self._saved_buffer(n, named[n]) for n in offsets]
        torch._foreach_copy_(saved, params)
        torch._foreach_add_(params, list(offsets.values()))
        return params, saved

    def _saved_buffer(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """A buffer kept across steps to save ``param`` in before a perturbation."""
        buf = self._saved.get(name)
        if buf is None or buf.shape != param.shape or buf.dtype != param.dtype:
            buf = self._saved[name] = torch.empty_like(param)
        return buf

    def topology_due(self) -> bool:
        """Whether the topology component runs at this step: its own ``topology_due(state)``
        if it has one, else its update interval."""
        if self.interval is None:
            return False
        ask = getattr(self.topology, "topology_due", None)
        if ask is not None:
            return bool(ask(self.state))
        return self.interval.due(self.state.step, self.state.total_steps)

    def _update_topology(self) -> bool:
        """Run the topology hook and enforce what the engine owns; returns whether the
        component asked to skip this step's optimizer update."""
        st = self.state
        hard = self.masks.kind == "hard"
        before = {n: m.clone() for n, m in self.masks.masks.items()} if hard else {}
        change = self.plugins.hook.sparsefw_topology_update(state=st)
        # hard masks: dropped and grown entries restart at zero with zero optimizer state;
        # forward masks keep the dense weights as they are
        for n, old in before.items():
            self.masks.zero_where(n, old ^ self.masks.masks[n], self.optimizer)
        self.masks.apply_()
        distributed.check_in_sync(self.masks.masks, self.dist, "the mask")
        if change is None:
            return False
        for key, counts in (("topology/dropped", change.dropped), ("topology/grown", change.grown)):
            total = _total(counts, self.device)  # summed over the logging window
            st.metrics[key] = st.metrics[key] + total if key in st.metrics else total
        return change.skip_optimizer_step

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Run one training step on batch ``(x, y)``."""
        st = self.state
        st.batch = (x, y)
        st.values = self._schedule_values()
        if MASK_DECAY in st.values:  # β of forward masks (MDGF) is a schedule value
            self.masks.decay = float(st.values[MASK_DECAY])
        skip = False
        if self.topology_phase == "before_forward" and self.topology_due():
            skip = self._update_topology()
        perts = [p for p in self.plugins.hook.sparsefw_perturb(state=st) if p is not None]
        self.optimizer.zero_grad(set_to_none=True)
        inputs = next((p.inputs for p in reversed(perts) if p.inputs is not None), x)
        restore = self._apply_perturbations(perts)
        loss = self.forward_backward(inputs, y)
        if restore is not None:
            with torch.no_grad():
                torch._foreach_copy_(*restore)
        st.loss = loss
        self.scaler.unscale_(self.optimizer)

        if self.topology_phase == "after_backward" and self.topology_due():
            skip = self._update_topology()

        self.plugins.hook.sparsefw_gradient_correct(state=st)
        self.masks.mask_grads_()
        skip = self.guard.after_backward(st.step, loss, self.model.parameters()) or skip
        if not skip:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        # no masks.apply_() here: with pruned gradients zero and the optimizer state of pruned
        # entries zero (zeroed whenever a mask changes), SGD and AdamW leave pruned weights
        # exactly zero; the masks are applied whenever they change instead
        self.lr_schedule.step()

        acc = self._acc
        acc["loss"] += loss.float()
        acc["correct"] += (self._last_logits.argmax(1) == y).sum()
        acc["seen"] += y.numel()
        acc["steps"] += 1
        st.step += 1
        metrics = None
        if st.step % self.cfg.train.log_every == 0 or st.step == st.total_steps:
            metrics = self._read_train_metrics()
        self.plugins.hook.sparsefw_step_end(state=st, metrics=metrics)

    def _zero_acc(self) -> dict[str, Any]:
        z = torch.zeros((), device=self.device)
        return {"loss": z.clone(), "correct": z.clone().long(), "seen": 0, "steps": 0}

    def _read_train_metrics(self) -> dict[str, float]:
        acc = self._acc
        extra = {k: v for k, v in self.state.metrics.items() if torch.is_tensor(v)}
        stacked = torch.stack(
            [acc["loss"].double(), acc["correct"].double(), *(v.double() for v in extra.values())]
        )
        if self.dist.enabled:  # loss and extras averaged over ranks, correct summed
            distributed.all_reduce_sum_(stacked, self.dist)
            stacked[0] /= self.dist.world_size
            stacked[2:] /= self.dist.world_size
        values = stacked.tolist()
        steps = max(acc["steps"], 1)
        out = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "train/loss": values[0] / steps,
            "train/acc": values[1] / max(acc["seen"] * self.dist.world_size, 1),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        out.update(dict(zip(extra, values[2:], strict=True)))
        out.update({f"schedule/{k}": v for k, v in self.state.values.items()})
        self._acc = self._zero_acc()
        self.state.metrics.clear()
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Test loss and accuracy, global and per-layer density (one host sync)."""
        self.model.eval()
        loss = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        n = 0
        for x, y in self.test_source.epoch():
            out = self.forward(x).float()
            loss += F.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
            n += y.numel()
        totals = torch.stack([loss, correct.double(), torch.tensor(float(n), device=self.device,
                                                                  dtype=torch.float64)])
        lv, cv, n = distributed.all_reduce_sum_(totals, self.dist).tolist()
        metrics = {"step": self.state.step, "epoch": self.state.epoch,
                   "test/loss": lv / max(n, 1), "test/acc": cv / max(n, 1)}
        extra = self.plugins.hook.sparsefw_evaluate(
            state=self.state, batches=lambda: self.test_source.epoch()
        )
        for answer in extra:
            metrics.update(answer or {})
        self.model.train()
        metrics.update(self.masks.summary())
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``checkpoint.pt`` atomically into the run directory (the one it replaces
        is kept as ``checkpoint.prev.pt``); never when the weights are non-finite."""
        st = self.state
        self.guard.check_weights(st.step, self.model.parameters())
        payload = {
            "step": st.step,
            "epoch": st.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "masks": self.masks.state_dict(),
            "plugins": self.plugins.states(st),
            "rng": checkpoint.rng_states(st.generator),
            "acc": self._acc,
            "passes": dict(st.passes),
            "guard": self.guard.state_dict(),
        }
        path = self.run_dir / checkpoint.CHECKPOINT
        if self.dist.is_main:
            checkpoint.save(path, payload)
        distributed.barrier(self.dist)
        return path

    def load_checkpoint(self, path: str | Path, *, trust: bool = False) -> None:
        """Restore everything :meth:`save_checkpoint` wrote; training continues from there.
        ``trust`` loads with full unpickling (unsafe; see :func:`checkpoint.load`)."""
        payload = checkpoint.load(path, map_location=self.device, trust=trust)
        checkpoint.check_payload(path, payload, self.model)
        st = self.state
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.lr_schedule.load_state_dict(payload["lr_schedule"])
        self.scaler.load_state_dict(payload["scaler"])
        self.masks.load_state_dict(payload["masks"])
        self.masks.refresh_sparse_layers()
        st.step, st.epoch = payload["step"], payload["epoch"]
        st.round = self.position(st.step)[0]
        st.passes.update(payload["passes"])
        self._acc = payload["acc"]
        checkpoint.set_rng_states(payload["rng"], st.generator)
        self.plugins.load_states(st, payload["plugins"])
        self.guard.load_state_dict(payload.get("guard", {}))
        self.resumed = True

    # ------------------------------------------------------------------ the run
    def _train_source(self, rank: int = 0, world_size: int = 1) -> BatchSource:
        """The training batches of this rank (``world_size = 1``: whole global batches)."""
        tc = self.cfg.train
        return BatchSource(
            self.data.train, tc.batch_size, self.device, shuffle=True, seed=self.cfg.seed,
            drop_last=True, in_memory=self.data.in_memory, num_workers=tc.num_workers,
            rank=rank, world_size=world_size, augment=getattr(self.data, "device_augment", None),
        )

    def _init_masks(self) -> None:
        # every rank scores the same full global batches (no sharding, no DDP hooks)
        source = self._train_source() if self.dist.enabled else self.train_source
        it = iter(())

        def batches(n: int):
            nonlocal it
            out = []
            for _ in range(n):
                batch = next(it, None)
                if batch is None:
                    it = source.epoch(0)
                    batch = next(it)
                out.append(batch)
            return out

        answer = self.plugins.hook.sparsefw_mask_init(state=self.state, batches=batches)
        self.model.zero_grad(set_to_none=True)
        for name in self.masks.names:
            if name not in answer:
                raise RuntimeError(f"mask_init answer lacks a mask for {name}")
            self.masks.update(name, answer[name])
        self.masks.apply_()
        self.masks.refresh_sparse_layers()
        distributed.check_in_sync(self.masks.masks, self.dist, "the initial mask")

    def position(self, step: int) -> tuple[int, int]:
        """``(round, iteration within the round)`` of the run's ``step``. The first round runs
        iterations ``0 .. T−1``; each later round replays ``round_start .. T−1``."""
        first = self.steps_per_round
        if step < first:
            return 0, step
        later = first - self.round_start
        r, offset = divmod(step - first, later)
        return r + 1, self.round_start + offset

    def _next_round(self) -> None:
        st = self.state
        self.plugins.hook.sparsefw_round_end(state=st)
        self.masks.apply_()
        self.masks.refresh_sparse_layers()
        self.optimizer.state.clear()
        st.round += 1

    def fit(self) -> dict[str, float]:
        """Train to the end (or on from a loaded checkpoint) and return the final evaluation."""
        st = self.state
        if not self.resumed:
            self._init_masks()
            if self.dist.is_main:
                write_run_info(self.run_dir, self.cfg, self.raw_config, self.catalogue)
        self.plugins.hook.sparsefw_run_start(state=st)
        metrics: dict[str, float] = {}
        started = time.perf_counter()
        spe, epochs = self.steps_per_epoch, self.cfg.train.epochs
        while st.step < st.total_steps:
            rnd, it = self.position(st.step)
            in_round, start = divmod(it, spe)
            # the data order of epoch e of round r is permutation r·epochs + e: new every round
            st.epoch = rnd * epochs + in_round
            if start == 0 or (rnd > 0 and it == self.round_start):
                self.plugins.hook.sparsefw_epoch_start(state=st)
            every = self.cfg.train.checkpoint_every
            epoch_end = False
            for x, y in self.train_source.epoch(st.epoch, start):
                self.step(x, y)
                self.guard.poll(st.step)
                nxt_round, nxt_it = self.position(st.step)
                epoch_end = (st.step >= st.total_steps or nxt_round != rnd
                             or nxt_it % spe == 0)
                if epoch_end:
                    break
                if every and st.step % every == 0:
                    self.save_checkpoint()  # epoch ends checkpoint after their evaluation
            if epoch_end:
                self.plugins.hook.sparsefw_epoch_end(state=st)
                distributed.check_in_sync(dict(self.model.named_parameters()), self.dist,
                                          "the weights")
                metrics = self.evaluate()
                metrics["time/elapsed_s"] = time.perf_counter() - started
                self.plugins.hook.sparsefw_eval_end(state=st, metrics=metrics)
                if st.step < st.total_steps and self.position(st.step)[0] != rnd:
                    self._next_round()
                self.save_checkpoint()
        if not metrics:
            metrics = self.evaluate()
        self.plugins.hook.sparsefw_run_end(state=st, metrics=metrics)
        return metrics


def _total(counts: dict[str, Any], device: torch.device) -> torch.Tensor:
    values = [torch.as_tensor(v, device=device) for v in counts.values()]
    return torch.stack(values).sum() if values else torch.zeros((), device=device)


def train(
    cfg: RunConfig,
    catalogue: Catalogue,
    *,
    run_dir: str | Path | None = None,
    raw_config: dict | None = None,
    resume: str | Path | None = None,
    config_source: str = "<config>",
    trust_checkpoint: bool = False,
) -> tuple[Trainer, dict[str, float]]:
    """Build a :class:`Trainer` and run it; with ``resume`` continue the run in that directory
    (``trust_checkpoint``: load its checkpoint with full unpickling, unsafe)."""
    if resume is not None:
        run_dir = Path(resume)
        ckpt = checkpoint.resume_path(resume)
    trainer = Trainer(cfg, catalogue, run_dir=run_dir, raw_config=raw_config,
                      config_source=config_source)
    if resume is not None:
        if trainer.dist.is_main:  # a kill while writing leaves a temporary file
            checkpoint.remove_stale_temps(run_dir)
        trainer.load_checkpoint(ckpt, trust=trust_checkpoint)
    metrics = trainer.fit()
    return trainer, metrics


__all__ = ["Trainer", "train", "resolve_device"]
