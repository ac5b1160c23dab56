"""``sparsefw sweep CONFIG [CONFIG ...] --grid KEY=V1,V2 ... --seeds N``: run a grid of
trainings and tabulate them.

Each CONFIG is one *method* (named after its file stem). Every method runs at every point of
the grid (the Cartesian product of the ``--grid`` options; keys are ``section.key`` as in
``--set``) with seeds ``0 .. N-1`` (``--seed-start`` shifts them). The runs go to ``--jobs K``
long-lived worker processes (default 1; :mod:`sparsefw.workers`), which pay torch's start-up
once; each run is seeded and isolated exactly as a lone ``sparsefw train`` (its results are the
same bit for bit). Runs are queued round-robin: seed 0 of every method and grid point, then
seed 1, ..., so a busy machine slows every method alike. Everything lands in ``--out DIR``::

    DIR/runs/<method>/<grid point>/seed<k>/   one run directory each (+ train.log, result.json)
    DIR/workers/worker<k>.log                 each worker's own output
    DIR/results.csv                           one row per run, with its cost: wall and CPU
                                              seconds, training passes, FLOPs (sparsefw.cost)
    DIR/summary.csv                           per method and grid point: n, mean, std
    DIR/results.md                            methods × grid points, test accuracy mean ± std
    DIR/accuracy_vs_sparsity.png              accuracy against measured sparsity, per method

A run whose ``result.json`` says it finished is not run again (``--rerun`` forces it), so an
interrupted sweep continues where it stopped. ``sparsefw compare DIR --base METHOD`` compares the
methods seed by seed.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs

from sparsefw.config import ConfigError
from sparsefw.stats import mean_std
from sparsefw.workers import RunSpec, WorkerPool, finished

METRIC = "test/acc"
#: the cost columns of ``results.csv`` (see :func:`sparsefw.workers.result_row`)
COST_FIELDS = ("time_s", "cpu_s", "passes_forward", "passes_backward", "flops_dense",
               "flops_sparse")


# ------------------------------------------------------------------------------ the grid
def split_values(text: str) -> list[str]:
    """Split ``"0.1,0.02"`` on commas outside brackets and quotes (``"[8,8],[16]"`` is two)."""
    parts, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        cur += ch
    parts.append(cur.strip())
    return [p for p in parts if p]


def parse_grid(options: Iterable[str]) -> list[tuple[str, list[str]]]:
    """``["sparsity.density=0.1,0.02"]`` -> ``[("sparsity.density", ["0.1", "0.02"])]``
    (values kept as text: each becomes one ``--set key=value``)."""
    grid = []
    seen = set()
    for text in options:
        if "=" not in text:
            raise ConfigError([f"--grid {text!r}: expected section.key=v1,v2,..."])
        key, values = text.split("=", 1)
        key = key.strip()
        if key in seen:
            raise ConfigError([f"--grid {key}: given twice"])
        seen.add(key)
        vals = split_values(values)
        if not vals:
            raise ConfigError([f"--grid {text!r}: no values"])
        grid.append((key, vals))
    return grid


def grid_points(grid: Sequence[tuple[str, list[str]]]) -> list[tuple[tuple[str, str], ...]]:
    """Every combination, in the order given (the last key varies fastest)."""
    if not grid:
        return [()]
    keys = [k for k, _ in grid]
    return [tuple(zip(keys, combo, strict=True))
            for combo in itertools.product(*(v for _, v in grid))]


def point_label(point: Sequence[tuple[str, str]]) -> str:
    """``"sparsity.density=0.1"`` (joined by ``,``), or ``"default"`` for the empty point."""
    return ",".join(f"{k}={v}" for k, v in point) or "default"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "-", text).strip("-") or "x"


def method_names(configs: Sequence[str]) -> list[str]:
    """A unique short name per config file: its stem, with parents added where stems clash."""
    paths = [Path(c) for c in configs]
    names = [p.stem for p in paths]
    for depth in (1, 2):
        dup = {n for n in names if names.count(n) > 1}
        names = [("/".join(p.parts[-1 - depth:-1]) + "/" + p.stem) if n in dup else n
                 for p, n in zip(paths, names, strict=True)]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def plan(configs: Sequence[str], grid: Sequence[tuple[str, list[str]]], seeds: Sequence[int],
         out: Path, fixed: Sequence[str] = ()) -> list[RunSpec]:
    """Every run: methods × grid points × seeds."""
    specs = []
    for method, cfg in zip(method_names(configs), configs, strict=True):
        for point in grid_points(grid):
            for seed in seeds:
                overrides = (*fixed, *(f"{k}={v}" for k, v in point), f"seed={seed}")
                run_dir = out / "runs" / _safe(method) / _safe(point_label(point)) / f"seed{seed}"
                specs.append(RunSpec(method, str(cfg), tuple(point), seed, tuple(overrides),
                                     str(run_dir)))
    return specs


def validate(specs: Sequence[RunSpec], registry) -> None:
    """Load every run's config before anything trains; all problems in one ConfigError."""
    from sparsefw import config as config_mod

    problems: list[str] = []
    for spec in specs:
        try:
            config_mod.load(spec.config, registry, spec.overrides)
        except ConfigError as e:
            where = f"{spec.method} [{point_label(spec.point)}] seed {spec.seed}"
            problems.extend(f"{where}: {p}" for p in e.problems)
    if problems:
        raise ConfigError(sorted(set(problems)))


# ------------------------------------------------------------------------------ running
def queue_order(specs: Sequence[RunSpec]) -> list[int]:
    """Indices of ``specs`` round-robin by seed: for the first seed every grid point with every
    method in turn, then the same for the second seed, ... (points and methods in planned
    order), so runs that will be compared run side by side."""
    def first(values) -> dict:
        return {v: i for i, v in reversed(list(enumerate(values)))}

    seed = first(sorted(s.seed for s in specs))
    point = first(s.point for s in specs)
    method = first(s.method for s in specs)
    return sorted(range(len(specs)),
                  key=lambda i: (seed[specs[i].seed], point[specs[i].point],
                                 method[specs[i].method]))


def run_all(specs: Sequence[RunSpec], *, jobs: int = 1, rerun: bool = False,
            log_dir: str | Path = "workers", echo=print) -> list[dict]:
    """Run every spec (skipping finished ones unless ``rerun``) in ``jobs`` worker processes;
    rows in spec order."""
    rows: list[dict | None] = [None if rerun else finished(s) for s in specs]
    todo = [i for i in queue_order(specs) if rows[i] is None]
    skipped = len(specs) - len(todo)
    if skipped:
        echo(f"{skipped} of {len(specs)} runs already finished; running {len(todo)}")

    def report(k: int, row: dict) -> None:
        i = todo[k]
        rows[i] = row
        acc = row.get("test/acc")
        acc_s = f"acc {acc:.4f}" if isinstance(acc, float) else row.get("error", "")[:200]
        echo(f"[{sum(r is not None for r in rows)}/{len(specs)}] {row['method']} "
             f"{point_label(specs[i].point)} seed {row['seed']}: {row['status']} {acc_s} "
             f"({row['time_s']:.1f}s wall, {row.get('cpu_s', 0.0):.1f}s CPU)")

    if todo:
        threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))
        WorkerPool(jobs, threads, log_dir).run([specs[i] for i in todo], report)
    return [r for r in rows if r is not None]


# ------------------------------------------------------------------------------ results
@attrs.frozen
class Cell:
    """One method at one grid point, over seeds."""

    method: str
    point: tuple[tuple[str, str], ...]
    n: int
    failed: int
    acc_mean: float
    acc_std: float
    density_mean: float


def summarise(rows: Sequence[dict], methods: Sequence[str],
              points: Sequence[tuple[tuple[str, str], ...]]) -> list[Cell]:
    """Mean and std of the test accuracy (and mean measured density) per method and point."""
    cells = []
    for method in methods:
        for point in points:
            mine = [r for r in rows if r["method"] == method
                    and tuple(r["point"].items()) == tuple(point)]
            ok = [r for r in mine if r["status"] == "ok" and r.get(METRIC) is not None]
            if ok:
                mean, std = mean_std([r[METRIC] for r in ok])
                dens, _ = mean_std([r["density"] for r in ok])
            else:
                mean = std = dens = math.nan
            cells.append(Cell(method, tuple(point), len(ok), len(mine) - len(ok), mean, std,
                              dens))
    return cells


def write_csv(rows: Sequence[dict], keys: Sequence[str], path: Path) -> None:
    """One row per run: method, the grid values, seed, status, metrics, run directory."""
    fields = ["method", *keys, "seed", "status", "test/acc", "test/loss", "density", "step",
              *COST_FIELDS, "run_dir", "config", "error"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r.get(k) for k in fields if k not in keys},
                        **{k: r["point"].get(k) for k in keys}})


def write_summary_csv(cells: Sequence[Cell], keys: Sequence[str], path: Path) -> None:
    fields = ["method", *keys, "n", "failed", "acc_mean", "acc_std", "density_mean"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for c in cells:
            point = dict(c.point)
            w.writerow([c.method, *(point.get(k) for k in keys), c.n, c.failed,
                        f"{c.acc_mean:.6f}", f"{c.acc_std:.6f}", f"{c.density_mean:.6f}"])


def markdown_table(cells: Sequence[Cell], methods: Sequence[str],
                   points: Sequence[tuple[tuple[str, str], ...]], seeds: int) -> str:
    """Methods (rows) × grid points (columns): test accuracy in %, mean ± std over seeds."""
    by = {(c.method, c.point): c for c in cells}
    header = [point_label(p) for p in points]
    lines = [f"Test accuracy (%), mean ± std over {seeds} seed{'s' if seeds != 1 else ''}.", "",
             "| method | " + " | ".join(header) + " |",
             "|---|" + "---:|" * len(header)]
    for m in methods:
        out = []
        for p in points:
            c = by[(m, tuple(p))]
            if c.n == 0:
                out.append("failed")
                continue
            text = f"{100 * c.acc_mean:.2f} ± {100 * c.acc_std:.2f}"
            if c.n != seeds:
                text += f" (n={c.n})"
            out.append(text)
        lines.append(f"| {m} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def plot(cells: Sequence[Cell], path: Path, title: str = "") -> None:
    """Accuracy against measured sparsity (1 − density), one line per method (and per value
    of grid keys other than the density)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    lines: dict[str, list[Cell]] = {}
    for c in cells:
        if c.n == 0:
            continue
        other = [(k, v) for k, v in c.point if k != "sparsity.density"]
        label = c.method + (f" ({point_label(other)})" if other else "")
        lines.setdefault(label, []).append(c)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, cs in lines.items():
        cs = sorted(cs, key=lambda c: 1 - c.density_mean)
        ax.errorbar([1 - c.density_mean for c in cs], [100 * c.acc_mean for c in cs],
                    yerr=[100 * c.acc_std for c in cs], marker="o", capsize=3, label=label)
    ax.set_xlabel("sparsity (1 − measured density)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=8)
    ax.set_title(title or "accuracy against sparsity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@attrs.frozen
class SweepResult:
    rows: tuple[dict, ...]
    cells: tuple[Cell, ...]
    csv: Path
    summary_csv: Path
    markdown: Path
    plot: Path

    @property
    def failed(self) -> int:
        return sum(r["status"] != "ok" for r in self.rows)


def sweep(configs: Sequence[str], grid_options: Sequence[str] = (), *, seeds: int = 1,
          seed_start: int = 0, out: str | Path = "sweep", jobs: int = 1, fixed: Sequence[str] = (),
          rerun: bool = False, echo=print) -> SweepResult:
    """Run the sweep and write its tables and plot (see the module docstring). Configs are
    checked against the catalogue every run will load (built-ins and installed plugins)."""
    from sparsefw.plugins import load_catalogue

    if not configs:
        raise ConfigError(["sweep: give at least one CONFIG"])
    if seeds < 1:
        raise ConfigError([f"--seeds must be at least 1, got {seeds}"])
    for c in configs:
        if not Path(c).is_file():
            raise ConfigError([f"{c}: file not found"])
    out = Path(out)
    grid = parse_grid(grid_options)
    seed_list = list(range(seed_start, seed_start + seeds))
    specs = plan(configs, grid, seed_list, out, fixed)
    validate(specs, load_catalogue().registry)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({
        "configs": list(configs), "grid": grid, "seeds": seed_list, "set": list(fixed),
        "methods": method_names(configs), "runs": [s.to_json() for s in specs]}, indent=2))
    echo(f"sweep: {len(configs)} method(s) × {len(grid_points(grid))} grid point(s) × "
         f"{seeds} seed(s) = {len(specs)} runs -> {out}")
    rows = run_all(specs, jobs=jobs, rerun=rerun, log_dir=out / "workers", echo=echo)

    keys = [k for k, _ in grid]
    methods = method_names(configs)
    points = grid_points(grid)
    cells = summarise(rows, methods, points)
    paths = (out / "results.csv", out / "summary.csv", out / "results.md",
             out / "accuracy_vs_sparsity.png")
    write_csv(rows, keys, paths[0])
    write_summary_csv(cells, keys, paths[1])
    table = markdown_table(cells, methods, points, seeds)
    paths[2].write_text(f"# Sweep {out.name}\n\n{table}\n\n"
                        f"![accuracy against sparsity]({paths[3].name})\n")
    plot(cells, paths[3])
    return SweepResult(tuple(rows), tuple(cells), *paths)


# ------------------------------------------------------------------------------ CLI
def cmd_sweep(args) -> int:
    out = args.out or f"sweeps/sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    result = sweep(args.configs, args.grid or (), seeds=args.seeds, seed_start=args.seed_start,
                   out=out, jobs=args.jobs, fixed=args.set or (), rerun=args.rerun)
    print()
    print(result.markdown.read_text().split("\n", 2)[2].split("\n![")[0].strip())
    print(f"\nresults: {result.csv}\nsummary: {result.summary_csv}\ntable:   {result.markdown}"
          f"\nplot:    {result.plot}")
    if result.failed:
        print(f"sparsefw: {result.failed} run(s) failed; see their train.log", file=sys.stderr)
        return 1
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="run methods × a grid of settings × seeds; CSV, Markdown table and plot",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="one TOML config per method")
    p.add_argument("--grid", action="append", metavar="SECTION.KEY=V1,V2",
                   help="a grid axis (repeatable; the grid is their product)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per grid point (default 1)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a value in every run (repeatable)")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes running trainings at once (default 1)")
    p.add_argument("--out", metavar="DIR", help="sweep directory (default sweeps/sweep-<time>)")
    p.add_argument("--rerun", action="store_true", help="run again even finished runs")
    p.set_defaults(func=cmd_sweep)
