"""``structure_decay`` schedule: SDGF, structure-decay gradient flow (Bambhaniya et al.,
arXiv 2402.04744; sparse-structure decay of Kao et al., arXiv 2209.07617).

Binary N:M masks with a straight-through backward, but the N:M structure moves from dense to the
target over training (:func:`sparsefw.nm.structure_at`):

* ``stepwise`` — ``(M−1):M → M/2:M → … → N:M`` (1:8: 7:8, 4:8, 2:8, 1:8), in
  ``log2(M/N) + 1`` equal frames of the sparse window;
* ``geometric`` — constant density, shrinking groups ``8N:8M → 4N:4M → 2N:2M → N:M``.

An optional dense warm-up (``dense_frac``, structure ``M:M``) comes first and an optional
fine-tune phase at the target (``finetune_frac``) last. Answers ``{"nm_n": n_t, "nm_m": m_t}``;
the ``nm`` topology component masks with that structure (and recomputes as soon as it changes).
With a ``mask_decay`` schedule too it is the hybrid of the two recipes.
"""

from __future__ import annotations

import attrs

from sparsefw.config import ConfigError, in_range, one_of
from sparsefw.hookspecs import hookimpl
from sparsefw.nm import STRUCTURE_KINDS, check_shapes, structure_at, visited_m

from .masking import M_VALUE, N_VALUE, _n_lt_m, _positive_int, resolve_target


def _fracs_fit(inst, _attribute, _value):
    if inst.dense_frac + inst.finetune_frac >= 1:
        raise ValueError(
            f"dense_frac + finetune_frac must be < 1, got {inst.dense_frac} + {inst.finetune_frac}"
        )


@attrs.frozen
class StructureDecayConfig:
    """``kind``; target ``n``/``m`` (unset: the ``nm`` topology's); ``dense_frac`` and
    ``finetune_frac`` (fractions of the run); ``frames`` of ``geometric``."""

    kind: str = attrs.field(default="stepwise", validator=one_of(*STRUCTURE_KINDS))
    n: int | None = attrs.field(default=None, validator=[_positive_int, _n_lt_m])
    m: int | None = attrs.field(default=None, validator=[_positive_int, _n_lt_m])
    dense_frac: float = attrs.field(default=0.0, validator=[in_range(0, 1, lo_open=False,
                                                                     hi_open=True), _fracs_fit])
    finetune_frac: float = attrs.field(default=0.0, validator=[in_range(0, 1, lo_open=False,
                                                                        hi_open=True), _fracs_fit])
    frames: int = attrs.field(default=4, validator=in_range(0))


@attrs.define(eq=False)
class StructureDecay:
    """The N:M structure of this step, from dense to the target."""

    #: for sparsefw.testing.contract: a target, and no harness run without the nm topology
    contract_hints = {"mask_kind": "forward", "options": {"n": 1, "m": 4},
                      "skip_checks": {"in_trainer": "needs the nm topology component (its runs "
                                                    "are in tests/test_nm.py)"}}

    cfg: StructureDecayConfig
    #: the schedule values this component answers (read by the ``nm`` topology)
    produces_values = (N_VALUE, M_VALUE)
    _target: tuple[int, int] | None = None

    def target(self, state) -> tuple[int, int]:
        if self._target is None:
            n, m, _ = resolve_target(state, self.cfg.n, self.cfg.m)
            self._target = (n, m)
        return self._target

    def structure(self, step: int, total_steps: int, n: int, m: int) -> tuple[int, int]:
        c = self.cfg
        return structure_at(step, total_steps, n, m, c.kind, dense_frac=c.dense_frac,
                            finetune_frac=c.finetune_frac, frames=c.frames)

    @hookimpl
    def sparsefw_run_start(self, state):
        n, m, mode = resolve_target(state, self.cfg.n, self.cfg.m)
        topo = state.config.topology_update
        problems = []
        if topo is None or topo.name != "nm":
            problems.append("schedule 'structure_decay' needs [topology_update] name = 'nm'")
        elif (topo.options.n, topo.options.m) != (n, m):
            problems.append(f"schedule 'structure_decay' targets {n}:{m} but the nm topology "
                            f"{topo.options.n}:{topo.options.m}")
        shapes = {k: tuple(p.shape) for k, p in state.masks.params.items()}
        problems += check_shapes(shapes, visited_m(n, m, self.cfg.kind, self.cfg.frames), mode)
        if problems:
            raise ConfigError(problems)

    @hookimpl
    def sparsefw_schedule(self, state):
        n, m = self.target(state)
        nt, mt = self.structure(state.step, state.total_steps, n, m)
        return {N_VALUE: nt, M_VALUE: mt}


@hookimpl
def sparsefw_register(registry):
    registry.add("schedule", "structure_decay", config=StructureDecayConfig, factory=StructureDecay)
