"""Forward masking inside a user's own model call: the forward of each masked module sees
``w ⊙ m_eff`` (straight-through to ``w``, :meth:`sparsefw.masks.MaskSet.effective_weight`)
while the module keeps its own parameter, so state-dict keys, ``save_pretrained`` and the
optimizer are untouched (no parametrization renames anything).

A forward pre-hook swaps the effective weight into the module for the duration of its forward
and a forward hook (``always_call``) puts the parameter back. When something else already
substituted the weight (``torch.func.functional_call`` with a snapshot or with the effective
weights themselves), the hooks leave it alone.

Under FSDP2 (``fully_shard``; Zhao et al., arXiv 2304.11277) the module's parameter is a sharded
``DTensor`` until FSDP's own forward pre-hook (registered with ``prepend=True``, so it runs
before ours; an enclosing FSDP module's runs before the layer is called at all) all-gathers it
and puts the whole, unsharded weight in the module. The pre-hook then masks *that* weight with
the whole mask, all-gathered from the ranks' mask shards for this forward
(:meth:`~sparsefw.masks.MaskSet.whole_float_mask`; no rank keeps a whole-layer mask between
steps, so the per-rank mask memory stays a shard's). The straight-through backward hands the
dense gradient of the masked product to the unsharded weight, and FSDP reduce-scatters it to
the shards as usual: the STE gradient SR-STE (Zhou et al., arXiv 2102.04010) starts from. When
FSDP reshards after the forward it replaces the module's weight itself; the post-hook only puts
the unsharded weight back when the module still holds the effective one.
"""

from __future__ import annotations

import torch

from sparsefw import sharding
from sparsefw.masks import MaskSet


def _unsharded_by_fsdp(current, registered) -> bool:
    """Whether ``current`` is the whole weight FSDP2 all-gathered in place of the sharded
    parameter ``registered``: a plain (not ``DTensor``) parameter of its global shape
    (substitutes from ``functional_call`` are plain tensors, not parameters)."""
    return (isinstance(current, torch.nn.Parameter) and sharding.is_sharded(registered)
            and not sharding.is_sharded(current) and current.shape == registered.shape)


def install(model: torch.nn.Module, masks: MaskSet) -> list:
    """Put the swap hooks on every masked module of ``model``; returns the hook handles."""
    handles = []
    for name in masks.names:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        swapped: list = []

        def pre(mod, args, *, name=name, attr=attr, swapped=swapped):
            current = mod._parameters.get(attr)
            registered = masks.params[name]
            if current is registered:
                effective = masks.effective_weight(name)
            elif _unsharded_by_fsdp(current, registered):
                effective = masks.effective_weight(name, current)
            else:
                return None
            swapped.append((current, effective))
            mod._parameters[attr] = effective
            return None

        def post(mod, args, output, *, attr=attr, swapped=swapped):
            if swapped:
                current, effective = swapped.pop()
                if mod._parameters.get(attr) is effective:  # FSDP may have resharded it
                    mod._parameters[attr] = current
            return None

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    return handles
