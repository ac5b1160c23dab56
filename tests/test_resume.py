"""Checkpoints: kill-and-resume reproduces the uninterrupted run bit for bit (CPU), and a
checkpoint is never left half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sparsefw.engine import Trainer, checkpoint
from sparsefw.testing.resume import assert_same_run, interrupted_and_resumed


@pytest.mark.parametrize("kill_at", [5, 8])  # mid-epoch, and right at an epoch boundary
def test_kill_and_resume_is_bit_identical(catalogue, make_config, tmp_path, kill_at):
    cfg, raw = make_config(train={"epochs": 3, "checkpoint_every": 1})
    full, resumed = interrupted_and_resumed(cfg, raw, catalogue, tmp_path, kill_at)
    assert resumed.state.step == full.state.step
    assert_same_run(full, resumed)
    # the metrics file reads as the uninterrupted run's
    def lines(d):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    assert lines(tmp_path / "cut") == lines(tmp_path / "full")


def test_resume_restores_optimizer_schedule_and_rng(catalogue, make_config, tmp_path):
    cfg, raw = make_config(train={"epochs": 1})
    a = Trainer(cfg, catalogue, run_dir=tmp_path / "a", raw_config=raw)
    a.fit()
    b = Trainer(cfg, catalogue, run_dir=tmp_path / "b", raw_config=raw)
    b.load_checkpoint(tmp_path / "a" / checkpoint.CHECKPOINT)
    assert b.state.step == a.state.step
    assert b.lr_schedule.state_dict() == a.lr_schedule.state_dict()
    assert torch.equal(b.state.generator.get_state(), a.state.generator.get_state())
    pa = a.optimizer.state_dict()["state"]
    pb = b.optimizer.state_dict()["state"]
    assert all(torch.equal(pa[k]["momentum_buffer"], pb[k]["momentum_buffer"]) for k in pa)


def test_failed_write_leaves_the_old_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"step": 1})

    def half_then_crash(f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoint.atomic_write(path, half_then_crash)
    assert checkpoint.load(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


def test_sigkill_during_training_leaves_a_loadable_checkpoint(tmp_path):
    """A real kill -9 of a training process: whatever it had written loads, and resume ends
    the run."""
    config = tmp_path / "run.toml"
    config.write_text(
        "[train]\nepochs = 200\nbatch_size = 16\ncheckpoint_every = 1\ndevice = 'cpu'\n"
        "[data]\nname = 'synthetic'\nn_train = 64\nn_test = 32\n"
        "[model]\nname = 'mlp'\nhidden = [64]\n[sparsity]\ndensity = 0.3\n"
        "[logging]\nobservers = ['jsonl']\n"
    )
    run_dir = tmp_path / "run"
    env = dict(os.environ, SPARSEFW_DISABLE_PLUGIN_AUTOLOAD="1")
    log = tmp_path / "stderr.txt"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sparsefw.cli", "train", str(config), "--run-dir",
             str(run_dir)],
            env=env, stdout=subprocess.DEVNULL, stderr=err,
        )
    ckpt = run_dir / checkpoint.CHECKPOINT
    written = (ckpt, run_dir / checkpoint.PREVIOUS)
    deadline = time.monotonic() + 180  # a loaded 2-core machine starts torch slowly
    while (time.monotonic() < deadline and proc.poll() is None
           and not any(p.exists() for p in written)):
        time.sleep(0.05)
    rc = proc.poll()
    assert rc in (None, 0), f"training failed (exit {rc}): {log.read_text()[-2000:]}"
    time.sleep(0.3)  # let it write a few more checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # a kill between the two renames of a write leaves the previous checkpoint alone, which a
    # resume reads (docs/reliability.md); one of the two is always there and complete
    assert any(p.exists() for p in written), "no checkpoint written before the kill"
    payload = checkpoint.load(checkpoint.resume_path(run_dir))
    assert payload["step"] >= 1
    # every line of metrics.jsonl but a cut last one parses, and resume drops the cut line
    from sparsefw.cli import main

    assert main(["train", "--resume", str(run_dir)]) == 0
    final = checkpoint.load(ckpt)
    assert final["step"] == 200 * 4
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
