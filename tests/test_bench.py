"""The benchmark runs and reports (``benchmarks/bench.py``); how fast is not checked here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    if str(BENCH.parent) not in sys.path:  # bench.py imports its sibling module ``timing``
        sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("sparsefw_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_run_prints_the_ratio_table(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--tiny", "--models", "mlp", "--threads", "1",
         "--sweep", "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "x plain" in text and "x base" in text
    plain_row = next(line for line in text.splitlines() if line.startswith("(a) plain"))
    assert "1.00x" in plain_row
    for label in ("(b) sparsefw dense", "(c) sparsefw hard-masked 90%", "(d) forward-masked"):
        row = next(line for line in text.splitlines() if line.startswith(label))
        assert "x" in row and "error" not in row, row
    assert "== acceptance ==" in text and "== sweep: width" in text
    assert "== sweep: masked layers" in text
    data = json.loads(out.read_text())
    (res,) = data["results"]
    v = res["variants"]
    assert v["plain"]["x_plain"] == pytest.approx(1.0)
    for key in ("plain", "dense", "hard90", "nm24"):
        assert v[key]["status"] == "ok", v[key]
        assert v[key]["median_ms"] > 0 and v[key]["q3_ms"] >= v[key]["q1_ms"]
        assert v[key]["state_mb"] > 0 and v[key]["peak_mb"] >= v[key]["state_mb"] * 0.5
    for key, rec in v.items():
        assert rec["status"] in ("ok", "not available"), (key, rec)
    # the other methods' cpu_kernels rows run only when --only names them
    assert "rigl_kernels" in v and not any(k.endswith("_kernels") and k != "rigl_kernels"
                                           for k in v)
    if v["rigl"]["status"] == "ok":
        assert "update" in v["rigl"] and v["rigl"]["amortised"]["every"] == 100
    if v["agent"]["status"] == "ok":
        assert v["agent"]["per_epoch"]["batches"] >= 1
    assert data["meta"]["torch"] == torch.__version__ and data["meta"]["command"]
    checks = {c["variant"]: c for c in data["acceptance"]}
    assert set(checks) == {"hard90", "hard90_masked", "s2sam", "rigl.update",
                           "rigl_kernels.update"}
    assert checks["s2sam"]["limit"] == (1.10 if res["batch"] == 32 else 1.05)
    if v["rigl"]["status"] == "ok":
        ratio = v["rigl"]["update"]["median_ms"] / v["rigl"]["median_ms"]
        assert checks["rigl.update"]["ratio"] == pytest.approx(ratio)


def test_nm_mask_keeps_two_of_every_four(bench):
    w = torch.tensor([[4.0, -1.0, 3.0, 0.5, 0.1, 0.2, -0.3, 0.0]])
    m = bench.nm_mask_2_4(w)
    assert m.tolist() == [[True, False, True, False, False, True, True, False]]
    big = bench.nm_mask_2_4(torch.randn(16, 32))
    assert (big.reshape(-1, 4).sum(1) == 2).all()


def test_tensor_bytes_counts_each_storage_once(bench):
    lin = nn.Linear(4, 3)  # 12 + 3 floats
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()  # momentum buffers: 15 floats; gradients: 15 floats
    assert bench.tensor_bytes(lin) == 4 * 30
    assert bench.tensor_bytes(lin, opt, [lin.weight, {"w": lin.weight}]) == 4 * 45


def test_stats_median_and_quartiles(bench):
    s = bench._stats([0.001, 0.002, 0.003, 0.004, 0.100])
    assert s["median_ms"] == pytest.approx(3.0)
    assert s["q1_ms"] == pytest.approx(2.0) and s["q3_ms"] == pytest.approx(4.0)


def test_mask_pass_script_reports_the_loops(bench):
    """``benchmarks/mask_pass.py``: the plain loop, the two masking passes and (where it
    builds) the masked SGD kernel, each with its ratio to the plain loop (1.00x for the plain
    loop itself)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "mask_pass.py"), "--batch", "4",
         "--repeats", "1", "--steps", "1"],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = proc.stdout.splitlines()[1:]
    expected = ["plain", "+ mask pass", "+ masked_fill"]
    if bench.masked_sgd_unavailable(torch.device("cpu")) is None:
        expected.append("masked kernel")
    assert [r[:16].strip() for r in rows] == expected
    assert rows[0].endswith("1.00x") and all(r.endswith("x") for r in rows)


def test_opt_in_rows_are_variants_of_every_topology_row(bench):
    spec = bench.model_spec("mlp", bench.PRESETS["tiny"])
    catalogue = bench.build_catalogue([])
    vs = {v.key: v for v in bench.variants(spec, catalogue.registry,
                                           set(catalogue.registry.entries))}
    for name, _, _ in bench.TOPOLOGY_ROWS:
        row = vs[f"{name}_kernels"]
        assert row.opt_in and row.updates and row.base == "hard90_masked"
        assert row.sections["sparsity"]["cpu_kernels"] is True
        assert row.sections["topology_update"]["name"] == name
