"""Part 3 — step time of the engine against a plain PyTorch loop in the same process, at GPU
shapes, bf16 autocast, eager and with ``torch.compile``.

This part is a driver of ``benchmarks/bench.py``: the variants, the runners (a real
:class:`~sparsefw.engine.Trainer` stepped on a fixed batch; the plain loop), the interleaved
timing with warm-up (CUDA events on CUDA, :mod:`timing`), medians and inter-quartile ranges,
RigL's update/amortised figures and AGENT's per-epoch figure all come from there. It adds the
GPU model shapes, MDGF (forward-masked 2:4 with β decay, the ``nm_mdgf_2of4`` recipe) and the
budget: models are measured in order, eager first, and the part is cut between models.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from types import SimpleNamespace

import torch

from sparsefw import config as config_mod
from sparsefw.plugins import load_catalogue

import bench
from gpu_parts import tokens
from gpu_parts.budget import PartContext

#: variants of ``bench.variants`` timed here (plus ``mdgf24``), in table order
EAGER_VARIANTS = ("plain", "dense", "hard90", "nm24", "mdgf24", "rigl", "s2sam", "sam", "agent")
#: variants timed again under torch.compile (each compiles its own graphs: minutes otherwise)
COMPILED_VARIANTS = ("plain", "hard90", "s2sam")
GPT2_VOCAB = 50257

FULL = bench.Sizes(256, (), (3, 32, 32), 16, (), warmup=3, repeats=5, steps=10,
                   epoch_batches=2, epoch_repeats=2, sweep_widths=(), sweep_depth=0,
                   sweep_depth_width=0, sweep_masked=())
TINY = replace(FULL, batch=4, warmup=1, repeats=2, steps=1, epoch_repeats=1)


def _lm(key: str, opts: dict, seq: int, batch: int, vocab: int, sizes: bench.Sizes):
    data = {"name": "random_tokens", "n_train": batch * sizes.epoch_batches, "n_test": batch,
            "seq_len": seq, "vocab": vocab}
    return bench.ModelSpec(key, "gpt", opts, (seq,), batch, num_classes=vocab, vocab=vocab,
                           data=data)


def model_specs(tiny: bool) -> list[bench.ModelSpec]:
    """The measured models, in order: CIFAR ResNet-32/56 and WRN-28-10 at batch 256, a
    ViT-S/16 at batch 256 on 224² inputs, a GPT-2-small-sized LM at sequence 1024 (batch 8)."""
    if tiny:
        cifar, b = (3, 8, 8), 4
        return [
            bench.ModelSpec("resnet32", "resnet32", {"width": 2}, cifar, b),
            bench.ModelSpec("resnet56", "resnet56", {"width": 2}, cifar, b),
            bench.ModelSpec("wrn28_10", "wrn", {"depth": 10, "widen": 1}, cifar, b),
            bench.ModelSpec("vit_s16", "vit", {"patch_size": 4, "dim": 16, "depth": 1,
                                               "heads": 2}, (3, 16, 16), b, num_classes=10),
            _lm("gpt2_small", {"dim": 16, "depth": 1, "heads": 2}, 16, 2, 64, TINY),
        ]
    cifar, b = (3, 32, 32), 256
    return [
        bench.ModelSpec("resnet32", "resnet32", {"width": 16}, cifar, b),
        bench.ModelSpec("resnet56", "resnet56", {"width": 16}, cifar, b),
        bench.ModelSpec("wrn28_10", "wrn", {"depth": 28, "widen": 10}, cifar, b),
        bench.ModelSpec("vit_s16", "vit", {"patch_size": 16, "dim": 384, "depth": 12,
                                           "heads": 6, "mlp_ratio": 4}, (3, 224, 224), b,
                        num_classes=1000),
        _lm("gpt2_small", {"dim": 768, "depth": 12, "heads": 12, "mlp_ratio": 4}, 1024, 8,
            GPT2_VOCAB, FULL),
    ]


def mdgf_variant(ctx: PartContext, nm24: bench.Variant) -> bench.Variant:
    """MDGF 2:4 as its recipe (``configs/nm_mdgf_2of4.toml``) sets it — mask recomputed every
    step, β decaying — with the layers the 2:4 variant keeps dense."""
    recipe = config_mod.read_toml(ctx.root / "configs" / "nm_mdgf_2of4.toml")
    sparsity = {**recipe["sparsity"],
                "dense_layers": nm24.sections["sparsity"].get("dense_layers", [])}
    sections = {"sparsity": sparsity, "mask_init": recipe["mask_init"],
                "topology_update": recipe["topology_update"], "schedule": recipe["schedule"]}
    return bench.Variant("mdgf24", "(d'') MDGF 2:4 (nm_mdgf_2of4 recipe)", base="nm24",
                         sections=sections, requires=(("schedule", "mask_decay"),),
                         note=nm24.note)


def variant_list(ctx: PartContext, spec, registry, keep: tuple[str, ...]) -> list[bench.Variant]:
    vs = {v.key: v for v in bench.variants(spec, registry, set(registry.entries))}
    if "nm24" in vs:
        vs["mdgf24"] = mdgf_variant(ctx, vs["nm24"])
    return [vs[k] for k in keep if k in vs]


def _cell(rec: dict) -> str:
    if rec.get("status") != "ok":
        return rec.get("status", "?")
    return f"{rec['x_plain']:.2f}x ({rec['median_ms']:.2f} ms ± {rec['iqr_ms']:.2f})"


def _table(results: list[dict], mode: str) -> list[str]:
    """Markdown: one row per variant (and RigL/AGENT sub-rows), one column per model."""
    if not results:
        return []
    models = [r["model"] for r in results]
    out = [f"**{mode}** — x plain loop (median step ms ± IQR)", "",
           "| variant | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    keys: list[str] = []
    for r in results:
        keys += [k for k in r["variants"] if k not in keys]
    for k in keys:
        recs = [r["variants"].get(k, {}) for r in results]
        label = next((x["label"] for x in recs if x.get("label")), k)
        out.append(f"| {label} | " + " | ".join(_cell(x) if x else "—" for x in recs) + " |")
        if k == "rigl":
            out.append("| RigL update step | " + " | ".join(
                f"{x['update']['median_ms'] / _plain(r):.2f}x ({x['update']['median_ms']:.2f} ms)"
                if "update" in x else "—" for x, r in zip(recs, results, strict=True)) + " |")
            out.append("| RigL amortised at ΔT=100 | " + " | ".join(
                f"{x['amortised']['x_plain']:.2f}x ({x['amortised']['median_ms']:.2f} ms)"
                if "amortised" in x else "—" for x in recs) + " |")
        if k == "agent":
            out.append("| AGENT per epoch, per batch | " + " | ".join(
                f"{x['per_epoch']['x_plain']:.2f}x ({x['per_epoch']['per_batch_ms']:.2f} ms)"
                if "per_epoch" in x else "—" for x in recs) + " |")
    return out + [""]


def _plain(res: dict) -> float:
    return res["variants"].get("plain", {}).get("median_ms") or float("nan")


def run(ctx: PartContext) -> None:
    sizes = TINY if ctx.tiny else FULL
    # the figures' frame first: a budget that runs out while the catalogue loads still
    # leaves a report of an empty part, not a missing one
    ctx.figures.update(amp="bf16", sizes=sizes.__dict__, eager={}, compiled={},
                       clock="cuda events" if ctx.device.type == "cuda" else "wall")
    catalogue = load_catalogue(autoload=False, extra=[("gpu_suite_tokens", tokens)])
    registry = catalogue.registry
    wanted = ctx.options.get("steptime_modes", ("eager", "compile"))
    modes = [("eager", False, EAGER_VARIANTS)] if "eager" in wanted else []
    if "compile" not in wanted:
        ctx.note("torch.compile: not asked for (--steptime-modes)")
    elif ctx.tiny:
        ctx.note("torch.compile: not run at --tiny (compiling on a CPU takes minutes)")
    else:
        modes.append(("torch.compile", True, COMPILED_VARIANTS))
    try:
        for mode, compile_, keep in modes:
            store = ctx.figures["compiled" if compile_ else "eager"]
            for spec in model_specs(ctx.tiny):
                ctx.check(f"{spec.key} ({mode})")
                # memory: on CUDA cheap (allocator statistics); on CPU a profiler pass per
                # variant, too slow for the --tiny budget
                args = SimpleNamespace(compile=compile_, amp="bf16", strict=False, profile=False,
                                       clock="wall", out=str(ctx.work_dir / "bench.json"),
                                       memory=ctx.device.type == "cuda")
                vlist = variant_list(ctx, spec, registry, keep)
                res = bench.measure_model(spec, vlist, catalogue, ctx.device, sizes, args,
                                          ctx.work_dir, log=lambda *a: None)
                res["device"] = ctx.device.type
                store[spec.key] = res
                for key, rec in res["variants"].items():
                    if rec.get("status") == "error":
                        ctx.note(f"{spec.key} {key} ({mode}): {rec.get('reason')}")
                ctx.lines.append(f"```\n{bench.format_model_table(ctx.device.type, res)}\n```")
                gc.collect()
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:  # what was measured is reported, also when the part is cut
        summary = []
        for mode, key in (("eager", "eager"), ("torch.compile", "compiled")):
            summary += _table(list(ctx.figures[key].values()), f"{mode}, bf16 autocast")
        ctx.lines[:0] = summary
