"""The peer table (``benchmarks/bench_peers.py``) runs and reports without the peer packages;
its seed-style loop masks what it claims to, and its amortisation and density are computed as
documented. How fast is not checked here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "benchmarks" / "bench_peers.py"


@pytest.fixture(scope="module")
def peers():
    if str(PEERS.parent) not in sys.path:  # it imports its siblings ``bench`` and ``timing``
        sys.path.insert(0, str(PEERS.parent))
    spec = importlib.util.spec_from_file_location("sparsefw_bench_peers", PEERS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_run_reports_every_row(peers, tmp_path, capsys):
    out = tmp_path / "peers.json"
    assert peers.main(["--tiny", "--cases", "mlp:8", "--threads", "1", "--clock", "cpu",
                       "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| row | kernels | cpu ms |" in text and "### x plain" in text
    data = json.loads(out.read_text())
    (res,) = data["results"]
    v = res["variants"]
    assert res["model"] == "mlp" and res["batch"] == 8
    assert v["plain"]["x_plain"] == pytest.approx(1.0)
    assert v["plain"]["implementation"] in ("for_loop", "foreach", "fused")
    for key in ("plain", "hard90", "loop_hard90", "seed"):
        assert v[key]["status"] == "ok", v[key]
        assert v[key]["median_ms"] > 0 and v[key]["q3_ms"] >= v[key]["q1_ms"]
        assert v[key]["state_mb"] > 0
    assert v["plain"]["density"] == 1.0
    for key in ("hard90", "loop_hard90", "seed"):
        assert 0.05 < v[key]["density"] < 0.2, (key, v[key]["density"])
    assert v["hard90"]["x_base"] == pytest.approx(v["hard90"]["x_plain"])  # its base: plain
    for key in ("loop_hard90", "seed"):  # the others' base: sparsefw's hard 90%
        assert v[key]["x_base"] == pytest.approx(v[key]["median_ms"] / v["hard90"]["median_ms"])
    if v["rigl"]["status"] == "ok":
        assert v["rigl"]["amortised"]["every"] == 100 and "update" in v["rigl"]
    for key, module in (("rigl_torch", "rigl_torch"), ("rigl_torch_static", "rigl_torch"),
                        ("sparsimony", "sparsimony")):
        installed = importlib.util.find_spec(module) is not None
        assert v[key]["status"] == ("ok" if installed else "not installed"), v[key]
        if not installed:
            row = next(line for line in text.splitlines() if line.startswith(
                f"| {v[key]['label']} |") and "not installed" in line)
            assert "--no-deps" in row
    assert data["meta"]["command"].startswith("bench_peers.py")
    assert "### x plain" in data["markdown"]


def test_seed_loop_keeps_masked_weights_and_momentum_at_zero(peers):
    from sparsefw.plugins import load_catalogue

    registry = load_catalogue().registry
    spec = peers.model_spec("mlp", peers.PRESETS["tiny"])
    run = peers.SeedLoopRunner(spec, registry, torch.device("cpu"))
    x, y = peers.batch_tensors(spec, torch.device("cpu"))
    for _ in range(3):
        run.step(x, y)
    assert run.masks and all(m.dtype == torch.float32 for _, m in run.masks)
    for p, m in run.masks:
        off = m == 0
        assert off.any() and (p[off] == 0).all()
        assert (run.optimizer.state[p]["momentum_buffer"][off] == 0).all()
        assert (p[~off] != 0).any()  # the kept weights train


def test_peer_update_is_amortised_over_its_interval(peers):
    class Peer:  # a peer whose update block is two steps long
        update_steps = 2
        every = 100

    results = {"plain": {"median_ms": 10.0}, "hard90": {"median_ms": 12.0},
               "p": {"median_ms": 11.0, "update": {"median_ms": 50.0}}}
    peers._amortise_peers(results, {"p": Peer()})
    a = results["p"]["amortised"]
    # 98 regular steps of 11 ms and one 50 ms block of the two others, over 100 steps
    assert a["median_ms"] == pytest.approx((98 * 11 + 50) / 100)
    assert a["x_plain"] == pytest.approx(11.28 / 10) and a["x_base"] == pytest.approx(11.28 / 12)
    assert results["p"]["update"]["steps"] == 2


def test_density_counts_nonzero_linear_and_conv_weights(peers):
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(2, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 0.0]).view(2, 1, 1, 1))  # 1 of 2
        model[2].weight.copy_(torch.tensor([[0.0, 2.0], [0.0, 0.0], [3.0, 4.0]]))  # 3 of 6
    assert peers.weight_density(model) == pytest.approx(4 / 8)
