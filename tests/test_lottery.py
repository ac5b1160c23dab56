"""Lottery ticket / iterative magnitude pruning with rewinding (``mask_init = "lottery"``).

Hand-computed rounds on a tiny model, the density law (1 − p)^r and the rewind invariant through
real multi-round engine runs, and resume from a checkpoint taken mid-run.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sparsefw import distributions
from sparsefw.config import ConfigError, SparsityConfig
from sparsefw.engine import Trainer
from sparsefw.masks import MaskSet, sparsifiable_params
from sparsefw_plugins.mask_init.lottery import LotteryConfig, LotteryTicket, kept_count

T, F_ = True, False


def tiny_model():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        model[0].bias.copy_(torch.tensor([0.5, -0.5]))
        model[1].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    return model


def fake_state(model, distribution="uniform"):
    masks = MaskSet(sparsifiable_params(model))
    return SimpleNamespace(
        model=model, masks=masks, device=torch.device("cpu"), step=0, steps_per_round=10,
        generator=torch.Generator().manual_seed(0),
        config=SimpleNamespace(sparsity=SparsityConfig(density=1.0, distribution=distribution)),
    )


@torch.no_grad()
def train_to(model, w0, w1, b0=None):
    """Pretend a round of training ended at these weights (then hard-mask as the engine does)."""
    model[0].weight.copy_(torch.tensor(w0))
    model[1].weight.copy_(torch.tensor(w1))
    if b0 is not None:
        model[0].bias.copy_(torch.tensor(b0))


def engine_round_end(comp, state):
    comp.sparsefw_round_end(state=state)
    state.masks.apply_()


# ----------------------------------------------------------------------------- counts
def test_kept_count_hand_values():
    assert [kept_count(100, 0.2, r) for r in range(4)] == [100, 80, 64, 51]  # 51.2
    assert kept_count(7, 0.5, 1) == 4  # 3.5 rounds half up
    assert kept_count(10, 0.2, 3) == 5  # 5.12
    assert kept_count(0, 0.2, 2) == 0


@given(start=st.integers(0, 10_000), p=st.floats(0.01, 0.99), r=st.integers(0, 12))
def test_kept_count_within_half_a_weight_and_monotone(start, p, r):
    exact = (1 - p) ** r * start
    assert abs(kept_count(start, p, r) - exact) <= 0.5 + 1e-9
    assert kept_count(start, p, r + 1) <= kept_count(start, p, r)


# ----------------------------------------------------------------------------- hand rounds
def test_layer_rounds_hand_computed():
    model = tiny_model()
    state = fake_state(model)
    comp = LotteryTicket(LotteryConfig(prune_fraction=0.5, scope="layer"))
    masks = comp.sparsefw_mask_init(state=state, batches=None)
    assert all(m.all() for m in masks.values())  # dense start
    assert state.masks.targets == {"0.weight": 6, "1.weight": 4}

    # round 1: |w| after training; layer 0 keeps round(3) = 3, layer 1 keeps 2: the 3, then
    # the first of the tied |2|s (flat 0 before flat 2)
    train_to(model, [[-9.0, 0.1, 0.2], [7.0, -0.3, 8.0]], [[2.0, -3.0], [-2.0, 0.5]], [1.0, 1.0])
    engine_round_end(comp, state)
    assert state.masks.masks["0.weight"].tolist() == [[T, F_, F_], [T, F_, T]]
    assert state.masks.masks["1.weight"].tolist() == [[T, T], [F_, F_]]
    assert state.masks.targets == {"0.weight": 3, "1.weight": 2}
    # survivors rewound to the initial weights, the rest zero; biases rewound too
    assert model[0].weight.tolist() == [[1.0, 0.0, 0.0], [4.0, 0.0, 6.0]]
    assert model[1].weight.tolist() == [[1.0, 2.0], [0.0, 0.0]]
    assert model[0].bias.tolist() == [0.5, -0.5]

    # round 2: keep round(0.25 · 6) = 2 (1.5 half up) and round(0.25 · 4) = 1 among the
    # survivors only; the pruned position with a large value must not come back
    train_to(model, [[3.0, 99.0, 0.0], [-5.0, 0.0, 4.0]], [[0.0, -1.0], [50.0, 0.0]])
    engine_round_end(comp, state)
    assert state.masks.masks["0.weight"].tolist() == [[F_, F_, F_], [T, F_, T]]
    assert state.masks.masks["1.weight"].tolist() == [[F_, T], [F_, F_]]
    assert model[0].weight.tolist() == [[0.0, 0.0, 0.0], [4.0, 0.0, 6.0]]
    assert model[1].weight.tolist() == [[0.0, 2.0], [0.0, 0.0]]
    assert comp.rounds_done == 2


def test_global_round_hand_computed():
    model = tiny_model()
    state = fake_state(model)
    comp = LotteryTicket(LotteryConfig(prune_fraction=0.6, scope="global", rewind="masked"))
    comp.sparsefw_mask_init(state=state, batches=None)
    # 10 weights; keep round(0.4 · 10) = 4 with one threshold: 9, 8, 7, then the tied 5s in
    # model order (layer 0 flat 4 before layer 1 flat 2)
    train_to(model, [[1.0, 2.0, 3.0], [4.0, 5.0, -8.0]], [[9.0, 0.0], [-5.0, 7.0]], [3.0, 3.0])
    engine_round_end(comp, state)
    assert state.masks.masks["0.weight"].tolist() == [[F_, F_, F_], [F_, T, T]]
    assert state.masks.masks["1.weight"].tolist() == [[T, F_], [F_, T]]
    assert state.masks.targets == {"0.weight": 2, "1.weight": 2}
    assert model[0].weight.tolist() == [[0.0, 0.0, 0.0], [0.0, 5.0, 6.0]]
    assert model[1].weight.tolist() == [[1.0, 0.0], [0.0, 4.0]]
    assert model[0].bias.tolist() == [3.0, 3.0]  # rewind="masked" leaves biases alone


def test_rewind_to_iteration_k_and_state_round_trip():
    model = tiny_model()
    state = fake_state(model)
    comp = LotteryTicket(LotteryConfig(prune_fraction=0.5, scope="layer", rewind_step=2))
    comp.sparsefw_mask_init(state=state, batches=None)
    assert comp.rewind_state is None
    state.step = 1
    comp.sparsefw_step_end(state=state, metrics=None)
    assert comp.rewind_state is None
    train_to(model, [[6.0, 5.0, 4.0], [3.0, 2.0, 1.0]], [[4.0, 3.0], [2.0, 1.0]])
    state.step = 2
    comp.sparsefw_step_end(state=state, metrics=None)
    saved = comp.sparsefw_state_dict(state=state)
    train_to(model, [[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]])
    state.step = 3
    comp.sparsefw_step_end(state=state, metrics=None)  # saved only once

    other = LotteryTicket(comp.cfg)
    other.sparsefw_load_state_dict(state=state, plugin_state=saved)
    assert other.start_counts == {"0.weight": 6, "1.weight": 4}
    engine_round_end(other, state)
    assert model[0].weight.tolist() == [[0.0, 0.0, 4.0], [3.0, 2.0, 0.0]]
    assert model[1].weight.tolist() == [[0.0, 3.0], [2.0, 0.0]]


def test_random_start_and_rewind_step_validation():
    model = nn.Sequential(nn.Linear(20, 10), nn.Linear(10, 5))
    state = fake_state(model, "erk")
    comp = LotteryTicket(LotteryConfig(start_density=0.3))
    masks = comp.sparsefw_mask_init(state=state, batches=None)
    shapes = {n: tuple(p.shape) for n, p in state.masks.params.items()}
    expect = distributions.active_counts(shapes, 0.3, "erk")
    assert {n: int(m.sum()) for n, m in masks.items()} == expect == state.masks.targets
    with pytest.raises(ConfigError, match="rewind_step"):
        LotteryTicket(LotteryConfig(rewind_step=11)).sparsefw_mask_init(state=state, batches=None)


# ----------------------------------------------------------------------------- engine runs
def lottery_config(make_config, **options):
    k = options.get("rewind_step", 0)
    return make_config(
        mask_init={"name": "lottery", "prune_fraction": 0.2, **options},
        train={"epochs": 1, "rounds": 3, "round_start": k}, sparsity={"density": 1.0},
    )[0]


@pytest.mark.parametrize("options", [
    {"scope": "layer"},
    {"scope": "global", "rewind_step": 3},
    {"scope": "layer", "start_density": 0.5, "rewind": "masked"},
])
def test_rounds_density_and_rewind_through_the_engine(make_config, catalogue, tmp_path, options):
    """Acceptance: after r prunings the density is (1 − p)^r of the start, and right after each
    round boundary the surviving weights equal the saved iteration-k weights."""
    trainer = Trainer(lottery_config(make_config, **options), catalogue, run_dir=tmp_path)
    comp = trainer.plugins.components[0].instance
    seen = []
    original = trainer._next_round

    def next_round():
        original()
        masks = trainer.masks
        weights = {n: p.detach().clone() for n, p in masks.params.items()}
        seen.append((trainer.state.step, {n: m.clone() for n, m in masks.masks.items()}, weights))

    trainer._next_round = next_round
    metrics = trainer.fit()
    spr, k = trainer.steps_per_round, options.get("rewind_step", 0)
    assert [s for s, _, _ in seen] == [spr, spr + (spr - k)]  # later rounds replay k..T
    start = dict(comp.start_counts)
    start_total = sum(start.values())
    numel = sum(trainer.masks.numels())
    for r, (_, masks, weights) in enumerate(seen, start=1):
        counts = {n: int(m.sum()) for n, m in masks.items()}
        if options["scope"] == "layer":
            for n, c in counts.items():
                assert abs(c - 0.8**r * start[n]) <= 0.5
        else:
            assert sum(counts.values()) == math.floor(0.8**r * start_total + 0.5)
        for n, w in weights.items():
            saved = comp.rewind_state[n]
            assert torch.equal(w[masks[n]], saved[masks[n]]), n
            assert not w[~masks[n]].any()
    final_counts = {n: int(m.sum()) for n, m in trainer.masks.masks.items()}
    assert final_counts == {n: int(m.sum()) for n, m in seen[-1][1].items()}
    assert metrics["density"] == pytest.approx(sum(final_counts.values()) / numel)
    assert metrics["density"] == pytest.approx(0.64 * start_total / numel, abs=len(start) / numel)
    assert comp.rounds_done == 2
    if options.get("start_density", 1.0) == 1.0:
        assert start_total == numel
    # the saved weights are those of iteration k: the initial ones for k = 0, trained ones after
    init = Trainer(lottery_config(make_config, **options), catalogue, run_dir=tmp_path / "init")
    for n, p in init.masks.params.items():
        same = torch.equal(comp.rewind_state[n], p.detach())
        assert same == (options.get("rewind_step", 0) == 0), n


@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    p=st.floats(0.05, 0.95),
    scope=st.sampled_from(["layer", "global"]),
    rounds=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_rounds_nest_and_follow_the_density_law(widths, p, scope, rounds, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:], strict=False)])
    state = fake_state(model)
    comp = LotteryTicket(LotteryConfig(prune_fraction=p, scope=scope))
    for n, m in comp.sparsefw_mask_init(state=state, batches=None).items():
        state.masks.update(n, m)
    init = {n: w.detach().clone() for n, w in state.masks.params.items()}
    start = {n: w.numel() for n, w in init.items()}
    for r in range(1, rounds + 1):
        before = {n: m.clone() for n, m in state.masks.masks.items()}
        with torch.no_grad():
            for w in state.masks.params.values():
                w.normal_()
        engine_round_end(comp, state)
        counts = {n: int(m.sum()) for n, m in state.masks.masks.items()}
        assert counts == state.masks.targets
        if scope == "layer":
            assert counts == {n: kept_count(c, p, r) for n, c in start.items()}
        else:
            assert sum(counts.values()) == kept_count(sum(start.values()), p, r)
        for n, m in state.masks.masks.items():
            assert m.dtype == torch.bool and m.shape == init[n].shape
            assert not (m & ~before[n]).any()  # nothing pruned comes back
            w = state.masks.params[n].detach()
            assert torch.equal(w, init[n] * m)


def test_resume_mid_run_reproduces_the_uninterrupted_run(make_config, catalogue, tmp_path):
    cfg = lottery_config(make_config, scope="global", rewind_step=2)
    full = Trainer(cfg, catalogue, run_dir=tmp_path / "full")
    full.fit()
    spr = full.steps_per_round

    # stop inside the second round (after the first pruning), then resume from the checkpoint
    cut = make_config(
        mask_init={"name": "lottery", "prune_fraction": 0.2, "scope": "global", "rewind_step": 2},
        train={"epochs": 1, "rounds": 3, "round_start": 2, "max_steps": spr + 1},
        sparsity={"density": 1.0},
    )[0]
    first = Trainer(cut, catalogue, run_dir=tmp_path / "cut")
    first.fit()
    resumed = Trainer(cfg, catalogue, run_dir=tmp_path / "resumed")
    resumed.load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    comp = resumed.plugins.components[0].instance
    assert comp.rounds_done == 1 and comp.rewind_state is not None
    resumed.fit()
    for n, p in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[n], p, rtol=0, atol=0)
    for n, m in full.masks.masks.items():
        assert torch.equal(resumed.masks.masks[n], m)


def test_rounds_after_rewinding_to_k_replay_the_schedule_from_k(make_config, catalogue,
                                                                   tmp_path):
    """Frankle et al. 2020 (arXiv 1912.05671): after rewinding to iteration k, training goes on
    from iteration k — the learning rate of a later round's first step is that of step k."""
    cfg = lottery_config(make_config, scope="global", rewind_step=2)
    trainer = Trainer(cfg, catalogue, run_dir=tmp_path)
    lrs = []
    original = trainer.step

    def step(x, y):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        return original(x, y)

    trainer.step = step
    trainer.fit()
    spr = trainer.steps_per_round
    assert len(lrs) == spr + 2 * (spr - 2) == trainer.total_steps
    assert lrs[spr] == pytest.approx(lrs[2]) and lrs[spr + (spr - 2)] == pytest.approx(lrs[2])
    assert lrs[spr - 1] == pytest.approx(lrs[-1])  # every round ends where the first ended


def test_rewind_step_without_round_start_is_a_config_error(make_config, catalogue, tmp_path):
    cfg = make_config(mask_init={"name": "lottery", "rewind_step": 2},
                      train={"epochs": 1, "rounds": 2}, sparsity={"density": 1.0})[0]
    with pytest.raises(ConfigError, match="round_start = 2"):
        Trainer(cfg, catalogue, run_dir=tmp_path).fit()


@pytest.mark.parametrize("rewind_step", [0, 3])
def test_sparse_fan_in_rescales_rounds_rewound_to_the_initialisation(make_config, catalogue,
                                                                    tmp_path, rewind_step):
    """``[sparsity] init = "sparse_fan_in"``: a round rewound to iteration 0 starts from the
    initial weights scaled by sqrt(F / k) for each unit's kept fan-in under the round's masks,
    as the first round's were; weights rewound to k > 0 (trained values) are restored as
    saved."""
    from sparsefw.initialisation import fan_in_scales

    cfg = make_config(
        mask_init={"name": "lottery", "prune_fraction": 0.5, "start_density": 0.5,
                   "rewind_step": rewind_step},
        train={"epochs": 1, "rounds": 2, "round_start": rewind_step},
        sparsity={"density": 1.0, "init": "sparse_fan_in"})[0]
    trainer = Trainer(cfg, catalogue, run_dir=tmp_path)
    comp = trainer.plugins.components[0].instance
    seen = []
    original = trainer._next_round

    def next_round():
        original()
        seen.append({n: (m.clone(), trainer.masks.params[n].detach().clone())
                     for n, m in trainer.masks.masks.items()})

    trainer._next_round = next_round
    trainer.fit()
    assert len(seen) == 1
    for n, (mask, w) in seen[0].items():
        saved = comp.rewind_state[n]
        if rewind_step == 0:
            scale = fan_in_scales(mask).to(w.dtype).view(-1, *([1] * (w.dim() - 1)))
            want = saved * scale
        else:
            want = saved
        assert torch.equal(w[mask], want.expand_as(w)[mask]), n
        assert not w[~mask].any()
