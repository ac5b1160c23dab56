"""Masks of parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every parameter is an ``nn.Parameter`` holding a ``DTensor`` (PyTorch docs,
*torch.distributed.fsdp.fully_shard* and *torch.distributed.tensor*; Zhao et al., PyTorch FSDP,
arXiv 2304.11277): each rank keeps one shard of the dimension-0 chunks (``torch.chunk``
boundaries, the last ranks' chunks possibly smaller or empty), and its gradient and optimizer
state are ``DTensor`` objects with the same placement. :class:`~sparsefw.masks.MaskSet` keeps, for
such a parameter, the mask of **this rank's shard only** (a plain tensor of the local shape; the
parameter records the mesh and placement), so the per-step mask arithmetic (weights, gradients,
optimizer state) runs on local tensors with no collective and no host sync.

Decisions that need the whole layer (mask initialisation, topology updates) run on a *gathered
view* (:func:`gathered_view`): every rank all-gathers the layer's weights, gradient and mask,
takes the decision the unsharded run would take on identical inputs, and keeps its own slice
(:func:`local_slice`). Updates are rare, so the all-gathers cost little; the decision then
equals the single-process one exactly, ties and random draws included.

Forward masks (the N:M recipes: dense weights trained, ``w ⊙ m`` in the forward) are applied
to the *unsharded* weight FSDP all-gathers for each forward, with the whole mask all-gathered
from the shards' masks for that forward (:mod:`sparsefw.forward_masking`); the straight-through
gradient is then reduce-scattered by FSDP, and SR-STE's decay ``λ·(1 − m) ⊙ w`` (Zhou et al.,
arXiv 2102.04010) is added on the local shards.

What is supported so far is checked up front (:func:`check_supported`): a 1-D mesh with
``Shard`` placements, hard masks or forward masks with the ``nm`` topology, and the components
listed in :data:`SUPPORTED`; anything else fails with ``not supported under FSDP yet: ...``
instead of silently doing the wrong thing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

__all__ = [
    "FORWARD_TOPOLOGIES",
    "SUPPORTED",
    "UNVERIFIED_SCHEDULES",
    "NotSupportedUnderFSDP",
    "check_nm_groups",
    "check_supported",
    "gather",
    "gathered_view",
    "global_norm",
    "is_sharded",
    "local",
    "local_slice",
    "memory_per_rank",
    "reshard",
    "shard_bounds",
    "to_dtensor",
]

#: the components verified under FSDP (tests/test_fsdp.py); others are refused
SUPPORTED = {
    "mask_init": ("random", "dense", "nm"),
    "topology_update": ("rigl", "set", "static", "nm"),
    "gradient_correct": ("srste",),
    "perturb": ("s2sam",),
}

#: forward masks (``[sparsity] kind = "forward"``) are verified with the N:M recipe only:
#: ``nm`` masks recomputed from |w| (STE, optionally SR-STE, Zhou et al. arXiv 2102.04010)
FORWARD_TOPOLOGIES = ("nm",)

#: schedules whose values change the masks' arithmetic, not verified under FSDP yet
UNVERIFIED_SCHEDULES = {
    "mask_decay": "MDGF's decaying mask (β > 0 in the forward)",
    "structure_decay": "SDGF's changing N:M structure",
}


class NotSupportedUnderFSDP(ValueError):
    """A configuration or placement that sparse training under FSDP cannot (yet) run exactly."""


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(t) -> bool:
    """Whether ``t`` (a tensor or parameter) is a ``DTensor``."""
    return torch.distributed.is_available() and isinstance(t, _dtensor_cls())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` (a view of its storage: in-place edits under ``no_grad``
    edit the parameter), or ``t`` itself when it is a plain tensor."""
    return t.to_local() if is_sharded(t) else t


def gather(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (one all-gather for a ``DTensor``)."""
    return t.full_tensor() if is_sharded(t) else t


def local_slice(p: torch.Tensor) -> tuple[slice, ...]:
    """Index of this rank's shard of ``p`` (a ``DTensor``) within the global tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + s) for s, o in zip(shape, offset, strict=True))


def shard_of(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full`` (a tensor of ``p``'s global shape), placed like ``p``."""
    if not is_sharded(p):
        return full
    return full[local_slice(p)].contiguous()


def global_norm(tensors: list[torch.Tensor], like: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all of ``tensors`` together, where ``tensors[i]`` is this rank's shard of
    ``like[i]`` when that is a ``DTensor`` (then the shards' squares are summed over its mesh:
    one all-reduce of one number, no host sync) and the whole tensor otherwise (counted once).
    What SAM's global ``‖g‖`` (Foret et al., arXiv 2010.01412) is over sharded gradients."""
    norms = torch._foreach_norm(tensors)
    sharded = [is_sharded(t) for t in like]
    if not any(sharded):
        return torch.linalg.vector_norm(torch.stack(norms))
    total = torch.stack([n for n, s in zip(norms, sharded, strict=True) if s]).double()
    total = total.square().sum()
    torch.distributed.all_reduce(total, group=like[sharded.index(True)].device_mesh.get_group())
    whole = [n for n, s in zip(norms, sharded, strict=True) if not s]
    if whole:
        total = total + torch.stack(whole).double().square().sum()
    return total.sqrt().to(norms[0].dtype)


def reshard(model: nn.Module) -> None:
    """Free the unsharded parameters every ``fully_shard``-ed module of ``model`` still holds.
    FSDP2 keeps the root's parameters unsharded after a forward until its backward; after a
    forward without one (``torch.no_grad`` evaluation) they would stay, and the next forward
    would use them instead of all-gathering the shards again, missing any in-place change to
    the shards made since (an optimizer step, a perturbation written into them)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def to_dtensor(shard: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``shard`` (this rank's part) as a ``DTensor`` with ``like``'s mesh, placement and global
    shape: what ``torch.distributed.checkpoint`` saves and reshards."""
    return _dtensor_cls().from_local(shard, like.device_mesh, like.placements,
                                     shape=like.shape, stride=like.stride())


def shard_bounds(size: int, world: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each rank's chunk of a dimension of ``size`` split ``torch.chunk``
    style over ``world`` ranks (what ``Shard(d)`` does; trailing chunks may be empty)."""
    step = max(math.ceil(size / world), 1)
    return [(min(r * step, size), min((r + 1) * step, size)) for r in range(world)]


def check_placement(name: str, p: torch.Tensor) -> None:
    """Refuse placements the masks cannot follow yet: meshes of more than one dimension and
    anything but ``Shard``."""
    from torch.distributed.tensor import Shard

    if p.device_mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in p.placements):
        raise NotSupportedUnderFSDP(
            f"not supported under FSDP yet: parameter {name!r} placed as {tuple(p.placements)} "
            f"on a {p.device_mesh.ndim}-D mesh; masks follow Shard placements on a 1-D mesh "
            "(plain fully_shard, no HSDP)")


def check_nm_groups(params: Mapping[str, torch.Tensor], m: int, mode: str = "row") -> None:
    """Refuse a placement that splits an N:M group (``m`` consecutive entries along the
    grouped dimension, :func:`sparsefw.nm.group_dim`) across ranks, naming the layer, its
    placement and the fix; every rank reaches the same verdict from global shapes."""
    from sparsefw.nm import group_dim

    for name, p in params.items():
        if not is_sharded(p):
            continue
        d = group_dim(p.shape, mode)
        world = p.device_mesh.size()
        for pl in p.placements:
            if getattr(pl, "dim", None) != d:
                continue
            bounds = [(a, b) for a, b in shard_bounds(p.shape[d], world) if b > a]
            split = [(a, b) for a, b in bounds if a % m or (b % m and b != p.shape[d])]
            if split:
                a, b = split[0]
                raise NotSupportedUnderFSDP(
                    f"{name}: the placement {pl} splits N:M groups of {m} along dim {d} "
                    f"({'input' if mode == 'row' else 'output'} dimension, size {p.shape[d]}): "
                    f"a rank holds entries [{a}, {b}) of {world} chunks, not a multiple of {m}. "
                    f"Shard another dimension (groups run along dim {d}; fully_shard's "
                    f"shard_placement_fn), pick a size whose per-rank chunk is a multiple of "
                    f"{m}, or keep the layer dense ([sparsity] dense_layers)")


def check_supported(masks, cfg) -> None:
    """Raise :class:`NotSupportedUnderFSDP` unless every masked parameter's placement and every
    selected component is one sparse training under FSDP runs exactly (see :data:`SUPPORTED`)."""
    for name, p in masks.params.items():
        if is_sharded(p):
            check_placement(name, p)
    topo = cfg.topology_update
    m = getattr(getattr(topo, "options", None), "m", None) if topo is not None else None
    if isinstance(m, int):  # the N:M placement error comes first: it names the real problem
        check_nm_groups(masks.params, m, getattr(topo.options, "mode", "row"))
    if cfg.sparsity.init != "dense" and any(
            getattr(pl, "dim", 0) != 0 for p in masks.params.values() if is_sharded(p)
            for pl in p.placements):
        raise NotSupportedUnderFSDP(
            f"not supported under FSDP yet: [sparsity] init = {cfg.sparsity.init!r} with a "
            "placement other than Shard(0) (the fan-in of a row needs the whole row)")
    if masks.kind != "hard" and (topo is None or topo.name not in FORWARD_TOPOLOGIES):
        raise NotSupportedUnderFSDP(
            f"not supported under FSDP yet: [sparsity] kind = {masks.kind!r} with "
            f"[topology_update] {getattr(topo, 'name', None)!r}; forward masks are verified "
            f"under FSDP with the N:M recipe only ([topology_update] name = "
            f"{' or '.join(map(repr, FORWARD_TOPOLOGIES))}); use hard masks otherwise")
    for sel in cfg.schedule:
        if sel.name in UNVERIFIED_SCHEDULES:
            raise NotSupportedUnderFSDP(
                f"not supported under FSDP yet: [[schedule]] {sel.name!r} "
                f"({UNVERIFIED_SCHEDULES[sel.name]})")
    if cfg.sparsity.compute != "dense":
        raise NotSupportedUnderFSDP("not supported under FSDP yet: [sparsity] compute = "
                                    f"{cfg.sparsity.compute!r}; use \"dense\"")
    selected = [("mask_init", cfg.mask_init), ("topology_update", topo)]
    selected += [("gradient_correct", c) for c in cfg.gradient_correct]
    selected += [("perturb", c) for c in cfg.perturb]
    for section, sel in selected:
        if sel is not None and sel.name not in SUPPORTED[section]:
            ok = ", ".join(SUPPORTED[section]) or "none yet"
            raise NotSupportedUnderFSDP(
                f"not supported under FSDP yet: [{section}] {sel.name!r} (verified under "
                f"FSDP: {ok})")


def gathered_view(masks):
    """A :class:`~sparsefw.masks.MaskSet` over whole (all-gathered) copies of the sharded
    parameters, with their whole gradients and masks: what a component sees during mask
    initialisation and topology updates under FSDP. Three all-gathers per sharded layer."""
    from sparsefw.masks import MaskSet

    params: dict[str, nn.Parameter] = {}
    for n, p in masks.params.items():
        if not is_sharded(p):
            params[n] = p
            continue
        full = nn.Parameter(gather(p.detach()), requires_grad=p.requires_grad)
        if p.grad is not None:
            full.grad = gather(p.grad)
        params[n] = full
    view = MaskSet(params, kind=masks.kind)
    view.targets = dict(masks.targets)
    view.decay = masks.decay
    for n, p in masks.params.items():
        if is_sharded(p):  # gloo cannot all-gather bool: as uint8
            whole = gather(to_dtensor(masks.float_mask(n).to(torch.uint8), p)).bool()
            view.update(n, whole)
        else:
            view.update(n, masks.masks[n])
    return view


def memory_per_rank(model: nn.Module, masks, optimizer: torch.optim.Optimizer | None = None
                    ) -> dict[str, int]:
    """Bytes this rank holds for the parameters, the masks (0/1 in the parameters' dtype, plus
    any bool masks built from them and not yet released) and the optimizer state: local shards under FSDP, whole tensors otherwise (what
    each DDP rank holds). Gradients and activations are not counted."""
    def nbytes(t: torch.Tensor) -> int:
        t = local(t)
        return t.numel() * t.element_size()

    out = {"params": sum(nbytes(p) for p in model.parameters()),
           "masks": sum(nbytes(m) for m in masks._float.values())
           + sum(nbytes(m) for m in masks.masks.held()),
           "optimizer": 0}
    if optimizer is not None:
        out["optimizer"] = sum(nbytes(v) for s in optimizer.state.values() for v in s.values()
                               if torch.is_tensor(v) and v.dim() > 0)
    out["total"] = out["params"] + out["masks"] + out["optimizer"]
    return out
