"""``grad_correlation``: a read-only diagnostic that logs how gradients correlate over time, how
much gradient reaches pruned weights, and how much of the network the topology has explored.

Selected as ``[[gradient_correct]] name = "grad_correlation"`` (the ``[logging] observers``
list takes names only, and this slot sees the step's gradient). It never edits a gradient. Put
it *first* in the ``gradient_correct`` list to see the raw gradient, after a correction (AGENT)
to see the corrected one. Metrics (0-d device tensors in ``state.metrics``):

* ``diag/cos_prev``, ``diag/pearson_prev`` — cosine and Pearson correlation between this step's
  gradient and the previous measured step's (another batch, other weights);
* ``diag/cos_snapshot``, ``diag/pearson_snapshot`` — between this step's gradient and the
  gradient of a *snapshot* of the weights taken at the start of the epoch, on the same batch:
  AGENT's control-variate correlation (Lei et al., arXiv 2301.03573). Costs one extra forward and
  backward per measured step (``snapshot = false`` turns it off);
* ``diag/pruned_grad_norm``, ``diag/pruned_grad_var`` — forward (N:M, STE-style) masks only: the
  norm and variance of the gradient reaching pruned weights, the "gradient flow" PGF reasons about
  (Bambhaniya et al., arXiv 2402.04744);
* ``explore/rate`` — the fraction of maskable weights ever active since the run started (ITOP's
  exploration rate R_s, Liu et al., arXiv 2102.02887); ``explore/turnover`` — at steps where the
  topology changed, the fraction of the active set that is new
  (``|m_new ∧ ¬m_old| / |m_new|``).

Correlations are taken over the entries the optimizer updates (``scope = "auto"``): active
entries plus unmasked parameters for hard masks, every entry for forward masks; ``"active"`` and
``"all"`` force one or the other. The snapshot's gradient uses the snapshot's weights with its
masks of that time, cloned buffers (BatchNorm running statistics of the model are not touched) and
a forked CPU RNG (so dropout draws of the run are unchanged on CPU).
"""

from __future__ import annotations

import attrs
import torch
from torch.func import functional_call

from sparsefw.config import in_range, one_of
from sparsefw.diagnostics.correlation import cosine, norm_and_variance, pearson
from sparsefw.hookspecs import hookimpl


@attrs.frozen
class GradCorrelationConfig:
    """Options of ``grad_correlation``."""

    #: measure every this many steps (exploration is tracked at every topology change)
    every: int = attrs.field(default=1, validator=in_range(0))
    #: also correlate with the epoch-start snapshot's gradient on the same batch (+1 fwd/bwd)
    snapshot: bool = True
    #: entries the correlations are taken over
    scope: str = attrs.field(default="auto", validator=one_of("auto", "active", "all"))
    #: track the exploration rate and mask turnover
    exploration: bool = True


@attrs.define(eq=False)
class GradCorrelation:
    """Log gradient correlations, pruned-gradient flow and exploration (never edits gradients)."""

    cfg: GradCorrelationConfig
    #: the snapshot gradient is taken on the step's batch
    needs = ("batch",)
    prev: list | None = None
    snap_params: dict | None = None
    snap_buffers: dict | None = None
    ever: dict | None = None
    last: dict | None = None
    rate: torch.Tensor | None = None

    # ------------------------------------------------------------------ helpers
    def _weights(self, state, names):
        masks = state.masks
        scope = self.cfg.scope
        if scope == "auto":
            scope = "active" if masks.kind == "hard" else "all"
        if scope == "all":
            return [None] * len(names)
        return [masks.masks[n] if n in masks.masks else None for n in names]

    @torch.no_grad()
    def _refresh_snapshot(self, state) -> None:
        masks = state.masks
        self.snap_params = {
            n: (p.detach() * masks.masks[n] if n in masks.masks else p.detach()).clone()
            for n, p in state.model.named_parameters()
        }
        self.snap_buffers = {n: b.detach().clone() for n, b in state.model.named_buffers()}

    def _snapshot_grads(self, state, names):
        x, y = state.batch
        params = {n: t.detach().clone().requires_grad_(True) for n, t in self.snap_params.items()}
        buffers = {n: b.clone() for n, b in self.snap_buffers.items()}
        with torch.random.fork_rng(devices=[], enabled=state.device.type == "cpu"):
            with torch.enable_grad():
                out = functional_call(state.model, {**params, **buffers}, (x,))
                loss = state.loss_fn(out.float(), y)
                grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        return [torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads,
                                                                                strict=True)]

    @torch.no_grad()
    def _explore(self, state, changed: bool) -> None:
        masks = state.masks.masks
        if not masks:
            return
        if self.ever is None:
            self.ever = {n: m.clone() for n, m in masks.items()}
            self.last = {n: m.clone() for n, m in masks.items()}
        if changed:
            new = torch.stack([(m & ~self.last[n]).sum() for n, m in masks.items()]).sum()
            active = torch.stack([m.sum() for m in masks.values()]).sum()
            state.metrics["explore/turnover"] = new.double() / active.clamp_min(1).double()
            for n, m in masks.items():
                self.ever[n] |= m
                self.last[n] = m.clone()
            self.rate = None
        if self.rate is None:
            total = sum(m.numel() for m in masks.values())
            self.rate = torch.stack([e.sum() for e in self.ever.values()]).sum().double() / total
        state.metrics["explore/rate"] = self.rate

    # ------------------------------------------------------------------ hooks
    @hookimpl
    def sparsefw_run_start(self, state):
        if self.cfg.exploration:
            self._explore(state, changed=False)
        if self.cfg.snapshot and self.snap_params is None:
            self._refresh_snapshot(state)

    @hookimpl
    def sparsefw_epoch_start(self, state):
        if self.cfg.snapshot:
            self._refresh_snapshot(state)

    @hookimpl
    def sparsefw_gradient_correct(self, state):
        if self.cfg.exploration:
            topo = state.config.topology_update
            due = topo is not None and topo.options.due(state.step, state.total_steps)
            self._explore(state, changed=due)
        if state.step % self.cfg.every:
            return
        named = dict(state.model.named_parameters())
        names = [n for n, p in named.items() if p.requires_grad]
        grads = [named[n].grad if named[n].grad is not None else torch.zeros_like(named[n])
                 for n in names]
        weights = self._weights(state, names)
        if self.prev is not None:
            state.metrics["diag/cos_prev"] = cosine(grads, self.prev, weights)
            state.metrics["diag/pearson_prev"] = pearson(grads, self.prev, weights)
        if self.cfg.snapshot and self.snap_params is not None and state.batch is not None:
            snap = self._snapshot_grads(state, names)
            state.metrics["diag/cos_snapshot"] = cosine(grads, snap, weights)
            state.metrics["diag/pearson_snapshot"] = pearson(grads, snap, weights)
        if state.masks.kind == "forward" and state.masks.masks:
            pruned = [(~m) for m in state.masks.masks.values()]
            pg = [named[n].grad if named[n].grad is not None else torch.zeros_like(named[n])
                  for n in state.masks.masks]
            gnorm, gvar = norm_and_variance(pg, pruned)
            state.metrics["diag/pruned_grad_norm"] = gnorm
            state.metrics["diag/pruned_grad_var"] = gvar
        self.prev = [g.detach().clone() for g in grads]

    # ------------------------------------------------------------------ checkpoints
    @hookimpl
    def sparsefw_state_dict(self, state):
        return {
            "prev": self.prev,
            "snap_params": self.snap_params,
            "snap_buffers": self.snap_buffers,
            "ever": self.ever,
            "last": self.last,
        }

    @hookimpl
    def sparsefw_load_state_dict(self, state, plugin_state):
        for key in ("prev", "snap_params", "snap_buffers", "ever", "last"):
            setattr(self, key, plugin_state.get(key))
        self.rate = None


@hookimpl
def sparsefw_register(registry):
    registry.add("gradient_correct", "grad_correlation", config=GradCorrelationConfig,
                 factory=GradCorrelation)
