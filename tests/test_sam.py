"""SAM and S²-SAM (plugins/perturb/sam.py, s2sam.py): hand-computed steps, bit-exact restore
through the engine's step, ρ = 0 equals the plain optimizer, pass counts, masks, resume."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefw.engine import Trainer
from sparsefw.hookspecs import hookimpl
from sparsefw.masks import MaskSet
from sparsefw.testing.resume import assert_same_run, interrupted_and_resumed
from sparsefw_plugins.perturb.s2sam import S2SAM
from sparsefw_plugins.perturb.sam import SAM, SharpnessConfig, ascent


# ------------------------------------------------------------------ a 2-parameter quadratic
class Quadratic(torch.nn.Module):
    """L(w) = ½(a·w₁² + b·w₂²) through a loss function that ignores its inputs."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x):
        return self.w


def quad_state(w, a=1.0, b=4.0, mask=(True, True)):
    model = Quadratic(w)
    coeff = torch.tensor([a, b], dtype=torch.float64)
    masks = MaskSet({"w": model.w})
    masks.update("w", torch.tensor(mask))
    passes = {"forward": 0, "backward": 0}

    def forward_backward(x, y, sync=True):
        passes["forward"] += 1
        passes["backward"] += 1
        loss = 0.5 * (coeff * model(x) ** 2).sum()
        loss.backward()
        return loss.detach()

    state = SimpleNamespace(
        model=model, masks=masks, values={}, batch=(torch.zeros(1), torch.zeros(1)),
        forward_backward=forward_backward, passes=passes, named_params={"w": model.w},
    )
    state.closure = lambda sync=True: forward_backward(*state.batch)
    return state


def offsets(pert):
    """The offsets a :class:`Perturbation` asks for: ``scale · params[name]``."""
    if pert.scale is None:
        return dict(pert.params)
    return {n: d * pert.scale for n, d in pert.params.items()}


def engine_like_step(component, state, lr):
    """The engine's order: perturb, zero grads, add offsets, forward/backward, restore,
    gradient_correct, mask grads, plain SGD step."""
    pert = component.sparsefw_perturb(state=state)
    w = state.model.w
    w.grad = None
    saved = w.detach().clone()
    with torch.no_grad():
        if pert is not None and "w" in pert.params:
            w.add_(offsets(pert)["w"])
    state.forward_backward(*state.batch)
    with torch.no_grad():
        w.copy_(saved)
    if hasattr(component, "sparsefw_gradient_correct"):
        component.sparsefw_gradient_correct(state=state)
    state.masks.mask_grads_()
    with torch.no_grad():
        w.sub_(lr * w.grad)
    return pert


def test_sam_step_by_hand():
    st_ = quad_state([1.0, 1.0])
    engine_like_step(SAM(SharpnessConfig(rho=0.1)), st_, lr=0.1)
    # g = (1, 4); e = 0.1·g/√17; g_sam = (1·(1 + e₁), 4·(1 + e₂)); w ← w − 0.1·g_sam
    e1, e2 = 0.1 / math.sqrt(17), 0.4 / math.sqrt(17)
    expect = [1 - 0.1 * (1 + e1), 1 - 0.1 * 4 * (1 + e2)]
    assert st_.model.w.tolist() == pytest.approx(expect, abs=1e-6)
    assert st_.passes == {"forward": 2, "backward": 2}


def test_s2sam_steps_by_hand():
    st_ = quad_state([1.0, 1.0])
    comp = S2SAM(SharpnessConfig(rho=0.1))
    assert engine_like_step(comp, st_, lr=0.1) is None  # first step: no perturbation
    assert st_.model.w.tolist() == pytest.approx([0.9, 0.6], abs=1e-12)
    engine_like_step(comp, st_, lr=0.1)
    # e from g₀ = (1, 4) at the *new* point (0.9, 0.6): g₁ = (0.9 + e₁, 4·(0.6 + e₂))
    e1, e2 = 0.1 / math.sqrt(17), 0.4 / math.sqrt(17)
    g1 = [0.9 + e1, 4 * (0.6 + e2)]
    w2 = [0.9 - 0.1 * g1[0], 0.6 - 0.1 * g1[1]]
    assert st_.model.w.tolist() == pytest.approx(w2, abs=1e-6)
    engine_like_step(comp, st_, lr=0.1)  # third step perturbs along g₁
    n = math.hypot(*g1)
    g2 = [w2[0] + 0.1 * g1[0] / n, 4 * (w2[1] + 0.1 * g1[1] / n)]
    assert st_.model.w.tolist() == pytest.approx([w2[0] - 0.1 * g2[0], w2[1] - 0.1 * g2[1]],
                                                 abs=1e-6)
    assert st_.passes == {"forward": 3, "backward": 3}


def test_masked_and_adaptive_by_hand():
    # mask-aware: w₂ pruned -> only w₁ moves, norm over active entries: e = (ρ·sign(g₁), 0)
    st_ = quad_state([1.0, 0.0], mask=(True, False))
    pert = engine_like_step(SAM(SharpnessConfig(rho=0.1)), st_, lr=0.1)
    assert offsets(pert)["w"].tolist() == pytest.approx([0.1, 0.0], abs=1e-9)
    # dense (reference) option: the pruned entry is perturbed too
    st_ = quad_state([1.0, 0.5], mask=(True, False))
    pert = SAM(SharpnessConfig(rho=0.1, perturb_pruned=True)).sparsefw_perturb(state=st_)
    g = [1.0, 2.0]
    assert offsets(pert)["w"].tolist() == pytest.approx([0.1 * x / math.hypot(*g) for x in g])
    # ASAM: e = ρ·T²g/‖Tg‖, T = |w| = (2, 0.5), g = (a·w₁, b·w₂) = (2, 2)
    st_ = quad_state([2.0, 0.5])
    pert = SAM(SharpnessConfig(rho=0.1, adaptive=True)).sparsefw_perturb(state=st_)
    tg = [2 * 2.0, 0.5 * 2.0]
    expect = [0.1 * 2 * tg[0] / math.hypot(*tg), 0.1 * 0.5 * tg[1] / math.hypot(*tg)]
    assert offsets(pert)["w"].tolist() == pytest.approx(expect, abs=1e-9)


@given(
    shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
    rho=st.floats(0.001, 2.0),
    adaptive=st.booleans(),
)
def test_ascent_radius_and_support(shapes, seed, rho, adaptive):
    gen = torch.Generator().manual_seed(seed)
    params = {f"p{i}": torch.nn.Parameter(torch.randn(s, generator=gen), requires_grad=False)
              for i, s in enumerate(shapes)}
    masks = MaskSet(params)
    for n, p in params.items():
        m = torch.rand(p.shape, generator=gen) < 0.6
        masks.update(n, m)
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    e = ascent(grads, params, masks, rho, adaptive=adaptive)
    for n in params:  # nothing outside the mask moves
        assert torch.all(e[n][~masks.masks[n]] == 0)
    active = torch.cat([(g * masks.masks[n] * (params[n].abs() if adaptive else 1)).flatten()
                        for n, g in grads.items()])
    if active.norm() > 1e-6:
        if adaptive:  # ‖T⁻¹e‖ = ρ on the active entries
            radius = torch.cat([(e[n][masks.masks[n]] / params[n][masks.masks[n]].abs())
                                for n in params]).norm()
        else:
            radius = torch.cat([v.flatten() for v in e.values()]).norm()
        assert float(radius) == pytest.approx(rho, rel=1e-4)


def test_nonfinite_gradient_gives_no_perturbation():
    params = {"a": torch.nn.Parameter(torch.ones(3))}
    masks = MaskSet(params)
    grads = {"a": torch.tensor([1.0, float("inf"), 2.0])}
    e = ascent(grads, params, masks, 0.5, sanitize=True)
    assert torch.equal(e["a"], torch.zeros(3))


# ------------------------------------------------------------------ through the engine
class Recorder:
    """Checks, inside the engine's real step, that the weights after restore are bit-identical
    to the weights before the perturb hooks, and counts forwards that saw moved weights."""

    def __init__(self, model):
        self.model = model
        self.before = None
        self.checked = 0
        self.moved_forwards = 0
        model.register_forward_pre_hook(self._pre)

    def _bits(self):
        return {n: p.detach().clone().view(torch.int32) for n, p in self.model.named_parameters()}

    def _pre(self, module, args):
        if self.before is not None and torch.is_grad_enabled():
            now = self._bits()
            if any(not torch.equal(now[n], b) for n, b in self.before.items()):
                self.moved_forwards += 1

    @hookimpl
    def sparsefw_perturb(self, state):
        self.before = self._bits()

    @hookimpl
    def sparsefw_gradient_correct(self, state):
        now = self._bits()
        for n, b in self.before.items():
            assert torch.equal(now[n], b), f"{n} not restored bit-exactly"
        self.checked += 1
        self.before = None


def run_with_recorder(catalogue, make_config, tmp_path, perturb, **over):
    cfg, raw = make_config(perturb=[perturb], **over)
    tr = Trainer(cfg, catalogue, run_dir=tmp_path, raw_config=raw)
    rec = Recorder(tr.model)
    tr.plugins.pm.register(rec, name="test:recorder")
    tr.fit()
    return tr, rec


@settings(max_examples=8)
@given(
    hidden=st.lists(st.integers(2, 12), min_size=1, max_size=2),
    density=st.floats(0.05, 1.0),
    seed=st.integers(0, 1000),
    name=st.sampled_from(["sam", "s2sam"]),
    pruned=st.booleans(),
    adaptive=st.booleans(),
)
def test_perturb_then_restore_is_bit_exact(catalogue, make_config, tmp_path_factory, hidden,
                                           density, seed, name, pruned, adaptive):
    tr, rec = run_with_recorder(
        catalogue, make_config, tmp_path_factory.mktemp("r"),
        {"name": name, "rho": 0.5, "perturb_pruned": pruned, "adaptive": adaptive},
        seed=seed, model={"name": "mlp", "hidden": hidden}, sparsity={"density": density},
        train={"max_steps": 3, "epochs": 1}, logging={"observers": []},
    )
    assert rec.checked == 3
    # the perturbation really moves the weights: s2sam from step 2 on, sam at every step
    assert rec.moved_forwards >= (2 if name == "s2sam" else 3)


def final_weights(catalogue, make_config, path, **over):
    cfg, raw = make_config(logging={"observers": []}, **over)
    tr = Trainer(cfg, catalogue, run_dir=path, raw_config=raw)
    tr.fit()
    return {n: p.detach().clone() for n, p in tr.model.named_parameters()}


@pytest.mark.parametrize("perturb", [
    {"name": "sam", "rho": 0.0},
    {"name": "s2sam", "rho": 0.0},
    {"name": "s2sam", "rho": 0.0, "perturb_pruned": True},
    {"name": "sam", "rho": 0.0, "adaptive": True},
])
def test_rho_zero_is_the_plain_optimizer(catalogue, make_config, tmp_path, perturb):
    plain = final_weights(catalogue, make_config, tmp_path / "plain")
    other = final_weights(catalogue, make_config, tmp_path / "p", perturb=[perturb])
    for n, w in plain.items():
        assert torch.equal(w, other[n]), n


def test_scheduled_rho_overrides_the_config(catalogue, make_config, tmp_path):
    plain = final_weights(catalogue, make_config, tmp_path / "plain")
    sched = [{"name": "constant", "value": "rho", "constant": 0.0}]
    zero = final_weights(catalogue, make_config, tmp_path / "z",
                         perturb=[{"name": "s2sam", "rho": 0.5}], schedule=sched)
    moved = final_weights(catalogue, make_config, tmp_path / "m",
                          perturb=[{"name": "s2sam", "rho": 0.5}])
    assert all(torch.equal(w, zero[n]) for n, w in plain.items())
    assert not all(torch.equal(w, moved[n]) for n, w in plain.items())


@pytest.mark.parametrize("name,per_step", [("s2sam", 1), ("sam", 2)])
def test_passes_per_step(catalogue, make_config, tmp_path, name, per_step):
    cfg, raw = make_config(perturb=[{"name": name, "rho": 0.1}], logging={"observers": []})
    tr = Trainer(cfg, catalogue, run_dir=tmp_path, raw_config=raw)
    tr._init_masks()
    for x, y in tr.train_source.epoch(0):
        before = dict(tr.state.passes)
        tr.step(x, y)
        assert tr.state.passes["forward"] - before["forward"] == per_step
        assert tr.state.passes["backward"] - before["backward"] == per_step


@pytest.mark.parametrize("kill_at", [5, 8])
def test_s2sam_resume_is_exact(catalogue, make_config, tmp_path, kill_at):
    over = {"train": {"epochs": 3, "checkpoint_every": 1},
            "perturb": [{"name": "s2sam", "rho": 0.3}]}
    cfg, raw = make_config(**over)
    full, resumed = interrupted_and_resumed(cfg, raw, catalogue, tmp_path, kill_at)
    assert_same_run(full, resumed)
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["kind"] == "eval"
