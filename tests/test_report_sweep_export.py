"""``sparsefw report``, ``sparsefw sweep`` and ``sparsefw export`` on tiny runs on the embedded
digits data."""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsefw import cli
from sparsefw import config as config_mod
from sparsefw.commands import export, report, sweep
from sparsefw.engine import train
from sparsefw.plugins import load_catalogue

EXAMPLE_SRC = Path(__file__).resolve().parent.parent / "examples" / "sparsefw-example" / "src"
if str(EXAMPLE_SRC) not in sys.path:
    sys.path.insert(0, str(EXAMPLE_SRC))
import sparsefw_example.plugin as example_plugin  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"

TINY_DIGITS = """
seed = 0
[train]
epochs = {epochs}
batch_size = 64
eval_batch_size = 256
log_every = 1
device = "cpu"
{max_steps}
[data]
name = "digits"
[model]
name = "mlp"
hidden = [32]
[optimizer]
lr = 0.1
[sparsity]
density = 0.2
[logging]
observers = {observers}
{method}
"""
REWIRE = """
[topology_update]
name = "random_rewire"
every = 4
end = 1.0
drop_fraction = 0.3
"""
STATIC = """
[topology_update]
name = "static"
"""
SET = """
[topology_update]
name = "set"
every = 4
end = 1.0
"""


def write_config(path: Path, method: str, *, epochs: int = 2, max_steps: int | None = None,
                 observers: str = '["jsonl"]') -> Path:
    path.write_text(TINY_DIGITS.format(
        epochs=epochs, method=method, observers=observers,
        max_steps=f"max_steps = {max_steps}" if max_steps else ""))
    return path


@pytest.fixture(scope="module")
def catalogue():
    """Built-ins plus the example plugin (registered directly, no install needed)."""
    return load_catalogue(autoload=False, extra=[("example", example_plugin)])


@pytest.fixture(scope="module")
def run(tmp_path_factory, catalogue):
    """A 2-epoch run (44 steps) with random rewiring every 4 steps, logging every step."""
    tmp = tmp_path_factory.mktemp("run")
    cfg_path = write_config(tmp / "rewire.toml", REWIRE, observers='["jsonl", "tensorboard"]')
    cfg, raw = config_mod.load(cfg_path, catalogue.registry)
    trainer, metrics = train(cfg, catalogue, run_dir=tmp / "run", raw_config=raw,
                             config_source=str(cfg_path))
    return tmp / "run", trainer, metrics


# ------------------------------------------------------------------------------ report
def test_report_table_curves_heatmap_and_tensorboard(run, tmp_path):
    run_dir, trainer, metrics = run
    rep = report.make_report(run_dir, tmp_path / "rep")
    assert rep.markdown.exists()
    for fig in rep.figures:
        assert fig.read_bytes()[:8] == PNG and fig.stat().st_size > 5000
    masks = trainer.masks.masks
    assert [r.name for r in rep.rows] == list(masks)
    train_records, evals = report.read_metrics(run_dir)
    for row in rep.rows:
        assert row.active == int(masks[row.name].sum()) == trainer.masks.targets[row.name]
        assert row.shape == tuple(masks[row.name].shape)
        logged = sum(r.get(f"topology/dropped/{row.name}", 0) for r in train_records)
        assert row.dropped == row.grown == logged > 0
    text = rep.markdown.read_text()
    assert "| **total** |" in text and "random_rewire" in text
    assert f"{metrics['test/acc']:.4f}" in text
    assert rep.final["step"] == metrics["step"] == evals[-1]["step"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()["images"]
    assert "report/density_heatmap" in tags and "report/curves" in tags
    assert "test/acc" in acc.Tags()["scalars"]


def test_density_matrix_has_one_column_per_evaluation(run):
    run_dir, trainer, _ = run
    _, evals = report.read_metrics(run_dir)
    steps, rows = report.density_matrix(evals, trainer.masks.names)
    assert steps == [r["step"] for r in evals] and len(rows) == len(trainer.masks.names)
    assert all(len(r) == len(steps) for r in rows)


def test_report_cli(run, tmp_path, capsys):
    run_dir, _, _ = run
    assert cli.main(["report", str(run_dir), "--out", str(tmp_path / "r"),
                     "--no-tensorboard"]) == 0
    out = capsys.readouterr().out
    assert "| layer | shape |" in out and (tmp_path / "r" / "report.md").exists()
    assert cli.main(["report", str(tmp_path / "nope")]) == 2


# ------------------------------------------------------------------------------ export
def plain_mlp() -> nn.Module:
    """The run's architecture written out with torch only (same module indices as sparsefw's
    MLP, so the same state-dict keys)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(inplace=True), nn.Linear(32, 10))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def test_exported_model_loads_into_plain_model_with_same_accuracy(run, tmp_path):
    from sparsefw.data import DigitsConfig, digits

    run_dir, trainer, metrics = run
    result = export.export_run(run_dir, tmp_path / "model.pt")
    state = torch.load(result.path, weights_only=True)  # plain tensors only
    assert list(state) == list(trainer.model.state_dict())
    masks = torch.load(result.masks_path, weights_only=True)
    assert set(masks) == set(trainer.masks.names)
    for name, m in masks.items():
        assert m.dtype == torch.bool and torch.all(state[name][~m] == 0)
    model = plain_mlp()
    model.load_state_dict(state)  # strict
    test = digits(DigitsConfig()).test
    x, y = test.tensors
    assert accuracy(model, x, y) == pytest.approx(metrics["test/acc"], abs=1e-12)
    meta = json.loads(result.meta_path.read_text())
    assert meta["model"]["name"] == "mlp" and meta["density"] == pytest.approx(metrics["density"])


def _docstring_decoder():
    """The decoder exactly as ``unpack_sparse``'s docstring gives it (no sparsefw): run the
    documented code itself, so the docs cannot drift from the format."""
    doc = export.unpack_sparse.__doc__
    code = textwrap.dedent(doc.split("copyable::", 1)[1].split('"""')[0]).strip()
    scope: dict = {}
    exec(code, scope)
    return scope["unpack"]


copied_unpack = _docstring_decoder()


def test_sparse_export_round_trips_and_is_smaller(run, tmp_path, capsys):
    run_dir, _, _ = run
    dense = export.export_run(run_dir, tmp_path / "d.pt")
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "s.pt"), "--sparse"]) == 0
    assert "bitmask + values" in capsys.readouterr().out
    payload = torch.load(tmp_path / "s.pt", weights_only=True)
    ref = torch.load(dense.path, weights_only=True)
    for unpacked in (export.unpack_sparse(payload), copied_unpack(payload)):
        assert list(unpacked) == list(ref)
        for k in ref:
            assert torch.equal(unpacked[k], ref[k]), k
    assert (tmp_path / "s.pt").stat().st_size < 0.5 * dense.path.stat().st_size


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (4, 3, 3, 3)])
def test_pack_bits_inverts(shape):
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) < 0.4
    packed = export.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(export.unpack_bits(packed, shape), mask)


# ------------------------------------------------------------------------------ sweep
def test_sweep_two_methods_two_sparsities_two_seeds(tmp_path):
    # the worker processes load the installed catalogue, as `sparsefw train` would: built-ins
    static = write_config(tmp_path / "static.toml", STATIC, epochs=1, max_steps=8)
    rewire = write_config(tmp_path / "rewire.toml", SET, epochs=1, max_steps=8)
    out = tmp_path / "sweep"
    lines: list[str] = []
    result = sweep.sweep([str(static), str(rewire)], ["sparsity.density=0.1,0.3"], seeds=2,
                         out=out, echo=lines.append)
    assert result.failed == 0 and len(result.rows) == 8

    with open(result.csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert {(r["method"], r["sparsity.density"], r["seed"]) for r in rows} == {
        (m, d, s) for m in ("static", "rewire") for d in ("0.1", "0.3") for s in ("0", "1")}
    assert all(r["status"] == "ok" and 0 <= float(r["test/acc"]) <= 1 for r in rows)
    for r in rows:  # measured density is the configured one
        assert float(r["density"]) == pytest.approx(float(r["sparsity.density"]), abs=2e-3)
        assert Path(r["run_dir"], "checkpoint.pt").exists()

    with open(result.summary_csv) as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 4 and all(s["n"] == "2" for s in summary)
    cell = next(s for s in summary if s["method"] == "static" and s["sparsity.density"] == "0.3")
    accs = [float(r["test/acc"]) for r in rows
            if r["method"] == "static" and r["sparsity.density"] == "0.3"]
    assert float(cell["acc_mean"]) == pytest.approx(sum(accs) / 2, abs=1e-6)

    md = result.markdown.read_text()
    assert "| method | sparsity.density=0.1 | sparsity.density=0.3 |" in md
    for method in ("static", "rewire"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {method} |"))
        assert row.count("±") == 2
    assert result.plot.read_bytes()[:8] == PNG

    # a second call finds every run finished and only re-tabulates
    lines.clear()
    again = sweep.sweep([str(static), str(rewire)], ["sparsity.density=0.1,0.3"], seeds=2,
                        out=out, echo=lines.append)
    assert any("8 of 8 runs already finished" in x for x in lines)
    assert [r["test/acc"] for r in again.rows] == [r["test/acc"] for r in result.rows]


@pytest.mark.slow  # starts two Python processes
def test_sweep_cli_with_parallel_jobs(tmp_path, capsys):
    static = write_config(tmp_path / "static.toml", STATIC, epochs=1, max_steps=4)
    out = tmp_path / "sw"
    assert cli.main(["sweep", str(static), "--grid", "sparsity.density=0.2", "--seeds", "2",
                     "--jobs", "2", "--out", str(out), "--set", "train.log_every=2"]) == 0
    text = capsys.readouterr().out
    assert "| static |" in text and "±" in text
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert (out / "runs" / "static" / "sparsity.density=0.2" / "seed1" / "train.log").exists()


def test_sweep_reports_every_config_problem_before_running(tmp_path, capsys):
    static = write_config(tmp_path / "static.toml", STATIC, epochs=1, max_steps=4)
    rc = cli.main(["sweep", str(static), "--grid", "sparsity.densty=0.1", "--grid",
                   "optimizer.lr=-1,0.1", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and "densty" in err and "lr must be" in err
    assert not (tmp_path / "bad" / "runs").exists()


def test_commands_are_registered(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in ("report", "sweep", "export"):
        assert name in out


def test_grid_parsing():
    assert sweep.split_values("0.1, 0.02") == ["0.1", "0.02"]
    assert sweep.split_values("[8,8],[16]") == ["[8,8]", "[16]"]
    assert sweep.split_values('"a,b",c') == ['"a,b"', "c"]
    grid = sweep.parse_grid(["sparsity.density=0.1,0.02", "model.hidden=[8,8],[16]"])
    points = sweep.grid_points(grid)
    assert len(points) == 4 and points[1] == (("sparsity.density", "0.1"),
                                              ("model.hidden", "[16]"))
    assert sweep.point_label(()) == "default"
    with pytest.raises(config_mod.ConfigError, match="given twice"):
        sweep.parse_grid(["a.b=1", "a.b=2"])
    assert sweep.method_names(["x/set.toml", "y/set.toml", "z/rigl.toml"]) == [
        "x/set", "y/set", "rigl"]
