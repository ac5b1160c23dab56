"""Sweeps in long-lived worker processes: results equal lone ``sparsefw train`` runs bit for bit,
runs are queued round-robin by seed, and each run's cost (passes, FLOPs) is recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsefw.commands import compare, sweep
from sparsefw.commands.report import read_metrics
from sparsefw.cost import cost_curve, layer_flops
from sparsefw.engine import train
from sparsefw.workers import RunSpec

TINY = """
seed = 0
[train]
epochs = 2
batch_size = 64
eval_batch_size = 256
log_every = 5
device = "cpu"
max_steps = 30
[data]
name = "digits"
[model]
name = "mlp"
hidden = [32]
[sparsity]
density = 0.2
[logging]
observers = ["jsonl"]
[topology_update]
{topology}
"""
METHODS = {
    "static": 'name = "static"',
    "set": 'name = "set"\nevery = 4\nend = 1.0',
    "rigl": 'name = "rigl"\nevery = 5\nend = 1.0',
}


def _comparable(run_dir: Path) -> tuple[list[dict], dict]:
    """The evaluation records without timings, and the checkpoint's model and masks."""
    _, evals = read_metrics(run_dir)
    evals = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in evals]
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    return evals, {"model": ckpt["model"], "masks": ckpt["masks"]["masks"]}


@pytest.mark.slow  # two worker processes, then six lone `sparsefw train` processes
def test_sweep_runs_equal_lone_train_runs(tmp_path):
    configs = []
    for name, topology in METHODS.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(TINY.format(topology=topology))
        configs.append(str(path))
    out = tmp_path / "sweep"
    result = sweep.sweep(configs, ["sparsity.density=0.1,0.3"], seeds=1, out=out, jobs=2,
                         echo=lambda _: None)
    assert result.failed == 0 and len(result.rows) == 6
    # each worker ran several runs of different methods one after another
    assert len(list((out / "workers").glob("worker*.log"))) == 2

    # the thread count the workers ran with (results may depend on it)
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // 2)))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    lone = {}
    procs = []
    for row in result.rows:
        run_dir = tmp_path / "lone" / Path(row["run_dir"]).relative_to(out / "runs")
        lone[row["run_dir"]] = run_dir
        sets = [a for kv in (f"{k}={v}" for k, v in row["point"].items()) for a in ("--set", kv)]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "sparsefw.cli", "train", row["config"], *sets,
             "--set", f"seed={row['seed']}", "--run-dir", str(run_dir)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        if len(procs) == 2:
            assert all(p.wait() == 0 for p in procs)
            procs.clear()
    assert all(p.wait() == 0 for p in procs)

    for row in result.rows:
        swept_evals, swept = _comparable(Path(row["run_dir"]))
        lone_evals, alone = _comparable(lone[row["run_dir"]])
        assert swept_evals == lone_evals and len(swept_evals) == 2
        for part in ("model", "masks"):
            assert swept[part].keys() == alone[part].keys()
            for key in swept[part]:
                assert torch.equal(swept[part][key], alone[part][key]), (row["run_dir"], key)
        assert row["test/acc"] == lone_evals[-1]["test/acc"]

    # and the sweep compares: every method at both densities, costs from the recorded passes
    results = compare.run_compare(out, "static", plots=False).results
    assert [[c.method for c in rows] for rows in results.values()] == [list(METHODS)] * 2
    for rows in results.values():
        assert all(c.n == 1 and c.equal_epochs.n == 1 for c in rows)
        assert rows[0].compute_ratio == 1.0


def test_queue_is_round_robin_by_seed(tmp_path):
    specs = sweep.plan(["a.toml", "b.toml"], sweep.parse_grid(["x.y=1,2"]), [3, 4], tmp_path)
    order = [(specs[i].seed, specs[i].point[0][1], specs[i].method)
             for i in sweep.queue_order(specs)]
    assert order == [(3, "1", "a"), (3, "1", "b"), (3, "2", "a"), (3, "2", "b"),
                     (4, "1", "a"), (4, "1", "b"), (4, "2", "a"), (4, "2", "b")]


def test_run_spec_round_trips_through_json(tmp_path):
    spec = RunSpec("m", "c.toml", (("a.b", "1"),), 2, ("a.b=1", "seed=2"), str(tmp_path))
    assert RunSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


# ------------------------------------------------------------------------------ cost
def test_layer_flops_by_hand():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 4))
    flops = layer_flops(model, torch.zeros(1, 1, 5, 5))
    # conv: fan-in 1·3·3 = 9, output 2·3·3 = 18 elements: 2·9·18; linear: 2·18·4
    assert flops == {"0.weight": 324, "2.weight": 144}
    assert model.training


def test_cost_curve_by_hand():
    flops = {"a.weight": 100, "b.weight": 10}
    evals = [
        {"step": 4, "test/acc": 0.5, "passes/forward": 4, "passes/backward": 4,
         "density/a.weight": 0.5, "density/b.weight": 1.0},
        {"step": 6, "test/acc": 0.6},  # no pass counts: skipped
        {"step": 8, "test/acc": 0.7, "passes/forward": 10, "passes/backward": 8,
         "density/a.weight": 0.25, "density/b.weight": 1.0},
    ]
    curve = cost_curve(evals, flops, batch_size=2, steps_per_epoch=4)
    assert [p.step for p in curve] == [4, 8] and [p.epochs for p in curve] == [1.0, 2.0]
    # interval 1: (4 + 2·4)·2 = 24 sample-passes; dense 110, sparse 100·0.5 + 10 = 60 per sample
    assert (curve[0].flops_dense, curve[0].flops_sparse) == (24 * 110, 24 * 60)
    # interval 2: (6 + 2·4)·2 = 28; sparse 100·0.25 + 10 = 35 per sample
    assert (curve[1].flops_dense, curve[1].flops_sparse) == (52 * 110, 24 * 60 + 28 * 35)
    assert (curve[1].passes, curve[1].acc) == (18, 0.7)


def test_cost_curve_charges_dense_weight_gradients_by_hand():
    # SNFS reads dense weight gradients at every step: each such backward pays its
    # weight-gradient half at full density (RigL appendix H: 2·f_S + f_D per backward)
    flops = {"a.weight": 100, "b.weight": 10}
    evals = [
        {"step": 4, "test/acc": 0.5, "passes/forward": 4, "passes/backward": 4,
         "passes/dense_grad": 4, "density/a.weight": 0.5, "density/b.weight": 1.0},
        {"step": 8, "test/acc": 0.7, "passes/forward": 8, "passes/backward": 8,
         "passes/dense_grad": 6, "density/a.weight": 0.25, "density/b.weight": 1.0},
    ]
    curve = cost_curve(evals, flops, batch_size=2, steps_per_epoch=4)
    # interval 1: 24 sample-passes at 60 (sparse) + 4 dense reads · 2 samples · (110 - 60)
    assert curve[0].flops_sparse == 24 * 60 + 8 * 50
    # interval 2: 24 at 35 + 2 dense reads · 2 · (110 - 35); the dense estimate is unchanged
    assert curve[1].flops_sparse == 24 * 60 + 8 * 50 + 24 * 35 + 4 * 75
    assert curve[1].flops_dense == 48 * 110


def test_jsonl_records_training_passes_apart_from_evaluation(make_config, catalogue, tmp_path):
    # TINY: 2 epochs of 4 steps; 32 test samples in one evaluation batch of 64
    cfg, raw = make_config()
    trainer, _ = train(cfg, catalogue, run_dir=tmp_path / "run", raw_config=raw)
    _, evals = read_metrics(tmp_path / "run")
    assert [(r["passes/forward"], r["passes/backward"], r["passes/eval_forward"])
            for r in evals] == [(4, 4, 1), (8, 8, 2)]
    assert trainer.state.passes == {"forward": 10, "backward": 8}
