"""``dsr`` topology: Dynamic Sparse Reparameterization (Mostafa & Wang, ICML 2019,
arXiv 1902.05967).

Every ``every`` steps (a *reallocation*):

1. prune, in every layer, the active weights with ``|w| < H`` — one global threshold H;
2. adapt H to the number pruned, K, against the target ``N_p = target_fraction · N_active``
   (N_active: active weights over all layers at the first reallocation): K < (1 − δ)·N_p doubles
   H, K > (1 + δ)·N_p halves it (δ = ``tolerance``); the new H applies from the next
   reallocation;
3. give the K freed parameters back to the layers in proportion to their surviving weights
   R_l (largest-remainder rounding, a layer never receives more than its free entries; what a
   full layer cannot take goes to the others, again in proportion to R_l);
4. grow each layer's share at random inactive positions (zero-initialised).

DSR therefore changes the per-layer counts while keeping the global count. Defaults follow the
reference code (IntelAI dynamic-reparameterization): initial H = 0.001, N_p a fraction 0.01 of
the parameters, δ = 0.1. The component reads the counts back to the host once per
reallocation (for H and the integer allocation). On CPU masks it edits the masks at the
pruned and grown indices (:meth:`DSR.index_changes`) instead of building whole new masks; both
paths leave the same masks (tested).
"""

from __future__ import annotations

import attrs
import numpy as np
import torch

from sparsefw.config import in_range
from sparsefw.hookspecs import hookimpl
from sparsefw.masks import fill_at, flat_numpy
from sparsefw.topology import (
    DropGrow,
    DropGrowConfig,
    compiled_compact,
    counts,
    random_scores,
    reallocate,
    select_indices,
    select_per_segment,
)


@attrs.frozen
class DSRConfig(DropGrowConfig):
    """DSR's options (``drop_fraction``/``decay`` are unused: the threshold decides)."""

    every: int = attrs.field(default=200, validator=in_range(0))
    initial_threshold: float = attrs.field(default=0.001, validator=in_range(0))
    target_fraction: float = attrs.field(default=0.01, validator=in_range(0, 1))
    tolerance: float = attrs.field(default=0.1, validator=in_range(0, 1, lo_open=False))


@attrs.define(eq=False)
class DSR(DropGrow):
    """Global adaptive magnitude threshold, proportional reallocation, random growth."""

    #: moves weights between layers: the global count is kept, not each layer's
    contract_hints = {"keeps_counts": False}
    threshold: float | None = None
    target: int | None = None

    def grow_scores(self, state, names):
        return random_scores(state, names)

    def new_masks(self, state, names, masks):
        """The whole-mask path (device masks): new bool masks built from the old ones."""
        params = [state.masks.params[n].detach() for n in names]
        threshold = self._threshold()
        pruned = [m & (p.abs() < threshold) for m, p in zip(masks, params, strict=True)]
        after = [m & ~d for m, d in zip(masks, pruned, strict=True)]
        # the one host sync of a reallocation: pruned and surviving counts per layer
        k_l, r_l = torch.stack([counts(pruned), counts(after)]).tolist()
        share = self._reallocation(state, masks, k_l, r_l)
        if self.cfg.regrow_dropped:
            cand = [~a for a in after]
        else:
            cand = [~m for m in masks]
        grown = select_per_segment(self.grow_scores(state, names), cand, share, largest=True)
        return [a | g for a, g in zip(after, grown, strict=True)]

    def index_changes(self, state, names, old):
        """The CPU path: the pruned entries found as flat indices, the shares grown at
        indices (:func:`~sparsefw.topology.select_indices`); the masks are edited there."""
        params = [state.masks.params[n].detach() for n in names]
        threshold = self._threshold()
        pruned = [_active_below(m, p, threshold) for m, p in zip(old, params, strict=True)]
        active = self.active_counts(state, names, old)
        k_l = [d.numel() for d in pruned]
        r_l = [a - k for a, k in zip(active.tolist(), k_l, strict=True)]
        share = self._reallocation(state, old, k_l, r_l)
        cand = [(~m).contiguous() for m in old]
        if self.cfg.regrow_dropped:  # inactive after the prune
            for c, d in zip(cand, pruned, strict=True):
                fill_at(c, d, True)
        grown = select_indices(self.grow_scores(state, names), cand, share, largest=True,
                               compact=compiled_compact(state))
        return active, list(zip(pruned, grown, strict=True))

    def _threshold(self) -> float:
        if self.threshold is None:
            self.threshold = self.cfg.initial_threshold
        return self.threshold

    def _reallocation(self, state, masks, k_l: list[int], r_l: list[int]) -> list[int]:
        """Steps 2 and 3 from the pruned (``k_l``) and surviving (``r_l``) counts per layer:
        the threshold for the next reallocation, and each layer's share of the freed
        parameters (never more than its free entries)."""
        c = self.cfg
        if self.target is None:
            self.target = max(1, round(c.target_fraction * (sum(k_l) + sum(r_l))))
        freed = sum(k_l)
        state.metrics["topology/dsr_threshold"] = torch.tensor(self.threshold, device=state.device)
        if freed < (1 - c.tolerance) * self.target:
            self.threshold *= 2
        elif freed > (1 + c.tolerance) * self.target:
            self.threshold /= 2
        # free entries: all inactive after the prune, or only those inactive before it
        room = [m.numel() - r - (0 if c.regrow_dropped else k)
                for m, r, k in zip(masks, r_l, k_l, strict=True)]
        return reallocate(freed, r_l, room)  # (host counts: partial top-k, not full sorts)

    def extra_state(self):
        return {"threshold": self.threshold, "target": self.target}

    def load_extra_state(self, sd):
        self.threshold = sd.get("threshold")
        self.target = sd.get("target")


def _active_below(mask: torch.Tensor, weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """Flat indices (long, increasing) of the active entries of ``mask`` with
    ``|weight| < threshold`` (a NaN weight is not below); through numpy views on large CPU
    layers (a few times faster than torch's ``nonzero``)."""
    m, w = flat_numpy(mask), flat_numpy(weight)
    if m is not None and w is not None and w.dtype == np.float32:
        t = np.float32(threshold)
        return torch.from_numpy(np.flatnonzero((w < t) & (w > -t) & m))
    return (mask & (weight.abs() < threshold)).reshape(-1).nonzero().squeeze(1)


@hookimpl
def sparsefw_register(registry):
    registry.add("topology_update", "dsr", config=DSRConfig, factory=DSR)
