"""``sparsefw plugins NAME``, failures and rejections reported with a non-zero exit, a wrong
hook argument reported by ``train`` as a config error, a plugin check stopping ``train``, and
``describe`` showing which component produces and which reads each schedule value."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from pathlib import Path

import pytest

from sparsefw.cli import main

ROOT = Path(__file__).resolve().parents[1]

WRONG_ARGUMENT = '''
import attrs
from sparsefw.hookspecs import hookimpl
from sparsefw.state import UpdateInterval, Perturbation

@attrs.define(eq=False)
class MomentumGrowth:
    """A topology rule with a misnamed hook argument."""
    cfg: UpdateInterval

    @hookimpl
    def sparsefw_topology_update(self, train_state):
        return None

@attrs.define(eq=False)
class Nudge:
    """Moves the weights itself (never restored)."""
    cfg: object = None

    @hookimpl
    def sparsefw_perturb(self, state):
        import torch
        with torch.no_grad():
            state.masks.params[state.masks.names[0]].add_(1e-3)
        return None

@hookimpl
def sparsefw_register(registry):
    registry.add("topology_update", "momentum_growth", config=UpdateInterval,
                 factory=MomentumGrowth)
    registry.add("perturb", "nudge", factory=Nudge)
'''


@pytest.fixture
def authordist(tmp_path, monkeypatch):
    info = tmp_path / "authordist-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: authordist\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sparsefw]\nauthor = sparsefw_test_author\n")
    (tmp_path / "sparsefw_test_author.py").write_text(textwrap.dedent(WRONG_ARGUMENT))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    for name in ("SPARSEFW_DISABLE_PLUGIN_AUTOLOAD", "SPARSEFW_STRICT_PLUGINS", "SPARSEFW_CHECK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPARSEFW_PLUGINS", "author")
    yield tmp_path
    sys.modules.pop("sparsefw_test_author", None)


def test_plugins_name_prints_the_options_and_docs(capsys, monkeypatch):
    monkeypatch.setenv("SPARSEFW_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert main(["plugins", "rigl"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("topology_update rigl  [sparsefw")
    assert "arXiv 1911.11134" in out
    assert "| `drop_fraction` | `float` | `0.3` | in [0, 1] |" in out
    assert "| `every` | `int` | `100` |" in out
    assert main(["plugins", "sparsefw:rigl"]) == 0
    assert main(["plugins", "no_such_thing"]) == 1
    assert "no component named 'no_such_thing'" in capsys.readouterr().err


def test_a_wrong_hook_argument_is_reported_by_plugins_and_train(authordist, capsys, tmp_path):
    assert main(["plugins"]) == 1
    captured = capsys.readouterr()
    assert "momentum_growth" not in captured.out.split("topology_update:")[1].split(":")[0]
    assert captured.err.count("'train_state'") == 1  # reported once
    assert "which hook sparsefw_topology_update does not have" in captured.err
    assert main(["plugins", "momentum_growth"]) == 1
    assert "'train_state'" in capsys.readouterr().err
    cfg = tmp_path / "mine.toml"
    base = os.path.relpath(ROOT / "configs" / "quickstart.toml", tmp_path)  # relative only
    cfg.write_text(f'extends = "{base}"\n'
                   '[topology_update]\nname = "momentum_growth"\n')
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "mine.toml: [topology_update] name:" in err and "'train_state'" in err


def test_a_plugin_check_stops_train_with_the_contract_message(authordist, capsys, tmp_path):
    cfg = tmp_path / "nudge.toml"
    base = os.path.relpath(ROOT / "configs" / "quickstart.toml", tmp_path)  # relative only
    cfg.write_text(f'extends = "{base}"\n'
                   '[train]\nepochs = 1\nmax_steps = 3\nout_dir = "' + str(tmp_path) + '"\n'
                   '[logging]\nobservers = ["jsonl"]\n'
                   '[debug]\ncheck_plugins = true\n[[perturb]]\nname = "nudge"\n')
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "perturb component 'nudge'" in err and "changed the weights" in err
    assert "Traceback" not in err


def test_describe_shows_who_produces_and_reads_each_value(capsys, monkeypatch):
    monkeypatch.setenv("SPARSEFW_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert main(["describe", str(ROOT / "configs" / "nm_mdgf_2of4.toml")]) == 0
    flow = capsys.readouterr().out.split("# schedule values")[1]
    assert "mask_decay: schedule[0]:mask_decay -> the lifecycle" in flow
    assert "nm_n: not scheduled" in flow and "topology_update:nm" in flow
    assert main(["describe", str(ROOT / "configs" / "rigl_s2sam.toml")]) == 0
    flow = capsys.readouterr().out.split("# schedule values")[1]
    assert "drop_fraction: not scheduled (readers use their options) -> topology_update:rigl" in flow
    assert "rho:" in flow and "perturb[0]:s2sam" in flow


def test_an_attrs_in_validator_error_is_one_clean_line():
    import attrs

    from sparsefw import config
    from sparsefw.registry import Registry

    @attrs.frozen
    class Opts:
        mode: str = attrs.field(default="a", validator=attrs.validators.in_(["a", "b"]))

    class Comp:
        """A perturbation."""

        def __init__(self, cfg):
            self.cfg = cfg

        from sparsefw.hookspecs import hookimpl

        @hookimpl
        def sparsefw_perturb(self, state):
            return None

    reg = Registry()
    reg.add("perturb", "opts", config=Opts, factory=Comp)
    with pytest.raises(config.ConfigError) as err:
        config.structure({"perturb": [{"name": "opts", "mode": "c"}]}, reg, source="x.toml")
    text = str(err.value)
    assert "x.toml: [[perturb]] #0 'mode' must be in ['a', 'b'] (got 'c')" in text
    assert "Attribute(" not in text
