"""Sparse training under FSDP2 (``fully_shard``) with two gloo processes on loopback: masks
follow the parameters' sharding, and topology decisions equal the single-process ones.

Every case runs in one spawn of two processes (:func:`fsdp_runs`, in order); each test then
compares its case with a single-process run with the same global batch."""

from __future__ import annotations

import json

import pytest
import torch

from . import fsdp_worker
from .conftest import TINY, merge
from .spawning import spawn

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available")

STEPS = 7  # topology updates at steps 0, 2, 4 and 6
METHODS = ("rigl", "set", "nm_srste", "rigl_s2sam")
ARCHS = ("mlp", "gpt")
#: every method on both models, and S²-SAM keeping a copy of the gradient (forward masks,
#: ``perturb_pruned``) on the MLP
CASES = [(m, a) for a in ARCHS for m in METHODS] + [("nm_s2sam", "mlp"),
                                                    ("rigl_s2sam_pruned", "mlp")]
CKPT_AT = 3
CKPT_METHODS = ("rigl", "rigl_s2sam")


#: a Trainer run (tests/conftest.py's TINY, 3 epochs of 8 steps): RigL every 4 steps; hidden
#: layer of 17 (split 9 + 8), 33 test samples in batches of 8 (the ranks' 17 and 16 samples
#: take 3 and 2 evaluation forwards, which FSDP's collectives must not mind)
TRAINER_RAW = merge(TINY, {"train": {"epochs": 3, "batch_size": 16, "eval_batch_size": 8},
                           "data": {"n_train": 128, "n_test": 33}, "model": {"hidden": [17]},
                           "topology_update": {"name": "rigl", "every": 4, "end": 0.9}})
TRAINER_FSDP = merge(TRAINER_RAW, {"train": {"parallel": "fsdp"}})
#: the small GPT on the text data set through the Trainer, RigL + S²-SAM: 2 epochs of 3 steps
#: (an evaluation between them), topology updates at steps 0, 2 and 4; the root module holds
#: the embeddings and LayerNorms (perturbed too)
TRAINER_GPT = merge({k: v for k, v in TINY.items() if k not in ("data", "model")}, {
    "data": {"name": "text", "seq_len": 16, "max_chars": 1000},
    "model": {"name": "gpt", "dim": 16, "depth": 1, "heads": 2},
    "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 16},
    "sparsity": {"density": 0.3}, "topology_update": {"name": "rigl", "every": 2, "end": 0.9},
    "perturb": [{"name": "s2sam", "rho": 0.5}]})


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """Run every case on 2 ranks; returns ``(out, load)`` where ``load(tag)`` gives both ranks'
    results (failing with the rank's traceback when the case raised)."""
    out = tmp_path_factory.mktemp("fsdp")
    ckpt = str(out / "ckpt")
    cases = [(f"{m}_{a}", {"method": m, "steps": STEPS, "arch": a}) for m, a in CASES]
    cases.append(("rigl_s2sam_loop_gpt", {"method": "rigl_s2sam", "steps": STEPS,
                                          "arch": "gpt", "closure": False}))
    for m in CKPT_METHODS:
        at = (f"{ckpt}_{m}", CKPT_AT)
        cases += [(f"full_{m}", {"method": m, "steps": STEPS, "save": at}),
                  (f"resumed_{m}", {"method": m, "steps": STEPS, "resume": at})]
    cases += [("nm_split", {}), ("refusals", {}), ("guard_verdicts", {})]
    cases += [("trainer_ddp", {"raw": TRAINER_RAW}), ("trainer_fsdp", {"raw": TRAINER_FSDP}),
              ("trainer_resumed", {"raw": TRAINER_FSDP,
                                   "resume_prev_of": str(out / "trainer_fsdp")}),
              ("trainer_gpt_ddp", {"raw": TRAINER_GPT}),
              ("trainer_gpt_fsdp", {"raw": merge(TRAINER_GPT, {"train": {"parallel": "fsdp"}})})]
    spawn(fsdp_worker.run_cases, out, str(out), cases, timeout=400)

    def load(tag: str) -> list[dict]:
        errors = sorted(out.glob(f"{tag}[01].err"))
        assert not errors, errors[0].read_text()
        return [torch.load(out / f"{tag}{r}.pt", weights_only=False) for r in range(2)]

    return out, load


def _needs(catalogue, method: str) -> None:
    names = catalogue.registry.names
    wanted = {"rigl": [("topology_update", "rigl")], "set": [("topology_update", "set")],
              "nm_srste": [("topology_update", "nm"), ("gradient_correct", "srste")],
              "rigl_s2sam": [("topology_update", "rigl"), ("perturb", "s2sam")],
              "nm_s2sam": [("topology_update", "nm"), ("gradient_correct", "srste"),
                           ("perturb", "s2sam")],
              "rigl_s2sam_pruned": [("topology_update", "rigl"), ("perturb", "s2sam")]}[method]
    missing = [n for section, n in wanted if n not in names(section)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not registered")


def _assert_equal_to(got: dict, ref: dict) -> None:
    """Whole masks equal (initial and final), weights within rtol 1e-4, same densities."""
    for n, m in ref["masks"].items():
        assert torch.equal(got["first"][n], ref["first"][n]), n
        assert torch.equal(got["masks"][n], m), n
    for n, p in ref["model"].items():
        torch.testing.assert_close(got["model"][n], p, rtol=1e-4, atol=1e-6)
    assert got["densities"] == pytest.approx(ref["densities"])


@pytest.mark.parametrize("method,arch", CASES)
def test_fsdp_masks_equal_single_process(catalogue, fsdp_runs, method, arch):
    """RigL, SET, 2:4 N:M + SR-STE (Zhou et al., arXiv 2102.04010) and RigL + S²-SAM (Ji et
    al., NeurIPS 2024) on a fully_shard-ed MLP and small GPT (and on the MLP S²-SAM with N:M
    forward masks and with ``perturb_pruned``): after 4 topology updates the
    whole masks equal one process's with the same global batch, the weights agree within
    rtol 1e-4, and each rank held only its shard's masks (uneven shards: 33 rows as 17 + 16,
    5 as 3 + 2, the GPT's 13-token head as 7 + 6) — about half the bytes of one process."""
    _needs(catalogue, method)
    a, b = fsdp_runs[1](f"{method}_{arch}")
    ref = fsdp_worker.train_loop(method, STEPS, catalogue=catalogue, arch=arch)
    assert a["updates"] == b["updates"] == ref["updates"] >= 3
    assert any(not torch.equal(ref["first"][n], m) for n, m in ref["masks"].items())
    shapes = {("mlp", False): ("0.weight", (17, 8), (16, 8)),
              ("mlp", True): ("4.weight", (3, 16), (2, 16)),
              ("gpt", False): ("lm_head.weight", (7, 16), (6, 16)),
              ("gpt", True): ("lm_head.weight", (7, 16), (6, 16))}
    name, sa, sb = shapes[arch, method.startswith("nm")]
    assert a["local_masks"][name] == sa and b["local_masks"][name] == sb
    for got in (a, b):
        _assert_equal_to(got, ref)
    if method.startswith("nm"):  # forward masks: the pruned dense weights are kept
        for got in (a, b):
            for n, m in ref["masks"].items():
                assert (got["model"][n][~m] != 0).all(), n
    # per rank, parameters + masks + optimizer state: about half of what a DDP rank holds
    # (every DDP rank holds the single-process tensors)
    for got in (a, b):
        assert 0.45 < got["bytes"]["total"] / ref["bytes"]["total"] < 0.55, got["bytes"]
    assert a["bytes"]["total"] + b["bytes"]["total"] == ref["bytes"]["total"]


def test_fsdp_s2sam_without_a_closure_equals_single_process(catalogue, fsdp_runs):
    """RigL + S²-SAM on the GPT driven as ``loss.backward(); sp.step()``: the perturbation is
    applied by the Sparsifier's forward pre-hook, which runs before FSDP's root pre-hook (the
    root's embeddings and LayerNorms are perturbed too), and ``sp.unperturbed()`` between the
    backward and the step gives the unperturbed loss of the global batch; both as in one
    process."""
    _needs(catalogue, "rigl_s2sam")
    a, b = fsdp_runs[1]("rigl_s2sam_loop_gpt")
    ref = fsdp_worker.train_loop("rigl_s2sam", STEPS, catalogue=catalogue, arch="gpt",
                                 closure=False)
    assert a["updates"] == ref["updates"] >= 3 and len(ref["unperturbed"]) == STEPS
    for got in (a, b):
        _assert_equal_to(got, ref)
        assert got["unperturbed"] == pytest.approx(ref["unperturbed"], rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,without", [("nm_srste", "nm_ste"), ("rigl_s2sam", "rigl"),
                                            ("nm_s2sam", "nm_srste"),
                                            ("rigl_s2sam_pruned", "rigl_s2sam")])
def test_fsdp_cases_are_sensitive_to_the_component(catalogue, method, without, arch):
    """The SR-STE term and the S²-SAM perturbation show in the single-process weights beyond
    the tolerance: the equality above checks that they run under FSDP, not only that the rest
    does."""
    _needs(catalogue, method)
    ref = fsdp_worker.train_loop(method, STEPS, catalogue=catalogue, arch=arch)
    other = fsdp_worker.train_loop(without, STEPS, catalogue=catalogue, arch=arch)
    assert any(not torch.allclose(other["model"][n], p, rtol=1e-4, atol=1e-6)
               for n, p in ref["model"].items())


@pytest.mark.parametrize("method", CKPT_METHODS)
def test_fsdp_checkpoint_saved_on_two_ranks_resumes_on_one_and_on_two(catalogue, fsdp_runs,
                                                                      method):
    """A distributed checkpoint written by 2 FSDP ranks after 2 RigL updates, resumed on 2
    ranks and on 1 unsharded process, continues to the uninterrupted 2-rank result; with
    S²-SAM the previous step's (sharded) gradient travels in the checkpoint too."""
    _needs(catalogue, method)
    out, load = fsdp_runs
    full, _ = load(f"full_{method}")
    resumed = load(f"resumed_{method}")
    one = fsdp_worker.train_loop(method, STEPS, catalogue=catalogue,
                                 resume=(str(out / f"ckpt_{method}"), CKPT_AT))
    assert full["updates"] == 4 and one["updates"] == resumed[0]["updates"] == 2
    for got in (*resumed, one):
        for n, m in full["masks"].items():
            assert torch.equal(got["masks"][n], m), n
        for n, p in full["model"].items():
            torch.testing.assert_close(got["model"][n], p, rtol=1e-4, atol=1e-6)


def test_fsdp_refuses_a_placement_that_splits_nm_groups(fsdp_runs):
    """2:4 groups run along the input dimension; sharding it as 12 = 6 + 6 splits a group."""
    out, _ = fsdp_runs
    for r in range(2):
        text = (out / f"refused{r}.txt").read_text()
        assert "NotSupportedUnderFSDP" in text and "0.weight" in text
        assert "splits N:M groups of 4 along dim 1" in text and "[0, 6)" in text


def test_fsdp_refuses_unverified_components(fsdp_runs):
    """Forward masks are verified under FSDP with the N:M recipe only; RigL on forward masks,
    MDGF's decaying mask (β > 0) and two-pass SAM are refused, each with the reason."""
    out, _ = fsdp_runs
    for r in range(2):
        text = (out / f"forward_rigl{r}.txt").read_text()
        assert text.startswith("NotSupportedUnderFSDP") and "kind = 'forward'" in text
        assert "'rigl'" in text and "N:M recipe only" in text
        text = (out / f"mask_decay{r}.txt").read_text()
        assert text.startswith("NotSupportedUnderFSDP") and "'mask_decay'" in text
        text = (out / f"sam{r}.txt").read_text()
        assert text.startswith("NotSupportedUnderFSDP") and "[perturb] 'sam'" in text
        assert "s2sam" in text


def test_the_divergence_guard_agrees_across_ranks(fsdp_runs):
    """Every rank checks the weights before a checkpoint write, and the gradients: finite
    entries whose squares overflow, on one rank's shard, are finite on both ranks; a NaN weight
    or an infinite gradient on the other rank's shard is divergence on both, under ``stop`` and
    under ``skip``. (Each rank reading its own shard would answer differently, and a rank that
    raised alone would leave the other waiting in the next collective. The gradients' flag
    agrees through ``DTensor`` itself, which reduces the partial norms before the finiteness
    test; the weights' answer is a partial norm read back per rank, so the guard all-reduces
    it.)"""
    _, load = fsdp_runs
    assert load("guard_verdicts") == [["finite", "diverged", "diverged", "diverged"]] * 2


def test_trainer_fsdp_equals_ddp(fsdp_runs):
    """``[train] parallel = "fsdp"`` under 2 ranks: the Trainer run (3 epochs, RigL, 5
    topology updates, evaluation and checkpoints every epoch) ends with the DDP run's masks,
    weights within rtol 1e-4 and its test metrics; each rank held its shard of the masks."""
    _, load = fsdp_runs
    ddp, _ = load("trainer_ddp")
    a, b = load("trainer_fsdp")
    assert ddp["step"] == a["step"] == b["step"] == 24
    assert a["local_masks"]["1.weight"] == (9, 8) and b["local_masks"]["1.weight"] == (8, 8)
    for got in (a, b):
        _assert_equal_to({**got, "first": ddp["masks"], "densities": 0},
                         {**ddp, "first": ddp["masks"], "densities": 0})
        for k in ("test/loss", "test/acc", "density"):
            assert got["metrics"][k] == pytest.approx(ddp["metrics"][k], rel=1e-4), k


def test_trainer_fsdp_equals_ddp_on_the_gpt_with_s2sam(fsdp_runs):
    """The small GPT through the Trainer with RigL + S²-SAM, ``parallel = "fsdp"`` against
    ``"ddp"`` on 2 ranks: the same masks after 3 topology updates, weights within rtol 1e-4,
    the same test loss (an evaluation between the epochs, whose forwards leave FSDP's root
    unsharded, does not disturb the next step)."""
    _, load = fsdp_runs
    ddp, _ = load("trainer_gpt_ddp")
    for got in load("trainer_gpt_fsdp"):
        assert got["step"] == ddp["step"] == 6 and got["metrics"]["epoch"] == 1
        _assert_equal_to({**got, "first": ddp["masks"], "densities": 0},
                         {**ddp, "first": ddp["masks"], "densities": 0})
        assert got["metrics"]["test/loss"] == pytest.approx(ddp["metrics"]["test/loss"],
                                                            rel=1e-4)


def test_trainer_fsdp_resumes_from_its_distributed_checkpoint_on_two_ranks_and_one(
        catalogue, fsdp_runs, tmp_path):
    """The FSDP run's directory holds ``checkpoint.dcp`` and the kept ``checkpoint.prev.dcp``
    (after epoch 2). With the current one gone (a kill between the two renames of a write),
    a resume on 2 ranks and one on 1 process continue from the kept one to the uninterrupted
    run's masks and weights."""
    from sparsefw import distributed_checkpoint

    out, load = fsdp_runs
    names = {p.name for p in (out / "trainer_fsdp").iterdir()}
    assert {distributed_checkpoint.CHECKPOINT_DIR, distributed_checkpoint.PREVIOUS_DIR} <= names
    assert not any(n.endswith(".tmp") for n in names)
    full, _ = load("trainer_fsdp")
    one = fsdp_worker.trainer_run(str(tmp_path / "one"), TRAINER_FSDP,
                                  resume_prev_of=str(out / "trainer_fsdp"))
    assert full["start"] == 0
    for got in (*load("trainer_resumed"), one):
        assert got["start"] == 16 and got["step"] == 24
        for n, m in full["masks"].items():
            assert torch.equal(got["masks"][n], m), n
        for n, p in full["model"].items():
            torch.testing.assert_close(got["model"][n], p, rtol=1e-4, atol=1e-6)


def test_distributed_checkpoint_refuses_a_changed_file_and_untrusted_metadata(fsdp_runs,
                                                                             tmp_path):
    """Every file of ``checkpoint.dcp`` is checked against the CRC-32 written with it; DCP's
    pickled metadata may name only DCP's metadata classes and plain data."""
    import pickle
    import shutil

    from sparsefw import distributed_checkpoint
    from sparsefw.engine.checkpoint import CheckpointError, UntrustedCheckpoint

    out, _ = fsdp_runs
    ckpt = tmp_path / distributed_checkpoint.CHECKPOINT_DIR
    shutil.copytree(out / "trainer_fsdp" / distributed_checkpoint.CHECKPOINT_DIR, ckpt)
    distributed_checkpoint.verify(ckpt)
    distributed_checkpoint.safe_metadata(ckpt)
    shard = next(ckpt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        distributed_checkpoint.verify(ckpt)
    (ckpt / ".metadata").write_bytes(pickle.dumps({"x": print}))
    with pytest.raises(UntrustedCheckpoint, match="builtins.print"):
        distributed_checkpoint.safe_metadata(ckpt)


def test_trainer_fsdp_refuses_what_it_does_not_run(catalogue, tmp_path):
    """Settings the Trainer does not run under FSDP yet fail before training, naming each."""
    from sparsefw import config as config_mod
    from sparsefw.engine import Trainer
    from sparsefw.sharding import NotSupportedUnderFSDP

    raw = merge(TRAINER_FSDP, {"train": {"compile": True, "amp": "bf16"},
                               "optimizer": {"implementation": "fused"}})
    cfg = config_mod.structure(raw, catalogue.registry)
    with pytest.raises(NotSupportedUnderFSDP) as err:
        Trainer(cfg, catalogue, run_dir=tmp_path / "run", raw_config=raw)
    for what in ("compile = true", "amp = 'bf16'", 'implementation = "fused"'):
        assert what in str(err.value)


def test_export_gathers_a_distributed_checkpoint_into_a_plain_state_dict(fsdp_runs, tmp_path):
    """``sparsefw export`` of an FSDP run (its ``checkpoint.dcp``, written by 2 ranks) in one
    process: the whole masked weights under the model's own key names, the whole masks, the
    step; the DCP directory named itself exports the same."""
    import subprocess
    import sys

    from sparsefw import distributed_checkpoint

    out, load = fsdp_runs
    full, _ = load("trainer_fsdp")
    run = out / "trainer_fsdp"
    target = tmp_path / "model.pt"
    done = subprocess.run([sys.executable, "-m", "sparsefw.cli", "export", str(run),
                           "--out", str(target)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    state = torch.load(target, weights_only=True)
    masks = torch.load(tmp_path / "model.masks.pt", weights_only=True)
    assert set(state) == set(full["model"]) and set(masks) == set(full["masks"])
    for n, p in full["model"].items():
        expected = p * full["masks"][n] if n in full["masks"] else p
        assert torch.equal(state[n], expected), n
    for n, m in full["masks"].items():
        assert torch.equal(masks[n], m), n
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["step"] == 24 and meta["model"]["name"] == "mlp"
    from sparsefw.commands.export import export_run

    again = export_run(run / distributed_checkpoint.CHECKPOINT_DIR, tmp_path / "again.pt")
    assert again.density == pytest.approx(meta["density"])
    for n, t in torch.load(again.path, weights_only=True).items():
        assert torch.equal(t, state[n]), n


@pytest.mark.parametrize("entry,says", [("pending", "save between steps"),
                                        ("dense_momentum", "dense gradient momentum")])
def test_what_a_distributed_checkpoint_cannot_hold_is_a_clear_refusal(entry, says):
    """A perturbation applied for the next forward, or the dense-gradient momentum, cannot go
    into a distributed checkpoint yet: NotSupportedUnderFSDP saying what to do, not a bare
    ValueError."""
    from sparsefw import distributed_checkpoint, sharding

    class Holding:
        def state_dict(self):
            return {"masks": {"masks": {}}, entry: {"w": torch.zeros(1)}}

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(sharding.NotSupportedUnderFSDP, match=says):
        distributed_checkpoint._target(model, opt, Holding())
