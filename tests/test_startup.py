"""CLI start-up: commands that do not train import neither torch's optimizer stack nor, where
they need no tensors, torch itself (checked in a fresh interpreter; no timings)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_compare import write_sweep

PROBE = """
import json, sys
from sparsefw import cli
try:
    code = cli.main({argv!r})
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "torch": "torch" in sys.modules,
                  "dynamo": "torch._dynamo" in sys.modules,
                  "engine": "sparsefw.engine.trainer" in sys.modules}}), file=sys.stderr)
"""


def _imports(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True,
                          text=True, timeout=300)
    return json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["sweep", "--help"],
                                  ["--version"]])
def test_help_imports_no_torch(argv):
    assert _imports(argv) == {"code": 0, "torch": False, "dynamo": False, "engine": False}


def test_compare_imports_no_torch(tmp_path):
    sweep_dir = write_sweep(tmp_path / "sw")
    found = _imports(["compare", str(sweep_dir), "--base", "base", "--no-plots"])
    assert found == {"code": 0, "torch": False, "dynamo": False, "engine": False}


def test_plugins_does_not_import_the_optimizer_stack():
    # the plugins need torch; torch._dynamo comes only with the first optimizer
    found = _imports(["plugins"])
    assert found["code"] == 0 and found["torch"] and not found["dynamo"]
