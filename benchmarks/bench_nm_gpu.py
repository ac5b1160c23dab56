"""GPU benchmark of 2:4 semi-structured sparsity: dense vs 2:4 ``F.linear`` for ViT-sized layers,
and a whole small-ViT forward with its MLP layers (``fc1``/``fc2``) exported to 2:4.

Needs an NVIDIA GPU of compute capability >= 8.0; without CUDA it exits with a message (status 2).
Run: ``python benchmarks/bench_nm_gpu.py [--dtype float16|bfloat16] [--tokens 8192]``.
Timings are CUDA-event medians of ``--repeats`` runs after warm-up.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from timing import time_op


def _time(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA device (CUDA events)."""
    return time_op(fn, torch.device("cuda"), repeats, warmup=5)["median_ms"]


def bench_linears(tokens: int, dtype: torch.dtype, repeats: int) -> None:
    from torch.sparse import to_sparse_semi_structured

    from sparsefw.nm import nm_mask

    print(f"\nF.linear, {tokens} tokens, {dtype}: ms dense / ms 2:4 / speed-up")
    for out_f, in_f in ((3072, 768), (768, 3072), (4096, 1024), (1024, 4096), (11008, 4096)):
        w = torch.randn(out_f, in_f, device="cuda", dtype=dtype)
        w = w * nm_mask(w, 2, 4)
        ws = to_sparse_semi_structured(w)
        x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
        dense = _time(lambda w=w, x=x: F.linear(x, w), repeats)
        sparse = _time(lambda ws=ws, x=x: F.linear(x, ws), repeats)
        print(f"  [{out_f:5d} x {in_f:5d}]  {dense:8.3f}  {sparse:8.3f}  {dense / sparse:5.2f}x")


def bench_vit(batch: int, dtype: torch.dtype, repeats: int) -> None:
    from sparsefw.export import materialize_, to_semi_structured
    from sparsefw.models.vit import ViT, ViTConfig

    cfg = ViTConfig(patch_size=16, dim=768, depth=12, heads=12, mlp_ratio=4)
    model = ViT(3, (224, 224), 1000, cfg).to("cuda", dtype).eval()
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
    with torch.inference_mode():
        dense = _time(lambda: model(x), repeats)
        names = [f"blocks.{i}.mlp.{fc}" for i in range(cfg.depth) for fc in ("fc1", "fc2")]
        materialize_(model, n=2, m=4, names=[f"{k}.weight" for k in names])
        ref = model(x)
        to_semi_structured(model, names)
        sparse = _time(lambda: model(x), repeats)
        err = (model(x).float() - ref.float()).abs().max().item()
    print(f"\nViT-B/16 forward, batch {batch}, {dtype}, MLP layers 2:4: dense {dense:.2f} ms, "
          f"2:4 {sparse:.2f} ms, speed-up {dense / sparse:.2f}x (max |diff| {err:.3g})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args(argv)
    from sparsefw.export import semi_structured_problem

    problem = semi_structured_problem()
    if problem:
        print(f"bench_nm_gpu: cannot run: {problem}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__})")
    bench_linears(args.tokens, dtype, args.repeats)
    bench_vit(args.batch, dtype, args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
