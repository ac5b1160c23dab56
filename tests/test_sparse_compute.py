"""Sparse compute in training (``[sparsity] compute``): the sparse Linear path gives the masked
dense layer's output, input gradient and (masked) weight gradient; a run with sparse compute
follows the dense run; RigL's update steps take the dense gradient and the new masks are
re-packed; configurations sparse compute cannot run are refused (``sparse``) or left dense
(``auto``). Speed is measured by ``benchmarks/bench_sparse.py``, never here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sparsefw import Sparsifier, sparse_compute, timing
from sparsefw.config import ConfigError
from sparsefw.masks import MaskSet
from sparsefw.sparse_compute import PackedWeight, SparseCompute, sparse_linear


@given(out_f=st.integers(1, 24), in_f=st.integers(1, 24), density=st.floats(0.0, 1.0),
       lead=st.sampled_from([(1,), (5,), (2, 3)]), bias=st.booleans(),
       dense_gradient=st.booleans(), seed=st.integers(0, 2**16))
def test_sparse_path_equals_masked_dense_layer(out_f, in_f, density, lead, bias, dense_gradient,
                                               seed):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    mask = torch.rand(out_f, in_f, generator=g) < density
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_f, in_f, generator=g) * mask)
    ref = nn.Linear(in_f, out_f, bias=bias)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(*lead, in_f, generator=g, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    gy = torch.randn(*lead, out_f, generator=g)
    packed = PackedWeight(layer.weight, mask)
    packed.dense_gradient = dense_gradient
    for _ in range(2):  # the second backward accumulates into the first's gradient
        sparse_linear(x, layer, packed).backward(gy)
        ref(xr).backward(gy)
    out = sparse_linear(x, layer, packed)
    torch.testing.assert_close(out, ref(xr), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    want = ref.weight.grad if dense_gradient else ref.weight.grad * mask
    torch.testing.assert_close(layer.weight.grad, want, atol=1e-5, rtol=1e-5)
    if bias:
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad, atol=1e-5, rtol=1e-5)


def _run(compute: str, topology=None, steps: int = 12, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 32),
                          nn.ReLU(), nn.Linear(32, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sp = Sparsifier(model, opt, density=0.2, distribution="uniform", compute=compute,
                    topology=topology, total_steps=steps, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    log = []
    for _ in range(steps):
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)

        def closure(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        sp.step(closure)
        if sp.compute is not None:
            log.append(sp.compute.dense_gradient)
    return model, sp, log


def test_sparse_run_follows_the_dense_run():
    dense, sp_d, _ = _run("dense")
    sparse, sp_s, _ = _run("sparse")
    assert sp_d.compute is None and set(sp_s.compute.summary().values()) == {"sparse"}
    for (n, a), b in zip(dense.state_dict().items(), sparse.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=n)
    for n, p in sp_s.masks.params.items():  # hard masking still holds
        assert torch.all(p[~sp_s.masks.masks[n]] == 0)


def test_rigl_takes_the_dense_gradient_on_update_steps_and_repacks():
    rigl = {"name": "rigl", "every": 4, "drop_fraction": 0.3}
    dense, sp_d, _ = _run("dense", topology=rigl)
    sparse, sp_s, log = _run("sparse", topology=rigl)
    due = [sp_s.interval.due(s, 12) for s in range(12)]
    assert log == due and any(due)
    for n in sp_d.masks.names:  # the same topology decisions as with dense compute
        assert torch.equal(sp_d.masks.masks[n], sp_s.masks.masks[n]), n
    for name, pname in sp_s.compute.layers.items():
        packed = sp_s.compute.packed[name]
        assert packed.version == sp_s.masks.version[pname] > 1  # re-packed after updates
        assert torch.equal(packed.flat, sp_s.masks.masks[pname].reshape(-1).nonzero()[:, 0])
    for a, b in zip(dense.state_dict().values(), sparse.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_auto_keeps_dense_where_dense_is_measured_faster(monkeypatch):
    monkeypatch.setattr(sparse_compute, "CACHE", {})
    monkeypatch.setattr(timing, "median_times",
                        lambda c, **_: {"dense": 1.0, "sparse": 0.95})  # within the margin
    _, sp, _ = _run("auto", steps=2)
    assert set(sp.compute.summary().values()) == {"dense"}
    monkeypatch.setattr(sparse_compute, "CACHE", {})
    monkeypatch.setattr(timing, "median_times", lambda c, **_: {"dense": 1.0, "sparse": 0.5})
    model, sp, _ = _run("auto", steps=2)
    assert set(sp.compute.summary().values()) == {"sparse"}
    assert "1.weight" in model.state_dict()  # state-dict keys untouched


@pytest.mark.parametrize("extra, why", [
    ({"kind": "forward"}, "forward masks"),
    ({"config": {"perturb": [{"name": "sam"}]}}, "perturbation"),
])
def test_sparse_refuses_what_it_cannot_run_and_auto_stays_dense(extra, why):
    with pytest.raises(ConfigError, match=why):
        _run("sparse", steps=1, **extra)
    _, sp, _ = _run("auto", steps=1, **extra)
    assert sp.compute is None


def test_remove_hooks_restores_the_modules_forward():
    model, sp, _ = _run("sparse", steps=1)
    assert "forward" in model[1].__dict__
    sp.remove_hooks()
    assert "forward" not in model[1].__dict__ and sp.compute is None


def test_weights_substituted_from_outside_compute_densely():
    layer = nn.Linear(6, 4)
    masks = MaskSet({"weight": layer.weight})
    masks.update("weight", torch.rand(4, 6) < 0.5)
    masks.apply_()
    comp = SparseCompute(layer, masks, "sparse")
    comp.active = True  # as in a training step
    other = torch.randn(4, 6)
    x = torch.randn(3, 6)
    out = torch.func.functional_call(layer, {"weight": other}, (x,))
    torch.testing.assert_close(out, F.linear(x, other, layer.bias))
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    assert comp.summary() == {"": "sparse"}


def test_trainer_runs_with_compute_auto(make_config, catalogue, tmp_path):
    from sparsefw.engine import train

    cfg, raw = make_config(sparsity={"density": 0.1, "compute": "auto"},
                           topology_update={"name": "rigl", "every": 2})
    trainer, metrics = train(cfg, catalogue, run_dir=tmp_path / "run", raw_config=raw)
    assert trainer.sparsifier.compute is not None
    assert set(trainer.sparsifier.compute.summary().values()) <= {"sparse", "dense"}
    assert 0.0 <= metrics["test/acc"] <= 1.0


def test_passes_outside_the_step_get_ordinary_gradients(make_config, catalogue, tmp_path):
    """SNIP scores by torch.autograd.grad before training: with sparse compute the first mask
    is the dense-compute one, and the runs agree."""
    from sparsefw.engine import train

    out = {}
    for compute in ("dense", "sparse"):
        cfg, raw = make_config(sparsity={"density": 0.2, "compute": compute},
                               mask_init={"name": "snip"})
        trainer, metrics = train(cfg, catalogue, run_dir=tmp_path / compute, raw_config=raw)
        out[compute] = trainer, metrics
    (dense, m_d), (sparse, m_s) = out["dense"], out["sparse"]
    for n in dense.masks.names:
        assert torch.equal(dense.masks.masks[n], sparse.masks.masks[n]), n
    assert m_s["test/acc"] == pytest.approx(m_d["test/acc"], abs=0.04)


def test_loop_without_closure_follows_the_dense_loop():
    def run(compute):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sp = Sparsifier(model, opt, density=0.3, distribution="uniform", compute=compute,
                        total_steps=6)
        g = torch.Generator().manual_seed(3)
        for _ in range(6):
            x, y = torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if compute == "sparse":
                assert sp.compute.active and sp.compute.packed  # the step's pass ran sparse
            sp.step()
        return model

    for a, b in zip(run("dense").state_dict().values(), run("sparse").state_dict().values(),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_auto_measurement_leaves_the_random_stream_alone(monkeypatch):
    monkeypatch.setattr(sparse_compute, "CACHE", {})
    layer = nn.Linear(16, 8)
    masks = MaskSet({"weight": layer.weight})
    masks.update("weight", torch.rand(8, 16) < 0.3)
    masks.apply_()
    comp = SparseCompute(layer, masks, "auto")
    comp.active = True
    x = torch.randn(4, 16)
    before = torch.get_rng_state()
    layer(x).sum().backward()
    assert comp.summary()[""] in ("sparse", "dense") and comp.times[""]
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("sparse_cost, kept", [(3.0, "dense"), (0.5, "sparse")])
def test_auto_checks_its_choices_on_whole_steps(monkeypatch, sparse_cost, kept):
    """Layers measured faster in isolation go back to dense when whole steps with them are not
    faster than all-dense steps (alternated for TRIAL_STEPS steps)."""
    monkeypatch.setattr(sparse_compute, "CACHE", {})
    monkeypatch.setattr(timing, "median_times", lambda c, **_: {"dense": 1.0, "sparse": 0.5})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = Sparsifier(model, opt, density=0.3, distribution="uniform", compute="auto",
                    total_steps=40)
    comp = sp.compute
    now = [0.0]

    def clock():
        now[0] += 1.0 if comp._trial_dense else sparse_cost
        return now[0]

    comp.clock = clock
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))
    modes = []
    for _ in range(sparse_compute.TRIAL_STEPS + 3):
        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        sp.step(closure)
        modes.append(comp.verified)
    assert comp.verified is (kept == "sparse")
    assert modes[sparse_compute.TRIAL_STEPS - 1] is None  # decided after the trial's last step
    assert [dense for dense, _ in comp.trial[:4]] == [False, True, False, True]
    assert set(comp.summary().values()) == {kept}
