"""``chex`` topology: CHEX, "CHannel EXploration for CNN Model Compression" (Hou et al.,
CVPR 2022, arXiv 2203.15794).

Periodic channel pruning and regrowing during training. Every ``every`` steps in
``[start, end)``:

1. **Layer budgets** (sub-model structure exploration): ``K = C − round(s·C)`` channels are
   kept in all; with ``allocation = "bn"`` they go to the alive channels of largest BatchNorm
   ``|γ|`` over all layers (each layer first keeps its ``ceil(min_channel_ratio·C_l)`` best),
   giving ``κ_l`` per layer; ``"uniform"`` keeps ``C_l − round(s·C_l)`` per layer (at least
   ``ceil(min_channel_ratio·C_l)``).
2. **Prune** (column subset selection): in each layer, keep the ``κ_l`` alive channels of largest
   leverage score ``ℓ_c = ‖U_κ[c, :]‖²`` where ``W = U Σ Vᵀ`` is the SVD of the layer's alive
   filters as rows (``C_out × C_in·k·k``); when ``κ_l`` exceeds the rank bound the score falls
   back to the mean ``|w|`` of the filter.
3. **Regrow**: ``round(δ_t·C_l)`` pruned channels per layer, sampled without replacement with
   probability proportional to the orthogonal-projection residual of their most recently used
   filter on the span of the kept filters, ``‖w_c − P w_c‖``; ``δ_t = δ_0/2·(1 + cos(π·u))``,
   ``u`` running from 0 at ``start`` to 1 at the last update, which therefore only prunes.
   Regrown channels restart from their most recently used values (weights of producer and
   consumers and BN affine entries), written back after the step's optimizer update.

See ``docs/methods/chex.md``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch

from sparsefw.channels import apply_channel_masks
from sparsefw.config import in_range, one_of
from sparsefw.hookspecs import hookimpl
from sparsefw.schedules import cosine_remaining, progress
from sparsefw.state import TopologyChange, UpdateInterval
from sparsefw.topology import counts
from sparsefw_plugins.channel.base import ChannelState, floors

ALLOCATIONS = ("bn", "uniform")


@attrs.frozen
class CHEXConfig(UpdateInterval):
    """CHEX's options."""

    #: channel sparsity s: fraction of the prunable channels removed
    channel_sparsity: float = attrs.field(default=0.5, validator=in_range(0, 1, lo_open=False,
                                                                         hi_open=True))
    #: δ_0, the initial regrowing factor (fraction of a layer's width regrown per update)
    regrow_fraction: float = attrs.field(default=0.3, validator=in_range(0, 1, lo_open=False))
    allocation: str = attrs.field(default="bn", validator=one_of(*ALLOCATIONS))
    min_channel_ratio: float = attrs.field(default=0.1, validator=in_range(0, 1, lo_open=False))


def leverage_scores(w: torch.Tensor, k: int) -> torch.Tensor:
    """Rank-``k`` leverage scores of the rows of ``w`` (``‖U_k[c]‖²``); mean ``|w|`` per row when
    ``k`` exceeds ``min(w.shape)`` (as the CHEX implementation in mmrazor)."""
    w = w.reshape(w.shape[0], -1).double()
    if k > min(w.shape):
        return w.abs().mean(1)
    u, _, _ = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :k] ** 2).sum(1)


def projection_residual(w: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``‖w_c − P w_c‖`` for every row ``c`` of ``w``, ``P`` the orthogonal projector on the span
    of the rows ``kept`` (bool)."""
    w = w.reshape(w.shape[0], -1).double()
    basis = w[kept]
    if basis.numel() == 0:
        return w.norm(dim=1)
    q = torch.linalg.pinv(basis) @ basis  # projector on the row space, in × in
    return (w - w @ q).norm(dim=1)


@attrs.define(eq=False)
class CHEX(ChannelState):
    """Periodic CSS pruning and projection-residual regrowing of channels."""

    #: the generic harness model has no channel-dependency rules; tests/test_chase_chex.py runs
    #: the same checks (counts, export, resume) on ResNet-20, VGG-16 and the MLP
    contract_hints: ClassVar[dict] = {
        "skip": "needs a model with channel rules (ResNet/VGG/MLP from sparsefw.models)"}

    cfg: CHEXConfig
    groups: list | None = None
    keep: dict[str, torch.Tensor] = attrs.field(factory=dict)
    #: unstructured masks the channel masks are applied on (the masks at the first update)
    base: dict[str, torch.Tensor] = attrs.field(factory=dict)
    #: most recently used values of every governed tensor (filled for alive channels)
    mru: dict[str, torch.Tensor] = attrs.field(factory=dict)
    #: (tensor name, bool where) to restore from ``mru`` after this step's optimizer update
    pending: list = attrs.field(factory=list)

    def regrow_factor(self, state) -> float:
        c = self.cfg
        end = c.end_step(state.total_steps)
        last = c.start + c.every * max((end - 1 - c.start) // c.every, 0)
        u = 1.0 if state.step >= last else progress(state.step, c.start, max(last, c.start + 1))
        return c.regrow_fraction * cosine_remaining(u)

    def budgets(self, state, alive: list[torch.Tensor]) -> list[int]:
        """κ_l per group."""
        c = self.cfg
        low = floors(self.groups, c.min_channel_ratio).tolist()
        total = sum(g.size for g in self.groups)
        target = total - round(c.channel_sparsity * total)
        has_bn = all(g.norm for g in self.groups)
        if c.allocation == "uniform" or not has_bn:
            return [max(lo, g.size - round(c.channel_sparsity * g.size))
                    for g, lo in zip(self.groups, low, strict=True)]
        named = dict(state.model.named_parameters())
        scores, reserved = [], []
        for g, a, lo in zip(self.groups, alive, low, strict=True):
            s = named[f"{g.norm}.weight"].detach().abs().double().masked_fill(~a, -math.inf)
            order = torch.sort(s, descending=True, stable=True).indices
            r = torch.zeros_like(a)
            r[order[:lo]] = True
            scores.append(s.masked_fill(r, -math.inf))
            reserved.append(r)
        rest = max(target - sum(low), 0)
        flat = torch.cat(scores)
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[torch.sort(flat, descending=True, stable=True).indices[:rest]] = True
        chosen &= torch.cat(alive)
        parts = chosen.split([g.size for g in self.groups])
        return [int(r.sum() + p.sum()) for r, p in zip(reserved, parts, strict=True)]

    def _tensors(self, state, g):
        """Governed tensors of a group with the dim of the channel index."""
        named = dict(state.model.named_parameters())
        out = [(g.producer_param, 0)] + [(c, 1) for c in g.consumer_params]
        if g.bias:
            out.append((g.bias, 0))
        if g.norm:
            out += [(f"{g.norm}.weight", 0), (f"{g.norm}.bias", 0)]
        return [(n, d, named[n]) for n, d in out]

    def _where(self, t, dim, sel):
        shape = [1] * t.dim()
        shape[dim] = sel.numel()
        return sel.view(shape).expand_as(t)

    def remember(self, state) -> None:
        """Store the current values of alive channels into ``mru``."""
        for g in self.groups:
            for n, d, t in self._tensors(state, g):
                cur = t.detach()
                if n not in self.mru:
                    self.mru[n] = cur.clone()
                else:
                    w = self._where(cur, d, self.keep[g.producer])
                    self.mru[n] = torch.where(w, cur, self.mru[n])

    def update_channels(self, state) -> None:
        """Prune to the budgets, then regrow (two host syncs per update)."""
        self.remember(state)
        alive = [self.keep[g.producer] for g in self.groups]
        kappa = self.budgets(state, alive)
        delta = self.regrow_factor(state)
        state.metrics["channels/regrow_fraction"] = torch.tensor(delta)
        for g, a, k in zip(self.groups, alive, kappa, strict=True):
            w = self.mru[g.producer_param]
            lev = leverage_scores(w[a], k)
            s = torch.full((g.size,), -math.inf, dtype=torch.float64, device=w.device)
            s[a] = lev
            kept = torch.zeros_like(a)
            kept[torch.sort(s, descending=True, stable=True).indices[:k]] = True
            kept &= a
            n_grow = min(round(delta * g.size), g.size - int(kept.sum()))
            grown = torch.zeros_like(a)
            if n_grow > 0:
                res = projection_residual(w, kept).masked_fill(kept, 0).clamp_min(0)
                cand = (~kept).double()
                p = res * cand
                if float(p.sum()) <= 0:
                    p = cand
                idx = torch.multinomial(p.float().cpu(), n_grow, replacement=False,
                                        generator=_cpu_generator(state))
                grown[idx.to(grown.device)] = True
                # restore the most recently used values after this step's optimizer update
                for n, d, t in self._tensors(state, g):
                    self.pending.append((n, self._where(t, d, grown & ~a)))
            self.keep[g.producer] = kept | grown

    @hookimpl
    def sparsefw_topology_update(self, state):
        self.setup_channels(state)
        if not self.groups:
            return None
        names = state.masks.names
        if not self.base:
            self.base = {n: state.masks.masks[n].clone() for n in names}
        old = [state.masks.masks[n].clone() for n in names]
        with torch.no_grad():
            self.update_channels(state)
            apply_channel_masks(state.masks, self.groups, self.keep, base=self.base)
        new = [state.masks.masks[n] for n in names]
        dropped = counts([o & ~m for o, m in zip(old, new, strict=True)])
        grown = counts([m & ~o for o, m in zip(old, new, strict=True)])
        state.metrics["channels/kept"] = self.kept_channels().double()
        return TopologyChange(dropped={n: dropped[i] for i, n in enumerate(names)},
                              grown={n: grown[i] for i, n in enumerate(names)})

    def after_step(self, state) -> None:
        if self.pending:
            named = dict(state.model.named_parameters())
            with torch.no_grad():
                for n, where in self.pending:
                    t = named[n]
                    t.copy_(torch.where(where, self.mru[n].to(t.dtype), t))
            state.masks.apply_()
            self.pending = []

    @hookimpl
    def sparsefw_state_dict(self, state):
        return {**self.channel_state(),
                "base": {n: m.clone() for n, m in self.base.items()},
                "mru": {n: m.clone() for n, m in self.mru.items()}}

    @hookimpl
    def sparsefw_load_state_dict(self, state, plugin_state):
        self.load_channel_state(state, plugin_state)
        named = dict(state.model.named_parameters())
        self.base = {n: m.to(named[n].device) for n, m in plugin_state.get("base", {}).items()}
        self.mru = {n: m.to(named[n].device) for n, m in plugin_state.get("mru", {}).items()}


def _cpu_generator(state) -> torch.Generator:
    """A CPU generator seeded from the run's generator (multinomial sampling on the host)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=state.generator,
                             device=state.generator.device))
    return torch.Generator().manual_seed(seed)


@hookimpl
def sparsefw_register(registry):
    registry.add("topology_update", "chex", config=CHEXConfig, factory=CHEX)
