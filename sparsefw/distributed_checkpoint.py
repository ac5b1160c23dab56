"""Resharding checkpoints of sparse training through ``torch.distributed.checkpoint`` (DCP).

``save`` on N ranks and ``load`` on M (PyTorch docs, *Distributed Checkpoint -
torch.distributed.checkpoint*): the model and optimizer state come from
``torch.distributed.checkpoint.state_dict.get_state_dict`` (``DTensor`` shards under FSDP2,
whole tensors otherwise), the masks are ``DTensor`` objects placed like their parameters
(:meth:`sparsefw.masks.MaskSet.state_dict`), so DCP reshards all three to whatever the loading
run holds: the shards of another FSDP layout, or whole tensors in one unsharded process. The
rest of the :class:`~sparsefw.Sparsifier`'s state (counters, schedule values, the components'
states, the shared generator) is the same on every rank under FSDP (decisions are taken on
whole layers) and travels as one pickled blob.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

__all__ = ["load", "save"]


def _target(model, optimizer, sparsifier) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = sparsifier.state_dict()
    masks = sd.pop("masks")
    if sd.get("pending") or sd.get("dense_momentum"):
        raise ValueError("distributed checkpoints do not carry a pending perturbation or the "
                         "dense gradient momentum yet")
    blob = io.BytesIO()
    torch.save({**sd, "masks": {k: v for k, v in masks.items() if k != "masks"}}, blob)
    blob.seek(0)
    return {"model": model_sd, "optimizer": optim_sd, "masks": dict(masks["masks"]),
            "sparsifier": blob}


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
    dcp.load(target, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=target["model"],
                   optim_state_dict=target["optimizer"])
    target["sparsifier"].seek(0)
    sd = torch.load(target["sparsifier"], weights_only=False)
    sd["masks"] = {**sd["masks"], "masks": target["masks"]}
    sparsifier.load_state_dict(sd)
