"""AGENT and SVRG (plugins/gradient/agent.py, svrg.py): the coefficient by hand, its EMA and
clipping, the statistics pass, the corrected gradient against a direct computation, the
``correct_every`` variant (plain g on skipped steps, the formula on the others, pass counts),
γ = 0 equals the plain optimizer, pass counts, resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsefw.engine import Trainer
from sparsefw.testing.resume import assert_same_run, interrupted_and_resumed
from sparsefw_plugins.gradient.agent import Agent, regression_coefficient, update_tau
from sparsefw_plugins.gradient.svrg import SVRGConfig, build_svrg


# ------------------------------------------------------------------ the coefficient
def test_coefficient_by_hand():
    cur = torch.tensor([1.0, 2.0, 3.0, 4.0])
    old = torch.tensor([2.0, 4.0, 5.0, 9.0])
    # means 2.5 and 5; Σ dc·do = 1.5·3 + 0.5·1 + 0 + 1.5·4 = 11; Σ do² = 9 + 1 + 0 + 16 = 26;
    # both divided by n − 1 = 3, so c = 11/26
    assert float(regression_coefficient(cur, old)) == pytest.approx(11 / 26, abs=1e-12)
    # the same as numpy-style sample moments
    stacked = torch.stack([cur, old]).double()
    assert float(regression_coefficient(cur, old)) == pytest.approx(
        float(torch.cov(stacked)[0, 1] / torch.var(old.double())), abs=1e-12)


def test_ema_and_clipping_by_hand():
    tau = torch.tensor(0.1, dtype=torch.float64)
    c = torch.tensor(11 / 26, dtype=torch.float64)
    assert float(update_tau(tau, c, 0.3, True)) == pytest.approx(0.7 * 0.1 + 0.3 * 11 / 26)
    big, neg = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    assert float(update_tau(tau, big, 0.3, True)) == 1.0
    assert float(update_tau(tau, big, 0.3, False)) == pytest.approx(0.07 + 1.5)
    assert float(update_tau(tau, neg, 0.3, True)) == 0.0
    assert float(update_tau(tau, neg, 0.3, False)) == pytest.approx(0.07 - 0.6)
    nan = torch.tensor(float("nan"), dtype=torch.float64)  # Var = 0: τ unchanged
    assert float(update_tau(tau, nan, 0.3, True)) == pytest.approx(0.1)


@given(coefs=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=20),
       alpha=st.floats(0.01, 1.0), tau0=st.floats(-2, 2))
def test_clipped_tau_stays_in_unit_interval(coefs, alpha, tau0):
    tau = torch.tensor(tau0, dtype=torch.float64)
    raw = tau.clone()
    for c in coefs:
        c = torch.tensor(c, dtype=torch.float64)
        tau = update_tau(tau, c, alpha, True)
        raw = update_tau(raw, c, alpha, False)
        assert 0.0 <= float(tau) <= 1.0
    expect = tau0
    for c in coefs:
        expect = (1 - alpha) * expect + alpha * c
    assert float(raw) == pytest.approx(expect, rel=1e-9, abs=1e-9)


# ------------------------------------------------------------------ against a direct computation
def tiny_trainer(catalogue, make_config, tmp_path, **over):
    over.setdefault("gradient_correct", [{"name": "agent"}])
    cfg, raw = make_config(logging={"observers": []}, **over)
    tr = Trainer(cfg, catalogue, run_dir=tmp_path, raw_config=raw)
    tr._init_masks()
    agent = next(c.instance for c in tr.plugins.components if c.slot == "gradient_correct")
    return tr, agent


def model_at(model, weights):
    m = copy.deepcopy(model)
    m.load_state_dict(weights)
    return m


def test_statistics_pass_and_coefficient_direct(catalogue, make_config, tmp_path):
    tr, agent = tiny_trainer(catalogue, make_config, tmp_path)
    st_ = tr.state
    w0 = copy.deepcopy(tr.model.state_dict())
    agent.sparsefw_epoch_start(state=st_)  # epoch 0: no old snapshot, τ stays τ₀
    assert float(agent.tau) == pytest.approx(0.1)
    batches = list(st_.train_batches())
    # mean gradient at θ₀, computed directly
    ref = model_at(tr.model, w0)
    ref.zero_grad()
    for x, y in batches:
        torch.nn.functional.cross_entropy(ref(x), y).backward()
    for n, p in ref.named_parameters():
        assert torch.allclose(agent.mean[n], p.grad / len(batches), atol=1e-6), n
        assert torch.equal(agent.snapshot[n], w0[n])
    # move the weights, then the next statistics pass compares θ₁ with θ₀ on the same batches
    for x, y in batches[:3]:
        tr.step(x, y)
    st_.epoch = 1
    w1 = copy.deepcopy(tr.model.state_dict())
    agent.sparsefw_epoch_start(state=st_)
    m1, m0 = model_at(tr.model, w1), model_at(tr.model, w0)
    batches = list(st_.train_batches())  # epoch 1's batches (reshuffled)
    with torch.no_grad():
        cur = torch.stack([torch.nn.functional.cross_entropy(m1(x), y) for x, y in batches])
        old = torch.stack([torch.nn.functional.cross_entropy(m0(x), y) for x, y in batches])
    c = regression_coefficient(cur, old)
    assert float(agent.coef_raw) == pytest.approx(float(c), rel=1e-5)
    expect = min(max(0.7 * 0.1 + 0.3 * float(c), 0.0), 1.0)
    assert float(agent.tau) == pytest.approx(expect, rel=1e-5)
    assert all(torch.equal(agent.snapshot[n], w1[n]) for n in w1)


def test_corrected_gradient_direct(catalogue, make_config, tmp_path):
    tr, agent = tiny_trainer(catalogue, make_config, tmp_path,
                             gradient_correct=[{"name": "agent", "gamma": 0.5}])
    st_ = tr.state
    agent.sparsefw_epoch_start(state=st_)
    w_snap = copy.deepcopy(tr.model.state_dict())
    batches = list(st_.train_batches())
    for x, y in batches[:2]:
        tr.step(x, y)
    agent.tau = torch.tensor(0.7, dtype=torch.float64)  # any τ
    x, y = batches[2]
    st_.batch = (x, y)
    tr.optimizer.zero_grad(set_to_none=True)
    tr.forward_backward(x, y)
    g = {n: p.grad.clone() for n, p in tr.model.named_parameters()}
    agent.sparsefw_gradient_correct(state=st_)
    snap = model_at(tr.model, w_snap)
    torch.nn.functional.cross_entropy(snap(x), y).backward()
    for n, p in tr.model.named_parameters():
        g_old = dict(snap.named_parameters())[n].grad
        d = g[n] + 0.7 * 0.5 * (agent.mean[n] - g_old)
        assert torch.allclose(p.grad, d, atol=1e-6), n


def test_correct_every_skips_or_applies_the_whole_estimator(catalogue, make_config, tmp_path):
    """correct_every = 2: on odd steps the gradient is the plain g and no snapshot pass runs;
    on even steps it is g + τγ(g̃ − g_old) with g_old on that step's batch (one extra forward
    and backward)."""
    tr, agent = tiny_trainer(catalogue, make_config, tmp_path,
                             gradient_correct=[{"name": "agent", "gamma": 0.5,
                                                "correct_every": 2}])
    st_ = tr.state
    agent.sparsefw_epoch_start(state=st_)
    w_snap = copy.deepcopy(tr.model.state_dict())
    batches = list(st_.train_batches())
    for x, y in batches[:2]:
        tr.step(x, y)
    agent.tau = torch.tensor(0.7, dtype=torch.float64)
    snap = model_at(tr.model, w_snap)
    for step, (x, y) in zip((5, 6), batches[2:4], strict=True):
        st_.step, st_.batch = step, (x, y)
        tr.optimizer.zero_grad(set_to_none=True)
        tr.forward_backward(x, y)
        g = {n: p.grad.clone() for n, p in tr.model.named_parameters()}
        before = dict(st_.passes)
        agent.sparsefw_gradient_correct(state=st_)
        extra = (st_.passes["forward"] - before["forward"],
                 st_.passes["backward"] - before["backward"])
        if step == 5:
            assert extra == (0, 0)
            for n, p in tr.model.named_parameters():
                assert torch.equal(p.grad, g[n]), n
            continue
        assert extra == (1, 1)
        snap.zero_grad()
        torch.nn.functional.cross_entropy(snap(x), y).backward()
        for n, p in tr.model.named_parameters():
            g_old = dict(snap.named_parameters())[n].grad
            d = g[n] + 0.7 * 0.5 * (agent.mean[n] - g_old)
            assert torch.allclose(p.grad, d, atol=1e-6), n


@pytest.mark.parametrize("k", [1, 2, 3])
def test_correct_every_pass_counts(catalogue, make_config, tmp_path, k):
    """Over one training epoch of nb steps (steps 0 … nb − 1), the snapshot's forward and
    backward run on the ⌈nb / k⌉ steps whose index is a multiple of k."""
    tr, agent = tiny_trainer(catalogue, make_config, tmp_path,
                             gradient_correct=[{"name": "agent", "correct_every": k}])
    st_ = tr.state
    agent.sparsefw_epoch_start(state=st_)
    nb = len(tr.train_source)
    before = dict(st_.passes)
    for i, (x, y) in enumerate(st_.train_batches()):
        assert st_.step == i
        tr.step(x, y)
    corrected = -(-nb // k)
    assert st_.passes["forward"] - before["forward"] == nb + corrected
    assert st_.passes["backward"] - before["backward"] == nb + corrected


def test_correct_every_previous_epoch(catalogue, make_config, tmp_path):
    """previous_epoch with correct_every = 2: g̃ averages every step's raw gradient (each
    refresh the mean of that epoch alone, though the sum reuses the old g̃'s buffers); the loss
    pairs of the coefficient come from the corrected steps only (forward-only in the first
    epoch, when there is no g̃ yet: one extra forward, no backward)."""
    tr, agent = tiny_trainer(catalogue, make_config, tmp_path,
                             gradient_correct=[{"name": "agent", "correct_every": 2,
                                                "mean_grad": "previous_epoch"}])
    st_ = tr.state
    nb = len(tr.train_source)

    def epoch():
        """One epoch of steps; the sum of their raw gradients, computed beside them."""
        total = {n: torch.zeros_like(p) for n, p in tr.model.named_parameters()}
        for x, y in st_.train_batches():
            tr.optimizer.zero_grad(set_to_none=True)
            tr.forward_backward(x, y)  # the raw gradient of this step, by itself
            for n, p in tr.model.named_parameters():
                total[n] += p.grad
            tr.optimizer.zero_grad(set_to_none=True)
            tr.step(x, y)
        return total

    agent.sparsefw_epoch_start(state=st_)
    for e in range(3):
        before, first = dict(st_.passes), st_.step
        total = epoch()
        corrected = len([s for s in range(first, first + nb) if s % 2 == 0])
        # nb steps + nb forward_backward calls above + the corrected steps' snapshot passes
        # (forward only in epoch 0)
        assert st_.passes["forward"] - before["forward"] == 2 * nb + corrected
        assert st_.passes["backward"] - before["backward"] == 2 * nb + (corrected if e else 0)
        assert agent.grad_count == nb and len(agent.loss_pairs) == corrected
        st_.epoch = e + 1
        agent.sparsefw_epoch_start(state=st_)
        for n, t in total.items():
            assert torch.allclose(agent.mean[n], t / nb, atol=1e-6), (e, n)


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_correct_every_must_be_positive(make_config, bad):
    with pytest.raises(ValueError, match="correct_every"):
        make_config(gradient_correct=[{"name": "agent", "correct_every": bad}])


def test_gamma_zero_is_the_plain_optimizer(catalogue, make_config, tmp_path):
    def final(path, **over):
        cfg, raw = make_config(logging={"observers": []}, **over)
        tr = Trainer(cfg, catalogue, run_dir=path, raw_config=raw)
        tr.fit()
        return {n: p.detach().clone() for n, p in tr.model.named_parameters()}

    plain = final(tmp_path / "plain")
    zero = final(tmp_path / "zero", gradient_correct=[{"name": "agent", "gamma": 0.0}])
    full = final(tmp_path / "full", gradient_correct=[{"name": "agent", "gamma": 1.0}])
    assert all(torch.equal(w, zero[n]) for n, w in plain.items())
    assert not all(torch.equal(w, full[n]) for n, w in plain.items())


def test_passes_per_step_and_statistics_pass(catalogue, make_config, tmp_path):
    tr, agent = tiny_trainer(catalogue, make_config, tmp_path)
    st_ = tr.state
    nb = len(tr.train_source)
    before = dict(st_.passes)
    agent.sparsefw_epoch_start(state=st_)  # first pass: current model only
    assert st_.passes["forward"] - before["forward"] == nb
    assert st_.passes["backward"] - before["backward"] == nb
    for x, y in st_.train_batches():
        before = dict(st_.passes)
        tr.step(x, y)  # g and g_old: 2 forwards + 2 backwards
        assert st_.passes["forward"] - before["forward"] == 2
        assert st_.passes["backward"] - before["backward"] == 2
    st_.epoch = 1
    before = dict(st_.passes)
    agent.sparsefw_epoch_start(state=st_)  # later passes: the snapshot's forward too
    assert st_.passes["forward"] - before["forward"] == 2 * nb
    assert st_.passes["backward"] - before["backward"] == nb


def test_svrg_is_agent_with_c_one():
    comp = build_svrg(SVRGConfig())
    assert isinstance(comp, Agent) and not comp.adaptive
    assert comp.cfg.gamma == 1.0 and comp.cfg.tau_init == 1.0


@pytest.mark.parametrize("over", [
    {"name": "svrg"},
    {"name": "agent", "mean_grad": "previous_epoch"},
    {"name": "agent", "refresh_every": 2, "clip": False},
    {"name": "agent", "mean_grad": "previous_epoch", "correct_every": 2},
])
def test_variants_run_and_log(catalogue, make_config, tmp_path, over):
    cfg, raw = make_config(gradient_correct=[over], train={"epochs": 3})
    tr = Trainer(cfg, catalogue, run_dir=tmp_path, raw_config=raw)
    metrics = tr.fit()
    assert 0.0 <= metrics["test/acc"] <= 1.0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    taus = [r["agent/tau"] for r in rows if "agent/tau" in r]
    if over["name"] == "agent":
        assert taus
        if over.get("clip", True):
            assert all(0.0 <= t <= 1.0 for t in taus)


@pytest.mark.parametrize("kill_at,variant,every", [(5, "stats_pass", 1), (8, "stats_pass", 1),
                                                   (6, "previous_epoch", 1),
                                                   (5, "previous_epoch", 2)])
def test_agent_resume_is_exact(catalogue, make_config, tmp_path, kill_at, variant, every):
    over = {"train": {"epochs": 3, "checkpoint_every": 1},
            "gradient_correct": [{"name": "agent", "gamma": 0.5, "mean_grad": variant,
                                  "correct_every": every}]}
    cfg, raw = make_config(**over)
    full, resumed = interrupted_and_resumed(cfg, raw, catalogue, tmp_path, kill_at)
    assert_same_run(full, resumed)
    a = next(c.instance for c in full.plugins.components if c.slot == "gradient_correct")
    b = next(c.instance for c in resumed.plugins.components if c.slot == "gradient_correct")
    assert torch.equal(a.tau, b.tau)
