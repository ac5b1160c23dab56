"""``lottery`` mask initialisation: iterative magnitude pruning with rewinding.

Lottery ticket hypothesis (Frankle & Carbin, ICLR 2019, arXiv 1803.03635) and its rewinding
variant (Frankle, Dziugaite, Roy & Carbin, ICML 2020, arXiv 1912.05671). Driven by
``[train] rounds``:

1. the first mask is dense (or random with ``start_density`` allocated by
   ``[sparsity] distribution``);
2. the weights at iteration ``k = rewind_step`` are saved (``k = 0``: the initial weights);
3. at the end of every round but the last, ``prune_fraction`` ``p`` of the *remaining* weights
   are pruned by magnitude (one global threshold or per layer) and the weights are rewound to
   their saved iteration-``k`` values; the engine then re-applies the masks, clears the
   optimizer state and restarts the learning-rate schedule. With ``[sparsity] init =
   "sparse_fan_in"`` and ``k = 0`` the rewound weights are the initialisation, so they are
   rescaled for the round's masks as the first round's were (Evci et al., arXiv 2010.03533;
   :mod:`sparsefw.initialisation`); weights rewound to ``k > 0`` are trained values and are
   restored as they were.

After ``r`` prunings the active count is ``⌊(1 − p)^r · n₀ + ½⌋`` of the start count ``n₀``
(per layer with ``scope = "layer"``; in total with ``scope = "global"``): rounding is done
against the start count, not compounded, so each layer is within half a weight of
``(1 − p)^r · n₀``.
"""

from __future__ import annotations

import math

import attrs
import torch

from sparsefw import distributions, initialisation
from sparsefw.config import ConfigError, in_range, one_of
from sparsefw.hookspecs import hookimpl
from sparsefw.masks import topk_mask
from sparsefw.scoring import SCOPES, global_topk, layer_topk

REWIND = ("all", "masked")


@attrs.frozen
class LotteryConfig:
    """Options of ``lottery``."""

    #: fraction of the remaining weights pruned at the end of each round
    prune_fraction: float = attrs.field(default=0.2, validator=in_range(0, 1, hi_open=True))
    #: magnitude pruning with one global threshold or per layer
    scope: str = attrs.field(default="global", validator=one_of(*SCOPES))
    #: iteration k whose weights survivors are rewound to (0: the initial weights)
    rewind_step: int = attrs.field(default=0, validator=in_range(0, lo_open=False))
    #: density of the first mask (1: dense; below 1: random, allocated per [sparsity])
    start_density: float = attrs.field(default=1.0, validator=in_range(0, 1))
    #: rewind every parameter and buffer ("all", as open_lth) or only the masked weights
    rewind: str = attrs.field(default="all", validator=one_of(*REWIND))


def kept_count(start: int, prune_fraction: float, rounds: int) -> int:
    """Active weights after ``rounds`` prunings of ``start``: ``⌊(1 − p)^r · n₀ + ½⌋``."""
    return min(start, math.floor((1.0 - prune_fraction) ** rounds * start + 0.5))


@attrs.define(eq=False)
class LotteryTicket:
    """Iterative magnitude pruning between rounds, rewinding survivors to iteration k."""

    cfg: LotteryConfig
    #: saved iteration-k tensors, by model state-dict name (None until saved)
    rewind_state: dict[str, torch.Tensor] | None = None
    #: prunings done so far
    rounds_done: int = 0
    #: active counts of the first mask, per layer
    start_counts: dict[str, int] = attrs.field(factory=dict)

    # ------------------------------------------------------------------ helpers
    def _tensors(self, state) -> dict[str, torch.Tensor]:
        if self.cfg.rewind == "masked":
            return dict(state.masks.params)
        return dict(state.model.state_dict(keep_vars=True))

    @torch.no_grad()
    def _save(self, state) -> None:
        self.rewind_state = {n: t.detach().clone() for n, t in self._tensors(state).items()}

    @torch.no_grad()
    def _rewind(self, state) -> None:
        current = self._tensors(state)
        names = [n for n in self.rewind_state if n in current]
        dst = [current[n].detach() for n in names]
        torch._foreach_copy_(dst, [self.rewind_state[n] for n in names])

    # ------------------------------------------------------------------ hooks
    @hookimpl
    def sparsefw_mask_init(self, state, batches):
        spr = getattr(state, "steps_per_round", 0)
        if spr and self.cfg.rewind_step > spr:
            raise ConfigError([f"[mask_init] rewind_step = {self.cfg.rewind_step} is past the "
                               f"end of the first round ({spr} steps)"])
        train = getattr(getattr(state, "config", None), "train", None)
        if train is not None and train.rounds > 1 and train.round_start != self.cfg.rewind_step:
            raise ConfigError([
                f"[mask_init] rewind_step = {self.cfg.rewind_step} but [train] round_start = "
                f"{train.round_start}: after rewinding to iteration k the next round must "
                f"replay iterations k..T (learning rate and data); set [train] round_start = "
                f"{self.cfg.rewind_step}"])
        params = state.masks.params
        if self.cfg.start_density >= 1:
            counts = {n: p.numel() for n, p in params.items()}
            masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
        else:
            shapes = {n: tuple(p.shape) for n, p in params.items()}
            sp = state.config.sparsity
            counts = distributions.active_counts(
                shapes, self.cfg.start_density, sp.distribution, kernel=sp.er_kernel
            )
            masks = {
                n: topk_mask(torch.rand(p.shape, generator=state.generator, device=state.device),
                             counts[n])
                for n, p in params.items()
            }
        self.start_counts = dict(counts)
        self.rounds_done = 0
        state.masks.targets = dict(counts)
        self.rewind_state = None
        if self.cfg.rewind_step == 0:
            self._save(state)
        return masks

    @hookimpl
    def sparsefw_step_end(self, state, metrics):
        if self.rewind_state is None and state.step == self.cfg.rewind_step:
            self._save(state)

    @hookimpl
    def sparsefw_round_end(self, state):
        if self.rewind_state is None:
            raise RuntimeError(f"lottery: no weights saved at iteration {self.cfg.rewind_step}")
        r = self.rounds_done + 1
        p = self.cfg.prune_fraction
        with torch.no_grad():
            scores = {
                n: w.detach().abs().masked_fill(~state.masks.masks[n], -math.inf)
                for n, w in state.masks.params.items()
            }
        if self.cfg.scope == "layer":
            counts = {n: kept_count(c, p, r) for n, c in self.start_counts.items()}
            new = layer_topk(scores, counts)
        else:
            new = global_topk(scores, kept_count(sum(self.start_counts.values()), p, r))
            # one host sync per round: the per-layer counts the global threshold left
            sums = torch.stack([m.sum() for m in new.values()]).tolist()
            counts = dict(zip(new, (int(c) for c in sums), strict=True))
        for n, m in new.items():
            state.masks.update(n, m)
        state.masks.targets = counts
        self._rewind(state)
        if self.cfg.rewind_step == 0:  # rewound to the initialisation: scale it for the masks
            initialisation.apply(state.masks, state.config.sparsity.init)
        self.rounds_done = r

    @hookimpl
    def sparsefw_state_dict(self, state):
        return {
            "rewind_state": self.rewind_state,
            "rounds_done": self.rounds_done,
            "start_counts": dict(self.start_counts),
        }

    @hookimpl
    def sparsefw_load_state_dict(self, state, plugin_state):
        saved = plugin_state["rewind_state"]
        self.rewind_state = (
            None if saved is None else {n: t.to(state.device) for n, t in saved.items()}
        )
        self.rounds_done = int(plugin_state["rounds_done"])
        self.start_counts = dict(plugin_state["start_counts"])


@hookimpl
def sparsefw_register(registry):
    registry.add("mask_init", "lottery", config=LotteryConfig, factory=LotteryTicket)
