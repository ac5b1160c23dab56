"""Forward masking inside a user's own model call: the forward of each masked module sees
``w ⊙ m_eff`` (straight-through to ``w``, :meth:`sparsefw.masks.MaskSet.effective_weight`)
while the module keeps its own parameter, so state-dict keys, ``save_pretrained`` and the
optimizer are untouched (no parametrization renames anything).

A forward pre-hook swaps the effective weight into the module for the duration of its forward
and a forward hook (``always_call``) puts the parameter back. When something else already
substituted the weight (``torch.func.functional_call`` with a snapshot or with the effective
weights themselves), the hooks leave it alone.
"""

from __future__ import annotations

import torch

from sparsefw.masks import MaskSet


def install(model: torch.nn.Module, masks: MaskSet) -> list:
    """Put the swap hooks on every masked module of ``model``; returns the hook handles."""
    handles = []
    for name in masks.names:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        swapped: list = []

        def pre(mod, args, *, name=name, attr=attr, swapped=swapped):
            current = mod._parameters.get(attr)
            if current is not masks.params[name]:
                return None
            swapped.append(current)
            mod._parameters[attr] = masks.effective_weight(name)
            return None

        def post(mod, args, output, *, attr=attr, swapped=swapped):
            if swapped:
                mod._parameters[attr] = swapped.pop()
            return None

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    return handles
