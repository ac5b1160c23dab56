"""Every bad input that used to train, crash or print a traceback is a :class:`ConfigError`:
the CLI prints one line per problem (file, section, key, the value cut short) and exits 2."""

from __future__ import annotations

import textwrap

import pytest
import torch

from sparsefw import config
from sparsefw.cli import main
from sparsefw.config import ConfigError

BASE = """
[train]
epochs = 4
device = "cpu"
[data]
name = "synthetic"
[model]
name = "mlp"
hidden = [16]
[mask_init]
name = "random"
"""


def _cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent(BASE))
    return path


# ------------------------------------------------------------------------------ values
@pytest.mark.parametrize("override, says", [
    ("optimizer.lr=nan", "[optimizer] lr: must be a finite number, got nan"),
    ("optimizer.lr=1e400", "[optimizer] lr: must be a finite number, got inf"),
    ("optimizer.momentum=nan", "[optimizer] momentum: must be a finite number"),
    ("optimizer.eps=nan", "[optimizer] eps: must be a finite number"),
    ("sparsity.density=nan", "[sparsity] density: must be a finite number"),
    ("lr_schedule.warmup_epochs=inf", "[lr_schedule] warmup_epochs: must be a finite number"),
    ("lr_schedule.warmup_epochs=nan", "[lr_schedule] warmup_epochs: must be a finite number"),
    ("lr_schedule.warmup_epochs=5", "warmup_epochs: 5.0 is longer than the run"),
    ("lr_schedule.milestones=[0.75, 0.5]", "milestones must be strictly increasing"),
    ("lr_schedule.milestones=[0.5, 1.5]", "milestones[1] must be in (0, 1)"),
    ("lr_schedule.milestones=[0.0]", "milestones[0] must be in (0, 1)"),
    ("optimizer.betas=[0.9, 1.0]", "betas[1] must be in [0, 1), got 1.0"),
    ("optimizer.betas=[-0.1, 0.9]", "betas[0] must be in [0, 1)"),
    ("train.device='banana'", "[train] device = 'banana' is not a device"),
    ('train.name="a\\u0000b"', "[train] name must be a non-empty path without NUL"),
    ("train.out_dir=''", "[train] out_dir must be a non-empty path"),
    ("seed=9223372036854775807", "seed must be in [0, 2**32)"),
    ("seed=-1", "seed must be in [0, 2**32)"),
    ("train.epochs=9223372036854775808", "[train] epochs: 9223372036854775808 does not fit"),
    ("logging.observers=['jsonl', 'jsonl']", "[logging] observers lists 'jsonl' more than once"),
    ("perturb=[{name='sam', rho=nan}]", "[[perturb]] #0 rho: must be a finite number"),
    ("topology_update={name='set', end=inf}", "[topology_update] end: must be a finite number"),
])
def test_bad_values_are_config_errors(cfg_file, capsys, override, says):
    code, err = _cli(capsys, "describe", str(cfg_file), "--set", override)
    assert code == 2 and "c.toml" in err and says in err, err


def test_a_type_error_does_not_hide_range_errors_in_its_section(cfg_file):
    with pytest.raises(ConfigError) as info:
        config.load(cfg_file, _registry(), ["optimizer.lr='fast'", "optimizer.momentum=2.0",
                                            "optimizer.eps=-1.0", "optimizer.nme='x'"])
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert any("lr: expected float, got str 'fast'" in p for p in problems)
    assert any("momentum must be in [0, 1), got 2.0" in p for p in problems)
    assert any("eps must be in (0, inf], got -1.0" in p for p in problems)
    assert any("unknown key nme" in p for p in problems)


def test_huge_values_are_cut_to_about_80_characters(cfg_file):
    huge = "x" * 200_000
    with pytest.raises(ConfigError) as info:
        config.load(cfg_file, _registry(), [f"sparsity.distribution='{huge}'",
                                            f"model.{huge}=1", f"train.amp=[{'1,' * 50_000}]"])
    assert len(info.value.problems) == 3
    for p in info.value.problems:
        assert len(p) < 600 and "characters)" in p or "(cut)" in p, p[:200]
    assert len(str(info.value)) < 2000


def _registry():
    from sparsefw.plugins import load_catalogue

    return load_catalogue(autoload=False).registry


# ------------------------------------------------------------------------------ files
def test_a_config_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.toml"
    path.write_bytes("# café\n[train]\nepochs = 1\n".encode("latin-1"))
    code, err = _cli(capsys, "describe", str(path))
    assert code == 2 and "not UTF-8 text" in err and "latin1.toml" in err


def test_a_directory_as_config_or_extends_target(tmp_path, capsys):
    code, err = _cli(capsys, "describe", str(tmp_path))
    assert code == 2 and "is a directory" in err
    (tmp_path / "sub").mkdir()
    (tmp_path / "c.toml").write_text('extends = "sub"\n')
    code, err = _cli(capsys, "describe", str(tmp_path / "c.toml"))
    assert code == 2 and "is a directory" in err


def test_extends_must_be_relative(tmp_path, capsys):
    base = tmp_path / "base.toml"
    base.write_text("seed = 1\n")
    for target in (str(base), "~/base.toml"):
        (tmp_path / "c.toml").write_text(f'extends = "{target}"\n')
        code, err = _cli(capsys, "describe", str(tmp_path / "c.toml"))
        assert code == 2 and "must be a path relative to this file's directory" in err


@pytest.mark.parametrize("junk", ["=1", "train..epochs=1", "train.epochs.deep=1", "train=5",
                                  "nokey", "perturb.99.rho=1"])
def test_junk_set(cfg_file, capsys, junk):
    code, err = _cli(capsys, "describe", str(cfg_file), f"--set={junk}")
    assert code == 2 and "1 problem in the configuration" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_config_error(cfg_file, capsys, tmp_path):
    code, err = _cli(capsys, "train", str(cfg_file), "--set", "train.device='cuda'",
                     "--run-dir", str(tmp_path / "r"))
    assert code == 2 and "device = 'cuda': no cuda device on this machine" in err


def test_duplicate_observers_are_refused_before_any_run(cfg_file, capsys, tmp_path):
    code, err = _cli(capsys, "train", str(cfg_file), "--set",
                     "logging.observers=['jsonl', 'progress', 'jsonl']",
                     "--run-dir", str(tmp_path / "r"))
    assert code == 2 and "more than once" in err
    assert not (tmp_path / "r").exists()
