"""``mask_decay`` schedule: MDGF, mask-decay gradient flow (Bambhaniya et al., "Progressive Gradient
Flow for Robust N:M Sparsity Training in Transformers", arXiv 2402.04744; pruning-mask decay of
Kao et al., arXiv 2209.07617).

The forward uses ``W ⊙ (m + β_t (1 − m))``: kept weights at full value, pruned weights scaled by
``β_t``, which decays from 1 to 0; the backward is plain straight-through (every weight receives
the dense gradient; β does not scale it). This component computes ``β_t`` at the start of every
step (:func:`sparsefw.nm.mask_decay_beta`: ``linear``, ``exponential``, ``step`` or ``cosine``
over the training fraction [``begin``, ``until``], exactly 0 from ``until`` on) and answers
``{"mask_decay": β_t}``, the schedule value the engine reads as the forward masks' β (logged as
``schedule/mask_decay``). Before ``begin`` β = 1: a dense warm-up.
"""

from __future__ import annotations

import attrs

from sparsefw.config import ConfigError, in_range, one_of
from sparsefw.hookspecs import hookimpl
from sparsefw.nm import DECAYS, mask_decay_beta


def _until_after_begin(inst, _attribute, _value):
    if not inst.until > inst.begin:
        raise ValueError(f"until ({inst.until}) must be > begin ({inst.begin})")


@attrs.frozen
class MaskDecayConfig:
    """``decay`` shape; β = 1 before ``begin`` and 0 from ``until`` (fractions of the run);
    ``final``: β just before ``until`` for ``exponential``; ``steps``: stairs of ``step``;
    ``alpha``: the reference's per-step rate for ``linear``/``exponential`` (overrides the
    fraction-based shape, the cut at ``until`` still applies)."""

    decay: str = attrs.field(default="linear", validator=one_of(*DECAYS))
    begin: float = attrs.field(default=0.0, validator=[in_range(0, 1, lo_open=False, hi_open=True),
                                                      _until_after_begin])
    until: float = attrs.field(default=0.75, validator=[in_range(0, 1), _until_after_begin])
    final: float = attrs.field(default=0.01, validator=in_range(0, 1, hi_open=True))
    steps: int = attrs.field(default=1, validator=in_range(0))
    alpha: float | None = attrs.field(default=None, validator=in_range(0))


@attrs.define(eq=False)
class MaskDecay:
    """β of the pruned weights in the forward, decaying to 0 (the ``mask_decay`` value)."""

    #: for sparsefw.testing.contract
    contract_hints = {"mask_kind": "forward"}

    cfg: MaskDecayConfig

    def beta(self, step: int, total_steps: int) -> float:
        c = self.cfg
        return mask_decay_beta(
            step / max(total_steps, 1), c.decay, begin=c.begin, until=c.until, final=c.final,
            steps=c.steps, alpha=c.alpha, step=step, total_steps=total_steps,
        )

    @hookimpl
    def sparsefw_run_start(self, state):
        if state.masks.kind != "forward":
            raise ConfigError(["schedule 'mask_decay' needs [sparsity] kind = \"forward\""])

    #: the schedule value this component answers (the lifecycle reads it as β)
    produces_values = ("mask_decay",)

    @hookimpl
    def sparsefw_schedule(self, state):
        return {"mask_decay": self.beta(state.step, state.total_steps)}


@hookimpl
def sparsefw_register(registry):
    registry.add("schedule", "mask_decay", config=MaskDecayConfig, factory=MaskDecay)
