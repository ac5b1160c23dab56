"""``snfs`` (sparse momentum, arXiv 1907.04840) on the lifecycle's dense gradient momentum:
growth keeps moving after the first update, weights move between layers with the total kept,
and the dense momentum is exactly ``β·m + g`` and costs nothing unless a component asks."""

from __future__ import annotations

import pytest
import torch

from sparsefw import config as config_mod
from sparsefw.commands.report import read_metrics
from sparsefw.engine import Trainer
from sparsefw.testing.resume import assert_same_run, interrupted_and_resumed
from sparsefw.topology import reallocate

from .conftest import TINY, merge

RAW = merge(TINY, {
    "train": {"epochs": 3, "batch_size": 16},
    "data": {"n_train": 128},
    "model": {"hidden": [64, 32]},
    "sparsity": {"density": 0.3},
    "topology_update": {"name": "snfs", "every": 2, "end": 0.75},
})


def _trainer(catalogue, tmp_path, raw=RAW):
    cfg = config_mod.structure(raw, catalogue.registry)
    return Trainer(cfg, catalogue, run_dir=tmp_path, raw_config=raw)


def test_growth_moves_at_every_update_until_the_end(catalogue, tmp_path):
    trainer = _trainer(catalogue, tmp_path)
    changes = []

    def after(outcome, name, impls, kwargs):
        if name == "sparsefw_topology_update":
            change = outcome.get_result()
            changes.append((kwargs["state"].step, sum(int(v) for v in change.grown.values()),
                            sum(int(v) for v in change.dropped.values())))

    trainer.plugins.pm.add_hookcall_monitoring(lambda *a: None, after)
    totals = []
    original = trainer.sparsifier.update_topology

    def counting():
        skip = original()
        totals.append(int(trainer.masks.active_counts().sum()))
        return skip

    trainer.sparsifier.update_topology = counting
    trainer.fit()
    end = int(0.75 * trainer.state.total_steps)
    assert [s for s, _, _ in changes] == list(range(0, end, 2))
    # grown = positions inactive before the update that are active after it: never zero
    assert all(grown > 0 for _, grown, _ in changes), changes
    assert all(grown == dropped for _, grown, dropped in changes)
    assert len(set(totals)) == 1  # the global count is kept ...
    counts = trainer.masks.active_counts().tolist()
    assert counts != [trainer.masks.targets[n] for n in trainer.masks.names]  # ... moved between layers


def test_dense_momentum_is_beta_m_plus_the_dense_gradient(catalogue, tmp_path):
    trainer = _trainer(catalogue, tmp_path, merge(RAW, {"topology_update": {"every": 1000}}))
    trainer._init_masks()
    src = trainer.train_source.epoch(0)
    x, y = next(src)
    trainer.step(x, y)
    m1 = {n: t.clone() for n, t in trainer.state.dense_momentum.items()}
    name = trainer.masks.names[0]
    pruned = ~trainer.masks.masks[name]
    assert bool((m1[name][pruned] != 0).any())  # pruned entries see the dense gradient
    grads = {}
    p = trainer.masks.params[name]
    p.register_hook(lambda g: grads.setdefault("g", g.clone()))
    x, y = next(src)
    trainer.step(x, y)
    torch.testing.assert_close(trainer.state.dense_momentum[name], 0.9 * m1[name] + grads["g"],
                               rtol=0, atol=1e-7)


def test_no_dense_momentum_unless_asked(catalogue, tmp_path):
    trainer = _trainer(catalogue, tmp_path, merge(RAW, {"topology_update": {"name": "rigl"}}))
    trainer.fit()
    assert trainer.state.dense_momentum is None
    assert trainer.sparsifier.dense_momentum_beta is None
    assert "dense_grad" not in trainer.state.passes


def test_every_backward_is_counted_as_a_dense_gradient_read(catalogue, tmp_path):
    # the cost estimate charges SNFS a dense weight gradient per step (sparsefw.cost)
    raw = merge(RAW, {"logging": {"observers": ["jsonl"]}})
    trainer = _trainer(catalogue, tmp_path, raw)
    trainer.fit()
    assert trainer.state.passes["dense_grad"] == trainer.state.passes["backward"]
    _, evals = read_metrics(tmp_path)
    assert [r["passes/dense_grad"] for r in evals] == [r["passes/backward"] for r in evals]


def test_reallocate_takes_momentum_weights():
    assert reallocate(10, [0.5, 1.5], [100, 100]) == [3, 7]  # 2.5 / 7.5: tie to the first
    assert reallocate(4, [0.0, 0.0], [3, 3]) == [2, 2]


def test_kill_and_resume_is_bit_identical(catalogue, tmp_path):
    raw = merge(RAW, {"train": {"checkpoint_every": 1}})
    cfg = config_mod.structure(raw, catalogue.registry)
    full, resumed = interrupted_and_resumed(cfg, raw, catalogue, tmp_path, kill_at=7)
    assert_same_run(full, resumed)
    for n, t in full.state.dense_momentum.items():
        assert torch.equal(resumed.state.dense_momentum[n], t), n


@pytest.mark.parametrize("regrow", [True, False])
def test_masks_are_bool_and_pruned_weights_zero(catalogue, tmp_path, regrow):
    trainer = _trainer(catalogue, tmp_path,
                       merge(RAW, {"topology_update": {"regrow_dropped": regrow}}))
    trainer.fit()
    for n in trainer.masks.names:
        m = trainer.masks.masks[n]
        assert m.dtype == torch.bool
        assert bool((trainer.masks.params[n][~m] == 0).all())
