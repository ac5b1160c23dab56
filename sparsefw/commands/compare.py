"""``sparsefw compare SWEEP_DIR --base METHOD``: every method of a sweep against a base method,
seed by seed, at equal epochs and at equal compute.

For each grid point and method, over the seeds that finished (a seed is *paired* when the base
ran it too; ``s`` is the sample standard deviation, ``t`` Student's quantile, see
:mod:`sparsefw.stats`):

* **acc**: final test accuracy, mean ± std;
* **Δ epochs**: at equal epochs — both runs' accuracy at the smaller of their two lengths in
  epochs, read off their evaluation curves (linear between evaluations) — the paired difference
  method − base: mean, the ``--level`` t-interval ``mean ± t · s/√n`` and ``k/n``, the seeds
  whose difference has the mean's sign;
* **Δ compute**: the same at equal compute (``--compute passes``: training forward + backward
  passes; ``flops``: the effective-sparse FLOP estimate of :mod:`sparsefw.cost`). The run that
  cost more is read part-way along its curve, before its schedule ended;
* **compute**: the method's mean final compute over the base's, and its mean CPU seconds;
* **to base final**: the first evaluation at which a run reaches the base's final accuracy of
  the same seed, in epochs and in compute (mean over the seeds that reach it, ``k/n`` reached),
  and its change against the base reaching its own final accuracy.

Writes ``compare.md`` (the tables) and ``compare_<point>.png`` (accuracy against epochs and
against compute, one line per method — the mean over seeds — and the seeds' range shaded)
into ``SWEEP_DIR`` (or ``--out``); prints the tables. Needs no torch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import attrs

from sparsefw.config import ConfigError
from sparsefw.cost import CostPoint, cost_curve
from sparsefw.stats import Paired, interpolate, mean_std, paired

COMPUTE_AXES = ("passes", "flops")
_LABELS = {"passes": "training passes (forward + backward)",
           "flops": "FLOPs (effective-sparse estimate)"}


@attrs.frozen
class Run:
    """One finished run of the sweep: its result row and its cost curve."""

    method: str
    point: tuple[tuple[str, str], ...]
    seed: int
    row: dict
    curve: tuple[CostPoint, ...]

    def xs(self, axis: str) -> list[float]:
        """The curve's x values: ``"epochs"``, ``"passes"`` or ``"flops"``."""
        if axis == "epochs":
            return [p.epochs for p in self.curve]
        if axis == "passes":
            return [float(p.passes) for p in self.curve]
        return [p.flops_sparse for p in self.curve]

    @property
    def accs(self) -> list[float]:
        return [p.acc for p in self.curve]

    def at(self, axis: str, x: float) -> float:
        """Test accuracy at ``x`` on ``axis`` (NaN outside the curve)."""
        return interpolate(self.xs(axis), self.accs, x)

    def end(self, axis: str) -> float:
        return self.xs(axis)[-1]

    def reaches(self, axis: str, target: float) -> float:
        """x of the first evaluation with accuracy ≥ ``target`` (NaN if none)."""
        return next((x for x, a in zip(self.xs(axis), self.accs, strict=True) if a >= target),
                    math.nan)


def load_runs(sweep_dir: str | Path) -> tuple[dict, list[Run]]:
    """The sweep's ``sweep.json`` and every finished run with a cost curve."""
    from sparsefw.commands.report import read_metrics

    sweep_dir = Path(sweep_dir)
    plan_path = sweep_dir / "sweep.json"
    if not plan_path.exists():
        raise FileNotFoundError(f"{sweep_dir}: no sweep.json (not a sweep directory)")
    plan = json.loads(plan_path.read_text())
    runs = []
    for spec in plan["runs"]:
        # DIR/runs/<method>/<point>/seed<k>, found under sweep_dir wherever the sweep ran
        run_dir = sweep_dir.joinpath(*Path(spec["run_dir"]).parts[-4:])
        path = run_dir / "result.json"
        if not path.exists():
            continue
        row = json.loads(path.read_text())
        if row.get("status") != "ok":
            continue
        if "layer_flops" not in row:
            raise ConfigError([f"{path}: no cost fields: the run is from an older sparsefw "
                               "(run the sweep again with --rerun) or its cost estimate failed "
                               "(see its train.log)"])
        _, evals = read_metrics(run_dir)
        curve = cost_curve(evals, row["layer_flops"], batch_size=row["batch_size"],
                           steps_per_epoch=row["steps_per_epoch"])
        if curve:
            runs.append(Run(spec["method"], tuple(tuple(p) for p in spec["point"]),
                            spec["seed"], row, tuple(curve)))
    return plan, runs


@attrs.frozen
class Comparison:
    """One method at one grid point against the base."""

    method: str
    point: tuple[tuple[str, str], ...]
    n: int
    acc_mean: float
    acc_std: float
    equal_epochs: Paired
    equal_compute: Paired
    #: mean final compute of the method over the base's, mean CPU seconds per run
    compute_ratio: float
    cpu_s: float
    #: to the base's final accuracy: mean epochs / compute over the seeds that reach it, how
    #: many reach it, and the relative change against the base on those seeds
    epochs_to: float
    compute_to: float
    reached: int
    epochs_to_change: float
    compute_to_change: float


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def compare_cell(runs: Sequence[Run], base: Sequence[Run], compute: str = "passes",
                 level: float = 0.95) -> Comparison:
    """``runs`` (one method, one point) against ``base`` (the base's runs at that point)."""
    mine = {r.seed: r for r in runs}
    ref = {r.seed: r for r in base}
    seeds = sorted(set(mine) & set(ref))

    def at_equal(axis: str) -> Paired:
        a, b = {}, {}
        for s in seeds:
            x = min(mine[s].end(axis), ref[s].end(axis))
            a[s], b[s] = mine[s].at(axis, x), ref[s].at(axis, x)
        return paired(a, b, level)

    def to_base_final(axis: str) -> tuple[float, float, int]:
        reach = {s: mine[s].reaches(axis, ref[s].accs[-1]) for s in seeds}
        ok = [s for s in seeds if not math.isnan(reach[s])]
        own = _mean([ref[s].reaches(axis, ref[s].accs[-1]) for s in ok])
        value = _mean([reach[s] for s in ok])
        return value, (value / own - 1 if ok and own > 0 else math.nan), len(ok)

    finals = [r.accs[-1] for r in runs]
    acc_mean, acc_std = mean_std(finals) if finals else (math.nan, math.nan)
    base_compute = _mean([r.end(compute) for r in base])
    epochs_to, epochs_change, reached = to_base_final("epochs")
    compute_to, compute_change, _ = to_base_final(compute)
    first = runs[0] if runs else None
    return Comparison(
        method=first.method if first else "", point=first.point if first else (), n=len(runs),
        acc_mean=acc_mean, acc_std=acc_std, equal_epochs=at_equal("epochs"),
        equal_compute=at_equal(compute),
        compute_ratio=_mean([r.end(compute) for r in runs]) / base_compute
        if base_compute else math.nan,
        cpu_s=_mean([float(r.row.get("cpu_s") or math.nan) for r in runs]),
        epochs_to=epochs_to, compute_to=compute_to, reached=reached,
        epochs_to_change=epochs_change, compute_to_change=compute_change,
    )


def compare(plan: dict, runs: Sequence[Run], base: str, compute: str = "passes",
            level: float = 0.95) -> dict[tuple, list[Comparison]]:
    """Per grid point (in the sweep's order), one :class:`Comparison` per method that has
    finished runs there (in the sweep's method order, the base first)."""
    methods = plan["methods"]
    if base not in methods:
        raise ConfigError([f"--base {base!r} is not a method of this sweep; choices: "
                           f"{', '.join(methods)}"])
    if compute not in COMPUTE_AXES:
        raise ConfigError([f"--compute {compute!r}: choose one of {', '.join(COMPUTE_AXES)}"])
    points: list[tuple] = []
    for spec in plan["runs"]:
        point = tuple(tuple(p) for p in spec["point"])
        if point not in points:
            points.append(point)
    out: dict[tuple, list[Comparison]] = {}
    for point in points:
        base_runs = [r for r in runs if r.method == base and r.point == point]
        rows = []
        for method in [base, *(m for m in methods if m != base)]:
            mine = [r for r in runs if r.method == method and r.point == point]
            if mine:
                rows.append(compare_cell(mine, base_runs, compute, level))
        out[point] = rows
    return out


# ------------------------------------------------------------------------------ output
def _fmt(value: float, spec: str, suffix: str = "") -> str:
    return "-" if math.isnan(value) else f"{value:{spec}}{suffix}"


def _compute_fmt(value: float, axis: str) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.3g}" if axis == "flops" else f"{value:,.0f}"


def _point_label(point) -> str:
    return ",".join(f"{k}={v}" for k, v in point) or "default"


def markdown(results: dict[tuple, list[Comparison]], base: str, compute: str,
             level: float) -> str:
    """One table per grid point (see the module docstring for the columns)."""
    pct = f"{100 * level:g}%"
    lines = [
        f"Paired against `{base}` seed by seed: Δ = method − base in accuracy points, "
        f"mean [{pct} t-interval] and the seeds with the mean's sign. Equal compute: "
        f"{_LABELS[compute]}. *To base final*: the first evaluation reaching the base's final "
        "accuracy (same seed), mean over the seeds that reach it, and its change against the "
        "base reaching its own. `-`: no paired value (at equal compute: the costlier run had "
        "not reached its first evaluation when the other run ended).", ""]
    for point, rows in results.items():
        lines += [f"### {_point_label(point)}", "",
                  "| method | n | test acc (%) | Δ equal epochs | Δ equal compute | "
                  "compute ×base | CPU s/run | epochs to base final | "
                  "compute to base final |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in rows:
            is_base = c.method == base
            reached = f" ({c.reached}/{c.equal_epochs.n})" if c.reached != c.equal_epochs.n \
                else ""
            change = ("" if is_base or math.isnan(c.epochs_to_change)
                      else f" ({100 * c.epochs_to_change:+.0f}%)")
            cchange = ("" if is_base or math.isnan(c.compute_to_change)
                       else f" ({100 * c.compute_to_change:+.0f}%)")
            lines.append(
                f"| {c.method}{' (base)' if is_base else ''} | {c.n} | "
                f"{_fmt(100 * c.acc_mean, '.2f')} ± {_fmt(100 * c.acc_std, '.2f')} | "
                f"{'' if is_base else c.equal_epochs.text()} | "
                f"{'' if is_base else c.equal_compute.text()} | "
                f"{_fmt(c.compute_ratio, '.2f', '×')} | {_fmt(c.cpu_s, '.1f')} | "
                f"{_fmt(c.epochs_to, '.1f')}{change}{reached} | "
                f"{_compute_fmt(c.compute_to, compute)}{cchange}{reached} |")
        lines.append("")
    return "\n".join(lines)


def _band(runs: Sequence[Run], axis: str) -> tuple[list[float], list[float], list[float],
                                                    list[float]]:
    """x grid (where every seed has a curve), and the mean, min and max over seeds."""
    lo = max(r.xs(axis)[0] for r in runs)
    hi = min(r.end(axis) for r in runs)
    xs = sorted({x for r in runs for x in r.xs(axis) if lo <= x <= hi})
    ys = [[r.at(axis, x) for r in runs] for x in xs]
    return xs, [sum(y) / len(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def plot_point(runs: Sequence[Run], methods: Sequence[str], compute: str, path: Path,
               title: str) -> None:
    """Accuracy against epochs (left) and compute (right): per method the mean over seeds,
    the seeds' min–max range shaded."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, axis, label in ((axes[0], "epochs", "epochs"), (axes[1], compute, _LABELS[compute])):
        for method in methods:
            mine = [r for r in runs if r.method == method]
            if not mine:
                continue
            xs, mean, low, high = _band(mine, axis)
            (line,) = ax.plot(xs, [100 * y for y in mean], label=method)
            if len(mine) > 1:
                ax.fill_between(xs, [100 * y for y in low], [100 * y for y in high],
                                color=line.get_color(), alpha=0.2)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_name(point) -> str:
    """``compare_<point>.png`` with the point made file-name safe."""
    return "compare_" + (re.sub(r"[^A-Za-z0-9._=,+-]+", "-", _point_label(point)).strip("-")
                         or "x") + ".png"


@attrs.frozen
class CompareResult:
    markdown: Path
    figures: tuple[Path, ...]
    results: dict


def run_compare(sweep_dir: str | Path, base: str, *, compute: str = "passes",
                level: float = 0.95, out: str | Path | None = None,
                plots: bool = True) -> CompareResult:
    """Compare a sweep's methods with ``base``; write ``compare.md`` and the figures."""
    if not 0 < level < 1:
        raise ConfigError([f"--level must be in (0, 1), got {level}"])
    plan, runs = load_runs(sweep_dir)
    results = compare(plan, runs, base, compute, level)
    out = Path(out) if out is not None else Path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if plots:
        for point in results:
            path = out / plot_name(point)
            plot_point([r for r in runs if r.point == point], plan["methods"], compute, path,
                       f"{_point_label(point)} (base {base})")
            figures.append(path)
    text = markdown(results, base, compute, level)
    md = out / "compare.md"
    images = "".join(f"![{p.stem}]({p.name})\n\n" for p in figures)
    md.write_text(f"# Compared with {base}: {Path(sweep_dir).name}\n\n{text}\n{images}")
    return CompareResult(md, tuple(figures), results)


# ------------------------------------------------------------------------------ CLI
def cmd_compare(args) -> int:
    result = run_compare(args.sweep_dir, args.base, compute=args.compute, level=args.level,
                         out=args.out, plots=not args.no_plots)
    print(markdown(result.results, args.base, args.compute, args.level))
    print(f"table: {result.markdown}")
    for path in result.figures:
        print(f"plot:  {path}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="a sweep's methods against a base, seed by seed: paired differences "
                        "with CIs at equal epochs and equal compute, cost, plots",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("sweep_dir", metavar="SWEEP_DIR")
    p.add_argument("--base", required=True, metavar="METHOD",
                   help="the method the others are compared with (a config stem of the sweep)")
    p.add_argument("--compute", choices=COMPUTE_AXES, default="passes",
                   help="the compute axis (default: passes)")
    p.add_argument("--level", type=float, default=0.95,
                   help="confidence level of the intervals (default 0.95)")
    p.add_argument("--out", metavar="DIR", help="write here instead of SWEEP_DIR")
    p.add_argument("--no-plots", action="store_true", help="write the table only")
    p.set_defaults(func=cmd_compare)
