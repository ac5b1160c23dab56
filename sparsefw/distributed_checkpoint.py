"""Resharding checkpoints of sparse training through ``torch.distributed.checkpoint`` (DCP).

``save`` on N ranks and ``load`` on M (PyTorch docs, *Distributed Checkpoint -
torch.distributed.checkpoint*): the model and optimizer state come from
``torch.distributed.checkpoint.state_dict.get_state_dict`` (``DTensor`` shards under FSDP2,
whole tensors otherwise), the masks are ``DTensor`` objects placed like their parameters
(:meth:`sparsefw.masks.MaskSet.state_dict`), so DCP reshards all three to whatever the loading
run holds: the shards of another FSDP layout, or whole tensors in one unsharded process.
Components' states that hold sharded tensors (S²-SAM's previous gradient, keyed by parameter
name) travel as DCP entries too, placed on loading like the parameter of the same name. The
rest of the :class:`~sparsefw.Sparsifier`'s state (counters, schedule values, the components'
other state, the shared generator) is the same on every rank under FSDP (decisions are taken
on whole layers) and travels as one pickled blob.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from sparsefw import sharding

__all__ = ["load", "save"]

#: where a sharded tensor of a component's state stood (its value is a DCP entry)
_SHARDED = "<sharded: a distributed checkpoint entry>"
_SEP = "/"  # joins the keys of a component's state (parameter names contain dots)


def _split_sharded(tree, path: tuple[str, ...], out: dict) -> object:
    """A copy of the nested dicts ``tree`` with every ``DTensor`` leaf replaced by a marker,
    the leaves collected into ``out`` under their joined key path."""
    if isinstance(tree, dict):
        return {k: _split_sharded(v, (*path, str(k)), out) for k, v in tree.items()}
    if sharding.is_sharded(tree):
        out[_SEP.join(path)] = tree
        return _SHARDED
    return tree


def _join_sharded(tree, path: tuple[str, ...], values: dict) -> object:
    if isinstance(tree, dict):
        return {k: _join_sharded(v, (*path, str(k)), values) for k, v in tree.items()}
    if isinstance(tree, str) and tree == _SHARDED:
        return values[_SEP.join(path)]
    return tree


def _target(model, optimizer, sparsifier) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = sparsifier.state_dict()
    masks = sd.pop("masks")
    if sd.get("pending") or sd.get("dense_momentum"):
        raise ValueError("distributed checkpoints do not carry a pending perturbation or the "
                         "dense gradient momentum yet")
    plugin_tensors: dict = {}
    sd["plugins"] = _split_sharded(sd["plugins"], (), plugin_tensors)
    blob = io.BytesIO()
    torch.save({**sd, "masks": {k: v for k, v in masks.items() if k != "masks"}}, blob)
    blob.seek(0)
    return {"model": model_sd, "optimizer": optim_sd, "masks": dict(masks["masks"]),
            "sparsifier": blob, "plugin_tensors": plugin_tensors}


def _plugin_templates(path: str, named: dict[str, torch.Tensor]) -> dict:
    """Load targets for the components' sharded tensors the checkpoint holds: placed like the
    parameter whose name ends their key when its shape matches, whole tensors otherwise."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    prefix = "plugin_tensors."
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    out = {}
    for fqn, m in meta.items():
        if not fqn.startswith(prefix) or not isinstance(m, TensorStorageMetadata):
            continue
        key = fqn[len(prefix):]
        p = named.get(key.rsplit(_SEP, 1)[-1])
        dtype = m.properties.dtype
        if p is not None and tuple(p.shape) == tuple(m.size):
            local = torch.empty(sharding.local(p.detach()).shape, dtype=dtype, device=p.device)
            out[key] = sharding.to_dtensor(local, p) if sharding.is_sharded(p) else local
        else:
            out[key] = torch.empty(tuple(m.size), dtype=dtype)
    return out


def save(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         sparsifier) -> None:
    """Write model, optimizer and sparsifier state to the directory ``path`` (every rank
    calls it; each writes its shards)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_target(model, optimizer, sparsifier), checkpoint_id=str(path))


def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         sparsifier) -> None:
    """Restore what :func:`save` wrote, resharded to this run's ranks and placements (every
    rank calls it; one process without a process group loads whole tensors)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    target = _target(model, optimizer, sparsifier)
    target["plugin_tensors"] = _plugin_templates(path, sparsifier.state.named_params)
    dcp.load(target, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=target["model"],
                   optim_state_dict=target["optimizer"])
    target["sparsifier"].seek(0)
    sd = torch.load(target["sparsifier"], weights_only=False)
    sd["masks"] = {**sd["masks"], "masks": target["masks"]}
    sd["plugins"] = _join_sharded(sd["plugins"], (), target["plugin_tensors"])
    sparsifier.load_state_dict(sd)
