"""The engine's perturbation mechanism (``Sparsifier._apply_perturbations`` / ``_put_back``):
offsets written into a second buffer with the scale folded in, the parameters' storage swapped
to it for the forward/backward and swapped back, bit for bit, with identity, ``.grad``, the
unperturbed storage and the optimizer state untouched; several perturbations at once; a pending
perturbation through ``unperturbed()``, ``state_dict`` and a failing closure."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefw import Sparsifier
from sparsefw.hookspecs import hookimpl
from sparsefw.state import Perturbation, add_offsets_, offset_into


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 9), min_size=0, max_size=3), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    kind=st.sampled_from(["none", "number", "tensor"]),
)
def test_offset_into_is_params_plus_scaled_deltas(shapes, seed, dtype, kind):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    deltas = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    scale = {"none": None, "number": 0.37,
             "tensor": torch.rand((), generator=gen).to(dtype)}[kind]
    before = [p.clone() for p in params]
    out = [torch.empty_like(p) for p in params]
    offset_into(out, params, deltas, scale)
    inplace = [p.clone() for p in params]
    add_offsets_(inplace, deltas, scale)
    for o, p, b, d, i in zip(out, params, before, deltas, inplace, strict=True):
        assert torch.equal(p, b)  # the parameters are left alone
        assert torch.equal(o, i)  # the in-place form computes the same bits
        expect = b.double() + d.double() * (1.0 if scale is None else float(scale))
        tol = 2 * torch.finfo(dtype).eps * (b.double().abs() + expect.abs() + 1)
        assert bool(((o.double() - expect).abs() <= tol).all())


class Offsets:
    """A perturb component: fixed directions, with or without a 0-dim scale."""

    def __init__(self, deltas, scale=None):
        self.deltas, self.scale = deltas, scale

    @hookimpl
    def sparsefw_perturb(self, state):
        named = state.named_params
        return Perturbation(params={n: d.to(named[n].dtype) for n, d in self.deltas.items()},
                            scale=self.scale)


def _loop(seed=0, lr=0.0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sp = Sparsifier(model, opt, {}, density=0.5, total_steps=10)
    return model, opt, sp


def _bits(model):
    return {n: p.detach().clone().view(torch.int32) for n, p in model.named_parameters()}


def _expected_perturbed(model, comps):
    named = dict(model.named_parameters())
    want = {n: p.detach().clone() for n, p in named.items()}
    for c in comps:
        for n, d in c.deltas.items():
            want[n] = want[n] + (d if c.scale is None else d * c.scale)
    return want


class Probe:
    """Records the weights' bits and storage before the perturb hooks and after the restore
    (the first ``gradient_correct``), and the weights each training forward sees."""

    def __init__(self, model):
        self.model, self.before, self.after, self.seen = model, None, None, []
        model.register_forward_pre_hook(self._pre)

    def _state(self):
        return {n: (p.detach().clone().view(torch.int32), p.data_ptr(), id(p))
                for n, p in self.model.named_parameters()}

    def _pre(self, module, args):
        self.seen.append({n: p.detach().clone() for n, p in module.named_parameters()})

    @hookimpl(tryfirst=True)
    def sparsefw_perturb(self, state):
        self.before, self.seen = self._state(), []

    @hookimpl(tryfirst=True)
    def sparsefw_gradient_correct(self, state):
        self.after = self._state()


@pytest.mark.parametrize("closure", [True, False])
@pytest.mark.parametrize("layout", ["disjoint", "shared"])
def test_perturbation_swapped_in_and_back_bit_exactly(closure, layout):
    model, opt, sp = _loop(lr=0.1)
    gen = torch.Generator().manual_seed(1)
    named = dict(model.named_parameters())
    d = {n: torch.randn(p.shape, generator=gen) for n, p in named.items()}
    if layout == "disjoint":  # each parameter offset by one perturbation: the fused path
        comps = [Offsets({"0.weight": d["0.weight"], "2.bias": d["2.bias"]},
                         scale=torch.tensor(0.25)),
                 Offsets({"0.bias": d["0.bias"]})]
    else:  # one parameter offset by two perturbations: summed offsets
        comps = [Offsets({"0.weight": d["0.weight"]}, scale=torch.tensor(0.25)),
                 Offsets({"0.weight": d["0.bias"].view(12, 1).expand(12, 6).clone(),
                          "2.weight": d["2.weight"]})]
    for i, c in enumerate(comps):
        sp.plugins.pm.register(c, name=f"perturb[{i}]:offsets")
    probe = Probe(model)
    sp.plugins.pm.register(probe, name="test:probe")
    x, y = torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)
    for _ in range(3):  # the second buffers are reused from the second step on
        if closure:
            def run():
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            want = _expected_perturbed(model, comps)
            sp.step(run)
        else:
            sp.zero_grad()
            want = _expected_perturbed(model, comps)
            F.cross_entropy(model(x), y).backward()
            sp.step()
        assert len(probe.seen) == 1
        for n, w in want.items():  # the forward saw w + Σ scale·d
            assert torch.allclose(probe.seen[0][n], w, rtol=0, atol=1e-6), n
        perturbed = {n for c in comps for n in c.deltas}
        assert {n for n, w in probe.seen[0].items()
                if not torch.equal(w.view(torch.int32), probe.before[n][0])} == perturbed
        for n, (bits, ptr, ident) in probe.before.items():  # restored: the same bits, the
            assert torch.equal(probe.after[n][0], bits), n  # same object, the same storage
            assert probe.after[n][1:] == (ptr, ident), n
        for n, p in model.named_parameters():
            assert p.grad is not None and p in opt.state, n


def test_closure_error_still_puts_the_weights_back():
    model, _, sp = _loop()
    sp.plugins.pm.register(Offsets({"0.weight": torch.ones(12, 6)}, scale=torch.tensor(0.5)),
                           name="perturb[0]:offsets")
    before = _bits(model)

    def boom():
        model(torch.randn(2, 6))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sp.step(boom)
    for n, b in _bits(model).items():
        assert torch.equal(b, before[n]), n


def test_pending_perturbation_unperturbed_and_state_dict():
    model, opt, sp = _loop(lr=0.1)
    sp.plugins.pm.register(Offsets({"2.weight": torch.full((3, 12), 0.5)}),
                           name="perturb[0]:offsets")
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    sp.zero_grad()
    F.cross_entropy(model(x), y).backward()
    sp.step()
    before = _bits(model)
    ptr = model[2].weight.data_ptr()
    sp.zero_grad()
    loss = F.cross_entropy(model(x), y)  # a training forward applies the next perturbation
    perturbed = _bits(model)
    assert not torch.equal(perturbed["2.weight"], before["2.weight"])
    with sp.unperturbed():
        assert model[2].weight.data_ptr() == ptr
        for n, b in _bits(model).items():
            assert torch.equal(b, before[n]), n
    for n, b in _bits(model).items():
        assert torch.equal(b, perturbed[n]), n
    # a checkpoint taken now holds the perturbed weights and the originals
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()},
               buf)
    buf.seek(0)
    sd = torch.load(buf)
    loss.backward()
    sp.step()
    model2, opt2, sp2 = _loop(seed=5, lr=0.1)
    sp2.plugins.pm.register(Offsets({"2.weight": torch.full((3, 12), 0.5)}),
                            name="perturb[0]:offsets")
    model2.load_state_dict(sd["model"])
    opt2.load_state_dict(sd["opt"])
    sp2.load_state_dict(sd["sp"])
    for n, b in _bits(model2).items():
        assert torch.equal(b, perturbed[n]), n
    F.cross_entropy(model2(x), y).backward()  # the pending step, finished after the resume
    sp2.step()
    for (n, a), b in zip(_bits(model).items(), _bits(model2).values(), strict=True):
        assert torch.equal(a, b), n
