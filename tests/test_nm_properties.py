"""Hypothesis property tests of the N:M invariants: every group of M keeps exactly N survivors,
the N largest in magnitude with ties broken by position; SDGF sequences are monotone and end at
the target; MDGF's β stays in [0, 1], never increases and is 0 from ``until`` on; SR-STE adds
exactly ``λ (1 − m) ⊙ W``."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsefw.nm import (
    group_counts,
    mask_decay_beta,
    nm_mask,
    structure_at,
    structure_sequence,
    to_groups,
)
from sparsefw_plugins.nm.srste import srste_correct_

NM = st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (1, 8), (2, 8), (4, 8), (1, 16), (3, 16),
                      (1, 32)])


def _reference_group_mask(values: list[float], n: int) -> list[bool]:
    """Keep the n largest |v|; among equal magnitudes the earlier index wins."""
    order = sorted(range(len(values)), key=lambda j: (-abs(values[j]), j))
    keep = set(order[:n])
    return [j in keep for j in range(len(values))]


@st.composite
def weights(draw):
    n, m = draw(NM)
    kind = draw(st.sampled_from(["linear", "conv"]))
    mode = draw(st.sampled_from(["row", "col"]))
    groups = draw(st.integers(1, 3))
    other = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    grouped = groups * m
    if kind == "linear":
        shape = (other, grouped) if mode == "row" else (grouped, other)
    else:
        k = draw(st.integers(1, 2))
        shape = (other, grouped, k, k) if mode == "row" else (grouped, other, k, k)
    # small integers: many exact ties, and signs, so the tie rule and |·| both matter
    w = torch.randint(-3, 4, shape, generator=gen).float()
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return w.to(dtype), n, m, mode


@given(weights())
def test_every_group_keeps_exactly_the_n_largest(device, case):
    w, n, m, mode = case
    w = w.to(device)
    mask = nm_mask(w, n, m, mode)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    assert group_counts(mask, m, mode).eq(n).all()
    vals = to_groups(w.float(), m, mode)
    kept = to_groups(mask, m, mode)
    for g in range(vals.shape[0]):
        expected = _reference_group_mask(vals[g].tolist(), n)
        assert kept[g].tolist() == expected
    # magnitudes: every kept |w| >= every pruned |w| in the same group
    a = vals.abs()
    lo = torch.where(kept, a, torch.inf).min(dim=1).values
    hi = torch.where(~kept, a, -torch.inf).max(dim=1).values
    assert (lo >= hi).all()


@given(weights())
def test_mask_is_deterministic_and_scale_invariant(case):
    w, n, m, mode = case
    assert torch.equal(nm_mask(w, n, m, mode), nm_mask(w.clone(), n, m, mode))
    assert torch.equal(nm_mask(w, n, m, mode), nm_mask(-2 * w, n, m, mode))


@given(NM, st.sampled_from(["stepwise", "geometric"]), st.integers(1, 5))
def test_structure_sequence_is_monotone_and_ends_at_target(nm, kind, frames):
    n, m = nm
    seq = structure_sequence(n, m, kind, frames)
    assert seq[-1] == (n, m)
    dens = [a / b for a, b in seq]
    assert all(x >= y for x, y in zip(dens, dens[1:], strict=False))
    assert all(1 <= a <= b for a, b in seq)
    if kind == "stepwise":
        assert all(b == m for _, b in seq) and len(set(seq)) == len(seq)
        assert seq[0] == ((m - 1, m) if m - 1 > n else (n, m))


@given(NM, st.sampled_from(["stepwise", "geometric"]), st.integers(1, 400),
       st.floats(0, 0.4), st.floats(0, 0.4))
def test_structure_at_is_monotone_in_sparsity(nm, kind, total, d, f):
    n, m = nm
    seq = [structure_at(s, total, n, m, kind, dense_frac=d, finetune_frac=f)
           for s in range(total)]
    dens = [a / b for a, b in seq]
    assert all(x >= y for x, y in zip(dens, dens[1:], strict=False))
    assert seq[-1] == (n, m) or (int(d * total) >= total and seq[-1] == (m, m))
    assert all(x <= 1 for x in dens)


@given(st.sampled_from(["linear", "exponential", "step", "cosine"]), st.floats(0, 0.5),
       st.floats(0.51, 1.0), st.integers(1, 8), st.floats(1e-4, 0.5))
def test_mask_decay_is_monotone_and_reaches_zero(decay, begin, until, steps, final):
    fracs = [i / 200 for i in range(201)]
    betas = [mask_decay_beta(x, decay, begin=begin, until=until, steps=steps, final=final)
             for x in fracs]
    assert all(0.0 <= b <= 1.0 for b in betas)
    assert all(a >= b for a, b in zip(betas, betas[1:], strict=False))
    assert all(b == 0.0 for x, b in zip(fracs, betas, strict=True) if x >= until)
    assert all(b == 1.0 for x, b in zip(fracs, betas, strict=True) if x <= begin)


@given(NM, st.integers(0, 2**16), st.floats(0, 1e-2))
def test_srste_adds_exactly_the_pruned_decay(nm, seed, lam):
    n, m = nm
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 2 * m, generator=gen)
    g = torch.randn(3, 2 * m, generator=gen)
    mask = nm_mask(w, n, m).float()
    out = g.clone()
    srste_correct_([out], [w], [mask], lam)
    assert torch.allclose(out, g + lam * (1 - mask) * w)
    assert torch.equal(out[mask.bool()], g[mask.bool()])
