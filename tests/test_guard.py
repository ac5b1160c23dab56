"""The divergence guard: a non-finite loss or gradient stops the run naming the step (or skips
the step, counted, with a limit); the last good checkpoint is never replaced by non-finite
weights; the CLI exits non-zero."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsefw.cli import main
from sparsefw.engine import Trainer, checkpoint
from sparsefw.engine.guard import Diverged, DivergenceGuard, _all_finite


# ------------------------------------------------------------------------------ by hand
def _params(*grads):
    out = []
    for g in grads:
        p = torch.zeros(len(g), requires_grad=True)
        p.grad = torch.tensor(g)
        out.append(p)
    return out


def test_stop_remembers_the_first_bad_step_and_what_it_was():
    guard = DivergenceGuard("stop", 0, 4, torch.device("cpu"))
    ok = _params([1.0, 2.0], [3.0])
    assert guard.after_backward(0, torch.tensor(0.5), ok) is False
    guard.check()  # nothing seen yet
    assert guard.after_backward(1, torch.tensor(math.nan), ok) is False
    assert guard.after_backward(2, torch.tensor(math.nan), ok) is False
    guard.poll(3)  # not the end of a logging window: no read
    with pytest.raises(Diverged, match="non-finite loss at step 1") as info:
        guard.poll(4)
    assert info.value.step == 1


def test_stop_reads_gradients_on_the_last_step_of_each_logging_window():
    # inside a window only the loss is read (a bad gradient shows in the next step's loss:
    # the update makes the weights non-finite); the window's last step reads the gradients too
    guard = DivergenceGuard("stop", 0, 4, torch.device("cpu"))
    bad = _params([1.0], [math.inf])
    assert guard.after_backward(1, torch.tensor(0.5), bad) is False
    guard.poll(4)  # step 1's gradients were not read
    assert guard.after_backward(7, torch.tensor(0.5), bad) is False
    with pytest.raises(Diverged, match="non-finite gradient at step 7"):
        guard.poll(8)


@pytest.mark.parametrize("loss, grads, what", [
    (math.nan, [1.0], "loss"), (1.0, [math.nan], "gradient"),
    (math.inf, [-math.inf], "loss and gradient"),
])
def test_what_was_non_finite_is_named(loss, grads, what):
    guard = DivergenceGuard("stop", 0, 1, torch.device("cpu"))
    guard.after_backward(7, torch.tensor(loss), _params(grads))
    with pytest.raises(Diverged, match=f"non-finite {what} at step 7"):
        guard.check()


def test_fp16_leaves_gradients_to_the_scaler():
    guard = DivergenceGuard("stop", 0, 1, torch.device("cpu"), gradients=False)
    guard.after_backward(0, torch.tensor(1.0), _params([math.inf]))
    guard.check()  # the scaler skips that step itself
    guard.after_backward(1, torch.tensor(math.nan), _params([1.0]))
    with pytest.raises(Diverged, match="loss at step 1"):
        guard.check()


def test_skip_counts_and_stops_past_the_limit():
    guard = DivergenceGuard("skip", 2, 1, torch.device("cpu"))
    bad = _params([math.nan])
    assert guard.after_backward(0, torch.tensor(1.0), _params([1.0])) is False
    assert guard.after_backward(1, torch.tensor(1.0), bad) is True
    assert guard.after_backward(2, torch.tensor(math.nan), _params([1.0])) is True
    assert guard.state_dict() == {"skipped": 2}
    with pytest.raises(Diverged, match="at step 3, the 3th step skipped"):
        guard.after_backward(3, torch.tensor(1.0), bad)


def test_non_finite_weights_are_never_checkpointed():
    guard = DivergenceGuard("stop", 0, 1, torch.device("cpu"))
    guard.check_weights(5, [torch.ones(3)])
    with pytest.raises(Diverged, match="non-finite weights after step 5"):
        guard.check_weights(5, [torch.ones(3), torch.tensor([0.0, math.inf])])


def test_large_finite_weights_are_checkpointed():
    """Float32 weights whose squares overflow (|w| > ~1.8e19, or many entries near 1e18) are
    finite: the norm pass alone would call them non-finite."""
    guard = DivergenceGuard("stop", 0, 1, torch.device("cpu"))
    guard.check_weights(5, [torch.ones(3), torch.tensor([3e19, -1e38]),
                            torch.full((1000,), 1e18)])
    with pytest.raises(Diverged, match="non-finite weights after step 5"):
        guard.check_weights(5, [torch.tensor([3e19, math.nan])])


#: float32 entries, large finite magnitudes (whose squares overflow) and non-finite ones often
_FLOAT32 = st.one_of(st.sampled_from([0.0, 1.0, 1e18, -3e19, 3.4e38, math.nan, math.inf,
                                      -math.inf]),
                     st.floats(width=32, allow_nan=True, allow_infinity=True))


@given(st.lists(st.lists(_FLOAT32, min_size=1, max_size=40), min_size=1, max_size=4))
def test_all_finite_is_exact(values):
    """Whatever the magnitudes (up to float32's largest), the weights check answers exactly
    "is every entry finite"."""
    tensors = [torch.tensor(v, dtype=torch.float32) for v in values]
    assert _all_finite(tensors) == all(bool(np.isfinite(v).all()) for v in values)


# ------------------------------------------------------------------------------ in a run
def _poison_at(trainer: Trainer, at: int, grads_only: bool = False) -> None:
    """Make step ``at`` non-finite: a NaN weight before it (loss and all later steps NaN),
    or, with ``grads_only``, NaN gradients in that one step."""
    original, backward = trainer.step, trainer.sparsifier.forward_backward

    def step(x, y):
        if trainer.state.step == at and not grads_only:
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = math.nan
        return original(x, y)

    def forward_backward(x, y, **kwargs):
        loss = backward(x, y, **kwargs)
        if trainer.state.step == at:
            for p in trainer.model.parameters():
                p.grad.fill_(math.nan)
        return loss

    trainer.step = step
    if grads_only:  # the step's own pass is the lifecycle's
        trainer.sparsifier.forward_backward = forward_backward


def test_nan_mid_run_stops_and_keeps_the_last_good_checkpoint(catalogue, make_config,
                                                             tmp_path):
    cfg, raw = make_config(train={"epochs": 3, "checkpoint_every": 1, "log_every": 3})
    trainer = Trainer(cfg, catalogue, run_dir=tmp_path, raw_config=raw)
    _poison_at(trainer, 6)
    with pytest.raises(Diverged, match="non-finite loss at step 6") as info:
        trainer.fit()
    assert info.value.step == 6
    good = checkpoint.load(tmp_path / checkpoint.CHECKPOINT)
    assert good["step"] == 6  # written after steps 0..5, before the bad one
    assert all(torch.isfinite(t).all() for t in good["model"].values())
    assert checkpoint.load(tmp_path / checkpoint.PREVIOUS)["step"] == 5


def test_detection_waits_for_the_logging_window_without_checkpoints(catalogue, make_config,
                                                                   tmp_path):
    cfg, raw = make_config(train={"epochs": 3, "log_every": 2})
    trainer = Trainer(cfg, catalogue, run_dir=tmp_path, raw_config=raw)
    _poison_at(trainer, 5)
    with pytest.raises(Diverged, match="at step 5"):
        trainer.fit()
    assert trainer.state.step == 6  # read at the end of the window 4..5
    assert checkpoint.load(tmp_path / checkpoint.CHECKPOINT)["step"] == 4  # epoch 1's


def test_skip_leaves_the_weights_of_a_bad_step_untouched(catalogue, make_config, tmp_path):
    cfg, raw = make_config(train={"epochs": 2, "on_nonfinite": "skip"})
    trainer = Trainer(cfg, catalogue, run_dir=tmp_path, raw_config=raw)
    _poison_at(trainer, 3, grads_only=True)
    seen = {}
    original = trainer.step

    def step(x, y):
        if trainer.state.step == 3:
            seen["before"] = [p.detach().clone() for p in trainer.model.parameters()]
        original(x, y)
        if trainer.state.step == 4:
            seen["after"] = [p.detach().clone() for p in trainer.model.parameters()]

    trainer.step = step
    trainer.fit()
    assert trainer.guard.skipped == 1 and trainer.state.step == 8
    assert all(torch.equal(a, b) for a, b in zip(seen["before"], seen["after"], strict=True))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert checkpoint.load(tmp_path / checkpoint.CHECKPOINT)["guard"] == {"skipped": 1}


def test_skip_with_no_allowance_stops(catalogue, make_config, tmp_path):
    cfg, raw = make_config(train={"on_nonfinite": "skip", "max_nonfinite_skips": 0})
    trainer = Trainer(cfg, catalogue, run_dir=tmp_path, raw_config=raw)
    _poison_at(trainer, 2, grads_only=True)
    with pytest.raises(Diverged, match="gradient at step 2"):
        trainer.fit()


def test_the_cli_exits_3_when_the_loss_diverges(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        "[train]\nepochs = 3\nbatch_size = 16\ndevice = 'cpu'\nlog_every = 1\n"
        "[data]\nname = 'synthetic'\nn_train = 64\nn_test = 32\n"
        "[model]\nname = 'mlp'\nhidden = [16]\n[optimizer]\nlr = 1e6\nmomentum = 0.9\n"
        "[logging]\nobservers = ['jsonl']\n")
    assert main(["train", str(config), "--run-dir", str(tmp_path / "r")]) == 3
    err = capsys.readouterr().err
    assert "training diverged: non-finite" in err and " step " in err
    assert "Traceback" not in err
    ckpt = tmp_path / "r" / checkpoint.CHECKPOINT
    if ckpt.exists():  # whatever was written holds finite weights only
        assert all(torch.isfinite(t).all() for t in checkpoint.load(ckpt)["model"].values())
