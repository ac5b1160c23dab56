"""``mest`` topology: Memory-Economic Sparse Training (Yuan et al., NeurIPS 2021,
arXiv 2110.14032).

Every ``every`` steps, in each layer: drop the ``floor(r_t·n_active)`` active weights with the
smallest score and grow as many at random inactive positions (zero-initialised). The score is
the paper's ``|w| + λ·|∇L|`` (``score = "magnitude_gradient"``, λ = ``grad_weight``) or plain
``|w|`` (``score = "magnitude"``, the code path read in boone891214/MEST).

The mutation ratio r_t follows ``variant``:

* ``"em"`` (elastic mutation, the default): piecewise constant, ``mutation_ratios[i]`` until the
  fraction of training ``milestones[i]``. The defaults (0.2, 0.1, 0.0) at (0.5625, 0.75) are the
  reference's schedule for 90% sparsity — lower-bound sparsity 0.92 → 0.91 → 0.90 at epochs 90
  and 120 of 160 — expressed as the share of active weights mutated per update;
* ``"plain"``: ``drop_fraction`` with the ``decay`` of the drop-and-grow options.

The reference states its schedule as lower-bound sparsities, i.e. offsets in sparsity points
(0.02, 0.01, 0 of *all* weights); as shares of the active weights these are the 90%-sparsity
values. With ``ratio_density`` set (0.1 for the defaults), the ``"em"`` ratios are rescaled to
the run's global density d so that the offsets stay the reference's:
``r_t = min(1, mutation_ratios[i] · ratio_density / d)``. Unset (the default), the ratios are
used as written at every density.

A ``drop_fraction`` schedule value, when provided, replaces both.
"""

from __future__ import annotations

import attrs
import torch

from sparsefw.config import in_range, one_of
from sparsefw.hookspecs import hookimpl
from sparsefw.topology import DropGrow, DropGrowConfig, grad_abs, random_scores


def _ratios(inst, attribute, value):
    if any(not 0 <= r <= 1 for r in value):
        raise ValueError(f"{attribute.name} must lie in [0, 1], got {value!r}")


@attrs.frozen
class MESTConfig(DropGrowConfig):
    """MEST's options (see the module docstring)."""

    every: int = attrs.field(default=500, validator=in_range(0))
    end: float = attrs.field(default=1.0, validator=in_range(0))
    variant: str = attrs.field(default="em", validator=one_of("em", "plain"))
    score: str = attrs.field(
        default="magnitude_gradient", validator=one_of("magnitude_gradient", "magnitude")
    )
    grad_weight: float = attrs.field(default=0.1, validator=in_range(0, lo_open=False))
    mutation_ratios: tuple[float, ...] = attrs.field(default=(0.2, 0.1, 0.0), validator=_ratios)
    milestones: tuple[float, ...] = (0.5625, 0.75)
    #: the density ``mutation_ratios`` were written for (0.1 for the defaults); when set, each
    #: ratio r becomes min(1, r · ratio_density / d) at the run's density d (unset: as written)
    ratio_density: float | None = attrs.field(default=None, validator=in_range(0, 1))

    def __attrs_post_init__(self):
        if len(self.mutation_ratios) != len(self.milestones) + 1:
            raise ValueError(
                f"mutation_ratios needs one more entry than milestones, got "
                f"{len(self.mutation_ratios)} and {len(self.milestones)}"
            )
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must increase, got {self.milestones!r}")


@attrs.define(eq=False)
class MEST(DropGrow):
    """Drop by ``|w| + λ|∇L|`` (or ``|w|``), grow at random, with an elastic mutation ratio."""


    def drop_scores(self, state, names):
        mags = super().drop_scores(state, names)
        if self.cfg.score == "magnitude" or self.cfg.grad_weight == 0:
            return mags
        grads = grad_abs(state, names)
        # λ|g| + |w| in place: the same values as |w| + λ|g| (addition commutes exactly) with
        # two new layer-sized tensors instead of four
        return [torch.abs(g).mul_(self.cfg.grad_weight).add_(torch.abs(w))
                for w, g in zip(mags.signed, grads.signed, strict=True)]

    def grow_scores(self, state, names):
        return random_scores(state, names)

    def drop_fraction(self, state):
        c = self.cfg
        if c.variant == "plain" or "drop_fraction" in state.values:
            return super().drop_fraction(state)
        frac = state.step / max(state.total_steps, 1)
        ratio = mutation_ratio(c.mutation_ratios, c.milestones, frac)
        if c.ratio_density is None:
            return ratio
        return scaled_ratio(ratio, c.ratio_density, state.config.sparsity.density)


def mutation_ratio(ratios, milestones, frac: float) -> float:
    """The elastic-mutation ratio at training fraction ``frac``."""
    i = sum(1 for m in milestones if frac >= m)
    return float(ratios[i])


def scaled_ratio(ratio: float, written_for: float, density: float) -> float:
    """``ratio`` (a share of the active weights at density ``written_for``) at ``density``: the
    same share of all weights, ``ratio · written_for / density``, at most 1."""
    return min(1.0, ratio * written_for / density)


@hookimpl
def sparsefw_register(registry):
    registry.add("topology_update", "mest", config=MESTConfig, factory=MEST)
