"""``nm`` mask initialisation and ``nm`` topology: N:M masks recomputed from weight magnitudes.

The N:M mask keeps the N largest ``|w|`` in every group of M consecutive weights along the input
dimension (:func:`sparsefw.nm.nm_mask`). With ``[sparsity] kind = "forward"`` the dense weights
are trained and the forward uses ``w ⊙ (m + β(1 − m))`` with a straight-through backward: plain
STE (Zhou et al., SR-STE, arXiv 2102.04010, their baseline; Bambhaniya et al., PGF, arXiv
2402.04744). The topology component recomputes the mask on its ``every``/``start``/``end``
interval (``every = 1``: every iteration, as SR-STE and PGF do), following the structure an
SDGF schedule puts in ``state.values`` (``nm_n``/``nm_m``), else its own ``n:m``.

Timing: the component's ``phase`` is ``"before_forward"``: the engine recomputes the mask from
the current weights right before the step's forward, as the references do, so the forward and
the backward of step ``t`` see ``m(W_t)``. It also runs between due steps when an SDGF schedule
switches the structure (``topology_due``).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from sparsefw.config import ConfigError, in_range, one_of
from sparsefw.hookspecs import hookimpl
from sparsefw.nm import GROUPINGS, check_shapes, nm_mask
from sparsefw.state import TopologyChange, UpdateInterval

#: state.values names an SDGF schedule answers with
N_VALUE, M_VALUE = "nm_n", "nm_m"


def _n_lt_m(inst, _attribute, _value):
    if inst.n is not None and inst.m is not None and not inst.n < inst.m:
        raise ValueError(f"N:M needs n < m, got n = {inst.n}, m = {inst.m}")


def _positive_int(_inst, attribute, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


@attrs.frozen
class NMTopologyConfig(UpdateInterval):
    """``n:m`` target, grouping ``mode`` (``row``: along the input dim; ``col``: output dim);
    recomputed every ``every`` steps in ``[start, end)`` (defaults: every step, whole run)."""

    every: int = attrs.field(default=1, validator=in_range(0))
    start: int = attrs.field(default=0, validator=in_range(0, lo_open=False))
    end: float = attrs.field(default=1.0, validator=in_range(0))
    n: int = attrs.field(default=2, validator=[_positive_int, _n_lt_m])
    m: int = attrs.field(default=4, validator=[_positive_int, _n_lt_m])
    mode: str = attrs.field(default="row", validator=one_of(*GROUPINGS))


@attrs.frozen
class NMInitConfig:
    """``n``, ``m``, ``mode``; left unset they are taken from the ``nm`` topology component."""

    n: int | None = attrs.field(default=None, validator=[_positive_int, _n_lt_m])
    m: int | None = attrs.field(default=None, validator=[_positive_int, _n_lt_m])
    mode: str | None = attrs.field(default=None, validator=attrs.validators.optional(one_of(*GROUPINGS)))


def resolve_target(state, n: int | None = None, m: int | None = None, mode: str | None = None):
    """``(n, m, mode)``: the given values, else those of the run's ``nm`` topology component."""
    topo = getattr(state.config, "topology_update", None)
    opts = topo.options if topo is not None and topo.name == "nm" else None
    n = n if n is not None else getattr(opts, "n", None)
    m = m if m is not None else getattr(opts, "m", None)
    mode = mode if mode is not None else getattr(opts, "mode", "row")
    if n is None or m is None:
        raise ConfigError(["N:M: set n and m (in this component or in [topology_update] name = 'nm')"])
    if not n < m:
        raise ConfigError([f"N:M needs n < m, got {n}:{m}"])
    return n, m, mode


def check_density(state, n: int, m: int) -> None:
    """``ConfigError`` unless ``[sparsity] density`` equals ``n/m`` (the accounting density)."""
    density = state.config.sparsity.density
    if abs(density - n / m) > 1e-9:
        raise ConfigError(
            [f"[sparsity] density = {density} but the N:M target {n}:{m} has density "
             f"{n / m:g}; set density = {n / m!r}"]
        )


@attrs.define(eq=False)
class NMMaskInit:
    """The first N:M mask, from the initial weights' magnitudes."""

    #: for sparsefw.testing.contract: forward masking at density n/m
    contract_hints = {"mask_kind": "forward", "density": 0.5, "other_densities": (),
                      "options": {"n": 2, "m": 4}}

    cfg: NMInitConfig

    @hookimpl
    def sparsefw_mask_init(self, state, batches):
        n, m, mode = resolve_target(state, self.cfg.n, self.cfg.m, self.cfg.mode)
        check_density(state, n, m)
        shapes = {k: tuple(p.shape) for k, p in state.masks.params.items()}
        problems = check_shapes(shapes, [m], mode)
        if problems:
            raise ConfigError(problems)
        out = {}
        for name, p in state.masks.params.items():
            out[name] = nm_mask(p, n, m, mode)
            state.masks.targets[name] = p.numel() // m * n
        return out


@attrs.define(eq=False)
class NMTopology:
    """Recompute the N:M masks from the current weight magnitudes on the update interval."""

    #: schedule values this component reads (shown by ``sparsefw describe``)
    reads_values: ClassVar[tuple[str, ...]] = (N_VALUE, M_VALUE)

    #: for sparsefw.testing.contract: the first update turns the harness's random masks
    #: (ERK counts) into N:M masks, so per-layer and total counts change
    contract_hints = {"mask_kind": "forward", "density": 0.5, "keeps_counts": False,
                      "keeps_total": False}

    #: recompute before the forward (the engine's topology phase)
    phase: ClassVar[str] = "before_forward"

    cfg: NMTopologyConfig
    _last: tuple[int, int] | None = None
    #: per layer, the bool mask this component set last and the MaskSet version it got (the
    #: MaskSet stores masks as 0/1 floats and releases bool copies after every step: keeping
    #: its own saves rebuilding one per layer on every recompute)
    _set: dict = attrs.field(factory=dict)

    def structure(self, state) -> tuple[int, int]:
        """This step's ``(n, m)``: an SDGF schedule's values, else the configured target."""
        return int(state.values.get(N_VALUE, self.cfg.n)), int(state.values.get(M_VALUE, self.cfg.m))

    def recompute(self, state) -> TopologyChange:
        """New masks for every masked parameter; returns the per-layer flip counts."""
        n, m = self.structure(state)
        masks = state.masks
        dropped, grown = {}, {}
        for name, p in masks.params.items():
            version, old = self._set.get(name, (None, None))
            if version != masks.version[name]:  # changed by someone else (or not set by us)
                old = masks.masks[name]
            new = nm_mask(p, n, m, self.cfg.mode)
            # N:M masks have exact counts, so one flip count gives both (no host sync)
            before = (p.numel() // self._last[1] * self._last[0] if self._last is not None
                      else old.sum())
            delta = p.numel() // m * n - before
            flips = torch.count_nonzero(old != new)  # (3x faster than a bool sum on the CPU)
            dropped[name] = (flips - delta) // 2
            grown[name] = (flips + delta) // 2
            masks.update(name, new)
            self._set[name] = (masks.version[name], new)
        self._last = (n, m)
        return TopologyChange(dropped=dropped, grown=grown)

    @hookimpl
    def sparsefw_run_start(self, state):
        if state.masks.kind != "forward":
            raise ConfigError(
                ["topology_update 'nm' needs [sparsity] kind = \"forward\" (dense weights trained, "
                 "N:M mask in the forward); with hard masks pruned weights would be zeroed"]
            )
        check_density(state, self.cfg.n, self.cfg.m)

    def topology_due(self, state) -> bool:
        """Due on the interval, or whenever an SDGF schedule switched the structure."""
        last = self._last if self._last is not None else (self.cfg.n, self.cfg.m)
        return self.cfg.due(state.step, state.total_steps) or self.structure(state) != last

    @hookimpl
    def sparsefw_topology_update(self, state):
        return self.recompute(state)


@hookimpl
def sparsefw_register(registry):
    registry.add("mask_init", "nm", config=NMInitConfig, factory=NMMaskInit)
    registry.add("topology_update", "nm", config=NMTopologyConfig, factory=NMTopology)
