"""``random`` and ``dense`` mask initialisation.

``random`` keeps, in each layer, a uniformly random subset of the size the density allocation
gives it (uniform, ER from Mocanu et al. arXiv 1707.04780, or ERK from Evci et al. arXiv
1911.11134; chosen in ``[sparsity] distribution``). Its ``density`` option starts from a denser
mask than the run's target (GraNet's denser start, arXiv 2106.10404, prunes down from there);
by default the initial mask has the ``[sparsity] density``. ``dense`` keeps every weight.
"""

from __future__ import annotations

import attrs
import torch

from sparsefw import distributions
from sparsefw.config import in_range
from sparsefw.hookspecs import hookimpl
from sparsefw.masks import topk_mask
from sparsefw.registry import EmptyConfig


@attrs.frozen
class RandomConfig:
    """``density``: the initial mask's global density (default: ``[sparsity] density``)."""

    density: float | None = attrs.field(default=None, validator=in_range(0, 1))


@attrs.define(eq=False)
class RandomMaskInit:
    """Random masks with the allocated number of active weights per layer."""

    cfg: RandomConfig

    @hookimpl
    def sparsefw_mask_init(self, state, batches):
        counts = state.masks.targets
        if self.cfg.density is not None:
            shapes = {n: tuple(p.shape) for n, p in state.masks.params.items()}
            sp = state.config.sparsity
            counts = distributions.active_counts(shapes, self.cfg.density, sp.distribution,
                                                 kernel=sp.er_kernel)
        out = {}
        for name, p in state.masks.params.items():
            scores = torch.rand(p.shape, generator=state.generator, device=state.device)
            out[name] = topk_mask(scores, counts[name])
        return out


@attrs.define(eq=False)
class DenseMaskInit:
    """All-ones masks: the dense baseline, whatever the configured density."""

    cfg: EmptyConfig

    @hookimpl
    def sparsefw_mask_init(self, state, batches):
        return {n: torch.ones_like(p, dtype=torch.bool) for n, p in state.masks.params.items()}


@hookimpl
def sparsefw_register(registry):
    registry.add("mask_init", "random", config=RandomConfig, factory=RandomMaskInit)
    registry.add("mask_init", "dense", factory=DenseMaskInit)
