"""``s2sam``: single-step sharpness-aware minimisation for sparse training (Ji et al., "A
Single-Step, Sharpness-Aware Minimization is All You Need to Achieve Efficient and Accurate Sparse
Training", NeurIPS 2024, OpenReview MJgMMqMDu4; SAM: Foret et al., arXiv 2010.01412).

The perturbation direction is the **previous step's gradient**, so a step costs one forward and
one backward, like plain SGD::

    step t:  e   = ρ · g_{t−1} / (‖g_{t−1}‖₂ + 1e-12)    (no perturbation at the first step)
             g_t = ∇L(w + e)                            the step's only forward/backward
             w   restored exactly; the optimizer steps with g_t; g_t is kept for step t+1

``g_{t−1}`` is the gradient the optimizer used at step t−1 (after every gradient correction).
This component's ``gradient_correct`` hook, which runs last, keeps it: with hard masks and the
mask-aware default it keeps *references* to the ``.grad`` tensors (the hard masks then zero
their pruned entries in place, and zeroing gradients with ``set_to_none`` leaves the tensors
alive), so no copy is made and no mask product is needed; for the dense perturbation and for
forward masks it copies them, before hard masking. Masks, ASAM (``adaptive``, with
``T = |w_t|``), the schedule value ``rho`` and AMP are handled as in ``sam`` (see
:func:`sparsefw_plugins.perturb.sam.ascent_direction`): by default only active weights are perturbed, with
the norm over active entries, using the *current* mask (entries dropped by a topology update
leave the perturbation). A non-finite stored gradient (an fp16 step
the loss scaler skipped) gives no perturbation. Memory: one gradient copy per parameter.

Passes over memory per step (the paper's "zero extra cost" is in forward/backward passes; on a
memory-bound model the rest shows): the norm of ``g_{t−1}`` (one multi-tensor norm), and the
engine's one write of ``w + e`` into a second buffer per parameter, which the parameter's
storage is swapped to for the forward/backward and swapped back from afterwards (no copy of
the weights, no copy back; under FSDP2 a copy in and a copy back). ``e`` is never a tensor of
its own: the hook hands the engine ``g_{t−1}`` itself and the 0-dim scale ``ρ/‖g_{t−1}‖`` (no
host sync), which the engine folds into that write.
"""

from __future__ import annotations

import attrs
import torch

from sparsefw import sharding
from sparsefw.hookspecs import hookimpl
from sparsefw.state import Perturbation
from sparsefw_plugins.perturb.sam import SharpnessConfig, ascent_direction, fp16

__all__ = ["S2SAM"]


@attrs.define(eq=False)
class S2SAM:
    """Single-step SAM: perturb along the previous step's gradient (1 forward + 1 backward)."""

    cfg: SharpnessConfig
    #: schedule values this component reads (shown by ``sparsefw describe``)
    reads_values = ("rho",)
    #: the previous step's gradient: references to the ``.grad`` tensors (hard masks,
    #: mask-aware) or a copy; ``None`` before the first step
    last: dict[str, torch.Tensor] | None = None
    #: the next step starts unperturbed (after a lottery round's rewind)
    skip_next: bool = False

    def _by_reference(self, state) -> bool:
        """With hard masks and the mask-aware default the kept ``.grad`` tensors are zeroed
        at pruned entries in place by the hard masks: references serve, premasked."""
        return state.masks.kind == "hard" and not self.cfg.perturb_pruned

    @hookimpl
    def sparsefw_perturb(self, state):
        grads, self.last = self.last, None  # references dropped: their memory can be reused
        if self.skip_next:
            self.skip_next = False
            return None
        if not grads:
            return None
        c = self.cfg
        by_reference = self._by_reference(state)
        v, scale = ascent_direction(
            grads, state.named_params, state.masks, state.values.get("rho", c.rho),
            perturb_pruned=c.perturb_pruned, premasked=by_reference,
            adaptive=c.adaptive, eta=c.eta, sanitize=fp16(state), owned=not by_reference,
        )
        return Perturbation(params=v, scale=scale)

    @hookimpl(trylast=True)
    def sparsefw_gradient_correct(self, state):
        grads = {n: p.grad for n, p in state.named_params.items() if p.grad is not None}
        if not grads:
            return
        if self._by_reference(state):
            self.last = grads
            return
        if self.last is None or self.last.keys() != grads.keys():
            self.last = {n: torch.empty_like(g) for n, g in grads.items()}
        names = list(grads)
        # FSDP2: copied shard by shard (DTensor has no sharding rule for foreach copies)
        torch._foreach_copy_([sharding.local(self.last[n]) for n in names],
                             [sharding.local(grads[n]) for n in names])

    @hookimpl
    def sparsefw_round_end(self, state):
        # the weights are rewound and the optimizer restarts: the next round starts unperturbed
        self.skip_next = True

    @hookimpl
    def sparsefw_state_dict(self, state):
        if self.skip_next:
            return {"last": None, "skip_next": True}
        grads = None if self.last is None else {n: t.clone() for n, t in self.last.items()}
        return {"last": grads or None, "skip_next": False}

    @hookimpl
    def sparsefw_load_state_dict(self, state, plugin_state):
        named = state.named_params
        last = plugin_state.get("last")
        self.last = None if last is None else {n: t.to(named[n].device) for n, t in last.items()}
        self.skip_next = plugin_state.get("skip_next", False)


@hookimpl
def sparsefw_register(registry):
    registry.add("perturb", "s2sam", config=SharpnessConfig, factory=S2SAM)
