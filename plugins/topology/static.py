"""``static`` topology: the mask chosen at initialisation never changes (the control every
dynamic method is compared with)."""

from __future__ import annotations

import attrs

from sparsefw.hookspecs import hookimpl
from sparsefw.state import UpdateInterval


@attrs.frozen
class StaticConfig(UpdateInterval):
    """No options beyond the (unused) update interval."""


@attrs.define(eq=False)
class StaticTopology:
    """Fixed mask: answers every update with ``None`` (nothing changed)."""

    cfg: StaticConfig
    #: reads nothing: a Trainer with ``fused_masked`` need not keep the masked gradients
    reads_gradients_after_step = False

    @hookimpl
    def sparsefw_topology_update(self, state):
        return None


@hookimpl
def sparsefw_register(registry):
    registry.add("topology_update", "static", config=StaticConfig, factory=StaticTopology)
