"""The host-count selection (``select_per_segment`` with a list of counts) picks exactly the
entries of a plain stable sort by (score, flat index), ties, signed zeros, infinities and NaNs
included, on every path: the partial top-k on integer keys and the sampled pre-filter used on
large CPU layers (``_select_sampled``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsefw import topology
from sparsefw.topology import Magnitudes, select_indices, select_per_segment

NAN = float("nan")
INF = float("inf")
#: scores drawn from a few of these: ties everywhere, -0.0 next to 0.0, NaNs of both signs
PALETTE = (0.0, -0.0, 1.0, -1.0, 0.5, 2.0, INF, -INF, NAN, -NAN)


def _order(bits: int) -> int:
    """A float32's bits (as a signed int) made monotone: the order the selection uses."""
    return bits ^ 0x7FFFFFFF if bits < 0 else bits


def reference(scores: torch.Tensor, cand: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The rule, written out: non-candidates get the worst score (-inf when ``largest``, +inf
    otherwise); all entries are stably sorted by score (-0.0 equal to 0.0, a NaN with the sign
    bit clear above +inf, one with it set below -inf), best first, so that among equal scores
    the lower index comes first; the first ``k`` are taken and the non-candidates among them
    dropped."""
    n = scores.numel()
    fill = torch.tensor([-INF if largest else INF])
    filled = torch.where(cand, scores, fill)
    keys = [_order(b) for b in (filled + 0.0).view(torch.int32).tolist()]
    order = sorted(range(n), key=lambda i: -keys[i] if largest else keys[i])  # stable
    chosen = torch.zeros(n, dtype=torch.bool)
    for i in order[:k]:
        chosen[i] = bool(cand[i])
    return chosen


def as_mask(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Chosen flat indices as a bool mask of ``n`` entries; each index chosen once."""
    assert idx.dtype == torch.long and idx.unique().numel() == idx.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return mask


def draw(n: int, palette: list[float], density: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor(palette, dtype=torch.float32)
    scores = values[torch.randint(0, len(palette), (n,), generator=g)]
    cand = torch.rand(n, generator=g) < density
    return scores, cand


case = dict(
    n=st.integers(1, 3000),
    palette=st.lists(st.sampled_from(PALETTE), min_size=1, max_size=5),
    density=st.sampled_from([0.05, 0.5, 0.95, 1.0]),
    seed=st.integers(0, 2**16),
    largest=st.booleans(),
    data=st.data(),
)


@given(**case)
def test_host_count_selection_equals_the_stable_sort(n, palette, density, seed, largest, data):
    scores, cand = draw(n, palette, density, seed)
    k = data.draw(st.integers(0, n + 3))
    expect = reference(scores, cand, k, largest)
    assert torch.equal(select_per_segment([scores], [cand], [k], largest=largest)[0], expect)
    with pytest.MonkeyPatch.context() as mp:  # every layer through the sampled pre-filter
        mp.setattr(topology, "SAMPLED_MIN_NUMEL", 0)
        out = select_per_segment([scores], [cand], [k], largest=largest)[0]
    assert torch.equal(out, expect)
    assert torch.equal(as_mask(select_indices([scores], [cand], [k], largest=largest)[0], n),
                       expect)


@given(**case)
def test_sampled_selection_is_exact_or_declines(n, palette, density, seed, largest, data):
    """``_select_sampled`` either returns the exact selection or None (never a wrong one)."""
    scores, cand = draw(n, palette, density, seed)
    k = data.draw(st.integers(1, n))
    out = topology._select_sampled(scores, cand, k, largest)
    if out is not None:
        assert torch.equal(as_mask(out, n), reference(scores, cand, k, largest))


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("palette", [None, (0.0, -0.0, 1.0, 3.0), (0.5, NAN, -NAN, INF, -INF)])
def test_large_layer_takes_the_sampled_path_and_matches(largest, palette):
    """A layer above ``SAMPLED_MIN_NUMEL``: the fast path answers (no fallback) and agrees with
    the stable sort, with continuous scores and with a few tied values. (NaNs that rank first,
    positive ones when ``largest``, leave no threshold to place: the full selection runs.)"""
    n = topology.SAMPLED_MIN_NUMEL * 2 + 8
    g = torch.Generator().manual_seed(3)
    if palette is None:
        scores, cand = torch.randn(n, generator=g), torch.rand(n, generator=g) < 0.1
    else:
        scores, cand = draw(n, list(palette), 0.9, 5)
    k = int(cand.sum()) // 3
    out = topology._select_sampled(scores, cand, k, largest)
    expect = reference(scores, cand, k, largest)
    if largest and palette is not None and any(math.isnan(v) for v in palette):
        assert out is None
    else:
        assert out is not None
        assert torch.equal(as_mask(out, n), expect)
    shaped = select_per_segment([scores.view(8, -1)], [cand.view(8, -1)], [k], largest=largest)
    assert torch.equal(shaped[0], expect.view(8, -1))


@given(n=st.integers(0, 200), density=st.sampled_from([0.0, 0.02, 0.3, 0.9, 1.0]),
       seed=st.integers(0, 2**16))
def test_flatnonzero_by_words_equals_numpy(n, density, seed):
    """``_flatnonzero`` (8-byte words first) lists the same positions as ``np.flatnonzero``,
    in the same (increasing) order, for any length (a tail of fewer than 8 entries) and
    density (the dense fallback)."""
    b = np.random.default_rng(seed).random(n) < density
    assert np.array_equal(topology._flatnonzero(b), np.flatnonzero(b))


@given(n=st.integers(1, 400), palette=case["palette"], seed=st.integers(0, 2**16),
       largest=st.booleans(), data=st.data())
def test_best_kept_follows_the_key_order(n, palette, seed, largest, data):
    """``_best_kept`` (a float partition without NaNs, int64 keys with them) takes the ``k``
    entries the stable sort takes, and reports the ``k``-th entry's key."""
    scores, _ = draw(n, palette, 1.0, seed)
    k = data.draw(st.integers(1, n))
    best, kth = topology._best_kept(scores.numpy(), k, largest)
    expect = reference(scores, torch.ones(n, dtype=torch.bool), k, largest)
    assert torch.equal(as_mask(torch.from_numpy(best).long(), n), expect)
    worst = scores[expect]
    keys = [_order((torch.tensor([v]) + 0.0).view(torch.int32).item()) for v in worst.tolist()]
    assert kth == (min(keys) if largest else max(keys))


@given(**case)
def test_magnitude_selection_equals_the_stable_sort_of_absolute_values(n, palette, density, seed,
                                                                       largest, data):
    """``magnitude=True`` (scores ``|x|``; large CPU layers compare ``x`` with ``±t``) picks the
    entries the stable sort of ``x.abs()`` picks, on both paths."""
    scores, cand = draw(n, palette, density, seed)
    k = data.draw(st.integers(0, n + 3))
    expect = reference(scores.abs(), cand, k, largest)
    for threshold in (topology.SAMPLED_MIN_NUMEL, 0):  # 0: every layer through the pre-filter
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(topology, "SAMPLED_MIN_NUMEL", threshold)
            out = select_indices([scores], [cand], [k], largest=largest, magnitude=True)[0]
        assert torch.equal(as_mask(out, n), expect)


@pytest.mark.parametrize("sampled", [False, True])
@given(n=st.integers(1, 300), seed=st.integers(0, 2**16), largest=st.booleans(),
       data=st.data())
def test_magnitudes_select_as_their_absolute_values(sampled, n, seed, largest, data,
                                                     monkeypatch):
    """:class:`Magnitudes` scores select exactly the entries of the tensors of absolute
    values, through select_indices and select_per_segment (host and device counts), and
    reading an entry gives ``|x|``."""
    if sampled:
        monkeypatch.setattr(topology, "SAMPLED_MIN_NUMEL", 0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g).round(decimals=1)  # ties, and -x ties with x
    cand = torch.rand(n, generator=g) < 0.7
    k = data.draw(st.integers(0, n))
    mags = Magnitudes([x])
    assert torch.equal(mags[0], x.abs()) and len(mags) == 1
    want = select_indices([x.abs()], [cand], [k], largest=largest)[0]
    got = select_indices(mags, [cand], [k], largest=largest)[0]
    assert torch.equal(got.sort().values, want.sort().values)
    for counts in ([k], torch.tensor([k])):
        assert torch.equal(select_per_segment(mags, [cand], counts, largest=largest)[0],
                           select_per_segment([x.abs()], [cand], counts, largest=largest)[0])


@given(n=st.integers(1, 3000), palette=st.lists(st.sampled_from(PALETTE), min_size=1,
                                                  max_size=5),
       density=st.sampled_from([0.05, 0.5, 1.0]), seed=st.integers(0, 2**16),
       largest=st.booleans(), magnitude=st.booleans(), block=st.integers(1, 700),
       threshold=st.sampled_from([0.0, 0.5, 1.0, INF]))
def test_blocked_prefilter_keeps_what_whole_array_passes_keep(n, palette, density, seed, largest,
                                                              magnitude, block, threshold,
                                                              monkeypatch):
    """``_kept`` block by block (any block size, a short last block) keeps exactly the
    candidates that whole-array comparisons keep: not strictly worse than ``t`` (NaNs kept),
    of ``|s|`` when ``magnitude``, increasing."""
    monkeypatch.setattr(topology, "_BLOCK", block)
    scores, cand = draw(n, palette, density, seed)
    s, c = scores.numpy(), cand.numpy()
    t = np.float32(threshold)
    v = np.abs(s) if magnitude else s
    worse = v < t if largest else v > t
    expect = np.flatnonzero(c & ~worse)
    got = topology._kept(s, c, t, largest, magnitude)
    assert np.array_equal(got, expect)


@pytest.mark.parametrize("sampled", [False, True])
@given(sizes=st.lists(st.integers(1, 400), min_size=1, max_size=4),
       palette=st.lists(st.sampled_from(PALETTE), min_size=1, max_size=5),
       density=st.sampled_from([0.05, 0.5, 1.0]), seed=st.integers(0, 2**16),
       largest=st.booleans(), magnitude=st.booleans(), data=st.data())
def test_global_host_selection_equals_the_one_sort_over_all_layers(
        sampled, sizes, palette, density, seed, largest, magnitude, data):
    """``select_global_indices`` (a host count, answered per layer) picks the entries of the
    reference rule applied to all layers joined in model order: ties to the lower flat index,
    so to the earlier layer; ``magnitude``: the scores are the absolute values."""
    scores, cand = draw(sum(sizes), palette, density, seed)
    k = data.draw(st.integers(-1, sum(sizes) + 3))
    expect = reference(scores.abs() if magnitude else scores, cand, max(k, 0), largest)
    layers = list(scores.split(sizes))
    given_scores = Magnitudes(layers) if magnitude else layers
    with pytest.MonkeyPatch.context() as mp:
        if sampled:
            mp.setattr(topology, "SAMPLED_MIN_NUMEL", 0)
        out = topology.select_global_indices(given_scores, list(cand.split(sizes)), k,
                                             largest=largest)
    got = torch.cat([as_mask(i, n) for i, n in zip(out, sizes, strict=True)])
    assert torch.equal(got, expect)
