"""``constant`` and ``cosine`` schedules of one named value (``drop_fraction``, ``rho``, ...),
and the span machinery every start-to-end schedule shares.

A span schedule goes from ``start`` to ``end`` over the fraction [``begin``, ``until``] of the
run, holding ``start`` before and ``end`` after: with u = (t/T − begin)/(until − begin) clipped to
[0, 1], the value is ``end + (start − end)·r(u)`` where ``r`` is the fraction still to go.
``cosine``: r(u) = ½(1 + cos(π·u)) (Loshchilov & Hutter, arXiv 1608.03983; RigL's drop-fraction
decay, arXiv 1911.11134). ``linear`` and ``cubic`` live in :mod:`sparsefw_plugins.schedule.decay`.
"""

from __future__ import annotations

import attrs

from sparsefw.config import in_range
from sparsefw.hookspecs import hookimpl
from sparsefw.schedules import cosine_remaining, progress, span


@attrs.frozen
class ConstantConfig:
    value: str = "value"
    constant: float = 0.0


@attrs.frozen
class SpanConfig:
    """A named value going from ``start`` to ``end`` over the fraction [``begin``, ``until``]."""

    value: str = "value"
    start: float = 1.0
    end: float = 0.0
    begin: float = attrs.field(default=0.0, validator=in_range(0, 1, lo_open=False))
    until: float = attrs.field(default=1.0, validator=in_range(0, 1))

    def __attrs_post_init__(self):
        if self.until <= self.begin:
            raise ValueError(f"until ({self.until}) must be larger than begin ({self.begin})")


def span_value(remaining, start: float, end: float, begin: float, until: float,
               frac: float) -> float:
    """A span schedule's value at training fraction ``frac``."""
    return span(remaining, start, end, progress(frac, begin, until))


def cosine_value(start: float, end: float, begin: float, until: float, frac: float) -> float:
    """The cosine schedule at training fraction ``frac``."""
    return span_value(cosine_remaining, start, end, begin, until, frac)


@attrs.define(eq=False)
class SpanSchedule:
    """Base of the start-to-end schedules: a subclass sets :attr:`remaining`."""

    cfg: SpanConfig
    remaining = staticmethod(cosine_remaining)

    @property
    def produces_values(self) -> tuple[str, ...]:
        """The schedule value this component answers (shown by ``sparsefw describe``)."""
        return (self.cfg.value,)

    @hookimpl
    def sparsefw_schedule(self, state):
        c = self.cfg
        frac = state.step / max(state.total_steps, 1)
        return {c.value: span_value(self.remaining, c.start, c.end, c.begin, c.until, frac)}


@attrs.define(eq=False)
class ConstantSchedule:
    """A named value that never changes."""

    cfg: ConstantConfig

    @property
    def produces_values(self) -> tuple[str, ...]:
        """The schedule value this component answers (shown by ``sparsefw describe``)."""
        return (self.cfg.value,)

    @hookimpl
    def sparsefw_schedule(self, state):
        return {self.cfg.value: self.cfg.constant}


@attrs.define(eq=False)
class CosineSchedule(SpanSchedule):
    """A named value on a half-cosine from ``start`` to ``end``."""

    remaining = staticmethod(cosine_remaining)


@hookimpl
def sparsefw_register(registry):
    registry.add("schedule", "constant", config=ConstantConfig, factory=ConstantSchedule)
    registry.add("schedule", "cosine", config=SpanConfig, factory=CosineSchedule)
