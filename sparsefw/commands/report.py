"""``sparsefw report RUN_DIR``: what a run did, per layer and over time.

Reads the run directory the engine wrote — ``run.json`` (resolved config), ``checkpoint.pt``
(the masks) and ``metrics.jsonl`` (train and eval records) — and writes into ``RUN_DIR/report``
(or ``--out``):

* ``report.md``: the run's method and final metrics, then one row per sparsified layer: shape,
  weights, active weights, density, allocated density, and the weights dropped and grown so far
  (summed from the ``topology/dropped/<layer>`` / ``topology/grown/<layer>`` metrics that
  topology components log);
* ``curves.png``: test and train accuracy and loss against the step;
* ``density.png``: a heatmap of each layer's density at every evaluation.

The same figures go to TensorBoard (``RUN_DIR/tb``) as the image summaries
``report/density_heatmap`` and ``report/curves``, unless ``--no-tensorboard``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from sparsefw.commands import TRUST_HELP

METRICS_FILE = "metrics.jsonl"


# ------------------------------------------------------------------------------ reading a run
def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """The train and eval records of ``metrics.jsonl`` in step order (an eval record repeated
    at one step, e.g. after a resume, is kept once: the last one)."""
    path = Path(run_dir) / METRICS_FILE
    train: list[dict] = []
    evals: dict[int, dict] = {}
    if not path.exists():
        return train, []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
            continue  # not a record the jsonl observer writes
        if record.get("kind") == "eval":
            evals[int(record.get("step", 0))] = record
        elif record.get("kind") == "train":
            train.append(record)
    train.sort(key=lambda r: r.get("step", 0))
    return train, [evals[s] for s in sorted(evals)]


def read_run_info(run_dir: str | Path) -> dict:
    """``run.json`` as a dict (empty if missing; a damaged one is a clear error)."""
    from sparsefw.engine import rundir

    return rundir.read_run_info(run_dir, missing_ok=True)


def load_masks(run_dir: str | Path, *, trust: bool = False) -> dict[str, Any]:
    """The checkpoint's mask state: ``{"masks": {name: bool tensor}, "targets": {...},
    "kind": ...}`` (``trust``: load the checkpoint with full unpickling, unsafe)."""
    from sparsefw.engine import checkpoint
    from sparsefw.engine.checkpoint import CHECKPOINT

    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no {CHECKPOINT} (has the run finished an epoch?)")
    payload = checkpoint.load(path, trust=trust)
    if not isinstance(payload.get("masks"), dict) or not isinstance(
            payload["masks"].get("masks"), dict):
        raise checkpoint.CheckpointError(f"{path}: no masks in it (not a training checkpoint)")
    return payload["masks"]


def method_summary(info: dict) -> str:
    """A one-line description of a run's method from its resolved config."""
    cfg = info.get("config", {})
    parts = []
    if "mask_init" in cfg:
        parts.append(f"mask_init={cfg['mask_init']['name']}")
    if cfg.get("topology_update"):
        parts.append(f"topology={cfg['topology_update']['name']}")
    for section in ("gradient_correct", "perturb", "schedule"):
        names = [s["name"] for s in cfg.get(section) or []]
        if names:
            parts.append(f"{section}={'+'.join(names)}")
    sp = cfg.get("sparsity", {})
    if sp:
        parts.append(f"density={sp.get('density')} ({sp.get('distribution')}, {sp.get('kind')})")
    if "model" in cfg:
        parts.append(f"model={cfg['model']['name']}")
    if "data" in cfg:
        parts.append(f"data={cfg['data']['name']}")
    return ", ".join(parts)


@attrs.frozen
class LayerRow:
    """One row of the per-layer table."""

    name: str
    shape: tuple[int, ...]
    numel: int
    active: int
    target: int
    dropped: int | None
    grown: int | None

    @property
    def density(self) -> float:
        return self.active / max(self.numel, 1)


def _sum_metric(records: Iterable[dict], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return sum(values) if values else None


def layer_table(run_dir: str | Path, train: list[dict] | None = None, *,
                trust: bool = False) -> list[LayerRow]:
    """Per-layer rows from the checkpoint's masks and the logged topology counts."""
    if train is None:
        train, _ = read_metrics(run_dir)
    state = load_masks(run_dir, trust=trust)
    rows = []
    for name, mask in state["masks"].items():
        dropped = _sum_metric(train, f"topology/dropped/{name}")
        grown = _sum_metric(train, f"topology/grown/{name}")
        rows.append(LayerRow(
            name=name, shape=tuple(mask.shape), numel=mask.numel(), active=int(mask.sum()),
            target=int(state.get("targets", {}).get(name, mask.numel())),
            dropped=None if dropped is None else int(round(dropped)),
            grown=None if grown is None else int(round(grown)),
        ))
    return rows


def _fmt_count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def table_markdown(rows: list[LayerRow], train: list[dict]) -> str:
    """The per-layer table as Markdown, with a total row."""
    lines = [
        "| layer | shape | weights | active | density | allocated | dropped | grown |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r.name}` | {'×'.join(map(str, r.shape))} | {r.numel:,} | {r.active:,} | "
            f"{r.density:.4f} | {r.target / max(r.numel, 1):.4f} | {_fmt_count(r.dropped)} | "
            f"{_fmt_count(r.grown)} |"
        )
    numel = sum(r.numel for r in rows)
    active = sum(r.active for r in rows)
    target = sum(r.target for r in rows)

    def total(values: list[int | None], key: str) -> int | None:
        if all(v is not None for v in values) and values:
            return sum(values)  # type: ignore[arg-type]
        logged = _sum_metric(train, key)
        return None if logged is None else int(round(logged))

    dropped = total([r.dropped for r in rows], "topology/dropped")
    grown = total([r.grown for r in rows], "topology/grown")
    lines.append(
        f"| **total** | | {numel:,} | {active:,} | {active / max(numel, 1):.4f} | "
        f"{target / max(numel, 1):.4f} | {_fmt_count(dropped)} | {_fmt_count(grown)} |"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def curves_figure(train: list[dict], evals: list[dict], title: str = ""):
    """Accuracy (left) and loss (right) against the step, test and train."""
    plt = _pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in ((ax_acc, "acc"), (ax_loss, "loss")):
        for records, split, style in ((evals, "test", "o-"), (train, "train", "-")):
            pts = [(r["step"], r[f"{split}/{key}"]) for r in records if f"{split}/{key}" in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, style, label=split, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_acc.set_title("accuracy")
    ax_loss.set_title("loss")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def density_matrix(evals: list[dict], layers: list[str]) -> tuple[list[int], list[list[float]]]:
    """Steps of the evaluations and, per layer, its density at each (NaN where not logged)."""
    steps = [int(r["step"]) for r in evals]
    rows = [[float(r.get(f"density/{n}", math.nan)) for r in evals] for n in layers]
    return steps, rows


def density_figure(evals: list[dict], layers: list[str]):
    """Heatmap: one row per layer, one column per evaluation, colour = density."""
    plt = _pyplot()
    steps, rows = density_matrix(evals, layers)
    fig, ax = plt.subplots(figsize=(max(5.0, min(14.0, 2 + 0.25 * len(steps))),
                                    max(2.5, 0.8 + 0.3 * len(layers))))
    if steps and rows:
        image = ax.imshow(rows, aspect="auto", interpolation="nearest", cmap="viridis",
                          vmin=0.0, vmax=max(1e-6, max((v for r in rows for v in r
                                                         if not math.isnan(v)), default=1.0)))
        fig.colorbar(image, ax=ax, label="density")
        ticks = list(range(len(steps)))
        if len(ticks) > 12:
            ticks = ticks[:: math.ceil(len(ticks) / 12)]
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("step (evaluation)")
    ax.set_title("layer density over training")
    fig.tight_layout()
    return fig


def figure_array(fig):
    """The figure rendered to an ``(H, W, 3)`` uint8 array (for TensorBoard images)."""
    import numpy as np

    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


# ------------------------------------------------------------------------------ the report
@attrs.frozen
class Report:
    """What :func:`make_report` wrote."""

    markdown: Path
    figures: tuple[Path, ...]
    rows: tuple[LayerRow, ...]
    final: dict
    tensorboard: Path | None


def make_report(run_dir: str | Path, out: str | Path | None = None, *,
                tensorboard: bool = True, trust: bool = False) -> Report:
    """Write ``report.md``, ``curves.png`` and ``density.png`` for ``run_dir`` into ``out``
    (default ``run_dir/report``) and, with ``tensorboard``, the figures as image summaries
    into ``run_dir/tb``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a run directory")
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    info = read_run_info(run_dir)
    train, evals = read_metrics(run_dir)
    rows = layer_table(run_dir, train, trust=trust)
    final = evals[-1] if evals else {}
    summary = method_summary(info)

    plt = _pyplot()
    curves = curves_figure(train, evals, title=summary)
    density = density_figure(evals, [r.name for r in rows])
    paths = (out / "curves.png", out / "density.png")
    curves.savefig(paths[0], dpi=120)
    density.savefig(paths[1], dpi=120)

    tb_dir = None
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        tb_dir = run_dir / "tb"
        step = int(final.get("step", 0))
        with SummaryWriter(log_dir=str(tb_dir), filename_suffix=".report") as writer:
            writer.add_image("report/density_heatmap", figure_array(density), step,
                             dataformats="HWC")
            writer.add_image("report/curves", figure_array(curves), step, dataformats="HWC")
            writer.add_text("report/layers", table_markdown(rows, train), step)
    plt.close(curves)
    plt.close(density)

    lines = [f"# Run report: {run_dir.name}", "", f"Method: {summary or '(no run.json)'}", ""]
    if final:
        shown = {k: v for k, v in final.items()
                 if (k.startswith("test/") or k == "density") and isinstance(v, (int, float))}
        lines += ["| final metric | value |", "|---|---:|",
                  *(f"| {k} | {v:.4f} |" for k, v in shown.items()),
                  f"| step | {final.get('step')} |", ""]
    best = max((r["test/acc"] for r in evals if "test/acc" in r), default=None)
    if best is not None:
        lines += [f"Best test accuracy: {best:.4f} over {len(evals)} evaluations.", ""]
    lines += ["## Layers", "", table_markdown(rows, train), "",
              "Dropped and grown: summed over the logged `topology/dropped/<layer>` and "
              "`topology/grown/<layer>` metrics (`-`: the topology component logs none).", "",
              "## Curves", "", "![accuracy and loss](curves.png)", "",
              "## Density per layer", "", "![layer density heatmap](density.png)", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return Report(markdown=md, figures=paths, rows=tuple(rows), final=final, tensorboard=tb_dir)


# ------------------------------------------------------------------------------ CLI
def cmd_report(args) -> int:
    report = make_report(args.run_dir, args.out, tensorboard=not args.no_tensorboard,
                         trust=args.trust_checkpoint)
    train, _ = read_metrics(args.run_dir)
    print(table_markdown(list(report.rows), train))
    if report.final:
        print(f"\nfinal test accuracy {report.final.get('test/acc', float('nan')):.4f} at step "
              f"{report.final.get('step')}")
    print(f"report: {report.markdown}")
    for path in report.figures:
        print(f"figure: {path}")
    if report.tensorboard is not None:
        print(f"tensorboard images: {report.tensorboard} (tensorboard --logdir {report.tensorboard})")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="per-layer table, accuracy curves and density heatmap of a run",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", metavar="DIR", help="write here instead of RUN_DIR/report")
    p.add_argument("--no-tensorboard", action="store_true",
                   help="do not add the figures to RUN_DIR/tb")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=cmd_report)
