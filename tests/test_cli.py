"""The ``sparsefw`` command: ``plugins``, ``describe`` and ``train`` (in process via
:func:`sparsefw.cli.main`, plus one real call of the installed console script)."""

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparsefw.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.toml"

PLUGIN = '''
import attrs
from sparsefw.hookspecs import hookimpl

@attrs.define(eq=False)
class Flat:
    """A schedule from a third-party distribution."""
    cfg: object

    @hookimpl
    def sparsefw_schedule(self, state):
        return {"flat": 1.0}

@hookimpl
def sparsefw_register(registry):
    registry.add("schedule", "cli_flat", factory=Flat)
'''


@pytest.fixture(autouse=True)
def hermetic(monkeypatch):
    """Built-in plugins only, unless a test installs its own distribution."""
    for name in ("SPARSEFW_PLUGINS", "SPARSEFW_STRICT_PLUGINS", "SPARSEFW_TRACE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPARSEFW_DISABLE_PLUGIN_AUTOLOAD", "1")


def test_plugins_lists_components_by_slot(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    headers = [line[:-1] for line in lines if line and not line.startswith(" ")]
    assert headers[:2] == ["mask_init", "topology_update"]
    assert {"schedule", "observer", "model", "dataset"} <= set(headers)
    # entries sit under their slot, sorted, each with its source and summary
    start = lines.index("schedule:")
    block = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        block.append(line.split()[0])
    assert block == sorted(block) and {"constant", "cosine"} <= set(block)
    random = next(line for line in lines if line.strip().startswith("random "))
    assert "[sparsefw " in random and "Random masks" in random


def test_plugins_shows_third_party_sources(tmp_path, monkeypatch, capsys):
    info = tmp_path / "clidist-2.5.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clidist\nVersion: 2.5\n")
    (info / "entry_points.txt").write_text("[sparsefw]\ncli_flat = sparsefw_test_cli_flat\n")
    (tmp_path / "sparsefw_test_cli_flat.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.delenv("SPARSEFW_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("SPARSEFW_PLUGINS", "cli_flat")
    try:
        assert main(["plugins"]) == 0
    finally:
        sys.modules.pop("sparsefw_test_cli_flat", None)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith("cli_flat"))
    assert "[clidist (cli_flat) 2.5]" in line and "third-party distribution" in line


def test_console_script_plugins():
    exe = Path(sys.executable).with_name("sparsefw")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sparsefw.cli"]
    env = {**os.environ, "SPARSEFW_DISABLE_PLUGIN_AUTOLOAD": "1"}
    res = subprocess.run([*cmd, "plugins"], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert "mask_init:" in res.stdout and "random" in res.stdout and "[sparsefw" in res.stdout


def test_describe_shows_resolved_config_and_call_plan(capsys):
    assert main(["describe", str(QUICKSTART), "--set", "sparsity.density=0.2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# resolved configuration\n")
    resolved = json.loads(out.split("# resolved configuration\n")[1].split("\n# components")[0])
    assert resolved["sparsity"]["density"] == 0.2  # the override is applied
    assert resolved["model"] == {"name": "mlp", "hidden": [256, 128]}
    assert resolved["optimizer"]["weight_decay"] == 5e-4  # defaults are filled in
    assert "# components" in out and "mask_init:random" in out
    plan = out.split("# call plan")[1]
    mask_line = next(line for line in plan.splitlines() if "sparsefw_mask_init" in line)
    assert mask_line.split()[-1] == "mask_init:random"
    gc_line = next(line for line in plan.splitlines() if "sparsefw_gradient_correct" in line)
    assert gc_line.split()[-1] == "-"


def test_train_with_a_bad_config_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[sparsity]\ndensity = 2.0\n[mask_init]\nname = "nope"\n'
                   '[optimizer]\nlrr = 0.1\n')
    assert main(["train", str(bad), "--run-dir", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert "3 problems in the configuration" in err
    assert "bad.toml: [sparsity] density" in err
    assert "bad.toml: [mask_init] name: unknown mask_init 'nope'; choices:" in err
    assert "bad.toml: [optimizer] unknown key lrr" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [
    ["train"],
    ["train", "missing.toml"],
    ["describe", str(QUICKSTART), "--set", "train.epochs"],
])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("sparsefw: ")


def test_train_prints_final_accuracy(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", str(QUICKSTART), "--set", "train.epochs=1",
                 "--set", 'logging.observers=["jsonl"]', "--run-dir", str(run_dir)])
    assert code == 0
    out = capsys.readouterr().out
    assert f"run directory: {run_dir}" in out
    final = next(line for line in out.splitlines() if line.startswith("final test accuracy:"))
    acc = float(final.split(":")[1].split()[0])
    assert 0.0 <= acc <= 1.0 and "density 0.1000" in final
    assert (run_dir / "metrics.jsonl").exists()


@pytest.mark.parametrize("over,allocation,init", [
    ([], "erk, er_kernel = true: Σ dims / Π dims", "dense: "),
    (["sparsity.distribution='er'", "sparsity.er_kernel=false", "sparsity.init='sparse_fan_in'"],
     "er, er_kernel = false: channels only", "sparse_fan_in: "),
])
def test_describe_shows_the_er_convention_and_init(capsys, over, allocation, init):
    sets = [x for o in over for x in ("--set", o)]
    assert main(["describe", str(QUICKSTART), *sets]) == 0
    section = capsys.readouterr().out.split("# sparsity\n")[1]
    lines = dict(line.split(None, 1) for line in section.splitlines() if line.strip())
    assert lines["allocation"].startswith(allocation)
    assert lines["init"].startswith(init)
