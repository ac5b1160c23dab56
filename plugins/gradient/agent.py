"""``agent``: adaptive gradient correction for sparse training (Lei, Xu, Zhang, He, Mallick,
"Balance is Essence: Accelerating Sparse Training via Adaptive Gradient Correction",
arXiv 2301.03573, CPAL 2024).

An SVRG-style control variate with an adaptive, data-estimated coefficient. At the start of every
epoch (every ``refresh_every`` epochs) a **statistics pass** over the epoch's training batches,
without parameter updates, records for each batch b the losses ``ℓ_b(θ_t)`` of the current model
and ``ℓ_b(θ̃)`` of the snapshot, and the mean gradient ``ū = (1/B) Σ_b ∇ℓ_b(θ_t)``. Then::

    c   = Cov(ℓ(θ_t), ℓ(θ̃)) / Var(ℓ(θ̃))          sample moments, ddof = 1
    τ   ← (1 − α)·τ + α·c                          α = 0.3, τ₀ = 0.1; clipped to [0, 1] (clip)
    θ̃  ← θ_t,  g̃ ← ū                               snapshot refresh

and every training step corrects the gradient, before the optimizer (and the hard masks)::

    d = g + τ·γ·(g̃ − g_old),   g_old = ∇ℓ_b(θ̃) on the step's batch,   γ = 0.1

The snapshot is a detached copy of the parameters (the *effective* weights ``w ⊙ m_eff`` under
forward masking) and buffers, evaluated with :func:`torch.func.functional_call` on the run's model
in train mode (its BatchNorm statistics are the snapshot's own). The coefficient is updated only
once a real snapshot exists (from the second statistics pass); the first epoch uses ``τ₀``. See
``docs/methods/agent.md`` for the cost, the cheaper variants (``mean_grad =
"previous_epoch"``, ``refresh_every > 1``, ``correct_every > 1``) and the choices made between
readings.

``correct_every = k`` (a variant, not the paper's method) corrects only the steps whose global
index is a multiple of k, with the unchanged formula; the other steps keep the plain gradient g
and take no snapshot pass. It is not rescaled: the control variate needs g_old on the step's own
batch, so a step either carries the whole estimator or none of it (no stale g_old).
"""

from __future__ import annotations

import contextlib

import attrs
import torch
from torch.func import functional_call

from sparsefw.attacks import AttackConfig, AttackUnits, craft
from sparsefw.config import in_range, one_of
from sparsefw.engine import distributed
from sparsefw.hookspecs import hookimpl

__all__ = ["Agent", "AgentConfig", "regression_coefficient", "update_tau"]


@attrs.frozen
class AgentConfig:
    """Options of ``agent``: scale ``gamma``, EMA rate ``alpha``, initial ``tau_init``,
    clipping of τ to [0, 1], snapshot refresh period, how the mean gradient is obtained,
    whether the statistics pass uses adversarial inputs when the run trains with ``pgd``, and
    ``correct_every`` (variant: correct only every k-th step, the others keep g)."""

    gamma: float = attrs.field(default=0.1, validator=in_range(0, lo_open=False))
    alpha: float = attrs.field(default=0.3, validator=in_range(0, 1))
    tau_init: float = 0.1
    clip: bool = True
    refresh_every: int = attrs.field(default=1, validator=in_range(0))
    mean_grad: str = attrs.field(
        default="stats_pass", validator=one_of("stats_pass", "previous_epoch")
    )
    stats_inputs: str = attrs.field(default="auto", validator=one_of("auto", "clean"))
    correct_every: int = attrs.field(default=1, validator=in_range(0))


def regression_coefficient(cur: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``Cov(cur, old) / Var(old)`` with sample moments (ddof = 1), in float64, as a 0-d
    tensor (the least-squares slope of ``cur`` on ``old``). Non-finite when ``Var(old) = 0``."""
    cur, old = cur.double().flatten(), old.double().flatten()
    n = cur.numel()
    dc, do = cur - cur.mean(), old - old.mean()
    cov = (dc * do).sum() / (n - 1)
    var = (do * do).sum() / (n - 1)
    return cov / var


def update_tau(tau: torch.Tensor, coef: torch.Tensor, alpha: float, clip: bool) -> torch.Tensor:
    """``(1 − α)·τ + α·c``, clipped to [0, 1] when ``clip``; ``τ`` unchanged when ``c`` is not
    finite (zero variance of the snapshot losses)."""
    new = (1 - alpha) * tau + alpha * coef
    new = torch.where(torch.isfinite(coef), new, tau)
    return new.clamp(0.0, 1.0) if clip else new


def _zero_if_nonfinite(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """All zeros when any entry is not finite (an fp16 overflow), else unchanged; no sync."""
    ok = torch.stack([torch.isfinite(t).all() for t in ts]).all()
    return [torch.where(ok, torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0), 0.0) for t in ts]


@attrs.define(eq=False)
class Agent:
    """AGENT: g + τγ(g̃ − g_old), τ the EMA of the batch-loss regression coefficient."""

    cfg: AgentConfig
    #: False: a fixed coefficient τ = tau_init (plain SVRG with tau_init = gamma = 1)
    adaptive: bool = True
    tau: torch.Tensor | None = None
    coef_raw: torch.Tensor | None = None
    snapshot: dict[str, torch.Tensor] | None = None
    mean: dict[str, torch.Tensor] | None = None
    # previous_epoch variant: running sums over the training pass
    grad_sum: dict[str, torch.Tensor] | None = None
    grad_count: int = 0
    loss_pairs: list[torch.Tensor] = attrs.field(factory=list)
    _attack: tuple | None = None

    def needs(self) -> tuple[str, ...]:
        """The snapshot gradient is taken on the step's batch; the reference variant's
        statistics pass reads the training batches at each epoch start."""
        return ("batch", "train_batches") if self.cfg.mean_grad == "stats_pass" else ("batch",)

    # ------------------------------------------------------------------ helpers
    def _params(self, state) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in state.model.named_parameters() if p.requires_grad}

    def _loss_scale(self, state) -> float:
        return 1024.0 if state.config.train.amp == "fp16" else 1.0

    def _autocast(self, state):
        amp = state.config.train.amp
        if amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(state.device.type, dtype=dtype)

    def _take_snapshot(self, state) -> None:
        effective = state.masks.effective() if state.masks.kind == "forward" else {}
        src = {n: (effective[n] if n in effective else p).detach()
               for n, p in self._params(state).items()}
        src.update({n: b.detach() for n, b in state.model.named_buffers()})
        with torch.no_grad():
            if self.snapshot is not None and self.snapshot.keys() == src.keys():
                # into the previous snapshot's buffers: no allocation per refresh
                torch._foreach_copy_(list(self.snapshot.values()), list(src.values()))
            else:
                self.snapshot = {n: t.clone() for n, t in src.items()}

    def _snapshot_loss(self, state, x, y, *, grad: bool):
        """The snapshot's loss on ``(x, y)``; with ``grad`` also its parameter gradient."""
        params = self._params(state)
        leaves = {n: self.snapshot[n].requires_grad_(grad) for n in params}
        state.passes["forward"] += 1
        with torch.set_grad_enabled(grad), self._autocast(state):
            out = functional_call(state.model, self.snapshot, (x,))
        loss = state.loss_fn(out.float(), y)
        if not grad:
            return _rank_mean(state, [loss.detach()])[0], None
        state.passes["backward"] += 1
        s = self._loss_scale(state)
        gs = torch.autograd.grad(loss * s if s != 1 else loss, list(leaves.values()),
                                 allow_unused=True)
        for t in leaves.values():
            t.requires_grad_(False)
        gs = [torch.zeros_like(t) if g is None else (g / s if s != 1 else g)
              for t, g in zip(leaves.values(), gs, strict=True)]
        # several ranks: each saw its shard of the global batch; average like DDP does
        loss, *gs = _rank_mean(state, [loss.detach(), *gs])
        return loss, dict(zip(leaves, gs, strict=True))

    def _adversarial(self, state):
        """The run's ``pgd`` training attack, if the statistics pass should use it."""
        if self.cfg.stats_inputs != "auto":
            return None
        for sel in state.config.perturb:
            if isinstance(sel.options, AttackConfig) and getattr(sel.options, "train", False):
                return sel.options
        return None

    def _tensor(self, state, value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.float64, device=state.device)

    # ------------------------------------------------------------------ epochs
    def _due(self, state) -> bool:
        return self.snapshot is None or state.epoch % self.cfg.refresh_every == 0

    @hookimpl
    def sparsefw_epoch_start(self, state):
        if self.tau is None:
            self.tau = self._tensor(state, self.cfg.tau_init)
        if not self._due(state):
            return
        if self.cfg.mean_grad == "previous_epoch":
            self._refresh_from_training_pass(state)
        else:
            self._statistics_pass(state)

    def _statistics_pass(self, state) -> None:
        params = self._params(state)
        names = list(params)
        total = [torch.zeros_like(p) for p in params.values()]
        cur, old = [], []
        attack = self._adversarial(state)
        units = None
        s = self._loss_scale(state)
        for x, y in state.train_batches():
            if attack is not None:
                if units is None:
                    units = AttackUnits(state.data.input_range, state.data.input_shape,
                                        attack.units, x.device, x.dtype)
                x = craft(attack, state, x, y, units)
            loss = state.loss_fn(state.forward(x).float(), y)
            state.passes["backward"] += 1
            gs = torch.autograd.grad(loss * s if s != 1 else loss, list(params.values()),
                                     allow_unused=True)
            pairs = [(t, g) for t, g in zip(total, gs, strict=True) if g is not None]
            if pairs:
                torch._foreach_add_([t for t, _ in pairs], [g for _, g in pairs])
            cur.append(loss.detach())
            if self.adaptive and self.snapshot is not None:
                old.append(self._snapshot_loss(state, x, y, grad=False)[0])
        n = len(cur)
        if n == 0:
            return
        _rank_mean(state, [*cur, *total])
        if old and n >= 2:
            self._update_coefficient(torch.stack(cur), torch.stack(old))
        torch._foreach_div_(total, n * s)
        if s != 1:
            total = _zero_if_nonfinite(total)
        self.mean = dict(zip(names, total, strict=True))
        self._take_snapshot(state)

    def _refresh_from_training_pass(self, state) -> None:
        """Variant: g̃ is the mean of the raw gradients of the training pass since the last
        refresh, and the coefficient comes from that pass's (current, snapshot) loss pairs."""
        spare = None
        if self.grad_count:
            # the running sum becomes g̃ in place; the old g̃'s tensors hold the next sum (the
            # first step after the refresh overwrites them: grad_count = 0)
            spare, self.mean = self.mean, self.grad_sum
            torch._foreach_div_(list(self.mean.values()), self.grad_count)
        if self.adaptive and len(self.loss_pairs) >= 2:
            pairs = torch.stack(self.loss_pairs)
            self._update_coefficient(pairs[:, 0], pairs[:, 1])
        self.grad_sum, self.grad_count, self.loss_pairs = spare, 0, []
        self._take_snapshot(state)

    def _update_coefficient(self, cur: torch.Tensor, old: torch.Tensor) -> None:
        if not self.adaptive:
            return
        self.coef_raw = regression_coefficient(cur, old)
        self.tau = update_tau(self.tau, self.coef_raw, self.cfg.alpha, self.cfg.clip)

    # ------------------------------------------------------------------ steps
    def _correcting(self, state) -> bool:
        """Whether this step carries the correction (and its snapshot pass): every step, or
        with ``correct_every = k`` the steps whose global index is a multiple of k."""
        return state.step % self.cfg.correct_every == 0

    @hookimpl
    def sparsefw_gradient_correct(self, state):
        if self.snapshot is None:
            return
        params = self._params(state)
        with_grad = [n for n, p in params.items() if p.grad is not None]
        if not with_grad:
            return
        grads = [params[n].grad for n in with_grad]
        x, y = state.batch
        variant = self.cfg.mean_grad == "previous_epoch"
        if variant:
            if self.grad_sum is None:
                self.grad_sum = {n: torch.zeros_like(p) for n, p in params.items()}
            sums = [self.grad_sum[n] for n in with_grad]
            if self.grad_count == 0:  # first step since the refresh: the sum starts here
                skipped = set(self.grad_sum) - set(with_grad)
                if skipped:
                    torch._foreach_zero_([self.grad_sum[n] for n in skipped])
                torch._foreach_copy_(sums, grads)
            else:
                torch._foreach_add_(sums, grads)
            self.grad_count += 1
        if not self._correcting(state):  # correct_every variant: g unchanged, no snapshot pass
            return
        if self.mean is None:  # previous_epoch variant, first epoch: nothing to correct with
            if variant and self.adaptive and state.loss is not None:
                old, _ = self._snapshot_loss(state, x, y, grad=False)
                self.loss_pairs.append(torch.stack([state.loss.double(), old.double()]))
            return
        old_loss, g_old = self._snapshot_loss(state, x, y, grad=True)
        if variant and self.adaptive and state.loss is not None:
            cur_loss = _rank_mean(state, [state.loss.detach().clone()])[0]
            self.loss_pairs.append(torch.stack([cur_loss.double(), old_loss.double()]))
        # τγ(g̃ − g_old), in g_old's own tensors: g_old − g̃, times −τγ
        corr = [g_old[n] for n in with_grad]
        torch._foreach_sub_(corr, [self.mean[n] for n in with_grad])
        c = -self.tau * self.cfg.gamma
        torch._foreach_mul_(corr, c.to(grads[0].dtype))
        if state.config.train.amp == "fp16":
            corr = _zero_if_nonfinite(corr)
        torch._foreach_add_(grads, corr)
        if self.adaptive:
            state.metrics["agent/tau"] = self.tau
            if self.coef_raw is not None:
                state.metrics["agent/coef_raw"] = self.coef_raw

    # ------------------------------------------------------------------ checkpoints
    @hookimpl
    def sparsefw_state_dict(self, state):
        clone = lambda d: None if d is None else {k: v.clone() for k, v in d.items()}  # noqa: E731
        return {
            "tau": None if self.tau is None else self.tau.clone(),
            "coef_raw": None if self.coef_raw is None else self.coef_raw.clone(),
            "snapshot": clone(self.snapshot),
            "mean": clone(self.mean),
            # right after a refresh the sum's buffers hold an old g̃ that the next step overwrites
            "grad_sum": clone(self.grad_sum) if self.grad_count else None,
            "grad_count": self.grad_count,
            "loss_pairs": [t.clone() for t in self.loss_pairs],
        }

    @hookimpl
    def sparsefw_load_state_dict(self, state, plugin_state):
        dev = state.device
        move = lambda d: None if d is None else {k: v.to(dev) for k, v in d.items()}  # noqa: E731
        ps = plugin_state
        self.tau = None if ps["tau"] is None else ps["tau"].to(dev)
        self.coef_raw = None if ps["coef_raw"] is None else ps["coef_raw"].to(dev)
        self.snapshot = move(ps["snapshot"])
        self.mean = move(ps["mean"])
        self.grad_sum = move(ps["grad_sum"])
        self.grad_count = ps["grad_count"]
        self.loss_pairs = [t.to(dev) for t in ps["loss_pairs"]]


@hookimpl
def sparsefw_register(registry):
    registry.add("gradient_correct", "agent", config=AgentConfig, factory=Agent)


def _rank_mean(state, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Average over the ranks of a multi-process run (identity for one process), so every rank
    computes the same coefficient and correction."""
    if state.dist is None or not state.dist.enabled:
        return tensors
    return distributed.all_reduce_mean_(tensors, state.dist)
