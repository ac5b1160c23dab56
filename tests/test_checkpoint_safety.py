"""Checkpoints: corruption is detected and names the kept previous checkpoint, a crafted pickle
is never executed by any command, write failures say why and leave the old files, a wrong
model is a clean error."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from sparsefw.cli import main
from sparsefw.engine import Trainer, checkpoint
from sparsefw.engine.checkpoint import (
    CHECKPOINT,
    PREVIOUS,
    CheckpointError,
    CheckpointWriteError,
    UntrustedCheckpoint,
)

TINY_TOML = (
    "[train]\nepochs = 2\nbatch_size = 16\ndevice = 'cpu'\n"
    "[data]\nname = 'synthetic'\nn_train = 64\nn_test = 32\n"
    "[model]\nname = 'mlp'\nhidden = [16]\n[sparsity]\ndensity = 0.5\n"
    "[logging]\nobservers = ['jsonl']\n"
)


@pytest.fixture
def run(tmp_path):
    """A finished two-epoch run (so both checkpoint.pt and checkpoint.prev.pt exist)."""
    config = tmp_path / "run.toml"
    config.write_text(TINY_TOML)
    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run_dir)]) == 0
    return run_dir


def _tensor_record(path: Path) -> tuple[int, int]:
    """(offset, size) of the largest tensor record's bytes in a torch.save zip."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:  # the local header: 30 bytes + name + extra field
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2),
                                                                                 "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


# ------------------------------------------------------------------------------ integrity
def test_the_previous_checkpoint_is_kept_and_loads(run):
    current = checkpoint.load(run / CHECKPOINT)
    previous = checkpoint.load(run / PREVIOUS)
    assert previous["step"] < current["step"]


def test_one_kib_overwritten_in_a_tensor_is_detected(run, capsys):
    path = run / CHECKPOINT
    offset, size = _tensor_record(path)
    assert size >= 1024
    with open(path, "r+b") as f:
        f.seek(offset + (size - 1024) // 2)
        f.write(os.urandom(1024))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    message = str(info.value)
    assert str(path) in message and "corrupted" in message
    assert f"mv {run / PREVIOUS} {path}" in message  # the kept previous one is offered
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    assert main(["export", str(run)]) == 2
    err = capsys.readouterr().err
    assert "corrupted" in err and "Traceback" not in err
    os.replace(run / PREVIOUS, path)  # taking the offer works
    assert main(["train", "--resume", str(run)]) == 0


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "empty", "text"])
def test_damaged_checkpoints_are_clean_errors(run, damage):
    path = run / CHECKPOINT
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "zeroed": bytes(len(data)),
                      "empty": b"", "text": b"not a checkpoint\n"}[damage])
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as info:
        checkpoint.load(path)
    assert str(path) in str(info.value) and PREVIOUS in str(info.value)


def test_a_checkpoint_of_another_model_is_a_clean_error(run, tmp_path, capsys):
    other = tmp_path / "other.toml"
    other.write_text(TINY_TOML.replace("hidden = [16]", "hidden = [32, 8]"))
    assert main(["train", str(other), "--run-dir", str(tmp_path / "o")]) == 0
    os.replace(tmp_path / "o" / CHECKPOINT, run / CHECKPOINT)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "was written for a different model" in err and "shape" in err
    assert "Traceback" not in err


def test_a_plain_state_dict_is_not_a_training_checkpoint(run, capsys):
    torch.save({"weight": torch.zeros(3)}, run / CHECKPOINT)
    capsys.readouterr()
    for command in (["train", "--resume"], ["export"], ["report", "--no-tensorboard"]):
        assert main([*command, str(run)]) == 2
        err = capsys.readouterr().err
        assert "not a sparsefw training checkpoint" in err or "no masks" in err, err
        assert "Traceback" not in err


def test_a_kill_between_the_two_renames_resumes_from_the_previous(run):
    step = checkpoint.load(run / PREVIOUS)["step"]
    os.unlink(run / CHECKPOINT)  # the state a kill after the first rename leaves
    assert checkpoint.resume_path(run) == run / PREVIOUS
    assert main(["train", "--resume", str(run)]) == 0
    assert checkpoint.load(run / CHECKPOINT)["step"] > step


# ------------------------------------------------------------------------------ untrusted
class _Plant:
    """Unpickling this creates a file: what a crafted checkpoint's code would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _plant(run: Path, marker: Path) -> None:
    payload = checkpoint.load(run / CHECKPOINT)
    payload["plugins"] = {"evil": _Plant(marker)}
    torch.save(payload, run / CHECKPOINT)  # a well-formed file: its CRCs all match


@pytest.mark.parametrize("command", [
    ["train", "--resume", "{run}"], ["export", "{run}"], ["report", "{run}", "--no-tensorboard"],
    ["analyze", "{run}", "--points", "3", "--iters", "2", "--no-plots"],
])
def test_a_crafted_pickle_is_not_executed_by_any_command(run, tmp_path, capsys, command):
    marker = tmp_path / "pwned"
    _plant(run, marker)
    argv = [a.format(run=run) for a in command]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "refused" in err and "--trust-checkpoint" in err and "Traceback" not in err


def test_trust_checkpoint_is_the_old_unsafe_behaviour(run, tmp_path):
    marker = tmp_path / "pwned"
    _plant(run, marker)
    with pytest.raises(UntrustedCheckpoint):
        checkpoint.load(run / CHECKPOINT)
    checkpoint.load(run / CHECKPOINT, trust=True)
    assert marker.exists()  # what --trust-checkpoint warns about


# ------------------------------------------------------------------------------ writes
def test_a_failed_write_names_the_cause_and_keeps_both_checkpoints(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT
    checkpoint.save(path, {"step": 1})
    checkpoint.save(path, {"step": 2})

    def full(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(CheckpointWriteError, match="No space left on device") as info:
        checkpoint.save(path, {"step": 3})
    assert str(path) in str(info.value) and "unchanged" in str(info.value)
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 2 and checkpoint.load(tmp_path / PREVIOUS)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [PREVIOUS, CHECKPOINT]


def test_a_new_checkpoint_that_does_not_verify_never_replaces_the_old(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT
    checkpoint.save(path, {"step": 1})
    checkpoint.save(path, {"step": 2})
    monkeypatch.setattr(checkpoint.torch, "save", lambda _obj, f: f.write(b"PK\x03\x04 short"))
    with pytest.raises(CheckpointWriteError, match="did not verify"):
        checkpoint.save(path, {"step": 3})
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 2 and checkpoint.load(tmp_path / PREVIOUS)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [PREVIOUS, CHECKPOINT]


def test_a_read_only_file_system_during_training_exits_1(tmp_path, capsys, monkeypatch):
    config = tmp_path / "run.toml"
    config.write_text(TINY_TOML)
    real = checkpoint.tempfile.mkstemp

    def read_only(*args, **kwargs):
        if kwargs.get("prefix", "").startswith(f".{CHECKPOINT}"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", read_only)
    capsys.readouterr()
    assert main(["train", str(config), "--run-dir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert f"could not write checkpoint {tmp_path / 'r' / CHECKPOINT}: Read-only file system" in err
    assert "Traceback" not in err


def test_a_file_size_limit_is_a_clean_error_not_an_enforce_fail(tmp_path):
    """A real failing write: torch's zip writer reports it as a RuntimeError ("enforce fail
    ... unexpected pos"); the message must say what happened instead."""
    code = (
        "import resource, sys, torch\n"
        "from sparsefw.engine import checkpoint\n"
        "p = sys.argv[1]\n"
        "checkpoint.save(p, {'w': torch.zeros(10)})\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))\n"
        "try:\n"
        "    checkpoint.save(p, {'w': torch.zeros(100_000)})\n"
        "except checkpoint.CheckpointWriteError as e:\n"
        "    print(e)\n"
        "print(checkpoint.load(p)['w'].numel())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / CHECKPOINT)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    message, numel = out.stdout.strip().splitlines()
    assert "File too large" in message and "enforce fail" not in message
    assert numel == "10"
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]


def test_plugin_states_of_every_shipped_method_load_weights_only(catalogue, make_config,
                                                                 tmp_path):
    """A checkpoint carrying the state of the stateful built-in components loads with
    ``weights_only=True`` (the contract suite checks each component on its own too)."""
    cfg, raw = make_config(
        train={"epochs": 1}, topology_update={"name": "rigl", "every": 2},
        gradient_correct=[{"name": "agent"}], perturb=[{"name": "s2sam"}],
    )
    trainer = Trainer(cfg, catalogue, run_dir=tmp_path / "r", raw_config=raw)
    trainer.fit()
    buf = io.BytesIO()
    torch.save(trainer.plugins.states(trainer.state), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)  # no global beyond tensors and plain data
