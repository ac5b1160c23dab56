"""Random growth (SET, DSR, MEST, ITOP) on large CPU layers draws the grown positions
themselves (``sample_candidates``) instead of a uniform score for every entry: the answer is
a uniformly random subset of the candidates of the asked size, drawn from the run's generator
(so a resumed run draws the same), and other layers keep the scores of one draw."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsefw import topology
from sparsefw.topology import RandomScores, sample_candidates, select_indices


def _state(generator: torch.Generator) -> torch.Tensor:
    return generator.get_state()


@given(n=st.integers(1, 3000), density=st.sampled_from([0.0, 0.01, 0.1, 0.3, 0.6, 1.0]),
       k=st.integers(0, 3000), seed=st.integers(0, 2**16))
def test_a_subset_of_the_candidates_of_the_asked_size(n, density, k, seed):
    rng = np.random.default_rng(seed)
    cand = rng.random(n) < density
    n_c = int(cand.sum())
    g = torch.Generator().manual_seed(seed)
    before = _state(g)
    got = sample_candidates(cand, k, g)
    if k < n_c < 2 * k:  # declined: the caller scores every entry instead
        assert got is None
        assert torch.equal(_state(g), before)  # and nothing was drawn
        return
    assert got is not None and got.dtype == np.int64
    assert got.size == min(k, n_c)
    assert np.all(np.diff(got) > 0)  # distinct, increasing
    assert cand[got].all()
    again = sample_candidates(cand, k, torch.Generator().manual_seed(seed))
    assert np.array_equal(got, again)  # the generator decides everything


@pytest.mark.parametrize("density", [0.9, 0.1])  # rejection over the layer / over the candidates
def test_every_candidate_equally_likely(density):
    """Inclusion counts over many draws are what a uniform k-subset gives: a chi-square within
    a few standard deviations of its mean, and no drift along the index (a sampler that
    favoured early draws or low positions would fail by far). Fixed seeds: not flaky."""
    n, k, rounds = 4000, 60, 3000
    cand = np.random.default_rng(1).random(n) < density
    n_c = int(cand.sum())
    g = torch.Generator().manual_seed(2)
    hits = np.zeros(n, dtype=np.int64)
    for _ in range(rounds):
        np.add.at(hits, sample_candidates(cand, k, g), 1)
    assert hits[~cand].sum() == 0
    counts = hits[cand]
    expected = rounds * k / n_c
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = n_c - 1
    assert abs(chi2 - dof) < 6 * math.sqrt(2 * dof), (chi2, dof)
    half = n_c // 2
    first, second = counts[:half].mean(), counts[half:].mean()
    se = math.sqrt(expected * (1 / half + 1 / (n_c - half)))
    assert abs(first - second) < 6 * se


def test_the_trim_to_k_keeps_inclusion_uniform():
    """The kept entries are a uniform subset of the distinct ones drawn (not, say, the lowest
    k): with k close to half of the candidates the trim leaves out many; inclusion stays
    uniform."""
    n, k, rounds = 200, 95, 4000
    cand = np.ones(n, dtype=bool)
    g = torch.Generator().manual_seed(3)
    hits = np.zeros(n, dtype=np.int64)
    for _ in range(rounds):
        got = sample_candidates(cand, k, g)
        assert got.size == k
        np.add.at(hits, got, 1)
    expected = rounds * k / n
    chi2 = float(((hits - expected) ** 2 / expected).sum())
    assert abs(chi2 - (n - 1)) < 6 * math.sqrt(2 * (n - 1)), chi2


def test_random_scores_read_layer_by_layer_equal_the_one_draw():
    shapes = [torch.Size([3, 5]), torch.Size([7]), torch.Size([2, 2, 2])]
    whole = RandomScores(shapes, torch.Generator().manual_seed(4), torch.device("cpu"))
    apart = RandomScores(shapes, torch.Generator().manual_seed(4), torch.device("cpu"))
    for i, s in enumerate(shapes):
        assert whole[i].shape == s
        assert torch.equal(whole[i].reshape(-1), apart.draw(i))
    assert len(whole) == 3 and torch.equal(whole[0], whole[0])  # drawn once, kept


def test_large_cpu_layers_sample_small_ones_score(monkeypatch):
    """``select_indices`` of RandomScores: a layer at the threshold draws its subset directly
    (no score per entry is drawn), a smaller one is scored exactly as before (the k largest
    of its own draw)."""
    monkeypatch.setattr(topology, "RANDOM_SUBSET_MIN_NUMEL", 1000)
    big = torch.rand(1000, generator=torch.Generator().manual_seed(5)) < 0.8
    small = torch.rand(999, generator=torch.Generator().manual_seed(6)) < 0.8
    g = torch.Generator().manual_seed(7)

    def no_scores(*args, **kwargs):
        raise AssertionError("a score per entry was drawn")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "rand", no_scores)
        got = select_indices(RandomScores([big.shape], g, torch.device("cpu")), [big], [40],
                             largest=True)[0]
    assert got.numel() == 40 and bool(big[got].all())

    g = torch.Generator().manual_seed(8)
    got = select_indices(RandomScores([small.shape], g, torch.device("cpu")), [small], [40],
                         largest=True)[0]
    scores = torch.rand(999, generator=torch.Generator().manual_seed(8))
    want = torch.topk(scores.masked_fill(~small, -math.inf), 40).indices
    assert sorted(got.tolist()) == sorted(want.tolist())
