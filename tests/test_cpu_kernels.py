"""``[sparsity] cpu_kernels = true``: sparsefw's compiled CPU kernels (:mod:`sparsefw.kernels`).
The compare-and-compact kernel must keep exactly the entries numpy's pre-filter
(``topology._kept``) keeps, for every score (ties, signed zeros, infinities, NaNs), candidate
kind and tail length, so that every topology method selects the same entries with it as
without; whole runs must be the same bit for bit; the engine's ``auto`` optimizer takes the
masked SGD kernel where it applies; and a machine that cannot build the kernels gets a
configuration error naming the key."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsefw import Sparsifier, kernels, topology
from sparsefw import config as config_mod
from sparsefw import masks as masks_mod
from sparsefw.config import ConfigError, SparsityConfig
from sparsefw.engine import Trainer
from sparsefw.kernels.masked_sgd import MaskedSGD
from sparsefw.testing.resume import assert_same_run

from .conftest import kernels_or_skip, merge
from .test_sparsifier import BASE, EVERY
from .test_topology_selection import PALETTE, draw


@pytest.fixture(scope="module", autouse=True)
def built():
    """Build (or load) the kernels once for the module (:func:`kernels_or_skip`)."""
    kernels_or_skip()


@given(n=st.integers(0, 300), palette=st.lists(st.sampled_from(PALETTE), min_size=1,
                                                 max_size=5),
       density=st.sampled_from([0.0, 0.05, 0.5, 1.0]), seed=st.integers(0, 2**16),
       largest=st.booleans(), magnitude=st.booleans(), float_candidates=st.booleans(),
       threshold=st.sampled_from([0.0, -0.0, 0.5, 1.0, 2.0, float("inf")]),
       expected=st.integers(0, 400))
def test_compare_and_compact_keeps_what_numpy_keeps(n, palette, density, seed, largest,
                                                    magnitude, float_candidates, threshold,
                                                    expected):
    """Any length (32-entry blocks and a tail of every length), any capacity hint (too small:
    the output grows), candidates as bools or as the 0/1 floats the masks are stored as."""
    scores, cand = draw(n, palette, density, seed) if n else (torch.zeros(0), torch.zeros(
        0, dtype=torch.bool))
    t = np.float32(threshold)
    expect = topology._kept(scores.numpy(), cand.numpy(), t, largest, magnitude)
    c = cand.float() if float_candidates else cand
    got = kernels.load_kernels().kept_indices(scores, c, float(t), largest, magnitude, expected)
    assert got.dtype == torch.long
    assert np.array_equal(got.numpy(), expect)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("magnitude", [True, False])
@pytest.mark.parametrize("float_candidates", [True, False])
@pytest.mark.parametrize("threshold", [0.0, 1.0, float("inf")])
def test_compare_and_compact_on_every_special_score(largest, magnitude, float_candidates,
                                                   threshold):
    """Every palette value (NaNs of both signs, infinities, ±0, ties) at every position of
    several 32-entry blocks and of a tail, half of them candidates."""
    values = torch.tensor(PALETTE, dtype=torch.float32)
    n = 32 * 7 + 13
    scores = values[torch.arange(n) % len(PALETTE)]
    cand = (torch.arange(n) // len(PALETTE)) % 2 == 0
    t = np.float32(threshold)
    expect = topology._kept(scores.numpy(), cand.numpy(), t, largest, magnitude)
    c = cand.float() if float_candidates else cand
    got = kernels.load_kernels().kept_indices(scores, c, float(t), largest, magnitude, 0)
    assert np.array_equal(got.numpy(), expect)


def test_compare_and_compact_joins_the_ranges_of_several_threads_in_order():
    """A layer larger than the kernel's parallel grain (2^18) is split over the threads; the
    ranges' indices are joined in increasing order."""
    n = (1 << 20) + 77
    g = torch.Generator().manual_seed(11)
    scores, cand = torch.randn(n, generator=g), torch.rand(n, generator=g) < 0.7
    expect = topology._kept(scores.numpy(), cand.numpy(), np.float32(1.5), True, True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = kernels.load_kernels().kept_indices(scores, cand, 1.5, True, True, 10)
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(got.numpy(), expect)


def test_compare_and_compact_refuses_what_it_cannot_read():
    kept = kernels.load_kernels().kept_indices
    with pytest.raises(RuntimeError, match="float32"):
        kept(torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.bool), 0.0, True,
             False, 0)
    with pytest.raises(RuntimeError, match="candidates"):
        kept(torch.zeros(8), torch.ones(8, dtype=torch.int32), 0.0, True, False, 0)
    with pytest.raises(RuntimeError, match="4 candidates for 8 scores"):
        kept(torch.zeros(8), torch.ones(4, dtype=torch.bool), 0.0, True, False, 0)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("magnitude", [True, False])
def test_a_large_layer_selects_the_same_entries_through_the_kernel(largest, magnitude):
    n = topology.SAMPLED_MIN_NUMEL * 3 + 5
    g = torch.Generator().manual_seed(7)
    scores, cand = torch.randn(n, generator=g), torch.rand(n, generator=g) < 0.2
    k = int(cand.sum()) // 4
    calls = []

    def compact(*args):
        calls.append(1)
        return kernels.load_kernels().kept_indices(*args)

    got = topology._select_sampled(scores, cand, k, largest, magnitude, compact)
    expect = topology._select_sampled(scores, cand, k, largest, magnitude)
    assert calls == [1] and got is not None and expect is not None
    assert torch.equal(got, expect)


@given(n=st.integers(1, 400), density=st.sampled_from([0.0, 0.3, 1.0]),
       seed=st.integers(0, 2**16), tensors=st.integers(0, 3), data=st.data())
def test_zeroing_at_indices_writes_what_numpy_writes(n, density, seed, tensors, data):
    """``zero_inactive_`` zeroes every tensor at the indices (any order, repeats) where the
    0/1 mask is zero (-0.0 included), and nothing else."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, generator=g) < density).float()
    mask[torch.rand(n, generator=g) < 0.1] = -0.0
    idx = torch.tensor(data.draw(st.lists(st.integers(0, n - 1), max_size=2 * n)),
                       dtype=torch.long)
    ours = [torch.randn(n, generator=g) for _ in range(tensors)]
    ref = [t.clone() for t in ours]
    i = idx.numpy()
    zero = i[mask.numpy()[i] == 0]
    for t in ref:
        t.numpy()[zero] = 0
    kernels.load_kernels().zero_inactive_(idx, mask, ours)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))


def test_zeroing_at_indices_refuses_what_it_cannot_write():
    zero = kernels.load_kernels().zero_inactive_
    with pytest.raises(RuntimeError, match="out of range"):
        zero(torch.tensor([0, 8]), torch.zeros(8), [torch.ones(8)])
    with pytest.raises(RuntimeError, match="mask's size"):
        zero(torch.tensor([0]), torch.zeros(8), [torch.ones(4)])
    with pytest.raises(RuntimeError, match="float32"):
        zero(torch.tensor([0]), torch.zeros(8), [torch.ones(8, dtype=torch.float64)])


METHODS = {
    "rigl": {"topology_update": {"name": "rigl", **EVERY}},
    "set": {"topology_update": {"name": "set", **EVERY}},
    "mest": {"topology_update": {"name": "mest", **EVERY}},
    "granet": {"topology_update": {"name": "granet", **EVERY}},
    "dsr": {"topology_update": {"name": "dsr", **EVERY}},
    "snfs": {"topology_update": {"name": "snfs", **EVERY}},
}


def _run(catalogue, tmp_path, raw) -> Trainer:
    cfg = config_mod.structure(raw, catalogue.registry, source="test.toml")
    trainer = Trainer(cfg, catalogue, run_dir=tmp_path, raw_config=raw)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_run_with_the_kernels_equals_one_without(catalogue, tmp_path, monkeypatch, method):
    """Whole runs of every method that selects by scores through ``select_indices`` or
    ``select_global_indices``: every layer takes the sampled path and the numpy route of the
    index edits here (the thresholds lowered), and the kernels answer in the run with
    ``cpu_kernels`` (counted)."""
    monkeypatch.setattr(topology, "SAMPLED_MIN_NUMEL", 0)
    monkeypatch.setattr(masks_mod, "NUMPY_MIN_NUMEL", 0)
    loaded = kernels.load_kernels()
    calls, zeroed = [], []

    class Counting:
        masked_sgd_ = loaded.masked_sgd_

        @staticmethod
        def kept_indices(*args):
            calls.append(1)
            return loaded.kept_indices(*args)

        @staticmethod
        def zero_inactive_(*args):
            zeroed.append(1)
            return loaded.zero_inactive_(*args)

    monkeypatch.setattr(kernels, "load_kernels", lambda: Counting)
    runs = []
    for on in (False, True):
        raw = merge(merge(BASE, METHODS[method]), {"sparsity": {"cpu_kernels": on}})
        runs.append(_run(catalogue, tmp_path / str(on), raw))
        assert bool(calls) is on and bool(zeroed) is on
    without, with_kernels = runs
    assert with_kernels.state.step == without.state.step == 24
    assert_same_run(without, with_kernels)


def test_the_engine_takes_the_masked_sgd_kernel_where_it_applies(catalogue, tmp_path):
    raw = merge(merge(BASE, METHODS["rigl"]), {"sparsity": {"cpu_kernels": True}})
    assert isinstance(_run(catalogue, tmp_path / "sgd", raw).optimizer, MaskedSGD)
    adamw = merge(raw, {"optimizer": {"name": "adamw", "lr": 1e-3}})
    opt = _run(catalogue, tmp_path / "adamw", adamw).optimizer
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    chosen = merge(raw, {"optimizer": {"implementation": "foreach"}})
    opt = _run(catalogue, tmp_path / "foreach", chosen).optimizer
    assert not isinstance(opt, MaskedSGD) and opt.defaults["foreach"]


def test_kernels_that_cannot_be_built_are_a_config_error(catalogue, tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "unavailable", lambda: "no C++ compiler here")
    raw = merge(BASE, {"sparsity": {"cpu_kernels": True}})
    cfg = config_mod.structure(raw, catalogue.registry, source="run.toml")
    with pytest.raises(ConfigError) as info:
        Trainer(cfg, catalogue, run_dir=tmp_path, raw_config=raw, config_source="run.toml")
    assert "run.toml: [sparsity] cpu_kernels = true: no C++ compiler here" in str(info.value)
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ConfigError, match=r"\[sparsity\] cpu_kernels = true: no C\+\+"):
        Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1),
                   {"sparsity": {"density": 0.5, "cpu_kernels": True}}, catalogue=catalogue,
                   total_steps=4)
    assert not list(tmp_path.iterdir())  # nothing written


def test_off_the_cpu_the_switch_builds_and_changes_nothing(monkeypatch):
    def no_build():
        raise AssertionError("built")

    monkeypatch.setattr(kernels, "load_kernels", no_build)
    on = SimpleNamespace(sparsity=SparsityConfig(cpu_kernels=True))
    assert topology.compiled_compact(SimpleNamespace(config=on,
                                                     device=torch.device("cuda"))) is None
    off = SimpleNamespace(sparsity=SparsityConfig())
    assert topology.compiled_compact(SimpleNamespace(config=off,
                                                     device=torch.device("cpu"))) is None


def test_each_python_environment_builds_its_own_module(monkeypatch):
    """One build per environment (named after ``sys.prefix``): another environment's build
    does not replace this one's."""
    assert kernels.load_kernels().__name__ == kernels.module_name()
    here = kernels.module_name()
    monkeypatch.setattr(sys, "prefix", sys.prefix + "-other")
    assert kernels.module_name() != here and kernels.module_name().startswith("sparsefw_kernels_")


def test_torchs_cuda_notice_is_dropped_and_nothing_else(caplog):
    """Loading CPU kernels on a machine with a CUDA toolkit and no GPU does not print torch's
    "No CUDA runtime is found"; other records of that logger still pass."""
    log = logging.getLogger("torch.utils.cpp_extension")
    with caplog.at_level(logging.WARNING), kernels._without_cuda_notice():
        log.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        log.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    log.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")  # filter gone
    assert len(caplog.records) == 2
