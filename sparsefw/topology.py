"""Shared drop/grow mechanics of the dynamic-topology components (SET, RigL, MEST, ITOP, ...).

A dynamic-sparse-training update is, per layer: drop the ``k`` active entries with the smallest
*drop score*, then grow ``k`` inactive entries with the largest *grow score*. Methods differ only
in the scores, in ``k`` and in a little bookkeeping, so :class:`DropGrow` holds the mechanics once
and a method overrides :meth:`DropGrow.drop_scores` / :meth:`DropGrow.grow_scores` (SET is a few
lines, RigL is SET with a gradient grow score).

Conventions, shared by every component built on this module:

* **At most one host sync per update** (:func:`select_per_segment`): the drop/grow counts are
  read to the host once and each layer's selection is a partial top-k on exact integer keys
  (``host_counts``); with device counts a component takes no sync at all and one stable sort
  per layer (DSR syncs once per update for its threshold bookkeeping; GraNet once, at its
  first update, when it measures its initial density). Global selections (GraNet's pruning)
  sort all layers at once, or with a host count rank them together by partial top-k
  (:func:`select_global_indices`: GraNet on CPU masks, which reads its counts once per update
  and edits the masks at indices like the methods above).
* **Ties** are broken deterministically by position: among equal scores the lower flat index (and,
  for global selections, the earlier layer in model order) is chosen first, for dropping as for
  growing. The references break ties with tiny random noise instead.
* **Re-growing a just-dropped entry** is allowed (``regrow_dropped = true``, as in the RigL and
  sparse_learning references): grow candidates are the entries inactive *after* the drop. Such an
  entry's mask does not change, so the engine leaves its weight and optimizer state untouched —
  it keeps its value, as in the reference. With ``regrow_dropped = false`` only entries inactive
  before the update may grow (then a layer with fewer free entries than ``k`` grows fewer).
* Counts reported in :class:`~sparsefw.state.TopologyChange` and in ``state.metrics`` are the net
  changes of the mask: ``dropped = |old ∧ ¬new|`` and ``grown = |new ∧ ¬old|`` per layer.
* **Exploration** (ITOP, arXiv 2102.02887): the component keeps, per layer, the mask of entries
  that were ever active and logs ``R_s`` = Σ ever-active / Σ entries as ``topology/itop_rate``.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Sequence
from typing import ClassVar

import attrs
import numpy as np
import torch

from sparsefw.config import in_range, one_of
from sparsefw.hookspecs import hookimpl
from sparsefw.masks import fill_at, flat_numpy
from sparsefw.schedules import cosine_remaining, linear_remaining, progress
from sparsefw.state import TopologyChange, UpdateInterval

#: decays of the drop fraction a component applies when no schedule provides ``drop_fraction``
DECAYS = ("cosine", "constant", "linear")


# ------------------------------------------------------------------------------ selection
class Magnitudes(Sequence[torch.Tensor]):
    """Per-layer scores ``|x|``, held as the signed tensors ``x`` (:attr:`signed`). Reading an
    entry builds its absolute values; :func:`select_indices` never does: it compares ``x``
    with ``±t`` on large CPU layers, which saves a pass and a layer-sized allocation. What
    :meth:`DropGrow.drop_scores` (``|w|``) and :func:`grad_abs` (``|∇L|``) answer."""

    def __init__(self, signed: Sequence[torch.Tensor]):
        self.signed = list(signed)

    def __len__(self) -> int:
        return len(self.signed)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [x.abs() for x in self.signed[i]]
        return self.signed[i].abs()


class RandomScores(Sequence[torch.Tensor]):
    """Per-layer uniform random scores in ``[0, 1)`` from ``generator``, drawn on first read
    (one draw over all layers in order, as ``torch.rand`` of their total size).

    The ``k`` best of independent uniform scores among the candidates are a uniformly random
    ``k``-subset of the candidates, whatever the scores' values: that is all a random growth
    (SET, DSR, MEST, ITOP) asks of them. So :func:`select_indices` never reads these scores on
    large CPU layers (at least :data:`RANDOM_SUBSET_MIN_NUMEL` entries): it draws the subset
    itself (:func:`sample_candidates`, a few draws per chosen entry instead of one per entry
    of the layer), and scores other layers one by one, in order (the same numbers as the one
    draw when no layer before them was sampled)."""

    def __init__(self, shapes: Sequence[torch.Size], generator: torch.Generator | None,
                 device: torch.device):
        self.shapes = [torch.Size(s) for s in shapes]
        self.generator = generator
        self.device = torch.device(device)
        self._drawn: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i):
        if self._drawn is None:
            sizes = [s.numel() for s in self.shapes]
            flat = torch.rand(sum(sizes), generator=self.generator, device=self.device)
            self._drawn = [f.view(s) for f, s in zip(flat.split(sizes), self.shapes,
                                                     strict=True)]
        return self._drawn[i]

    def draw(self, i: int) -> torch.Tensor:
        """Fresh flat scores for layer ``i`` alone (what :func:`select_indices` reads)."""
        return torch.rand(self.shapes[i].numel(), generator=self.generator, device=self.device)

    def samples_directly(self, candidates: torch.Tensor) -> bool:
        """Whether :func:`select_indices` draws this layer's subset itself (a large CPU layer)."""
        gen = self.generator
        return (candidates.device.type == "cpu"
                and candidates.numel() >= RANDOM_SUBSET_MIN_NUMEL
                and (gen is None or gen.device.type == "cpu"))


#: CPU layers with at least this many entries grow at random by drawing the chosen positions
#: (:func:`sample_candidates`) instead of a score for every entry (:class:`RandomScores`)
RANDOM_SUBSET_MIN_NUMEL = 1 << 16


def sample_candidates(cand: np.ndarray, k: int, generator: torch.Generator | None
                      ) -> np.ndarray | None:
    """A uniformly random ``k``-subset of the candidates (the True entries of the flat bool
    array ``cand``), as increasing flat indices, from torch's ``generator``; every candidate
    when ``k`` is at least their count. ``None``, drawing nothing, when ``k`` is more than
    half of them (then scoring every entry is as cheap).

    Positions are drawn uniformly with replacement (over the whole layer when at least a
    quarter of it are candidates, the others rejected; else over the candidates' indices)
    until at least ``k`` distinct candidates were hit; of those, a uniform random rest (drawn
    the same way) is left out. Given how many distinct candidates the draws hit, which ones
    they are is uniform over the subsets of that size (the draws are exchangeable and when to
    stop depends on that count only), so the ``k`` kept are a uniform ``k``-subset: the
    distribution of the ``k`` best of uniform scores, at a few draws per chosen entry instead
    of one per entry of the layer."""
    n_c = int(np.count_nonzero(cand))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n_c:
        return np.flatnonzero(cand)
    if 2 * k > n_c:
        return None
    universe = None if 4 * n_c >= cand.size else np.flatnonzero(cand)
    size = cand.size if universe is None else n_c
    small = size < 2**31  # int32 positions: half the bytes to draw and sort
    dtype = torch.int32 if small else torch.int64
    chosen = np.zeros(0, dtype=np.int32 if small else np.int64)
    while chosen.size < k:
        # draws landing on candidates that reach k distinct from chosen.size (coupon
        # collector's expectation plus a margin), over the fraction that lands on candidates
        hits = n_c * math.log((n_c - chosen.size) / (n_c - k))
        m = int((hits + 4.0 * math.sqrt(hits) + 16) * size / n_c) + 1
        pos = torch.randint(size, (m,), generator=generator, dtype=dtype).numpy()
        pos = pos[cand.take(pos)] if universe is None else universe.take(pos)
        both = np.sort(np.concatenate([chosen, pos]))
        chosen = both[np.concatenate([[True], both[1:] != both[:-1]])]
    if chosen.size > k:  # a uniform k-subset of them, in order: leave out a uniform rest
        extra = chosen.size - k
        if 8 * extra <= chosen.size:  # a few: drawn the same way (a much smaller draw)
            out = sample_candidates(np.ones(chosen.size, dtype=np.bool_), extra, generator)
        else:
            out = torch.randperm(chosen.size, generator=generator)[:extra].numpy()
        chosen = np.delete(chosen, out)
    return chosen.astype(np.int64, copy=False)


def select_per_segment(
    scores: Sequence[torch.Tensor],
    candidates: Sequence[torch.Tensor],
    k: torch.Tensor | Sequence[int],
    *,
    largest: bool,
    single_segment: bool = False,
) -> list[torch.Tensor]:
    """Per layer, the ``k[i]`` candidate entries of ``scores[i]`` with the largest (or smallest)
    score, as bool masks of the layers' shapes.

    ``k`` is a long device tensor with one count per layer (or one count in all when
    ``single_segment``: one global selection over every layer). Counts larger than the number of
    candidates select every candidate. Ties go to the lower flat index (earlier layer first in a
    global selection). With device counts there is no host sync (one stable sort per layer);
    with counts already on the host (a list of ints) a partial ``topk`` on exact integer keys
    is used instead, which is much faster on large layers and selects the same entries.
    """
    if not scores:
        return []
    fill = -math.inf if largest else math.inf
    if not torch.is_tensor(k):
        out = []
        for c, idx in zip(candidates, select_indices(scores, candidates, k, largest=largest),
                          strict=True):
            chosen = torch.zeros(c.numel(), dtype=torch.bool, device=c.device)
            chosen[idx] = True
            out.append(chosen.view_as(c))
        return out
    scores = list(scores)  # (Magnitudes: built once)
    if single_segment:
        sizes = [s.numel() for s in scores]
        flat = torch.cat([s.reshape(-1).float() for s in scores])
        cand = torch.cat([c.reshape(-1) for c in candidates])
        chosen = _select(flat, cand, k.reshape(()), largest, fill)
        return [c.view_as(s) for c, s in zip(chosen.split(sizes), scores, strict=True)]
    # one sort per layer (a segmented sort by layer id is slow on CPU: stable sorts of keys with
    # many duplicates); still no host sync, the counts stay on the device
    return [
        _select(s.reshape(-1).float(), c.reshape(-1), k[i], largest, fill).view_as(s)
        for i, (s, c) in enumerate(zip(scores, candidates, strict=True))
    ]


def _order_keys(flat: torch.Tensor, largest: bool) -> torch.Tensor:
    """int64 keys ordered as ``flat`` (float32) and unique, ties broken to the lower index:
    the float's bits made monotone as a signed integer, times 2³², plus the (reversed, when
    ``largest``) position.

    This *is* the order of every host-count selection: -0.0 ties with 0.0, a NaN with the sign
    bit clear ranks above +inf and one with it set below -inf (NaNs among themselves by their
    bits), and equal scores go to the lower position."""
    bits = (flat + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into 0.0 (a tie)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    pos = torch.arange(flat.numel(), device=flat.device, dtype=torch.long)
    if largest:
        pos = (flat.numel() - 1) - pos
    return ordered * 4_294_967_296 + pos


def select_indices(
    scores: Sequence[torch.Tensor],
    candidates: Sequence[torch.Tensor],
    k: Sequence[int],
    *,
    largest: bool,
    magnitude: bool = False,
    compact: Callable | None = None,
) -> list[torch.Tensor]:
    """:func:`select_per_segment` with host counts, answered as flat indices: per layer a long
    tensor (on the layer's device, in no particular order) of the ``k[i]`` chosen entries of
    ``scores[i]``, the same entries and tie rule. Cheaper than the bool masks when the
    caller edits masks at those indices (:meth:`DropGrow.update_by_index`).

    ``magnitude`` (implied by :class:`Magnitudes` scores): the scores are ``|scores[i]|``;
    large CPU layers then compare ``scores[i]`` with ``±t`` instead of building the absolute
    values.

    ``compact``: the compiled compare-and-compact of :func:`compiled_compact` (large CPU
    layers pre-filter in one pass; the same entries are selected), or None (numpy)."""
    if isinstance(scores, RandomScores):
        return _select_random(scores, candidates, k, largest, compact)
    if isinstance(scores, Magnitudes):
        scores, magnitude = scores.signed, True
    fill = -math.inf if largest else math.inf
    return [_select_topk(s.reshape(-1).float(), c.reshape(-1), int(k[i]), largest, fill,
                         magnitude, compact)
            for i, (s, c) in enumerate(zip(scores, candidates, strict=True))]


def select_global_indices(
    scores: Sequence[torch.Tensor],
    candidates: Sequence[torch.Tensor],
    k: int,
    *,
    largest: bool,
    compact: Callable | None = None,
) -> list[torch.Tensor]:
    """One global selection over every layer with a host count: the ``k`` best candidates
    of all ``scores`` together (ties to the lower flat index, the earlier layer first: the
    entries :func:`select_per_segment` with ``single_segment`` picks), answered per layer as
    flat indices (long tensors, in no particular order). Through :func:`_select_topk`, so a
    large CPU selection takes the sampled pre-filter instead of a full sort (``compact`` as
    for :func:`select_indices`)."""
    magnitude = isinstance(scores, Magnitudes)
    layers = scores.signed if magnitude else list(scores)
    if not layers:
        return []
    if k <= 0:  # (GraNet after its pruning phase: nothing to join and rank)
        return [torch.zeros(0, dtype=torch.long, device=c.device) for c in candidates]
    flat = torch.cat([s.reshape(-1).float() for s in layers])
    cand = torch.cat([c.reshape(-1) for c in candidates])
    fill = -math.inf if largest else math.inf
    chosen = _select_topk(flat, cand, int(k), largest, fill, magnitude, compact)
    sizes = torch.tensor([s.numel() for s in layers], device=chosen.device)
    ends = torch.cumsum(sizes, 0)
    layer = torch.bucketize(chosen, ends, right=True)  # which layer each chosen index is in
    return [chosen[layer == i] - (ends[i] - sizes[i]) for i in range(len(layers))]


def compiled_compact(state) -> Callable | None:
    """The compiled compare-and-compact (:mod:`sparsefw.kernels`) for a CPU run with
    ``[sparsity] cpu_kernels = true`` (loaded then: the front doors check that it can be), else
    None (off the CPU the switch does nothing); what the selections take as ``compact``."""
    if not state.config.sparsity.cpu_kernels or state.device.type != "cpu":
        return None
    from sparsefw.kernels import load_kernels

    return load_kernels().kept_indices


def _select_random(scores: RandomScores, candidates: Sequence[torch.Tensor], k: Sequence[int],
                   largest: bool, compact: Callable | None = None) -> list[torch.Tensor]:
    """:func:`select_indices` of :class:`RandomScores`, layer by layer in order: a large CPU
    layer's subset drawn directly (:func:`sample_candidates`; the smallest ``k`` of uniform
    scores are as uniform a subset as the largest), any other layer scored and selected."""
    fill = -math.inf if largest else math.inf
    out = []
    for i, c in enumerate(candidates):
        flat = c.reshape(-1)
        if scores.samples_directly(flat):
            chosen = sample_candidates(flat.numpy(), int(k[i]), scores.generator)
            if chosen is not None:
                out.append(torch.from_numpy(chosen))
                continue
        out.append(_select_topk(scores.draw(i), flat, int(k[i]), largest, fill,
                                compact=compact))
    return out


def _select_topk(flat, cand, k: int, largest, fill, magnitude=False, compact=None
                 ) -> torch.Tensor:
    """:func:`_select` with a host count, as flat indices: a partial top-k on unique integer
    keys (:func:`_order_keys`), or on CPU layers :func:`_select_sampled` (large ones) and
    :func:`_select_small`, which pick the same entries."""
    k = min(k, flat.numel())
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    if flat.device.type == "cpu" and flat.numel() >= SAMPLED_MIN_NUMEL:
        chosen = _select_sampled(flat, cand, k, largest, magnitude, compact)
        if chosen is not None:
            return chosen
    elif flat.device.type == "cpu":
        return _select_small(flat, cand, k, largest, magnitude, fill)
    if magnitude:
        flat = flat.abs()
    keys = _order_keys(flat.masked_fill(~cand, fill), largest)
    idx = torch.topk(keys, k, largest=largest, sorted=False).indices
    return idx[cand[idx]]  # counts above the candidates' pick filled entries: not chosen


def _select_small(flat, cand, k: int, largest: bool, magnitude: bool, fill: float
                  ) -> torch.Tensor:
    """:func:`_select_topk` on a small CPU layer: the same computation (non-candidates scored
    ``fill``, the best ``k`` under the order of :func:`_order_keys`, the candidates among them)
    by :func:`_best_kept` on zero-copy numpy views; the int64 keys and ``topk`` cost more in
    per-call overhead than in work on a layer this small."""
    s = flat.detach().reshape(-1).numpy()
    c = cand.reshape(-1).numpy()
    scores = np.where(c, np.abs(s) if magnitude else s, np.float32(fill))
    best, _ = _best_kept(scores, k, largest)
    return torch.from_numpy(best[c[best]])


#: layers with at least this many entries select by :func:`_select_sampled` on the CPU (smaller
#: ones by :func:`_select_small`)
SAMPLED_MIN_NUMEL = 1 << 16
#: scores drawn (with replacement, fixed seed) to place the pre-filter threshold
_SAMPLE = 1 << 13


@functools.lru_cache(maxsize=32)
def _sample_positions(n: int) -> np.ndarray:
    """Fixed pseudo-random positions in ``[0, n)`` (the same every call: the selection never
    depends on them, only its speed does). Random rather than strided, so that a stride that
    shares a factor with a row length cannot sample a few columns only; sorted, so that the
    gathers walk memory forward."""
    return np.sort(np.random.default_rng(0x5EED).integers(0, n, size=_SAMPLE))


_INF_KEY = 0x7F800000  # _order_keys' high part of +inf; -inf's is ~_INF_KEY


def _ordered(x: float) -> int:
    """The high part of :func:`_order_keys` of one float32 value."""
    bits = int(np.array([x + 0.0], dtype=np.float32).view(np.int32)[0])
    return bits ^ 0x7FFFFFFF if bits < 0 else bits


def _select_sampled(flat, cand, k: int, largest: bool, magnitude: bool = False,
                    compact: Callable | None = None) -> torch.Tensor | None:
    """:func:`_select_topk` on a large CPU layer: exactly the same entries (as flat
    indices), ~10x faster.

    A full partial top-k (or ``kthvalue``) of millions of scores costs tens of milliseconds on
    one CPU thread, and numpy's vectorised comparisons and introselect are several times faster
    than torch's CPU kernels for these element-wise passes; both tensors are read through
    zero-copy numpy views. The selection is exact, not approximate:

    1. a fixed sample of the scores places a threshold ``t`` that, with a safety margin, is
       passed by somewhat more than ``k`` candidates;
    2. one vectorised pass keeps the candidates not strictly worse than ``t`` (``~(s < t)``
       when ``largest``: NaNs pass, so they are ranked below with every other kept entry),
       found by :func:`_flatnonzero`;
    3. the kept entries (about ``k``, in increasing flat index) are ordered as by
       :func:`_order_keys` with their flat index order as the position, the tie rule of the
       full selection, and the best ``k`` are taken (:func:`_best_kept`).

    The result equals the full selection when the ``k``-th kept entry is not worse than ``t``
    (every entry left out is then strictly worse than it) and strictly better than the fill
    score of non-candidates (so none of them ranks among the first ``k``); otherwise, and
    whenever the sample cannot place ``t`` (``k`` near the candidate count, a NaN threshold),
    this returns None and the caller runs the full selection.

    ``magnitude``: the scores are ``|flat|`` (``t ≥ 0``); step 2 compares ``flat`` with ``±t``
    (``|x| < t`` is ``-t < x < t``; a NaN is on no side, as before) and only the kept entries'
    absolute values are taken.

    ``compact``: step 2 by the compiled kernel of :func:`compiled_compact` (one pass, the
    same indices)."""
    n = flat.numel()
    s = flat.detach().reshape(-1).numpy()
    c = cand.reshape(-1).numpy()
    pos = _sample_positions(n)
    v = s[pos][c[pos]]  # the sampled candidates' scores
    if magnitude:
        v = np.abs(v)
    # entries of the sample expected among the k chosen, plus a margin of ~4 standard deviations
    r = k * _SAMPLE / n
    r = int(r + 4.0 * math.sqrt(r) + 16)
    if r >= v.size:
        return None
    if largest:
        t = np.partition(v, v.size - r)[v.size - r]
    else:
        t = np.partition(v, r - 1)[r - 1]
    if np.isnan(t):
        return None
    if compact is None:
        idx = _kept(s, c, t, largest, magnitude)
    else:
        idx = compact(torch.from_numpy(s), torch.from_numpy(c), float(t), largest, magnitude,
                      r * n // _SAMPLE).numpy()
    if idx.size < k:
        return None
    vals = s.take(idx)
    best, kth = _best_kept(np.abs(vals) if magnitude else vals, k, largest)
    if largest:
        ok = kth >= _ordered(float(t)) and kth > ~_INF_KEY
    else:
        ok = kth <= _ordered(float(t)) and kth < _INF_KEY
    if not ok:
        return None
    return torch.from_numpy(idx[best])


#: entries per block of :func:`_kept`'s passes (a block's arrays stay in the L2 cache)
_BLOCK = 1 << 16


def _kept(s: np.ndarray, c: np.ndarray, t, largest: bool, magnitude: bool) -> np.ndarray:
    """Flat indices, increasing, of the candidates ``c`` whose score in ``s`` is not strictly
    worse than ``t`` (step 2 of :func:`_select_sampled`). The comparisons run block by block,
    so that each block's intermediate arrays are still in the cache for the next pass (~8%
    faster than whole-array passes, which are bound by memory bandwidth)."""
    kept = np.empty(s.size, dtype=np.bool_)
    other = np.empty(min(_BLOCK, s.size), dtype=np.bool_)
    first = np.less if largest else np.greater
    for a in range(0, s.size, _BLOCK):
        sb, cb = s[a:a + _BLOCK], c[a:a + _BLOCK]
        worse = first(sb, t, out=kept[a:a + _BLOCK])
        if magnitude and largest:
            worse &= np.greater(sb, -t, out=other[:sb.size])
        elif magnitude:
            worse |= np.less(sb, -t, out=other[:sb.size])
        np.greater(cb, worse, out=worse)  # c > worse: a candidate, not worse
    return _flatnonzero(kept)


def _best_kept(vals: np.ndarray, k: int, largest: bool) -> tuple[np.ndarray, int]:
    """Positions of the ``k`` best of ``vals`` (float32) under the order of
    :func:`_order_keys`, ties to the lower position, and the high key part of the ``k``-th.

    Without NaNs that order is the float order (-0.0 equal to 0.0): one ``partition`` places
    the ``k``-th value, every value strictly better is taken and the first of those equal to
    it fill up to ``k``. With NaNs (ordered by their bits) the int64 keys are partitioned."""
    n = vals.size
    if not np.isnan(vals).any():
        kth = np.partition(vals, n - k if largest else k - 1)[n - k if largest else k - 1]
        better = np.flatnonzero(vals > kth if largest else vals < kth)
        ties = np.flatnonzero(vals == kth)[: k - better.size]
        return np.concatenate([better, ties]), _ordered(float(kth))
    bits = (vals + np.float32(0.0)).view(np.int32)  # + 0.0: -0.0 ties with 0.0
    key = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits).astype(np.int64) << 32
    if largest:  # best = largest key; among equal scores the lower position
        key += np.arange(n - 1, -1, -1, dtype=np.int64)
        best = np.argpartition(key, n - k)[n - k:]
        return best, int(key[best].min()) >> 32
    key += np.arange(n, dtype=np.int64)
    best = np.argpartition(key, k - 1)[:k]
    return best, int(key[best].max()) >> 32


def _flatnonzero(b: np.ndarray) -> np.ndarray:
    """``np.flatnonzero`` of a contiguous bool array with few True entries, about four times
    faster: the nonzero 8-byte words first, then the entries within those words (increasing,
    as ``np.flatnonzero``)."""
    n8 = b.size - b.size % 8
    u = b[:n8].view(np.uint64)
    words = np.flatnonzero(u != 0)  # (nonzero of a bool array is faster than of uint64)
    if 2 * words.size > u.size:  # dense: nothing to gain
        return np.flatnonzero(b)
    within = np.flatnonzero(u.take(words).view(np.bool_))
    out = words[within >> 3] * 8 + (within & 7)
    return np.concatenate([out, np.flatnonzero(b[n8:]) + n8])


def _select(flat, cand, k, largest, fill):
    """The ``k`` best candidates of one flat score vector; ties to the lower index."""
    order = torch.sort(flat.masked_fill(~cand, fill), descending=largest, stable=True).indices
    chosen = torch.zeros_like(cand)
    chosen[order] = torch.arange(flat.numel(), device=flat.device) < k
    return chosen & cand


def counts(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Active entries per mask, one long device tensor."""
    if not masks:
        return torch.zeros(0, dtype=torch.long)
    # count_nonzero: about twice as fast as a bool sum on the CPU (which widens every entry);
    # numpy's, on a zero-copy view of a large CPU mask, about five times faster again
    return torch.stack([
        torch.tensor(np.count_nonzero(m.numpy()))
        if m.device.type == "cpu" and m.numel() >= SAMPLED_MIN_NUMEL else torch.count_nonzero(m)
        for m in masks])


def _count_at(mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Active entries of ``mask`` at the flat indices ``idx`` (0-d long device tensor); on a
    large CPU mask through numpy views, a few times faster than torch's gather."""
    if mask.device.type == "cpu" and mask.numel() >= SAMPLED_MIN_NUMEL and mask.is_contiguous():
        return torch.tensor(np.count_nonzero(mask.numpy().reshape(-1)[idx.numpy()]))
    return torch.count_nonzero(mask.reshape(-1)[idx])


def cosine_fraction(alpha: float, step: int, end_step: int) -> float:
    """RigL's drop fraction ``α/2·(1 + cos(π·t/T_end))``, 0 from ``T_end`` on."""
    return alpha * cosine_remaining(progress(step, 0, max(end_step, 1)))


# ------------------------------------------------------------------------------ base
@attrs.frozen
class DropGrowConfig(UpdateInterval):
    """Options shared by the drop-and-grow components.

    ``drop_fraction`` is α, the fraction of each layer's active entries replaced per update; it
    decays by ``decay`` (``cosine``: α/2·(1 + cos(π t/T_end)); ``linear``: α·(1 − t/T_end);
    ``constant``) with T_end the update interval's end. A ``drop_fraction`` schedule value,
    when a schedule component provides one, replaces this. ``skip_optimizer_step`` skips the
    optimizer update on update steps (some RigL references do; the default does not).
    """

    drop_fraction: float = attrs.field(default=0.3, validator=in_range(0, 1, lo_open=False))
    decay: str = attrs.field(default="cosine", validator=one_of(*DECAYS))
    regrow_dropped: bool = True
    skip_optimizer_step: bool = False


@attrs.define(eq=False)
class DropGrow:
    """Base component: per-layer drop by score, grow by score, exploration bookkeeping.

    Subclasses override :meth:`drop_scores` (low is dropped; default ``|w|``) and
    :meth:`grow_scores` (high is grown; no default), and may override :meth:`drop_counts`.
    """

    cfg: DropGrowConfig
    #: schedule values this component reads (shown by ``sparsefw describe``)
    reads_values: ClassVar[tuple[str, ...]] = ("drop_fraction",)
    #: per layer, entries that were ever active (ITOP's exploration); filled at the first update
    explored: dict[str, torch.Tensor] = attrs.field(factory=dict)
    #: active entries of large CPU ``explored`` masks, kept up to date by :meth:`explore_at`
    _explored_count: dict[str, int] = attrs.field(factory=dict, init=False, repr=False)
    #: (masks, their versions, active counts) after the last index update
    _last_counts: tuple | None = attrs.field(default=None, init=False, repr=False)
    #: read the drop/grow counts to the host once per update and select by partial top-k
    #: (False: no sync at all, one full sort per layer)
    host_counts: ClassVar[bool] = True
    #: a method with its own :meth:`new_masks` and :meth:`index_changes`: on CPU masks (where
    #: reading counts costs nothing) run :meth:`index_changes` (host counts, partial top-k on
    #: indices, masks edited there) instead of whole masks; False: :meth:`new_masks` everywhere
    cpu_host_counts: ClassVar[bool] = True

    # ------------------------------------------------------------ method-specific pieces
    def drop_scores(self, state, names: list[str]) -> Sequence[torch.Tensor]:
        """Scores of every entry, per layer; the smallest active ones are dropped. ``|w|``
        (as :class:`Magnitudes`)."""
        return Magnitudes(state.masks.params[n].detach() for n in names)

    def grow_scores(self, state, names: list[str]) -> Sequence[torch.Tensor]:
        """Scores of every entry, per layer; the largest inactive ones grow."""
        raise NotImplementedError

    def drop_fraction(self, state) -> float:
        """α at this step: the ``drop_fraction`` schedule value, else the configured decay."""
        if "drop_fraction" in state.values:
            return float(state.values["drop_fraction"])
        c = self.cfg
        end = c.end_step(state.total_steps)
        if c.decay == "cosine":
            return cosine_fraction(c.drop_fraction, state.step, end)
        if c.decay == "linear":
            return c.drop_fraction * linear_remaining(progress(state.step, 0, max(end, 1)))
        return c.drop_fraction

    def drop_counts(self, state, active: torch.Tensor) -> torch.Tensor:
        """Entries to drop per layer: ``floor(α · n_active)`` (as the RigL reference)."""
        alpha = self.drop_fraction(state)
        state.metrics["topology/drop_fraction"] = torch.tensor(alpha, device=active.device)
        return torch.floor(active.double() * alpha).long()

    # ------------------------------------------------------------ shared mechanics
    def drop_grow(
        self,
        state,
        names: list[str],
        masks: list[torch.Tensor],
        k_drop: torch.Tensor,
        k_grow: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Drop ``k_drop[i]`` entries of ``masks[i]`` by :meth:`drop_scores`, grow ``k_grow[i]``
        (default: as many as dropped) by :meth:`grow_scores`; returns the new masks.

        With :attr:`host_counts` the counts are read to the host once (the update's one sync)
        so that the selections run as partial top-k instead of full sorts."""
        if self.host_counts and torch.is_tensor(k_drop):
            both = torch.stack([k_drop, k_drop if k_grow is None else k_grow]).tolist()
            k_drop, k_grow = both[0], both[1]
        if not torch.is_tensor(k_drop):
            changes = self.drop_grow_indices(state, names, masks, k_drop,
                                             k_drop if k_grow is None else k_grow)
            return [edited_mask(m, d, g) for m, (d, g) in zip(masks, changes, strict=True)]
        dropped = select_per_segment(self.drop_scores(state, names), masks, k_drop, largest=False)
        after = [m & ~d for m, d in zip(masks, dropped, strict=True)]
        if self.cfg.regrow_dropped:
            cand = [~a for a in after]
        else:
            cand = [~m for m in masks]
        k_grow = k_drop if k_grow is None else k_grow
        grown = select_per_segment(self.grow_scores(state, names), cand, k_grow, largest=True)
        return [a | g for a, g in zip(after, grown, strict=True)]

    def drop_grow_indices(
        self,
        state,
        names: list[str],
        masks: list[torch.Tensor],
        k_drop: Sequence[int],
        k_grow: Sequence[int],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`drop_grow` with host counts, answered as flat indices per layer: ``(dropped,
        grown)``, long tensors (in no particular order). The new mask is ``masks[i]`` with
        ``dropped`` cleared, then ``grown`` set (an entry in both was re-grown: it stays)."""
        compact = compiled_compact(state)
        dropped = select_indices(self.drop_scores(state, names), masks, k_drop, largest=False,
                                 compact=compact)
        cand = [(~m).contiguous() for m in masks]
        if self.cfg.regrow_dropped:  # inactive after the drop
            for c, d in zip(cand, dropped, strict=True):
                fill_at(c, d, True)
        grown = select_indices(self.grow_scores(state, names), cand, k_grow, largest=True,
                               compact=compact)
        return list(zip(dropped, grown, strict=True))

    def new_masks(self, state, names: list[str], masks: list[torch.Tensor]) -> list[torch.Tensor]:
        """The masks after this update (the whole algorithm of a simple method)."""
        return self.drop_grow(state, names, masks, self.drop_counts(state, counts(masks)))

    def index_path(self, old: list[torch.Tensor]) -> bool:
        """Whether this update runs as :meth:`update_by_index` (else :meth:`new_masks` and
        :meth:`commit`): for a method that changes only scores and counts (:meth:`new_masks`
        not overridden) with :attr:`host_counts`; for one that overrides :meth:`new_masks`
        and :meth:`index_changes` (GraNet, DSR, SNFS), on CPU masks unless
        :attr:`cpu_host_counts` is False."""
        cls = type(self)
        if cls.new_masks is DropGrow.new_masks:
            return self.host_counts
        return (self.cpu_host_counts and cls.index_changes is not DropGrow.index_changes
                and old[0].device.type == "cpu")

    def active_counts(self, state, names: list[str], old: list[torch.Tensor]) -> torch.Tensor:
        """Active entries per layer (long device tensor): what this component's last index
        update left when no mask changed since (same MaskSet, same mask versions), else
        counted."""
        if self._last_counts is not None:
            ref, versions, active = self._last_counts
            if ref() is state.masks and versions == [state.masks.version[n] for n in names]:
                return active
        return counts(old)

    def index_changes(self, state, names: list[str], old: list[torch.Tensor]
                      ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """:meth:`new_masks` as indices: the active counts before the update and, per layer,
        the flat indices to clear and then set (:meth:`drop_grow_indices`)."""
        active = self.active_counts(state, names, old)
        k = self.drop_counts(state, active).tolist()  # the update's one host sync
        return active, self.drop_grow_indices(state, names, old, k, k)

    def update_by_index(self, state, names: list[str], old: list[torch.Tensor]):
        """:meth:`new_masks` and :meth:`commit` on the changed entries only
        (:meth:`index_changes`): the masks are edited at the chosen indices
        (:meth:`~sparsefw.masks.MaskSet.update_at`) and the counts follow from the indices,
        instead of building, comparing and converting whole masks; the masks, metrics and
        answer are the same."""
        active, changes = self.index_changes(state, names, old)
        # a grown entry active before the update was dropped and re-grown: its mask is kept
        regrown = torch.stack([_count_at(m, g) for m, (_, g) in zip(old, changes, strict=True)])
        chosen = torch.tensor([[d.numel(), g.numel()] for d, g in changes],
                              dtype=torch.long).to(active.device)
        for n, (d, g) in zip(names, changes, strict=True):
            state.masks.update_at(n, d, g)
        self.explore_at(names, old, [g for _, g in changes])
        dropped, grown = chosen[:, 0] - regrown, chosen[:, 1] - regrown
        self._last_counts = (weakref.ref(state.masks), [state.masks.version[n] for n in names],
                             active - dropped + grown)
        return self.report(state, names, dropped, grown)

    def commit(self, state, names: list[str], old: list[torch.Tensor], new: list[torch.Tensor]):
        """Write ``new`` masks, log the per-layer changes and the exploration rate, and build the
        :class:`TopologyChange` answer."""
        dropped = counts([o & ~m for o, m in zip(old, new, strict=True)])
        grown = counts([m & ~o for o, m in zip(old, new, strict=True)])
        for n, m in zip(names, new, strict=True):
            state.masks.update(n, m)
        self.explore(names, old, new)
        return self.report(state, names, dropped, grown)

    def report(self, state, names: list[str], dropped: torch.Tensor, grown: torch.Tensor):
        """Log the per-layer net changes (long device tensors, one count per layer) and the
        exploration rate, and build the :class:`TopologyChange` answer."""
        metrics = state.metrics
        for i, n in enumerate(names):  # summed over the updates of one logging window
            for key, value in ((f"topology/dropped/{n}", dropped[i]),
                               (f"topology/grown/{n}", grown[i])):
                metrics[key] = metrics[key] + value if key in metrics else value
        metrics["topology/itop_rate"] = self.itop_rate()
        return TopologyChange(
            dropped={n: dropped[i] for i, n in enumerate(names)},
            grown={n: grown[i] for i, n in enumerate(names)},
            skip_optimizer_step=self.cfg.skip_optimizer_step,
        )

    def explore(self, names, old, new) -> None:
        """Add ``new`` (and, at the first update, ``old``) to the ever-active masks."""
        for n, o, m in zip(names, old, new, strict=True):
            if n not in self.explored:
                self.explored[n] = o.clone()
            self.explored[n] |= m
            self._explored_count.pop(n, None)

    def explore_at(self, names, old, grown) -> None:
        """:meth:`explore` for masks edited at indices: of the new mask only the ``grown``
        entries (flat indices per layer, each once) can be active and not yet explored."""
        for n, o, g in zip(names, old, grown, strict=True):
            if n not in self.explored:
                self.explored[n] = o.clone(memory_format=torch.contiguous_format)
            e = self.explored[n]
            flat = flat_numpy(e)
            if flat is not None:  # (a large CPU layer: its count follows from a gather)
                i = g.numpy()
                if n in self._explored_count:
                    self._explored_count[n] += i.size - int(np.count_nonzero(flat[i]))
                flat[i] = True
            else:
                e.view(-1).index_fill_(0, g, True)

    def itop_rate(self) -> torch.Tensor:
        """R_s: fraction of all sparsifiable entries that were ever active (0-d device tensor).
        Large CPU layers are counted once and then kept up to date by :meth:`explore_at`."""
        for n, e in self.explored.items():
            flat = flat_numpy(e)
            if flat is not None and n not in self._explored_count:
                self._explored_count[n] = int(np.count_nonzero(flat))
        rest = [e for n, e in self.explored.items() if n not in self._explored_count]
        total = sum(e.numel() for e in self.explored.values())
        return (counts(rest).sum() + sum(self._explored_count.values())).double() / max(total, 1)

    # ------------------------------------------------------------ hooks
    @hookimpl
    def sparsefw_topology_update(self, state):
        names = state.masks.names
        if not names:
            return None
        old = [state.masks.masks[n] for n in names]
        with torch.no_grad():
            if self.index_path(old):
                return self.update_by_index(state, names, old)
            new = self.new_masks(state, names, old)
            return self.commit(state, names, old, new)

    def extra_state(self) -> dict:
        """Method-specific resumable state (override)."""
        return {}

    def load_extra_state(self, sd: dict) -> None:
        """Restore :meth:`extra_state` (override)."""

    @hookimpl
    def sparsefw_state_dict(self, state):
        return {"explored": {n: e.clone() for n, e in self.explored.items()},
                **self.extra_state()}

    @hookimpl
    def sparsefw_load_state_dict(self, state, plugin_state):
        self.explored = {n: e.to(state.masks.params[n].device).clone()
                         for n, e in plugin_state.get("explored", {}).items()}
        self._explored_count = {}
        self.load_extra_state(plugin_state)


def edited_mask(mask: torch.Tensor, dropped: torch.Tensor, grown: torch.Tensor
                ) -> torch.Tensor:
    """A copy of ``mask`` with the flat indices ``dropped`` cleared, then ``grown`` set."""
    out = mask.clone(memory_format=torch.contiguous_format)
    fill_at(out, dropped, False)
    fill_at(out, grown, True)
    return out


def reallocate(freed: int, surviving: list[float], room: list[int]) -> list[int]:
    """Split ``freed`` parameters over layers in proportion to ``surviving`` (counts, or any
    non-negative weights), never more than a layer's ``room``; largest remainders (then the
    earlier layer) take the rounding leftovers (DSR, SNFS).

    Returns per-layer grow counts summing to ``min(freed, Σ room)``."""
    share = [0] * len(surviving)
    left = min(freed, sum(room))
    open_ = [i for i in range(len(surviving)) if room[i] > 0]
    while left > 0 and open_:
        weights = [surviving[i] for i in open_]
        total = sum(weights)
        if total == 0:  # nothing survives anywhere: split evenly
            weights, total = [1] * len(open_), len(open_)
        exact = [left * w / total for w in weights]
        give = [min(int(e), room[i] - share[i]) for e, i in zip(exact, open_, strict=True)]
        rest = left - sum(give)
        # leftovers by largest remainder among layers with room
        order = sorted(range(len(open_)), key=lambda j: (-(exact[j] - int(exact[j])), j))
        for j in order:
            if rest == 0:
                break
            if share[open_[j]] + give[j] < room[open_[j]]:
                give[j] += 1
                rest -= 1
        for j, i in enumerate(open_):
            share[i] += give[j]
        left = rest
        open_ = [i for i in open_ if share[i] < room[i]]
    return share


# ------------------------------------------------------------------------------ score helpers
def grad_abs(state, names: list[str]) -> Magnitudes:
    """``|∇L|`` per layer (zeros where a parameter has no gradient), as :class:`Magnitudes`."""
    params = [state.masks.params[n] for n in names]
    return Magnitudes(p.grad.detach() if p.grad is not None else torch.zeros_like(p)
                      for p in params)


def random_scores(state, names: list[str]) -> RandomScores:
    """Uniform random scores per layer from the run's seeded generator (:class:`RandomScores`:
    drawn when read, or not at all where a random subset is drawn directly)."""
    params = [state.masks.params[n] for n in names]
    device = params[0].device if params else state.device
    return RandomScores([p.shape for p in params], state.generator, device)


__all__ = [
    "DECAYS", "DropGrow", "DropGrowConfig", "Magnitudes", "RandomScores", "cosine_fraction",
    "counts", "edited_mask", "grad_abs", "random_scores", "reallocate", "sample_candidates",
    "compiled_compact", "select_global_indices", "select_indices", "select_per_segment",
]
