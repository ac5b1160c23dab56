#!/usr/bin/env python
"""Does sparsity pay? Dense against sparse kernels, for inference (the exported runtime of
:mod:`sparsefw.runtime`) and for a training step (``[sparsity] compute = "auto"``,
:mod:`sparsefw.sparse_compute`).

Models (CPU-sized by default; ``--models`` picks):

* ``mlp``        MLP 784-4096-4096-10 on flat inputs
* ``vit_block``  a ViT-S transformer block (width 384, 6 heads, MLP 1536) on 16 tokens
* ``gpt2_linears`` the four GPT-2-small linears of a block (768→2304 qkv, 768→768 proj,
  768→3072 fc, 3072→768 proj), one after the other, on tokens (batch = tokens)
* ``resnet32``, ``vgg16``  CIFAR 3×32×32 (inference only: their 3×3 convolutions have no sparse
  kernel and stay dense; only the classifier and 1×1 convs can change)

Masks come from a :class:`sparsefw.Sparsifier` (random mask init, ERK allocation, the project's
defaults) at each density. For every model, density and batch size:

* **inference**: the dense export (the masked model) against :func:`sparsefw.runtime.to_runtime`
  tuned for all the batch sizes at once, both timed interleaved in this process
  (:func:`sparsefw.timing.median_times`: median of ``--repeats``), reported as dense time over
  runtime time, with the per-layer choices;
* **training** (not for the conv nets): one ``Sparsifier.step(closure)`` with SGD (momentum 0.9,
  weight decay 5e-4; torch's fused kernels, the engine's default and the fastest plain loop),
  ``compute = "dense"`` against ``compute = "auto"`` (auto's per-layer
  measurement and its whole-step check happen in warm-up steps, outside the timing).

Every figure is measured with one thread and with torch's default thread count. Usage::

    python benchmarks/bench_sparse.py                          # everything (long on a CPU)
    python benchmarks/bench_sparse.py --models mlp --densities 0.05 --batches 1,32 --no-train
    python benchmarks/bench_sparse.py --json out.json          # also write the raw numbers
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sparsefw import Sparsifier, runtime, sparse_compute, timing  # noqa: E402
from sparsefw.engine.optim import kernel_options  # noqa: E402
from sparsefw.models import MLP  # noqa: E402
from sparsefw.models.vit import Block  # noqa: E402
from sparsefw.runtime_export import format_choices  # noqa: E402

MODELS = ("mlp", "vit_block", "gpt2_linears", "resnet32", "vgg16")
CONV_NETS = ("resnet32", "vgg16")


class GPT2Linears(nn.Module):
    """The four Linear layers of a GPT-2-small block on ``(tokens, 768)`` rows: qkv (of which
    the query part feeds on), attention output projection, MLP up and down projections."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.qkv(x)[:, :self.proj.in_features])
        return self.out(self.fc(x))


def build(name: str) -> tuple[nn.Module, tuple[int, ...], str]:
    """``(model, one sample's shape, loss kind)``."""
    if name == "mlp":
        return MLP(784, (4096, 4096), 10), (784,), "ce"
    if name == "vit_block":
        return Block(384, 6, 4, 0.0), (16, 384), "mse"
    if name == "gpt2_linears":
        return GPT2Linears(), (768,), "mse"
    from sparsefw.plugins import load_catalogue

    entry = load_catalogue(autoload=False).registry.get("model", name)
    return entry.factory(entry.config(), input_shape=(3, 32, 32), num_classes=10), (3, 32, 32), \
        "ce"


def sparse_model(name: str, density: float, compute: str = "dense", seed: int = 0):
    """The model with masks at ``density``, its SGD optimizer and Sparsifier."""
    torch.manual_seed(seed)
    model, shape, loss = build(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4,
                          **kernel_options("auto", torch.device("cpu")))
    sp = Sparsifier(model, opt, density=density, compute=compute, total_steps=10**6)
    return model, opt, sp, shape, loss


def inference(name: str, density: float, batches: list[int], repeats: int) -> dict:
    model, _, sp, shape, _ = sparse_model(name, density)
    sp.finalize()
    dense = model.eval()
    example = torch.randn(max(batches), *shape)
    rt = runtime.to_runtime(dense, example, batch_sizes=batches, repeats=repeats)
    rows = []
    for b in batches:
        x = example[:b]
        with torch.no_grad():
            err = (rt.module(x) - dense(x)).abs().max().item()
            t = timing.median_times({"dense": lambda x=x: dense(x),
                                     "runtime": lambda x=x: rt.module(x)}, repeats=repeats,
                                    warmup=3)
        rows.append({"batch": b, "dense_ms": t["dense"] * 1e3, "runtime_ms": t["runtime"] * 1e3,
                     "speedup": t["dense"] / t["runtime"], "max_abs_diff": err})
    return {"rows": rows, "choices": format_choices(rt.choices),
            "channels_removed": rt.channels_removed}


def training(name: str, density: float, batches: list[int], repeats: int) -> list[dict]:
    out = []
    for b in batches:
        steps = {}
        summary = None
        for compute in ("dense", "auto"):
            model, _, sp, shape, loss_kind = sparse_model(name, density, compute)
            model.train()
            g = torch.Generator().manual_seed(1)
            x = torch.randn(b, *shape, generator=g)
            if loss_kind == "ce":
                y = torch.randint(0, 10, (b,), generator=g)
            else:
                with torch.no_grad():
                    y = torch.randn(model(x).shape, generator=g)

            def step(model=model, sp=sp, x=x, y=y, loss_kind=loss_kind):
                def closure():
                    out = model(x)
                    loss = F.cross_entropy(out, y) if loss_kind == "ce" else F.mse_loss(out, y)
                    loss.backward()
                    return loss
                sp.step(closure)

            # warm-up: auto measures its layers, then checks them on whole steps
            for _ in range(1 if compute == "dense" else sparse_compute.TRIAL_STEPS + 1):
                step()
            steps[compute] = step
            if sp.compute is not None:
                summary = sp.compute.summary()
        t = timing.median_times(steps, repeats=repeats, number=1, warmup=1)
        out.append({"batch": b, "dense_ms": t["dense"] * 1e3, "auto_ms": t["auto"] * 1e3,
                    "speedup": t["dense"] / t["auto"], "layers": summary})
    return out


def summary(runs: list[dict]) -> str:
    """One Markdown row per model, density and thread count: the speed-ups per batch size."""
    lines = ["| model | density | threads | inference: dense ms → speed-up, per batch | "
             "training step: dense ms → speed-up, per batch |", "|---|---|---|---|---|"]
    for r in runs:
        inf = "; ".join(f"{x['batch']}: {x['dense_ms']:.2f} → {x['speedup']:.2f}×"
                        for x in r.get("inference", {}).get("rows", []))
        tr = "; ".join(f"{x['batch']}: {x['dense_ms']:.1f} → {x['speedup']:.2f}×"
                       for x in r.get("training", []))
        lines.append(f"| {r['model']} | {r['density']} | {r['threads']} | {inf or '—'} "
                     f"| {tr or '—'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--densities", default="0.1,0.05,0.02")
    p.add_argument("--batches", default="1,32,256")
    p.add_argument("--train-batches", default="32,256")
    p.add_argument("--threads", default=f"1,{torch.get_num_threads()}")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--no-inference", action="store_true", help="training only")
    p.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    results = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
               "runs": []}
    print(f"torch {torch.__version__}, {platform.machine()}, default threads "
          f"{torch.get_num_threads()}")
    default_threads = torch.get_num_threads()
    for threads in sorted(set(ints(args.threads))):
        torch.set_num_threads(threads)
        for name in args.models.split(","):
            for density in [float(d) for d in args.densities.split(",")]:
                run = {"model": name, "density": density, "threads": threads}
                head = f"\n## {name}, density {density}, {threads} thread(s)"
                print(head)
                if not args.no_inference:
                    inf = inference(name, density, ints(args.batches), args.repeats)
                    run["inference"] = inf
                    print("inference: " + "; ".join(
                        f"batch {r['batch']}: {r['dense_ms']:.2f} ms dense, "
                        f"{r['speedup']:.2f}× (max |diff| {r['max_abs_diff']:.1e})"
                        for r in inf["rows"]))
                    print(inf["choices"])
                if not args.no_train and name not in CONV_NETS:
                    tr = training(name, density, ints(args.train_batches), args.repeats)
                    run["training"] = tr
                    print("training step (auto vs dense): " + "; ".join(
                        f"batch {r['batch']}: {r['dense_ms']:.1f} ms dense, {r['speedup']:.2f}×"
                        f" ({r['layers']})" for r in tr))
                results["runs"].append(run)
                sys.stdout.flush()
    torch.set_num_threads(default_threads)
    print("\n## Summary (speed-up = dense time / sparse time)\n")
    print(summary(results["runs"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
