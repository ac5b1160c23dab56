"""``snfs`` topology: sparse momentum (Dettmers & Zettlemoyer, "Sparse Networks from Scratch:
Faster Training without Losing Performance", arXiv 1907.04840).

Every ``every`` steps until ``end``, with ``m`` the momentum of the *dense* gradient
(``m ← β·m + g`` over all entries, pruned ones included; the lifecycle keeps it for this
component, ``state.dense_momentum``, since the optimizer's momentum is zero at pruned entries
under hard masks):

1. **prune** in every layer the ``floor(α_t·n_l)`` active weights of smallest magnitude ``|w|``
   (α_t: ``drop_fraction`` = 0.5 with cosine decay to 0 at ``end``, the paper's prune rate);
2. **redistribute**: the K freed weights go to the layers in proportion to each layer's mean
   momentum magnitude over its remaining active weights, ``c_l = mean_{active} |m|`` (largest-
   remainder rounding, never more than a layer's free entries; :func:`sparsefw.topology.
   reallocate`);
3. **grow** each layer's share at the inactive entries of largest ``|m|``.

The global number of active weights is kept; per-layer counts move toward the layers whose
momentum is largest. One host sync per update (the counts and contributions). Grown weights
start at zero with zero optimizer state, as in every drop-and-grow component here. On CPU
masks the drop and the growth are chosen and applied as flat indices
(:meth:`SNFS.index_changes`); both paths leave the same masks (tested).
"""

from __future__ import annotations

import attrs
import torch

from sparsefw.config import in_range
from sparsefw.hookspecs import hookimpl
from sparsefw.topology import (
    DropGrow,
    DropGrowConfig,
    compiled_compact,
    counts,
    edited_mask,
    reallocate,
    select_indices,
    select_per_segment,
)


@attrs.frozen
class SNFSConfig(DropGrowConfig):
    """SNFS's options: the prune rate α (``drop_fraction``, 0.5 with cosine decay) and the
    dense momentum's β (``momentum``, the paper's 0.9)."""

    drop_fraction: float = attrs.field(default=0.5, validator=in_range(0, 1, lo_open=False))
    momentum: float = attrs.field(default=0.9, validator=in_range(0, 1, lo_open=False,
                                                                  hi_open=True))


@attrs.define(eq=False)
class SNFS(DropGrow):
    """Magnitude pruning, redistribution by mean momentum, growth by momentum."""

    #: the lifecycle keeps the dense gradient momentum for this component
    needs = ("dense_momentum",)
    #: keeps the total over all layers, not each layer's count (weights move between layers)
    contract_hints = {"keeps_counts": False}

    @property
    def dense_momentum_beta(self) -> float:
        return self.cfg.momentum

    def _momentum(self, state, names: list[str]) -> list[torch.Tensor]:
        dm = state.dense_momentum or {}
        return [dm[n].abs() if n in dm else torch.zeros_like(state.masks.params[n])
                for n in names]

    def grow_scores(self, state, names):
        return self._momentum(state, names)

    def new_masks(self, state, names, masks):
        """The whole-mask path (device masks): new bool masks built from the old ones."""
        k_drop = self.drop_counts(state, counts(masks))
        dropped = select_per_segment(self.drop_scores(state, names), masks, k_drop,
                                     largest=False)
        after = [m & ~d for m, d in zip(masks, dropped, strict=True)]
        momentum = self._momentum(state, names)
        share, cand = self._regrowth(masks, after, k_drop, momentum)
        grown = select_per_segment(momentum, cand, share, largest=True)
        return [a | g for a, g in zip(after, grown, strict=True)]

    def index_changes(self, state, names, old):
        """The CPU path: the dropped and grown entries chosen as flat indices (partial top-k,
        :func:`~sparsefw.topology.select_indices`); the masks are edited there."""
        active = self.active_counts(state, names, old)
        k_drop = self.drop_counts(state, active)
        # (CPU masks: the counts are host memory, read through a numpy view without a sync;
        # the update's one sync reads the momentum sums in _regrowth)
        compact = compiled_compact(state)
        dropped = select_indices(self.drop_scores(state, names), old, k_drop.numpy().tolist(),
                                 largest=False, compact=compact)
        after = [edited_mask(m, d, d[:0]) for m, d in zip(old, dropped, strict=True)]
        momentum = self._momentum(state, names)
        share, cand = self._regrowth(old, after, k_drop, momentum)
        grown = select_indices(momentum, cand, share, largest=True, compact=compact)
        return active, list(zip(dropped, grown, strict=True))

    def _regrowth(self, masks, after, k_drop: torch.Tensor, momentum):
        """Steps 2 and 3's inputs: each layer's share of the freed weights (by mean momentum
        over its surviving weights) and its grow candidates."""
        # Σ over the surviving weights of |m|: a dot product with the 0/1 mask (a bool product
        # and a bool sum cost several times more on the CPU)
        total = torch.stack([torch.dot(mo.reshape(-1), a.reshape(-1).to(mo.dtype))
                             for mo, a in zip(momentum, after, strict=True)])
        # the update's one host sync: dropped and surviving counts, momentum sums
        k_l, r_l, sums = torch.stack(
            [k_drop.double(), counts(after).double(), total.double()]).tolist()
        k_l, r_l = [int(k) for k in k_l], [int(r) for r in r_l]
        contribution = [t / max(r, 1) for t, r in zip(sums, r_l, strict=True)]  # mean |m|
        if self.cfg.regrow_dropped:
            cand = [~a for a in after]
            room = [m.numel() - r for m, r in zip(masks, r_l, strict=True)]
        else:
            cand = [~m for m in masks]
            room = [m.numel() - r - k for m, r, k in zip(masks, r_l, k_l, strict=True)]
        return reallocate(sum(k_l), contribution, room), cand


@hookimpl
def sparsefw_register(registry):
    registry.add("topology_update", "snfs", config=SNFSConfig, factory=SNFS)
