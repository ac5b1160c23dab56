"""Sparse training under FSDP2 (``fully_shard``) with two gloo processes on loopback: masks
follow the parameters' sharding, and topology decisions equal the single-process ones."""

from __future__ import annotations

import pytest
import torch

from . import fsdp_worker
from .spawning import spawn

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available")


def _spawn(target, out, *args, world=2):
    spawn(target, out, str(out), *args, world=world)


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_fsdp_masks_equal_single_process(catalogue, tmp_path, method):
    """RigL / SET on a fully_shard-ed MLP (uneven shards: 33 rows as 17 + 16): after 3
    topology updates the whole masks equal one process's with the same global batch, the
    weights agree within rtol 1e-4, and each rank held only its shard's mask."""
    if method not in catalogue.registry.names("topology_update"):
        pytest.skip(f"{method} not registered")
    steps = 7  # updates at steps 0, 2, 4 and 6
    _spawn(fsdp_worker.run_loop, tmp_path, method, steps)
    a, b = (torch.load(tmp_path / f"fsdp{r}.pt", weights_only=False) for r in range(2))
    ref = fsdp_worker.train_loop(method, steps, catalogue=catalogue)
    assert a["updates"] == ref["updates"] >= 3
    assert a["local_masks"]["0.weight"] == (17, 8) and b["local_masks"]["0.weight"] == (16, 8)
    assert any(not torch.equal(ref["first"][n], m) for n, m in ref["masks"].items())
    for got in (a, b):
        for n, m in ref["masks"].items():
            assert torch.equal(got["first"][n], ref["first"][n]), n
            assert torch.equal(got["masks"][n], m), n
        for n, p in ref["model"].items():
            torch.testing.assert_close(got["model"][n], p, rtol=1e-4, atol=1e-6)
        assert got["densities"] == pytest.approx(ref["densities"])
    # per rank, parameters + masks + optimizer state: about half of what a DDP rank holds
    # (every DDP rank holds the single-process tensors); 33 rows split 17 + 16
    for got in (a, b):
        ratio = got["bytes"]["total"] / ref["bytes"]["total"]
        assert 0.45 < ratio < 0.53, (got["bytes"], ref["bytes"])
    assert a["bytes"]["total"] + b["bytes"]["total"] == ref["bytes"]["total"]


def test_fsdp_checkpoint_saved_on_two_ranks_resumes_on_one_and_on_two(catalogue, tmp_path):
    """A distributed checkpoint written by 2 FSDP ranks after 2 RigL updates, resumed on 2
    ranks and on 1 unsharded process, continues to the uninterrupted 2-rank result."""
    steps, at = 7, 3
    ckpt = str(tmp_path / "ckpt")
    _spawn(fsdp_worker.run_loop, tmp_path, "rigl", steps, (ckpt, at), None, "full")
    _spawn(fsdp_worker.run_loop, tmp_path, "rigl", steps, None, (ckpt, at), "resumed")
    full = torch.load(tmp_path / "full0.pt", weights_only=False)
    resumed = [torch.load(tmp_path / f"resumed{r}.pt", weights_only=False) for r in range(2)]
    one = fsdp_worker.train_loop("rigl", steps, catalogue=catalogue, resume=(ckpt, at))
    assert full["updates"] == 4 and one["updates"] == resumed[0]["updates"] == 2
    for got in (*resumed, one):
        for n, m in full["masks"].items():
            assert torch.equal(got["masks"][n], m), n
        for n, p in full["model"].items():
            torch.testing.assert_close(got["model"][n], p, rtol=1e-4, atol=1e-6)


def test_fsdp_refuses_a_placement_that_splits_nm_groups(tmp_path):
    """2:4 groups run along the input dimension; sharding it as 12 = 6 + 6 splits a group."""
    _spawn(fsdp_worker.nm_split, tmp_path)
    for r in range(2):
        text = (tmp_path / f"refused{r}.txt").read_text()
        assert "NotSupportedUnderFSDP" in text and "0.weight" in text
        assert "splits N:M groups of 4 along dim 1" in text and "[0, 6)" in text


def test_fsdp_masks_equal_single_process_nm_srste(catalogue, tmp_path):
    """2:4 N:M + SR-STE (Zhou et al., arXiv 2102.04010) on a fully_shard-ed MLP: forward masks
    on the unsharded weights FSDP all-gathers, the ``nm`` mask recomputed from |w| every 2
    steps on the gathered view, SR-STE's decay on the local shards. After 4 topology updates
    the whole masks equal one process's with the same global batch, the dense weights agree
    within rtol 1e-4, and each rank held only its shard's mask."""
    names = catalogue.registry.names
    if "nm" not in names("topology_update") or "srste" not in names("gradient_correct"):
        pytest.skip("nm / srste not registered")
    steps = 7  # updates at steps 0, 2, 4 and 6
    _spawn(fsdp_worker.run_loop, tmp_path, "nm_srste", steps)
    a, b = (torch.load(tmp_path / f"fsdp{r}.pt", weights_only=False) for r in range(2))
    ref = fsdp_worker.train_loop("nm_srste", steps, catalogue=catalogue)
    ste = fsdp_worker.train_loop("nm_ste", steps, catalogue=catalogue)
    assert a["updates"] == ref["updates"] >= 3
    assert a["local_masks"]["4.weight"] == (3, 16) and b["local_masks"]["4.weight"] == (2, 16)
    assert any(not torch.equal(ref["first"][n], m) for n, m in ref["masks"].items())
    # the SR-STE term shows in the weights (beyond the tolerance), and the weights stay dense
    assert any(not torch.allclose(ste["model"][n], p, rtol=1e-4, atol=1e-6)
               for n, p in ref["model"].items())
    for got in (a, b):
        for n, m in ref["masks"].items():
            assert torch.equal(got["first"][n], ref["first"][n]), n
            assert torch.equal(got["masks"][n], m), n
            assert (got["model"][n][~m] != 0).all(), n  # forward masks: pruned weights kept
        for n, p in ref["model"].items():
            torch.testing.assert_close(got["model"][n], p, rtol=1e-4, atol=1e-6)
        assert got["densities"] == pytest.approx(ref["densities"])
    for got in (a, b):  # masks sharded with their weights: about half of one process's bytes
        assert 0.4 < got["bytes"]["total"] / ref["bytes"]["total"] < 0.6, got["bytes"]
    assert a["bytes"]["total"] + b["bytes"]["total"] == ref["bytes"]["total"]


def test_fsdp_refuses_unverified_forward_masking(tmp_path):
    """Forward masks are verified under FSDP with the N:M recipe only; RigL on forward masks
    and MDGF's decaying mask (β > 0) are refused, each with the reason."""
    _spawn(fsdp_worker.refusals, tmp_path)
    for r in range(2):
        text = (tmp_path / f"forward_rigl{r}.txt").read_text()
        assert text.startswith("NotSupportedUnderFSDP") and "kind = 'forward'" in text
        assert "'rigl'" in text and "N:M recipe only" in text
        text = (tmp_path / f"mask_decay{r}.txt").read_text()
        assert text.startswith("NotSupportedUnderFSDP") and "'mask_decay'" in text
