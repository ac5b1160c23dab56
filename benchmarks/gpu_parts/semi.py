"""Part 4 — 2:4 semi-structured sparsity (``torch.sparse.to_sparse_semi_structured``) against
dense ``F.linear`` at the Linear shapes of ViT-S/16, ViT-B/16 (batch 256, 197 tokens) and
GPT-2 small (batch 8 × 1024 tokens), bf16: forward, and forward + backward to the input (the
weights frozen, as the exported layers are). Then the export round trip of
:mod:`sparsefw.export` on a block of each model's shapes: the compressed weights decompress to
exactly the pruned dense ones and the outputs agree. Where 2:4 kernels cannot run (CPU, GPUs
before Ampere), the dense side is still timed and the sparse side says why not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsefw.export import (
    SemiStructuredUnsupported,
    materialize_,
    semi_structured_problem,
    to_semi_structured,
)
from sparsefw.nm import nm_mask

from gpu_parts.budget import PartContext
from timing import time_op

DTYPE = torch.bfloat16


def families(tiny: bool) -> dict[str, tuple[int, int]]:
    """Model family -> (width, tokens per batch)."""
    if tiny:
        return {"ViT-S/16": (64, 64), "ViT-B/16": (128, 64), "GPT-2 small": (128, 32)}
    return {"ViT-S/16": (384, 256 * 197), "ViT-B/16": (768, 256 * 197),
            "GPT-2 small": (768, 8 * 1024)}


def layer_shapes(width: int) -> dict[str, tuple[int, int]]:
    """A transformer block's Linear layers: name -> (out_features, in_features)."""
    return {"qkv": (3 * width, width), "proj": (width, width), "fc1": (4 * width, width),
            "fc2": (width, 4 * width)}


def _fwd(x, w):
    with torch.no_grad():
        return F.linear(x, w)


def _fwd_bwd(x, w, g):
    x.grad = None
    F.linear(x, w).backward(g)


def measure_shape(device, tokens: int, out_f: int, in_f: int, repeats: int, problem) -> dict:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=gen).to(device, DTYPE)
    w = w * nm_mask(w, 2, 4)
    x = torch.randn(tokens, in_f, generator=gen).to(device, DTYPE).requires_grad_()
    g = torch.randn(tokens, out_f, generator=gen).to(device, DTYPE)
    rec = {"tokens": tokens, "out": out_f, "in": in_f,
           "dense_fwd": time_op(lambda: _fwd(x, w), device, repeats),
           "dense_fwd_bwd": time_op(lambda: _fwd_bwd(x, w, g), device, repeats)}
    if problem:
        rec["sparse"] = f"not run: {problem}"
        return rec
    from torch.sparse import to_sparse_semi_structured

    try:
        ws = to_sparse_semi_structured(w)
    except Exception as exc:  # a shape or backend the installed torch refuses
        rec["sparse"] = f"not run: {type(exc).__name__}: {(str(exc) or '?').splitlines()[0]}"
        return rec
    for key, fn in (("sparse_fwd", lambda: _fwd(x, ws)),
                    ("sparse_fwd_bwd", lambda: _fwd_bwd(x, ws, g))):
        try:
            rec[key] = time_op(fn, device, repeats)
        except Exception as exc:  # a capability probe: what the installed torch cannot do
            rec[key] = {"error": f"{type(exc).__name__}: {(str(exc) or '?').splitlines()[0]}"}
    return rec


def round_trip(device, width: int, problem) -> tuple[bool, str]:
    """Export a block's Linear layers to 2:4 and back; (ok, what happened)."""
    torch.manual_seed(0)
    shapes = layer_shapes(width)
    model = nn.ModuleDict({k: nn.Linear(i, o) for k, (o, i) in shapes.items()}).to(device, DTYPE)
    names = [f"{k}.weight" for k in shapes]
    materialize_(model, n=2, m=4, names=names)
    dense = {k: model[k].weight.detach().clone() for k in shapes}
    x = torch.randn(64, width, device=device, dtype=DTYPE)
    with torch.inference_mode():
        ref = model["qkv"](x)
    if problem:
        try:
            to_semi_structured(model, list(shapes))
        except SemiStructuredUnsupported as exc:
            return True, f"refused with a clear reason, as documented: {exc}"
        return False, "to_semi_structured did not refuse although 2:4 kernels cannot run here"
    try:
        done = to_semi_structured(model, list(shapes))
    except (SemiStructuredUnsupported, ValueError) as exc:
        return False, f"export refused: {exc}"
    if done != list(shapes):
        return False, f"converted {done}, expected {list(shapes)}"
    for k, w in dense.items():
        if not torch.equal(model[k].weight.to_dense(), w):
            return False, f"{k}: the compressed weight does not decompress to the pruned weight"
    with torch.inference_mode():
        out = model["qkv"](x)
    err = (out.float() - ref.float()).abs().max().item()
    if not torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2):
        return False, f"outputs differ by up to {err:.3g}"
    return True, f"exact weights, outputs within {err:.3g}"


def _ms(rec) -> str:
    if isinstance(rec, dict) and "median_ms" in rec:
        return f"{rec['median_ms']:.3f}"
    return "—"


def _speed(dense, sparse) -> str:
    if not (isinstance(sparse, dict) and "median_ms" in sparse):
        return "—"
    s = dense["median_ms"] / sparse["median_ms"]
    return f"{s:.2f}x {'faster' if s > 1 else 'slower'}"


def run(ctx: PartContext) -> None:
    device = ctx.device
    problem = semi_structured_problem(device) if device.type == "cuda" else \
        semi_structured_problem("cpu")
    repeats = 3 if ctx.tiny else 20
    ctx.figures.update(dtype="bfloat16", problem=problem, layers={}, round_trip={})
    ctx.lines += ["| model | layer | tokens × in → out | dense fwd ms | 2:4 fwd ms | fwd | "
                  "dense fwd+bwd ms | 2:4 fwd+bwd ms | fwd+bwd |", "|---" * 9 + "|"]
    for fam, (width, tokens) in families(ctx.tiny).items():
        for layer, (out_f, in_f) in layer_shapes(width).items():
            ctx.check(f"{fam} {layer}")
            rec = measure_shape(device, tokens, out_f, in_f, repeats, problem)
            ctx.figures["layers"][f"{fam}/{layer}"] = rec
            sf, sb = rec.get("sparse_fwd"), rec.get("sparse_fwd_bwd")
            ctx.lines.append(
                f"| {fam} | {layer} | {tokens} × {in_f} → {out_f} | {_ms(rec['dense_fwd'])} | "
                f"{_ms(sf)} | {_speed(rec['dense_fwd'], sf)} | {_ms(rec['dense_fwd_bwd'])} | "
                f"{_ms(sb)} | {_speed(rec['dense_fwd_bwd'], sb)} |")
            if "sparse" in rec and not problem:
                ctx.note(f"{fam} {layer}: 2:4 {rec['sparse']}")
            for key in ("sparse_fwd", "sparse_fwd_bwd"):
                if isinstance(rec.get(key), dict) and "error" in rec[key]:
                    ctx.note(f"{fam} {layer} {key}: {rec[key]['error']}")
        ctx.check(f"{fam} export round trip")
        ok, what = round_trip(device, width, problem)
        ctx.figures["round_trip"][fam] = {"ok": ok, "detail": what}
        if not ok:
            ctx.fail(f"2:4 export round trip, {fam}: {what}")
    if problem:
        ctx.note(f"2:4 kernels not run: {problem}")
    ctx.lines.append("")
    for fam, r in ctx.figures["round_trip"].items():
        ctx.lines.append(f"- export round trip, {fam}: {'ok' if r['ok'] else 'FAILED'} — "
                         f"{r['detail']}")
