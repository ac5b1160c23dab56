"""Two gloo processes on loopback: masks and weights identical on both ranks, equal to a
single-process run with the same global batch, a deliberate desync caught, and kill-and-resume
under 2 processes reproducing the uninterrupted 2-process run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparsefw import config as config_mod
from sparsefw.engine import train

from . import ddp_worker
from .conftest import TINY, merge
from .spawning import spawn

ROOT = Path(__file__).resolve().parents[1]


def _launch(raw, out, resume=None, kill_at=None, world=2, check_exit=True):
    procs = spawn(ddp_worker.run, out, raw, str(out), resume, kill_at, world=world,
                  check_errors=check_exit)
    if check_exit:
        for p in procs:
            assert p.exitcode == 0, f"worker exit code {p.exitcode}"
    return [out / f"rank{r}.pt" for r in range(world)]


def _raw(topology):
    return merge(TINY, {
        "train": {"epochs": 3, "batch_size": 16, "checkpoint_every": 1},
        "data": {"n_train": 128},
        "topology_update": topology,
    })


def _available(catalogue, name):
    return name in catalogue.registry.names("topology_update")


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_two_ranks_agree_and_match_single_process(catalogue, tmp_path, method):
    if not _available(catalogue, method):
        pytest.skip(f"{method} not registered")
    raw = _raw({"name": method, "every": 4, "end": 0.9})
    files = _launch(raw, tmp_path / "ddp")
    a, b = (torch.load(f, weights_only=False) for f in files)
    assert a["step"] == b["step"] == 24
    for n in a["masks"]:
        assert torch.equal(a["masks"][n], b["masks"][n]), n
    for n in a["model"]:
        assert torch.equal(a["model"][n], b["model"][n]), n
    # single process, same global batch
    cfg = config_mod.structure(raw, catalogue.registry)
    single, _ = train(cfg, catalogue, run_dir=tmp_path / "single", raw_config=raw)
    for n, m in single.masks.masks.items():
        assert torch.equal(m, a["masks"][n]), n
    for n, p in single.model.state_dict().items():
        torch.testing.assert_close(p, a["model"][n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra", [
    {"gradient_correct": [{"name": "agent"}]},
    {"perturb": [{"name": "s2sam", "rho": 0.05}]},
])
def test_stateful_corrections_stay_in_sync(catalogue, tmp_path, extra):
    """AGENT's statistics and snapshot gradients and S2-SAM's stored gradient are averaged over
    the ranks: both ranks agree, and match one process with the same global batch."""
    name = (extra.get("gradient_correct") or extra.get("perturb"))[0]["name"]
    if name not in catalogue.registry.names("gradient_correct") + catalogue.registry.names(
            "perturb"):
        pytest.skip(f"{name} not registered")
    raw = merge(_raw({"name": "rigl", "every": 4, "end": 0.9}), extra)
    a, b = (torch.load(f, weights_only=False) for f in _launch(raw, tmp_path / "ddp"))
    for n in a["model"]:
        assert torch.equal(a["model"][n], b["model"][n]), n
    cfg = config_mod.structure(raw, catalogue.registry)
    single, _ = train(cfg, catalogue, run_dir=tmp_path / "single", raw_config=raw)
    for n, p in single.model.state_dict().items():
        torch.testing.assert_close(p, a["model"][n], rtol=1e-4, atol=1e-5)


def test_desynchronised_mask_is_caught(tmp_path):
    raw = _raw({"name": "desync", "every": 2, "start": 1, "end": 1.0})
    # a rank may abort while the process group is torn down after the error: the error files,
    # written first, are what counts
    _launch(raw, tmp_path, check_exit=False)
    errors = [(tmp_path / f"error{r}.txt") for r in range(2)]
    assert all(e.exists() for e in errors)
    text = errors[0].read_text()
    assert "RanksOutOfSync" in text and "differs across ranks" in text
    assert "layer '" in text  # names the layer


def test_kill_and_resume_under_two_processes(catalogue, tmp_path):
    method = "set" if _available(catalogue, "set") else "static"
    raw = _raw({"name": method, "every": 4, "end": 0.9})
    full = [torch.load(f, weights_only=False) for f in _launch(raw, tmp_path / "full")]
    _launch(raw, tmp_path / "cut", kill_at=10)
    assert not (tmp_path / "cut" / "rank0.pt").exists()
    resumed = [torch.load(f, weights_only=False)
               for f in _launch(raw, tmp_path / "cut", resume=str(tmp_path / "cut"))]
    for r in range(2):
        for n in full[r]["model"]:
            assert torch.equal(full[r]["model"][n], resumed[r]["model"][n]), n
        for n in full[r]["masks"]:
            assert torch.equal(full[r]["masks"][n], resumed[r]["masks"][n]), n


def test_users_ddp_loop_with_a_sparsifier_keeps_ranks_in_sync_and_sam_local(tmp_path):
    """A user's own DDP loop: masks and weights equal on both ranks after 3 RigL updates, and
    SAM's first-step ε on each rank is computed from that rank's own gradient."""
    spawn(ddp_worker.run_loop, tmp_path, str(tmp_path))
    a, b = (torch.load(tmp_path / f"loop{r}.pt", weights_only=False) for r in range(2))
    assert a["step"] == b["step"] == 6
    for n in a["masks"]:
        assert torch.equal(a["masks"][n], b["masks"][n]), n
    for n in a["model"]:
        assert torch.equal(a["model"][n], b["model"][n]), n
    # ε of the first step, recomputed in one process from each rank's own half-batch gradient
    from sparsefw.masks import MaskSet
    from sparsefw_plugins.perturb.sam import ascent

    def first_eps(batches):
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 4))
        model.load_state_dict(a["init"]["model"])
        masks = MaskSet({n: p for n, p in model.named_parameters() if n in a["init"]["masks"]})
        for n, m in a["init"]["masks"].items():
            masks.update(n, m)
        x = torch.cat([bx for bx, _ in batches])
        y = torch.cat([by for _, by in batches])
        torch.nn.functional.cross_entropy(model(x), y).backward()
        named = dict(model.named_parameters())
        return ascent({n: p.grad for n, p in named.items()}, named, masks, 0.05)

    for saved in (a, b):
        local = first_eps([saved["batches"][0]])
        for n, e in saved["eps"][0].items():
            torch.testing.assert_close(e, local[n], rtol=1e-5, atol=1e-7)
    averaged = first_eps([a["batches"][0], b["batches"][0]])  # what an all-reduce would give
    assert not torch.allclose(a["eps"][0]["0.weight"], averaged["0.weight"])


def test_sam_ascent_uses_each_ranks_own_gradient(catalogue, tmp_path):
    """SAM's pass 1 runs under DDP's ``no_sync``: on each rank the perturbation the model sees in
    pass 2 is ε = ρ·g/‖g‖ of that rank's own gradient (not of the all-reduced one), so the two
    ranks' ε differ; the update itself is still synchronised (the weights agree)."""
    raw = merge(TINY, {
        "train": {"epochs": 1, "batch_size": 16, "max_steps": 1},
        "data": {"n_train": 64},
        "perturb": [{"name": "sam", "rho": 0.05}],
    })
    spawn(ddp_worker.sam_epsilon, tmp_path, raw, str(tmp_path))
    eps = [torch.load(tmp_path / f"eps{r}.pt", weights_only=False) for r in range(2)]
    for rec in eps:
        assert rec["sync"] is False
        assert set(rec["seen"]) == set(rec["expected"])
        for n, e in rec["expected"].items():
            torch.testing.assert_close(rec["seen"][n], e, rtol=1e-4, atol=1e-6)
    # the ranks' shards differ, so their ε differ (an all-reduced gradient gives one ε)
    assert any(not torch.allclose(eps[0]["seen"][n], eps[1]["seen"][n], atol=1e-4)
               for n in eps[0]["seen"])


def test_the_cli_under_two_ranks_prints_its_summary_once(tmp_path):
    """``sparsefw train`` started on two ranks (as by torchrun): one run, both ranks exit 0,
    and the run directory and final accuracy are printed by rank 0 only."""
    argv = ["train", str(ROOT / "configs" / "quickstart.toml"), "--set", "train.epochs=1",
            "--set", f"train.out_dir={tmp_path / 'runs'}"]
    spawn(ddp_worker.cli_train, tmp_path, argv, str(tmp_path))
    first, second = ((tmp_path / f"stdout{r}.txt").read_text() for r in range(2))
    assert first.startswith("exit 0") and second.startswith("exit 0")
    assert "final test accuracy" in first and "run directory" in first
    assert "final test accuracy" not in second and "run directory" not in second
    assert len(list((tmp_path / "runs").iterdir())) == 1
