"""The training engine: builds a run from a :class:`~sparsefw.config.RunConfig` — data, model,
optimizer, learning-rate schedule, run directory — and drives the step lifecycle of a
:class:`~sparsefw.sparsifier.Sparsifier` over the data, with evaluation, logging and
checkpoints. The lifecycle itself (hooks and their order, see ``docs/hooks.md``) lives in the
Sparsifier, which a user's own loop drives the same way; the Trainer is one front door to it.
Its divergence guard (:mod:`sparsefw.engine.guard`) is handed to the Sparsifier, which runs it
on each step's loss and final gradients right before the optimizer step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from sparsefw import distributed_checkpoint, kernels, sharding
from sparsefw.config import ConfigError, RunConfig
from sparsefw.engine import checkpoint, distributed
from sparsefw.engine.guard import DivergenceGuard
from sparsefw.engine.loaders import BatchSource
from sparsefw.engine.optim import build_lr_schedule, build_optimizer, fused_masked_problems
from sparsefw.engine.rundir import make_run_dir, write_run_info
from sparsefw.masks import sparsifiable_params
from sparsefw.plugins import Catalogue, RunPlugins
from sparsefw.sparsifier import MASK_DECAY, TOPOLOGY_PHASES, Sparsifier

__all__ = ["Trainer", "train", "resolve_device", "MASK_DECAY", "TOPOLOGY_PHASES"]


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
        #: ``[train] parallel = "fsdp"``: parameters, masks and optimizer state sharded
        self.fsdp = tc.parallel == "fsdp"
        if self.fsdp:
            distributed.check_fsdp(cfg)
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
        if self.fsdp and self.dist.enabled:  # every Linear/Conv layer its own FSDP group
            distributed.fully_shard_layers(model, sparsifiable_params(model))
        elif self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.forward_model = torch.compile(wrapped) if tc.compile else wrapped
        if self.dist.enabled and not self.fsdp:  # plugins' extra passes: local model, no DDP
            self.local_model = torch.compile(model) if tc.compile else model
        else:
            self.local_model = self.forward_model

        self.steps_per_epoch = len(self.train_source)
        self.steps_per_round = tc.epochs * self.steps_per_epoch
        if tc.rounds > 1 and tc.round_start >= self.steps_per_round:
            raise ConfigError([f"{config_source}: [train] round_start {tc.round_start} must be "
                               f"below the round's {self.steps_per_round} steps"])
        self.round_start = tc.round_start if tc.rounds > 1 else 0
        later = self.steps_per_round - self.round_start
        total = self.steps_per_round + (tc.rounds - 1) * later
        self.total_steps = min(total, tc.max_steps) if tc.max_steps else total
        opt_cfg = cfg.optimizer
        if (cfg.sparsity.cpu_kernels and self.device.type == "cpu"
                and (reason := kernels.unavailable())):
            raise ConfigError([f"{config_source}: [sparsity] cpu_kernels = true: {reason}"])
        if self.fsdp and opt_cfg.implementation == "auto":  # no fused kernels for DTensors
            opt_cfg = attrs.evolve(opt_cfg, implementation="foreach")
        if (opt_cfg.implementation == "auto" and cfg.sparsity.cpu_kernels
                and not fused_masked_problems(cfg, self.device)):
            opt_cfg = attrs.evolve(opt_cfg, implementation="fused_masked")
        if opt_cfg.implementation == "fused_masked":
            problems = fused_masked_problems(cfg, self.device)
            if problems:
                raise ConfigError([f'{config_source}: [optimizer] implementation = '
                                   f'"fused_masked": {p}' for p in problems])
        self.optimizer = build_optimizer(opt_cfg, model.parameters(), self.device)
        self.lr_schedule = build_lr_schedule(
            cfg.lr_schedule, self.optimizer, min(self.steps_per_round, self.total_steps),
            self.steps_per_epoch, iteration=lambda s: self.position(s)[1],
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.amp == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.amp)

        self.guard = DivergenceGuard(tc.on_nonfinite, tc.max_nonfinite_skips, tc.log_every,
                                     self.device, gradients=tc.amp != "fp16")
        #: the model's parameters, listed once (the weights check before each write reads them)
        self._parameters = list(model.parameters())
        # the step lifecycle: the same object a user's own loop drives
        self.sparsifier = Sparsifier(
            model, self.optimizer, cfg, catalogue=catalogue, total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch, scaler=self.scaler, loss_fn=F.cross_entropy,
            init_masks=False, forward_model=self.forward_model, dist=self.dist,
            observers=self.dist.is_main, front_door="trainer",
            after_optimizer_step=self._after_optimizer_step, guard=self.guard,
        )
        self.sparsifier.local_forward_model = self.local_model
        self.masks = self.sparsifier.masks
        self.plugins: RunPlugins = self.sparsifier.plugins
        self.interval = self.sparsifier.interval
        self.topology = self.sparsifier.topology
        self.topology_phase = self.sparsifier.topology_phase

        self.run_dir = make_run_dir(cfg, run_dir, config_source, self.dist)
        self.state = self.sparsifier.state
        st = self.state
        st.run_dir, st.data, st.steps_per_round = self.run_dir, self.data, self.steps_per_round
        st.train_batches = lambda: self.train_source.epoch(self.state.epoch)
        self.raw_config = raw_config
        self._acc = self._zero_acc()
        self.resumed = False

    # ------------------------------------------------------------------ passes
    def forward(self, x: torch.Tensor, *, synced: bool = False) -> torch.Tensor:
        """Model output for ``x`` as the masks define it; counts one forward pass. Only the
        training step's pass (``synced``) goes through DDP, whose backward all-reduces."""
        model = self.forward_model if synced else self.local_model
        return self.sparsifier.forward(x, model=model)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, sync: bool = True
                         ) -> torch.Tensor:
        """Forward, loss and backward into ``.grad`` (accumulating) through the DDP-wrapped
        model; returns the detached loss. Counts one forward and one backward pass. Under DDP,
        ``sync=False`` runs both inside ``no_sync``: ``.grad`` is this rank's own gradient."""
        return self.sparsifier.forward_backward(x, y, sync=sync)

    # ------------------------------------------------------------------ one step
    def topology_due(self) -> bool:
        """Whether the topology component runs at this step (see :class:`Sparsifier`)."""
        return self.sparsifier.topology_due()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Run one training step on batch ``(x, y)``: the Sparsifier's step with this
        batch's forward/backward as the closure (adversarial inputs replace ``x`` when a
        perturbation supplies them)."""
        st = self.state

        def closure():
            return self.sparsifier.forward_backward(st.inputs if st.inputs is not None else x, y)

        self.sparsifier.step(closure, batch=(x, y))

    def _after_optimizer_step(self) -> dict[str, float] | None:
        """The Trainer's bookkeeping after each optimizer step: the learning-rate schedule,
        the training loss and accuracy accumulators, and every ``log_every`` steps the metrics
        for the ``step_end`` observers (one host sync)."""
        st = self.state
        self.lr_schedule.step()
        _, y = st.batch
        acc = self._acc
        acc["loss"] += st.loss.float()
        acc["correct"] += (self.sparsifier.last_output.argmax(1) == y).sum()
        acc["seen"] += y.numel()
        acc["steps"] += 1
        if st.step % self.cfg.train.log_every == 0 or st.step == st.total_steps:
            return self._read_train_metrics()
        return None

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
        n, batches, x = 0, 0, None
        for x, y in self.test_source.epoch():
            out = self.forward(x).float()
            loss += F.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
            n += y.numel()
            batches += 1
        if self.fsdp and self.dist.enabled and x is not None:
            # FSDP's forwards are collectives: a rank with one batch fewer of the round-robin
            # test split runs one more forward (its output unused)
            bs, world = self.cfg.train.eval_batch_size, self.dist.world_size
            most = -(-len(range(0, self.test_source.n, world)) // bs)
            for _ in range(most - batches):
                self.forward(x[:1])
        if self.fsdp and self.dist.enabled:  # no backward frees the root's unsharded weights
            sharding.reshard(self.model)
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
        is kept as ``checkpoint.prev.pt``); never when the weights are non-finite. Under
        ``parallel = "fsdp"``: the distributed checkpoint ``checkpoint.dcp`` (kept previous:
        ``checkpoint.prev.dcp``; :func:`sparsefw.distributed_checkpoint.save_atomic`)."""
        st = self.state
        if self.fsdp:
            # (FSDP2 swaps the registered parameters between sharded and whole: list them)
            self.guard.check_weights(st.step, self.model.parameters())
            extra = {"lr_schedule": self.lr_schedule.state_dict(),
                     "scaler": self.scaler.state_dict(),
                     "rng": checkpoint.rng_states(st.generator), "acc": self._acc,
                     "guard": self.guard.state_dict()}
            return distributed_checkpoint.save_atomic(self.run_dir, self.model, self.optimizer,
                                                      self.sparsifier, extra, step=st.step)
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
            "lifecycle": self.sparsifier.lifecycle_state(),
            "acc": self._acc,
            "passes": dict(st.passes),
            "guard": self.guard.state_dict(),
        }
        path = self.run_dir / checkpoint.CHECKPOINT
        def weights_finite() -> None:  # every rank raises alike (no rank waits in the barrier)
            self.guard.check_weights(st.step, self._parameters)

        if self.dist.is_main:  # (the weights are checked while the file goes to disk)
            checkpoint.save(path, payload, verify=weights_finite)
        else:
            weights_finite()
        distributed.barrier(self.dist)
        return path

    def load_checkpoint(self, path: str | Path, *, trust: bool = False) -> None:
        """Restore everything :meth:`save_checkpoint` wrote; training continues from there.
        ``trust`` loads with full unpickling (unsafe; see :func:`checkpoint.load`)."""
        if self.fsdp:
            self._load_distributed_checkpoint(Path(path), trust)
            return
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
        self.sparsifier.load_lifecycle_state(payload.get("lifecycle", {}))
        self.plugins.load_states(st, payload["plugins"])
        self.guard.load_state_dict(payload.get("guard", {}))
        self.resumed = True

    def _load_distributed_checkpoint(self, path: Path, trust: bool) -> None:
        """Restore what :meth:`save_checkpoint` wrote under ``parallel = "fsdp"``, resharded
        to this run's ranks (CRC-32 of every file checked first)."""
        if not (path / ".metadata").is_file():
            raise checkpoint.CheckpointError(
                f'{path}: not a distributed checkpoint; [train] parallel = "fsdp" resumes from '
                f"{distributed_checkpoint.CHECKPOINT_DIR}")
        distributed_checkpoint.verify(path)
        st = self.state
        extra = distributed_checkpoint.load(path, self.model, self.optimizer, self.sparsifier,
                                            trust=trust)
        self.lr_schedule.load_state_dict(extra["lr_schedule"])
        self.scaler.load_state_dict(extra["scaler"])
        checkpoint.set_rng_states(extra["rng"], st.generator)
        self._acc = {k: v.to(self.device) if torch.is_tensor(v) else v
                     for k, v in extra["acc"].items()}
        self.guard.load_state_dict(extra.get("guard", {}))
        st.round = self.position(st.step)[0]
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

        self.sparsifier.init_masks(batches)

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
                if not self.fsdp:  # FSDP: each rank holds other shards (masks are checked)
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
        ckpt = (distributed_checkpoint.resume_path(resume) if cfg.train.parallel == "fsdp"
                else checkpoint.resume_path(resume))
    trainer = Trainer(cfg, catalogue, run_dir=run_dir, raw_config=raw_config,
                      config_source=config_source)
    if resume is not None:
        if trainer.dist.is_main:  # a kill while writing leaves a temporary file
            checkpoint.remove_stale_temps(run_dir)
        trainer.load_checkpoint(ckpt, trust=trust_checkpoint)
    metrics = trainer.fit()
    return trainer, metrics


__all__ = ["Trainer", "train", "resolve_device"]
