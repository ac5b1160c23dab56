"""``sparsefw export RUN_DIR --runtime``: a run's trained model as a sparse runtime
(:func:`sparsefw.runtime.to_runtime`) tuned on the target device, written with
:func:`sparsefw.runtime.save_runtime`, with a JSON file next to it listing each layer's choice
and timings.

The model is rebuilt from the run's recorded config (its data set is built for the input shape,
the number of classes and the example batch the autotune feeds: the first test samples) and its
``checkpoint.pt`` (weights and masks).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import attrs
import torch

from sparsefw import config as config_mod
from sparsefw import runtime
from sparsefw.engine import checkpoint
from sparsefw.engine.rundir import RUN_INFO

#: test samples stacked into the autotune's example batch
EXAMPLE_SAMPLES = 32


@attrs.frozen
class RuntimeExport:
    """What :func:`export_runtime` wrote: the model file, its format (``torchscript`` or
    ``pickle``), the JSON report, and the runtime itself."""

    path: Path
    format: str
    meta_path: Path
    result: runtime.Runtime


def _model_and_example(run_dir: Path, catalogue=None):
    """The run's model (checkpoint weights loaded), its masks and an example input batch."""
    from sparsefw.plugins import load_catalogue

    info_path = run_dir / RUN_INFO
    ckpt = run_dir / checkpoint.CHECKPOINT
    for path in (info_path, ckpt):
        if not path.exists():
            raise FileNotFoundError(f"{run_dir}: no {path.name} to export")
    catalogue = catalogue or load_catalogue()
    raw = json.loads(info_path.read_text())["raw_config"]
    cfg = config_mod.structure(raw, catalogue.registry, source=str(info_path))
    reg = catalogue.registry
    data = reg.get("dataset", cfg.data.name).build(cfg.data.options)
    model = reg.get("model", cfg.model.name).factory(
        cfg.model.options, input_shape=tuple(data.input_shape), num_classes=data.num_classes)
    payload = checkpoint.load(ckpt)
    model.load_state_dict(payload["model"])
    masks = {n: m.to(torch.bool) for n, m in payload["masks"]["masks"].items()}
    n = min(EXAMPLE_SAMPLES, len(data.test))
    example = torch.stack([torch.as_tensor(data.test[i][0]) for i in range(n)])
    return model.eval(), masks, example


def export_runtime(run_dir: str | Path, out: str | Path | None = None, *,
                   device: str = "cpu", batch_sizes: Sequence[int] = (1, 32),
                   repeats: int = 7, catalogue=None) -> RuntimeExport:
    """Export ``run_dir``'s model as a sparse runtime tuned on ``device`` for
    ``batch_sizes`` (default file ``RUN_DIR/export/model.runtime.pt``); ``catalogue`` resolves
    the run's config (default: built-ins and installed plugins)."""
    run_dir = Path(run_dir)
    model, masks, example = _model_and_example(run_dir, catalogue)
    result = runtime.to_runtime(model, example, masks=masks, device=device,
                                batch_sizes=batch_sizes, repeats=repeats)
    out = Path(out) if out is not None else run_dir / "export" / "model.runtime.pt"
    fmt = runtime.save_runtime(result.module, out)
    stem = out.name[:-3] if out.name.endswith(".pt") else out.name
    meta_path = out.with_name(f"{stem}.json")
    meta = {
        "run_dir": str(run_dir.resolve()),
        "format": fmt,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_sizes": sorted(set(int(b) for b in batch_sizes)),
        "channels_removed": result.channels_removed,
        "layers": [{**attrs.asdict(c), "speedups": list(c.speedups())} for c in result.choices],
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    return RuntimeExport(path=out, format=fmt, meta_path=meta_path, result=result)


def format_choices(choices: Sequence[runtime.LayerChoice]) -> str:
    """A Markdown table of the per-layer choices and speed-ups (dense time / chosen time)."""
    lines = ["| layer | kind | shape | density | rows: layout (speed-up) |",
             "|---|---|---|---|---|"]
    for c in choices:
        plan = ", ".join(f"{r}: {lay} ({s:.2f}×)" for r, lay, s in
                         zip(c.rows, c.layouts, c.speedups(), strict=True))
        lines.append(f"| {c.name} | {c.kind} | {c.shape[0]}×{c.shape[1]} | {c.density:.3f} "
                     f"| {plan} |")
    return "\n".join(lines)


def cmd_runtime(args) -> int:
    """The ``--runtime`` branch of ``sparsefw export``."""
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    result = export_runtime(args.run_dir, args.out, device=args.device, batch_sizes=sizes)
    print(f"exported: {result.path} ({result.format})")
    print(f"metadata: {result.meta_path}")
    if result.result.channels_removed:
        print(f"channels removed: {result.result.channels_removed}")
    print(format_choices(result.result.choices))
    return 0
