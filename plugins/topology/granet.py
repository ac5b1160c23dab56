"""``granet`` topology: gradual pruning with zero-cost neuroregeneration (Liu et al., NeurIPS
2021, arXiv 2106.10404).

At every update step t (``every`` steps from ``start`` to ``end``):

1. **Gradual magnitude pruning** (Zhu & Gupta, arXiv 1710.01878): the global density target
   ``d_t = d_f + (d_i − d_f)·(1 − (t − t_0)/(t_1 − t_0))³`` for t in [t_0, t_1] (t_0 = ``start``,
   t_1 = ``prune_end``, a fraction of the run when ≤ 1), ``d_f`` after t_1. If more than
   ``round(d_t·N)`` weights are active (N: all sparsifiable weights), the smallest-magnitude
   active weights over all layers are pruned down to it (one global ranking). A ``density``
   schedule value (e.g. from the ``cubic`` schedule) replaces the built-in d_t.
2. **Neuroregeneration**: in each layer drop ``ceil(α_t·n_active)`` of the smallest-magnitude
   remaining weights and regrow as many, by dense-gradient magnitude, among the entries inactive
   after both prunings. α_t is cosine-decayed from ``drop_fraction`` (0.5) to
   ``drop_fraction_end`` (0.005) over the run (the reference's ``CosineDecay``); a
   ``drop_fraction`` schedule value replaces it.

``d_f`` is ``final_density`` or, unset, ``[sparsity] density``. ``d_i`` is ``initial_density``
or, unset, the density the masks have at the first update. The mask initialisation must provide
a start at least as dense as d_i: ``[mask_init] name = "dense"`` for a dense start (GMP-like);
for the reference's sparse start (ERK at d_i = 0.5) the mask initialiser must produce that
density (see docs/methods/granet.md).
"""

from __future__ import annotations

import math
from typing import ClassVar

import attrs
import torch

from sparsefw.config import in_range
from sparsefw.hookspecs import hookimpl
from sparsefw.schedules import cosine_remaining, cubic_remaining, progress, span
from sparsefw.topology import (
    DropGrow,
    DropGrowConfig,
    compiled_compact,
    counts,
    edited_mask,
    grad_abs,
    select_global_indices,
    select_per_segment,
)


@attrs.frozen
class GraNetConfig(DropGrowConfig):
    """GraNet's options (see the module docstring)."""

    every: int = attrs.field(default=1000, validator=in_range(0))
    end: float = attrs.field(default=1.0, validator=in_range(0))
    drop_fraction: float = attrs.field(default=0.5, validator=in_range(0, 1, lo_open=False))
    drop_fraction_end: float = attrs.field(default=0.005, validator=in_range(0, 1, lo_open=False))
    initial_density: float | None = attrs.field(default=None, validator=in_range(0, 1))
    final_density: float | None = attrs.field(default=None, validator=in_range(0, 1))
    prune_end: float = attrs.field(default=0.5, validator=in_range(0))


def cubic_density(d_i: float, d_f: float, step: int, t0: int, t1: int) -> float:
    """Zhu & Gupta's cubic schedule: ``d_i`` at ``t0``, ``d_f`` from ``t1`` on."""
    return span(cubic_remaining, d_i, d_f, progress(step, t0, max(t1, t0 + 1)))


@attrs.define(eq=False)
class GraNet(DropGrow):
    """Global cubic magnitude pruning plus per-layer drop-and-regrow by gradient."""

    #: schedule values this component reads (shown by ``sparsefw describe``)
    reads_values: ClassVar[tuple[str, ...]] = ("density", "drop_fraction")

    #: no count sync: the global pruning already keeps its counts on the device
    host_counts: ClassVar[bool] = False

    #: d_i as used (configured or measured at the first update)
    initial_density: float | None = None

    def grow_scores(self, state, names):
        return grad_abs(state, names)

    def final_density(self, state) -> float:
        if self.cfg.final_density is not None:
            return self.cfg.final_density
        return float(state.config.sparsity.density)

    def density_target(self, state, masks, active: int | None = None) -> float:
        """d_t at this step (measuring d_i at the first update when it is not configured:
        from ``active``, the active entries of ``masks`` when the caller has read them, else
        with one host sync)."""
        if "density" in state.values:
            return float(state.values["density"])
        if self.initial_density is None:
            if self.cfg.initial_density is not None:
                self.initial_density = self.cfg.initial_density
            else:
                total = sum(m.numel() for m in masks)
                if active is None:  # one host sync, at the first update only
                    active = counts(masks).sum().item()
                self.initial_density = active / max(total, 1)
        c = self.cfg
        t1 = int(c.prune_end * state.total_steps) if c.prune_end <= 1 else int(c.prune_end)
        return cubic_density(self.initial_density, self.final_density(state), state.step,
                             c.start, t1)

    def drop_fraction(self, state):
        if "drop_fraction" in state.values:
            return float(state.values["drop_fraction"])
        c = self.cfg
        u = progress(state.step, 0, max(state.total_steps, 1))
        return span(cosine_remaining, c.drop_fraction, c.drop_fraction_end, u)

    def _alpha(self, state, device) -> float:
        """α at this step, logged as ``topology/drop_fraction``."""
        alpha = self.drop_fraction(state)
        state.metrics["topology/drop_fraction"] = torch.tensor(alpha, device=device)
        return alpha

    def drop_counts(self, state, active):
        return torch.ceil(active.double() * self._alpha(state, active.device)).long()

    def _density_metric(self, state, masks, device, active: int | None = None) -> int:
        """Entries the global pruning keeps at this step (``round(d_t·N)``); logs d_t."""
        d_t = self.density_target(state, masks, active)
        state.metrics["topology/density_target"] = torch.tensor(d_t, device=device)
        return round(d_t * sum(m.numel() for m in masks))

    def new_masks(self, state, names, masks):
        """The device path: counts stay on the device, selections are full stable sorts (the
        global pruning one over every layer)."""
        active = counts(masks)
        keep = self._density_metric(state, masks, active.device)
        excess = (active.sum() - keep).clamp(min=0).reshape(1)
        pruned = select_per_segment(self.drop_scores(state, names), masks, excess,
                                    largest=False, single_segment=True)
        after = [m & ~p for m, p in zip(masks, pruned, strict=True)]
        return self.drop_grow(state, names, after, self.drop_counts(state, counts(after)))

    def index_changes(self, state, names, old):
        """The CPU path (:attr:`cpu_host_counts`): counts read to the host, the global pruning
        and the per-layer drop and regrowth by partial top-k on indices; the pruned and the
        dropped entries are cleared together."""
        active = self.active_counts(state, names, old)
        n_active = active.tolist()  # the update's one read (free on the CPU)
        keep = self._density_metric(state, old, active.device, sum(n_active))
        pruned = select_global_indices(self.drop_scores(state, names), old,
                                       max(sum(n_active) - keep, 0), largest=False,
                                       compact=compiled_compact(state))
        after = [edited_mask(m, p, p[:0]) if p.numel() else m
                 for m, p in zip(old, pruned, strict=True)]
        alpha = self._alpha(state, active.device)
        # (float64 products, as drop_counts' on a tensor)
        k = [math.ceil(float(a - p.numel()) * alpha) for a, p in zip(n_active, pruned,
                                                                     strict=True)]
        changes = self.drop_grow_indices(state, names, after, k, k)
        return active, [(torch.cat([p, d]), g) for p, (d, g) in zip(pruned, changes,
                                                                    strict=True)]

    def extra_state(self):
        return {"initial_density": self.initial_density}

    def load_extra_state(self, sd):
        self.initial_density = sd.get("initial_density")


@hookimpl
def sparsefw_register(registry):
    registry.add("topology_update", "granet", config=GraNetConfig, factory=GraNet)
