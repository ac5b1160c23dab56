"""Run directories: never shared by two runs, always inside ``out_dir``; provenance of the
sparsefw source; resume refuses a changed run unless ``--force``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsefw.cli import main
from sparsefw.engine import rundir
from sparsefw.engine.checkpoint import CHECKPOINT
from sparsefw.engine.rundir import RunDirError, claim, make_run_dir, sanitise

TINY_TOML = (
    "[train]\nepochs = 1\nbatch_size = 16\ndevice = 'cpu'\nname = 'same'\n"
    "[data]\nname = 'synthetic'\nn_train = 64\nn_test = 32\n"
    "[model]\nname = 'mlp'\nhidden = [16]\n[sparsity]\ndensity = 0.5\n"
    "[logging]\nobservers = ['jsonl']\n"
)


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "run.toml"
    path.write_text(TINY_TOML.replace("[data]", f"out_dir = '{tmp_path / 'runs'}'\n{extra}[data]"))
    return path


def _run_dir_of(out: str) -> Path:
    return Path(next(line for line in out.splitlines() if line.startswith("run directory: "))
                .split(": ", 1)[1])


# ------------------------------------------------------------------------------ exclusive
def test_two_runs_started_together_get_their_own_directories(tmp_path):
    """Two processes with the same config and name, started at once: both succeed, each in
    its own directory, each directory holding one run's files."""
    config = _config(tmp_path)
    env = dict(os.environ, SPARSEFW_DISABLE_PLUGIN_AUTOLOAD="1")
    procs = [subprocess.Popen([sys.executable, "-m", "sparsefw.cli", "train", str(config)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    dirs = {_run_dir_of(out) for out, _err in outs}
    assert len(dirs) == 2
    for d in dirs:
        assert d.parent == tmp_path / "runs" and d.name.startswith("same-")
        assert (d / "run.json").exists() and (d / CHECKPOINT).exists()
        steps = [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(steps)  # one run's records, not two interleaved


def test_a_taken_timestamp_gets_the_next_suffix(tmp_path, make_config, monkeypatch):
    monkeypatch.setattr(rundir.time, "strftime", lambda _fmt: "20260101-000000")
    cfg, _ = make_config(train={"out_dir": str(tmp_path), "name": "x"})
    made = [make_run_dir(cfg, None, "c.toml") for _ in range(3)]
    assert [p.name for p in made] == ["x-20260101-000000", "x-20260101-000000-2",
                                      "x-20260101-000000-3"]


def test_an_explicit_run_dir_must_be_new_or_empty(tmp_path):
    claim(tmp_path / "new")
    with pytest.raises(RunDirError, match="just claimed by another run|not empty"):
        claim(tmp_path / "new")  # the second of two runs claiming it
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"not empty \(notes.txt\).*--resume"):
        claim(tmp_path / "used")
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"


def test_cli_refuses_a_used_run_dir(tmp_path, capsys):
    config = _config(tmp_path)
    assert main(["train", str(config), "--run-dir", str(tmp_path / "r")]) == 0
    before = (tmp_path / "r" / "run.json").read_bytes()
    capsys.readouterr()
    assert main(["train", str(config), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--resume" in err and "Traceback" not in err
    assert (tmp_path / "r" / "run.json").read_bytes() == before


# ------------------------------------------------------------------------------ names
@given(st.text(max_size=300))
def test_a_sanitised_name_stays_inside_out_dir(name):
    out = Path("/srv/runs")
    clean = sanitise(name)
    assert 0 < len(clean) <= rundir.MAX_STEM
    assert "/" not in clean and "\0" not in clean and not clean.startswith((".", "-"))
    assert (out / f"{clean}-20260101-000000").parent == out


@pytest.mark.parametrize("name, expected", [
    ("../../x", "_.._x"), ("a\0b", "a_b"), ("quickstart", "quickstart"), ("..", "run"),
    ("x" * 5000, "x" * 64), ("rigl 90%/erk", "rigl_90__erk"),
])
def test_sanitise_by_hand(name, expected):
    assert sanitise(name) == expected


def test_a_hostile_name_makes_a_directory_inside_out_dir(tmp_path, make_config):
    cfg, _ = make_config(train={"out_dir": str(tmp_path / "out"), "name": "../../" + "y" * 300})
    path = make_run_dir(cfg, None, "c.toml")
    assert path.parent == tmp_path / "out" and path.is_dir()


# ------------------------------------------------------------------------------ provenance
def test_git_revision_is_the_sparsefw_sources_not_the_working_directorys(tmp_path,
                                                                         monkeypatch):
    package = Path(rundir.__file__).resolve().parent.parent
    try:
        expected = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"],
                                  capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("sparsefw is not running from a git checkout here")
    other = tmp_path / "elsewhere"
    other.mkdir()
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    subprocess.run(["git", "init", "-q"], cwd=other, check=True)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "x"], cwd=other, check=True,
                   env=env)
    monkeypatch.chdir(other)
    rundir.git_revision.cache_clear()
    try:
        assert rundir.git_revision() == expected
    finally:
        rundir.git_revision.cache_clear()


# ------------------------------------------------------------------------------ resume
@pytest.fixture
def finished_run(tmp_path):
    config = _config(tmp_path)
    run = tmp_path / "r"
    assert main(["train", str(config), "--run-dir", str(run)]) == 0
    return config, run


def _edit_info(run: Path, edit) -> None:
    info = json.loads((run / "run.json").read_text())
    edit(info)
    (run / "run.json").write_text(json.dumps(info))


@pytest.mark.parametrize("edit, named", [
    (lambda i: i["versions"].update(sparsefw="0.0.1"), "sparsefw version: run 0.0.1"),
    (lambda i: i.update(git_revision="0" * 40), "git revision"),
    (lambda i: i["plugins"][0].update(version="9.9"), "component mask_init:random"),
    (lambda i: i["config"]["optimizer"].update(lr=0.5), "config optimizer.lr: run 0.5, now 0.1"),
])
def test_resume_refuses_a_changed_run_and_force_overrides(finished_run, capsys, edit, named):
    _config_path, run = finished_run
    if named == "git revision" and rundir.git_revision() is None:
        pytest.skip("no git checkout: there is no revision to compare")
    _edit_info(run, edit)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "refusing to continue" in err and named in err and "--force" in err, err
    assert main(["train", "--resume", str(run), "--force"]) == 0
    assert named in capsys.readouterr().err  # said as a warning


def test_resume_with_a_different_config_file_is_refused(finished_run, capsys):
    config, run = finished_run
    capsys.readouterr()
    assert main(["train", str(config), "--set", "optimizer.lr=0.2", "--resume", str(run)]) == 2
    assert "differs from the run's recorded config" in capsys.readouterr().err


@pytest.mark.parametrize("text, says", [
    ("{not json", "run.json cannot be read"),
    ("[1, 2]", "not a run.json written by sparsefw"),
    ("\udcff", "run.json cannot be read"),
])
def test_a_broken_run_json_is_a_clean_error(finished_run, capsys, text, says):
    _config_path, run = finished_run
    (run / "run.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert main(["report", str(run), "--no-tensorboard"]) == 2


def test_resume_removes_stale_temporary_files(finished_run):
    _config_path, run = finished_run
    stale = run / f".{CHECKPOINT}.k1ll3d.tmp"
    stale.write_bytes(b"\0" * 4096)
    assert main(["train", "--resume", str(run)]) == 0  # a finished run: evaluates again
    assert not stale.exists()


def test_non_object_lines_in_metrics_jsonl_are_kept_and_skipped(finished_run, capsys):
    from sparsefw.commands.report import read_metrics

    _config_path, run = finished_run
    with open(run / "metrics.jsonl", "a") as f:
        f.write('[1, 2]\n"text"\n{"step": "late", "kind": "train"}\n')
    train, evals = read_metrics(run)
    assert train and evals and all(isinstance(r["step"], int) for r in train)
    assert main(["report", str(run), "--no-tensorboard"]) == 0
    assert main(["train", "--resume", str(run)]) == 0
    text = (run / "metrics.jsonl").read_text()
    assert '[1, 2]\n"text"\n' in text  # someone else's lines are not ours to drop
