"""``sparsefw export RUN_DIR [--out FILE] [--sparse]``: the trained sparse model as plain
PyTorch files that load without sparsefw.

Default (dense storage), next to each other:

* ``FILE`` (default ``RUN_DIR/export/model.pt``): the model's ``state_dict`` — same key names —
  with every mask applied (pruned weights exactly zero; forward/N:M masks hard, β = 0), so
  ``model.load_state_dict(torch.load(FILE, weights_only=True))`` works on the same architecture
  built by hand;
* ``FILE`` with ``.masks.pt``: ``{parameter name: bool mask}``;
* ``FILE`` with ``.json``: where it came from (run, step, model and data config, densities).

A run trained with ``[train] parallel = "fsdp"`` has a distributed checkpoint directory
(``checkpoint.dcp``) instead of ``checkpoint.pt``: its shards are gathered into whole tensors in
this one process (no process group needed). ``RUN_DIR`` may also name a DCP directory itself
(``sparsefw.distributed_checkpoint.save`` in a user's loop).

``--sparse`` stores ``FILE`` (default ``RUN_DIR/export/model.sparse.pt``) compactly instead: each
masked tensor as a packed bitmask (1 bit per entry) plus its active values in row-major order,
every other tensor as is. Decoding needs only torch (see :func:`unpack_sparse`, ten lines you
can copy). The sizes of both forms are reported.

``--runtime [--device cpu|cuda] [--batch-sizes 1,32]`` writes a sparse runtime model instead
(:mod:`sparsefw.runtime_export`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from sparsefw.commands import TRUST_HELP

if TYPE_CHECKING:  # torch is imported by the functions that use it: the CLI starts without it
    import torch

SPARSE_FORMAT = "sparsefw.bitmask/1"


def _bits() -> torch.Tensor:
    """The weight of each bit of a byte, most significant first."""
    import torch

    return torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


# ------------------------------------------------------------------------------ packing
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, 8 entries per byte, most significant bit first (the
    row-major flattening, zero-padded to a multiple of 8)."""
    import torch

    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _bits()).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`."""
    numel = 1
    for s in shape:
        numel *= int(s)
    bits = packed.unsqueeze(1).bitwise_and(_bits()).ne(0).reshape(-1)
    return bits[:numel].reshape(tuple(shape))


def pack_sparse(state_dict: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
                ) -> dict[str, Any]:
    """The compact form: ``{"format", "tensors": {key: tensor or {"shape", "bitmask",
    "values"}}}``, keys in ``state_dict`` order."""
    import torch

    tensors: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key in masks:
            mask = masks[key].to(torch.bool).cpu()
            tensors[key] = {
                "shape": list(value.shape),
                "bitmask": pack_bits(mask),
                "values": value.detach().cpu().reshape(-1)[mask.reshape(-1)].clone(),
            }
        else:
            tensors[key] = value.detach().cpu().clone()
    return {"format": SPARSE_FORMAT, "tensors": tensors}


def unpack_sparse(payload: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A dense ``state_dict`` from :func:`pack_sparse`'s payload. Plain torch; copyable::

        import torch
        def unpack(payload):
            bits = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
            out = {}
            for key, t in payload["tensors"].items():
                if isinstance(t, dict):
                    n = torch.Size(t["shape"]).numel()
                    mask = t["bitmask"].unsqueeze(1).bitwise_and(bits).ne(0).reshape(-1)[:n]
                    dense = t["values"].new_zeros(n)
                    dense[mask] = t["values"]
                    t = dense.reshape(t["shape"])
                out[key] = t
            return out
    """
    if payload.get("format") != SPARSE_FORMAT:
        raise ValueError(f"not a {SPARSE_FORMAT} payload (format {payload.get('format')!r})")
    out: dict[str, torch.Tensor] = {}
    for key, t in payload["tensors"].items():
        if isinstance(t, Mapping):
            mask = unpack_bits(t["bitmask"], t["shape"])
            dense = t["values"].new_zeros(mask.numel())
            dense[mask.reshape(-1)] = t["values"]
            t = dense.reshape(tuple(t["shape"]))
        out[key] = t
    return out


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) dict/list."""
    import torch

    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# ------------------------------------------------------------------------------ export
def masked_state_dict(model_state: Mapping[str, torch.Tensor],
                      masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model_state`` (CPU copies) with each masked entry multiplied by its hard mask."""
    out = {}
    for key, value in model_state.items():
        value = value.detach().cpu().clone()
        if key in masks:
            value = value * masks[key].to(device="cpu", dtype=value.dtype)
        out[key] = value
    return out


@attrs.frozen
class Exported:
    """What :func:`export_run` wrote and the storage sizes in bytes."""

    path: Path
    masks_path: Path | None
    meta_path: Path
    dense_bytes: int
    stored_bytes: int
    file_bytes: int
    density: float


def export_run(run_dir: str | Path, out: str | Path | None = None, *,
               sparse: bool = False, trust: bool = False) -> Exported:
    """Export ``run_dir``'s ``checkpoint.pt``, or its distributed checkpoint
    ``checkpoint.dcp`` (``[train] parallel = "fsdp"``; ``run_dir`` may also be a DCP directory
    itself, written by :mod:`sparsefw.distributed_checkpoint`), see the module docstring;
    ``trust``: load it with full unpickling, unsafe."""
    import torch

    from sparsefw import distributed_checkpoint as dcp
    from sparsefw.engine import checkpoint
    from sparsefw.engine.checkpoint import CHECKPOINT
    from sparsefw.engine.rundir import read_run_info

    run_dir = Path(run_dir)
    ckpt = run_dir / CHECKPOINT
    if dcp.is_distributed_checkpoint(run_dir):  # a DCP directory itself (its run: the parent)
        ckpt, run_dir = run_dir, run_dir.parent
    elif not ckpt.exists() and (run_dir / dcp.CHECKPOINT_DIR).exists():
        ckpt = run_dir / dcp.CHECKPOINT_DIR  # a run with [train] parallel = "fsdp"
    if not ckpt.exists():
        raise FileNotFoundError(f"{run_dir}: no {CHECKPOINT} or {dcp.CHECKPOINT_DIR} to export")
    if ckpt.is_dir():  # every shard gathered into whole tensors, in this one process
        payload = dcp.read_whole(ckpt, trust=trust)
    else:
        payload = checkpoint.load(ckpt, trust=trust)
    mask_state = payload.get("masks")
    if not isinstance(payload.get("model"), dict) or not (
            isinstance(mask_state, dict) and isinstance(mask_state.get("masks"), dict)):
        raise checkpoint.CheckpointError(f"{ckpt}: not a sparsefw training checkpoint (no "
                                         f"model state or masks in it)")
    masks = {n: m.to(torch.bool) for n, m in payload["masks"]["masks"].items()}
    unknown = [n for n in masks if n not in payload["model"]]
    if unknown:
        raise ValueError(f"{ckpt}: masks for parameters not in the model: {unknown}")
    state = masked_state_dict(payload["model"], masks)
    if out is None:
        out = run_dir / "export" / ("model.sparse.pt" if sparse else "model.pt")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.name[:-3] if out.name.endswith(".pt") else out.name

    dense_bytes = tensor_bytes(state)
    masks_path = None
    if sparse:
        packed = pack_sparse(state, masks)
        torch.save(packed, out)
        stored = tensor_bytes(packed)
    else:
        torch.save(state, out)
        masks_path = out.with_name(f"{stem}.masks.pt")
        torch.save(masks, masks_path)
        stored = dense_bytes
    active = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    info = read_run_info(run_dir, missing_ok=True)
    cfg = info.get("config", {})
    meta = {
        "run_dir": str(run_dir.resolve()),
        "step": payload.get("step"),
        "format": SPARSE_FORMAT if sparse else "state_dict",
        "model": cfg.get("model"),
        "data": cfg.get("data"),
        "sparsity": cfg.get("sparsity"),
        "mask_kind": payload["masks"].get("kind"),
        "density": active / max(total, 1),
        "layers": {n: {"shape": list(m.shape), "active": int(m.sum())} for n, m in masks.items()},
        "bytes": {"dense": dense_bytes, "stored": stored},
        "sparsefw_version": info.get("versions", {}).get("sparsefw"),
    }
    meta_path = out.with_name(f"{stem}.json")
    meta_path.write_text(json.dumps(meta, indent=2))
    return Exported(path=out, masks_path=masks_path, meta_path=meta_path, dense_bytes=dense_bytes,
                    stored_bytes=stored, file_bytes=out.stat().st_size,
                    density=active / max(total, 1))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def cmd_export(args) -> int:
    if args.runtime:
        from sparsefw.runtime_export import cmd_runtime

        return cmd_runtime(args)
    result = export_run(args.run_dir, args.out, sparse=args.sparse,
                        trust=args.trust_checkpoint)
    print(f"exported: {result.path}")
    if result.masks_path is not None:
        print(f"masks:    {result.masks_path}")
    print(f"metadata: {result.meta_path}")
    ratio = result.stored_bytes / max(result.dense_bytes, 1)
    print(f"density {result.density:.4f}; tensors {_size(result.stored_bytes)} "
          f"({'bitmask + values' if args.sparse else 'dense'}; dense {_size(result.dense_bytes)}, "
          f"{ratio:.1%} of it); file {_size(result.file_bytes)}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write the masked model as a plain PyTorch state dict (or compact sparse)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="FILE", help="output file (default RUN_DIR/export/model.pt)")
    p.add_argument("--sparse", action="store_true",
                   help="store masked tensors as a packed bitmask plus their active values")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.add_argument("--runtime", action="store_true",
                   help="write a sparse runtime model: per layer the fastest of dense/CSR/BSR "
                        "(/2:4 on CUDA), measured on --device (default RUN_DIR/export/"
                        "model.runtime.pt)")
    p.add_argument("--device", default="cpu", help="--runtime: the device to tune for")
    p.add_argument("--batch-sizes", default="1,32", metavar="N,N",
                   help="--runtime: the batch sizes to tune for (default 1,32)")
    p.set_defaults(func=cmd_export)
