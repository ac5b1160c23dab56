"""Initial weights of a sparse network: ``[sparsity] init``.

A layer initialised for its dense fan-in F (variance ``c/F`` per weight: ``c = 2`` for Kaiming/He,
``c = 1/3`` for PyTorch's default ``U(±1/√F)``) and then masked keeps only k_i of the F incoming
weights of output unit i, so the unit's pre-activation variance falls from ``c·Var(x)`` to
``(k_i/F)·c·Var(x)``; at density 0.02 that is a factor 50 per layer, and a deep sparse network
starts with vanishing signals and gradients.

``"sparse_fan_in"`` rescales every masked layer, output unit by output unit, for the fan-in the
unit keeps: ``w_ij ← w_ij · √(F / k_i)``, so that each unit's weights have variance ``c/k_i`` and
its pre-activation variance is the dense layer's again. This is the sparsity-aware
initialisation of Evci, Ioannou, Keskin, Dauphin, "Gradient Flow in Sparse Neural Networks and
How Lottery Tickets Win" (AAAI 2022, arXiv 2010.03533), which draws each unit's weights with its
own sparse fan-in; rescaling the model's own draw keeps its distribution family (normal or
uniform, any gain) and needs no knowledge of the scheme. The layer-wise form they compare it
with, scaling a whole layer by ``1/√d_l`` (Liu et al., "Rethinking the Value of Network
Pruning", ICLR 2019, arXiv 1810.05270), agrees with it in expectation for random masks and
differs for masks whose fan-in varies between units (magnitude, SNIP, GraSP).

``"dense"`` (the default) leaves the weights as the model initialised them: the common practice,
and what sparsefw did before this option. With forward masks (N:M) the dense weights are scaled
for the masked forward (every unit keeps N of each M, a factor √(M/N)).

Units are the first dimension of the weight (``out_features`` of a Linear, ``out_channels`` of a
convolution); the fan-in is the product of the others. The scaling is applied once, by the
engine, right after ``mask_init`` has chosen the masks (so it sees the masks that SNIP, GraSP or
magnitude pruning chose, from the weights as initialised); a resumed run restores its weights
from the checkpoint instead. Layers kept dense are not touched.
"""

from __future__ import annotations

import torch

from sparsefw.config import INITS
from sparsefw.masks import MaskSet

#: the values of ``[sparsity] init``, each with one line saying what it does
DESCRIPTIONS = {
    "dense": "dense: the weights as the model initialised them",
    "sparse_fan_in": "sparse_fan_in: after mask_init, each masked unit's weights × √(F/k) for "
                     "the k of F inputs it keeps (Evci et al. 2022, arXiv 2010.03533)",
}
assert set(DESCRIPTIONS) == set(INITS), "every [sparsity] init is described"


@torch.no_grad()
def fan_in_scales(mask: torch.Tensor) -> torch.Tensor:
    """``√(F / k_i)`` per output unit of a layer with bool ``mask`` (units along dim 0, ``F`` the
    product of the other dims, ``k_i`` unit i's active inputs; 1 for a unit with none)."""
    rows = mask.reshape(mask.shape[0], -1)
    kept = rows.sum(1).to(torch.float64)
    scale = torch.sqrt(rows.shape[1] / kept.clamp(min=1))
    return torch.where(kept > 0, scale, torch.ones_like(scale))


@torch.no_grad()
def apply(masks: MaskSet, init: str) -> None:
    """Rescale the weights of every masked layer for ``init`` (one of :data:`INITS`) in place.
    No host synchronisation."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choices: {', '.join(INITS)}")
    if init == "dense":
        return
    for name in masks.params:  # a row-sharded (FSDP2 Shard(0)) layer: its rows' fan-in
        p = masks.local_param(name)
        scale = fan_in_scales(masks.masks[name])
        p.mul_(scale.to(p.dtype).view(-1, *([1] * (p.dim() - 1))))
