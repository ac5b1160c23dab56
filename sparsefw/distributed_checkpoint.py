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
import json
import os
import pickle
import shutil
import zlib
from pathlib import Path

import torch

from sparsefw import sharding

__all__ = ["CHECKPOINT_DIR", "PREVIOUS_DIR", "is_distributed_checkpoint", "load", "read_whole",
           "resume_path", "safe_metadata", "save", "save_atomic", "verify"]

#: the Trainer's distributed checkpoint in a run directory (``[train] parallel = "fsdp"``)
CHECKPOINT_DIR = "checkpoint.dcp"
#: the one before it, kept beside it
PREVIOUS_DIR = "checkpoint.prev.dcp"
#: CRC-32 of every file of a directory written by :func:`save_atomic`, written last
CHECKSUMS = "checksums.json"

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


def _blob(obj) -> io.BytesIO:
    blob = io.BytesIO()
    torch.save(obj, blob)
    blob.seek(0)
    return blob


def _unblob(blob: io.BytesIO, trust: bool):
    blob.seek(0)
    from sparsefw.engine.checkpoint import SAFE_GLOBALS

    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(blob, weights_only=not trust)


def _target(model, optimizer, sparsifier, extra: dict | None = None) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = sparsifier.state_dict()
    masks = sd.pop("masks")
    if sd.get("pending"):
        raise sharding.NotSupportedUnderFSDP(
            "a distributed checkpoint cannot hold a perturbation that is applied yet: save "
            "between steps, after sparsifier.step() returns and before the next training "
            "forward (which applies the next step's perturbation)")
    if sd.get("dense_momentum"):
        raise sharding.NotSupportedUnderFSDP(
            "distributed checkpoints do not carry the dense gradient momentum yet (a component "
            "that reads it runs in this Sparsifier): save with one process or without FSDP")
    plugin_tensors: dict = {}
    sd["plugins"] = _split_sharded(sd["plugins"], (), plugin_tensors)
    blob = _blob({**sd, "masks": {k: v for k, v in masks.items() if k != "masks"}})
    return {"model": model_sd, "optimizer": optim_sd, "masks": dict(masks["masks"]),
            "sparsifier": blob, "plugin_tensors": plugin_tensors, "extra": _blob(extra or {})}


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
         sparsifier, extra: dict | None = None) -> None:
    """Write model, optimizer and sparsifier state to the directory ``path`` (every rank
    calls it; each writes its shards). ``extra``: plain data of the caller's (the Trainer's
    learning-rate schedule, RNG states, ...), the same on every rank, returned by :func:`load`."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_target(model, optimizer, sparsifier, extra), checkpoint_id=str(path))


def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         sparsifier, *, trust: bool = False) -> dict:
    """Restore what :func:`save` wrote, resharded to this run's ranks and placements (every
    rank calls it; one process without a process group loads whole tensors); returns the
    ``extra`` it was given. Its pickled parts are read weights-only, and DCP's metadata only
    after :func:`safe_metadata` checked it, unless ``trust`` (unsafe: runs any code the
    files name)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not trust:
        safe_metadata(path)
    target = _target(model, optimizer, sparsifier)
    target["plugin_tensors"] = _plugin_templates(path, sparsifier.state.named_params)
    dcp.load(target, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=target["model"],
                   optim_state_dict=target["optimizer"])
    sd = _unblob(target["sparsifier"], trust)
    sd["masks"] = {**sd["masks"], "masks": target["masks"]}
    sd["plugins"] = _join_sharded(sd["plugins"], (), target["plugin_tensors"])
    sparsifier.load_state_dict(sd)
    return _unblob(target["extra"], trust)


#: what DCP's ``.metadata`` pickle may name besides DCP's own metadata classes: containers,
#: torch sizes, dtypes, layouts and memory formats; anything else is refused before DCP's
#: reader unpickles it
_METADATA_GLOBALS = {("collections", "OrderedDict"), ("builtins", "set"), ("torch", "Size"),
                     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}


class _MetadataCheck(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (module.startswith("torch.distributed.checkpoint.")
                   or (module, name) in _METADATA_GLOBALS
                   or (module == "torch" and isinstance(
                       getattr(torch, name, None),
                       (torch.dtype, torch.layout, torch.memory_format))))
        if allowed:
            return super().find_class(module, name)
        from sparsefw.engine.checkpoint import UntrustedCheckpoint

        raise UntrustedCheckpoint(
            f"the distributed checkpoint's metadata names {module}.{name}, which DCP's "
            "reader would import and call: refused. Load it only if you made it yourself, "
            "with --trust-checkpoint (unsafe)")


def safe_metadata(path: str | Path) -> None:
    """Raise :class:`~sparsefw.engine.checkpoint.UntrustedCheckpoint` unless the ``.metadata``
    file of the DCP directory ``path`` names only DCP's metadata classes, torch sizes and
    dtypes and plain containers (DCP's own reader unpickles it without restriction)."""
    from sparsefw.engine.checkpoint import CheckpointError

    meta = Path(path) / ".metadata"
    if not meta.is_file():
        raise CheckpointError(f"{path}: not a distributed checkpoint (no .metadata)")
    with open(meta, "rb") as f:
        _MetadataCheck(f).load()


def _checksums(directory: Path) -> dict[str, int]:
    out = {}
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.name != CHECKSUMS:
            crc = 0
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    crc = zlib.crc32(chunk, crc)
            out[f.name] = crc
    return out


def verify(path: str | Path) -> None:
    """Check every file of a directory :func:`save_atomic` wrote against the CRC-32 written
    with it; raise :class:`~sparsefw.engine.checkpoint.CheckpointError` naming the file (and
    the kept previous checkpoint) if one is missing, extra or changed."""
    from sparsefw.engine.checkpoint import CheckpointError

    path = Path(path)
    prev = path.with_name(PREVIOUS_DIR)
    offer = (f"; the previous checkpoint is kept beside it: to continue from there, "
             f"mv {prev} {path}" if path.name == CHECKPOINT_DIR and prev.exists() else "")
    try:
        written = json.loads((path / CHECKSUMS).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a complete distributed checkpoint ({exc})"
                              f"{offer}") from None
    found = _checksums(path)
    bad = sorted(set(written) ^ set(found)) + sorted(
        n for n in written if n in found and written[n] != found[n])
    if bad:
        raise CheckpointError(f"{path} is corrupted: its file {bad[0]!r} does not match the "
                              f"checksum written with it{offer}")


def save_atomic(run_dir: str | Path, model, optimizer, sparsifier, extra: dict | None = None,
                *, step: int = 0) -> Path:
    """:func:`save` into ``run_dir/checkpoint.dcp`` the way the engine writes its checkpoint
    files (:mod:`sparsefw.engine.checkpoint`): every rank writes into a temporary directory;
    rank 0 then writes the CRC-32 of each file, fsyncs, moves the current checkpoint aside to
    ``checkpoint.prev.dcp`` and renames the new one into place (``os.replace``, atomic on
    POSIX). A kill at any point leaves complete checkpoints only (the current, the previous,
    or the previous alone, which :func:`resume_path` then picks). Every rank calls it."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if dist else 0
    run_dir = Path(run_dir)
    tmp = run_dir / f".{CHECKPOINT_DIR}.step{step}.tmp"
    if rank == 0:  # a kill while writing leaves a temporary directory
        for stale in run_dir.glob(f".{CHECKPOINT_DIR}.*.tmp"):
            shutil.rmtree(stale)
    if dist:
        torch.distributed.barrier()
    save(tmp, model, optimizer, sparsifier, extra)
    if dist:
        torch.distributed.barrier()
    final = run_dir / CHECKPOINT_DIR
    if rank == 0:
        (tmp / CHECKSUMS).write_text(json.dumps(_checksums(tmp)))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        prev = run_dir / PREVIOUS_DIR
        if final.exists():
            if prev.exists():
                shutil.rmtree(prev)
            os.replace(final, prev)
        os.replace(tmp, final)
        fd = os.open(run_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if dist:
        torch.distributed.barrier()
    return final


def resume_path(run_dir: str | Path) -> Path:
    """The distributed checkpoint a resume of ``run_dir`` reads: ``checkpoint.dcp``, or the
    kept previous one when a kill fell between the two renames of a write."""
    from sparsefw.engine import checkpoint

    return checkpoint.resume_path(run_dir, CHECKPOINT_DIR, PREVIOUS_DIR)


def is_distributed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a DCP directory (it holds DCP's ``.metadata``)."""
    return (Path(path) / ".metadata").is_file()


def read_whole(path: str | Path, *, trust: bool = False) -> dict:
    """What :func:`save` wrote, read in one process without a model or a process group, as
    whole tensors (DCP gathers every shard): ``{"step", "epoch", "model", "masks": {"kind",
    "decay", "targets", "masks"}}`` (model and masks keyed by parameter name), what
    ``sparsefw export`` turns into a plain state dict. Checksums are checked when the
    directory has them (:func:`save_atomic`), the metadata before it is unpickled unless
    ``trust``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    if (path / CHECKSUMS).exists():
        verify(path)
    if not trust:
        safe_metadata(path)
    sd: dict = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(str(path)),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    state = _unblob(sd["sparsifier"], trust)
    return {"step": state["step"], "epoch": state["epoch"], "model": sd["model"],
            "masks": {**state["masks"], "masks": sd["masks"]}}
