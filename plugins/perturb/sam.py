"""``sam``: sharpness-aware minimisation (Foret et al., arXiv 2010.01412), two passes per step.

Per step, on the step's batch::

    g     = ∇L(w)                              pass 1 (this component, in the perturb hook,
                                               through the step's closure; under DDP on each
                                               rank's own batch shard, without all-reduce)
    e     = ρ · g / (‖g‖₂ + 1e-12)              global norm over all perturbed parameters
    g_sam = ∇L(w + e)                           pass 2 (the engine's forward/backward)
    w     = w − step(g_sam)                     the base optimizer, at the restored w

``adaptive = true`` is ASAM (Kwon et al., arXiv 2102.11600): ``e = ρ · T²g / ‖T g‖`` with
``T = |w| + η`` elementwise. Sparse networks: by default only active weights are perturbed and
the norm is taken over active entries (``perturb_pruned = false``), so the perturbed forward
stays inside the sparse subnetwork; ``perturb_pruned = true`` perturbs every entry with the dense
gradient. ``ρ`` is read from the schedule value ``rho`` when one is scheduled. The engine adds
``e`` and restores the weights bit-exactly by copy. ``e`` is never a tensor of its own: the hook
hands the engine pass 1's gradient (masked in place) and the 0-dim scale ``ρ/‖g‖``, which the
engine folds into its add (one pass per parameter on the CPU, no host sync). With fp16 AMP the
ascent gradient is still loss-scaled (the direction is scale-invariant) and a non-finite gradient gives no perturbation.
Under DDP pass 1 runs with ``sync=False`` (inside ``no_sync``): ``e`` comes from each rank's own
gradient with no all-reduce, as SAM computes it per accelerator (Foret et al., §4.1).

The helpers here (:class:`SharpnessConfig`, :func:`ascent_direction`) are shared with
``s2sam``.
"""

from __future__ import annotations

import attrs
import torch

from sparsefw import sharding
from sparsefw.config import in_range
from sparsefw.hookspecs import hookimpl
from sparsefw.masks import MaskSet
from sparsefw.state import Perturbation

__all__ = ["SAM", "SharpnessConfig", "ascent", "ascent_direction"]


@attrs.frozen
class SharpnessConfig:
    """Options of ``sam`` and ``s2sam``: radius ``rho`` (overridden by a scheduled ``rho``),
    whether pruned weights are perturbed too, and ASAM scaling with its ``eta``."""

    rho: float = attrs.field(default=0.05, validator=in_range(0, lo_open=False))
    perturb_pruned: bool = False
    adaptive: bool = False
    eta: float = attrs.field(default=0.0, validator=in_range(0, lo_open=False))


def ascent_direction(
    grads: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    masks: MaskSet,
    rho: float,
    *,
    perturb_pruned: bool = False,
    premasked: bool = False,
    adaptive: bool = False,
    eta: float = 0.0,
    sanitize: bool = False,
    owned: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The SAM/ASAM perturbation as ``(v, scale)`` with ``e = scale · v`` for every name in
    ``grads``: what :class:`~sparsefw.state.Perturbation` takes, so that the engine folds the
    scale into its add and ``e`` is never a tensor of its own.

    ``e = ρ·v/(‖v‖₂ + 1e-12)`` with ``v = g`` (SAM, Foret et al., arXiv 2010.01412), or
    ``e = ρ·T²g/(‖Tg‖₂ + 1e-12)`` with ``T = |w| + η`` (ASAM, Kwon et al., arXiv 2102.11600);
    the norm is global over all names (one multi-tensor norm, no copy of ``g``). Under FSDP2
    (``grads`` sharded ``DTensor`` objects) ``v`` holds this rank's shards (plain tensors) and
    the norm sums the shards' squares over the ranks (:func:`sparsefw.sharding.global_norm`, one
    all-reduce), so ``e`` is the single-process one, sliced. Unless
    ``perturb_pruned``, ``g`` is first multiplied by the hard/forward mask of each masked
    parameter (pruned entries get ``e = 0`` and do not enter the norm; ``premasked`` says the
    caller's gradients are already zero there). With a non-finite norm the scale is zero;
    ``sanitize`` also replaces non-finite entries of ``v`` so that the zero is exact (fp16
    AMP). ``owned``: the caller gives up ``grads`` (nobody else reads them), so masking and
    sanitizing happen in place instead of into new tensors. ``scale`` is a 0-dim tensor (no
    host synchronisation), ``None`` when ``grads`` is empty.
    """
    names = list(grads)
    if not names:
        return {}, None
    like = [grads[n] for n in names]
    g = [sharding.local(t) for t in like]  # FSDP2: this rank's shards, masks are local too
    if not perturb_pruned and not premasked:  # ``premasked``: pruned entries are already zero
        masked = [i for i, n in enumerate(names) if n in masks]
        if masked:
            gm = [g[i] for i in masked]
            fm = [masks.float_mask(names[i]) for i in masked]
            if owned:
                torch._foreach_mul_(gm, fm)
            else:
                for i, gi in zip(masked, torch._foreach_mul(gm, fm), strict=True):
                    g[i] = gi
    if adaptive:
        t = [sharding.local(params[n].detach()).abs() for n in names]
        if eta:
            torch._foreach_add_(t, eta)
        v = torch._foreach_mul(g, t)  # T g
        norm = sharding.global_norm(v, like)
        torch._foreach_mul_(v, t)  # T² g
        owned = True
    else:
        v = g
        norm = sharding.global_norm(v, like)
    scale = torch.where(torch.isfinite(norm), rho / (norm + 1e-12), torch.zeros_like(norm))
    if sanitize:
        if owned:
            for vi in v:
                vi.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        else:
            v = [torch.nan_to_num(vi, nan=0.0, posinf=0.0, neginf=0.0) for vi in v]
    return dict(zip(names, v, strict=True)), scale.to(v[0].dtype)


def ascent(grads: dict[str, torch.Tensor], params: dict[str, torch.Tensor], masks: MaskSet,
           rho: float, **options) -> dict[str, torch.Tensor]:
    """The perturbation ``e`` itself, one new tensor per name: :func:`ascent_direction`'s
    ``scale · v`` (same options). For tests and callers that need ``e``; the components hand
    ``(v, scale)`` to the engine instead."""
    v, scale = ascent_direction(grads, params, masks, rho, **options)
    if not v:
        return {}
    return dict(zip(v, torch._foreach_mul(list(v.values()), scale), strict=True))


def fp16(state) -> bool:
    """Whether the run uses fp16 autocast with loss scaling."""
    cfg = getattr(state, "config", None)
    return getattr(getattr(cfg, "train", None), "amp", "off") == "fp16"


@attrs.define(eq=False)
class SAM:
    """Sharpness-aware minimisation: ascend to w + ρ·g/‖g‖, take the gradient there (2 passes)."""

    cfg: SharpnessConfig
    #: schedule values this component reads (shown by ``sparsefw describe``)
    reads_values = ("rho",)
    #: the ascent gradient is a second evaluation of the step's loss: a closure is required
    needs = ("closure",)

    @hookimpl
    def sparsefw_perturb(self, state):
        named = state.named_params
        for p in named.values():
            p.grad = None
        # pass 1 on this rank's own gradient: under DDP no all-reduce (SAM's ε is per replica)
        state.closure(sync=False)
        grads = {n: p.grad for n, p in named.items() if p.grad is not None}
        for p in named.values():  # pass 1's gradients are this component's alone now
            p.grad = None
        c = self.cfg
        v, scale = ascent_direction(
            grads, named, state.masks, state.values.get("rho", c.rho),
            perturb_pruned=c.perturb_pruned, adaptive=c.adaptive, eta=c.eta,
            sanitize=fp16(state), owned=True,
        )
        return Perturbation(params=v, scale=scale)


@hookimpl
def sparsefw_register(registry):
    registry.add("perturb", "sam", config=SharpnessConfig, factory=SAM)
