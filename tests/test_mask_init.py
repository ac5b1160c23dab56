"""Mask initialisation by score: magnitude, SNIP and GraSP (and the shared selection helpers).

Hand-computed masks on tiny tensors (ties included), the SNIP and GraSP scores against a direct
autograd computation (explicit Hessian), property tests of the count invariants, and short runs
through the real engine.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from sparsefw import distributions
from sparsefw.config import SparsityConfig
from sparsefw.engine import Trainer
from sparsefw.masks import MaskSet, sparsifiable_params
from sparsefw.scoring import (
    global_budget,
    global_topk,
    grasp_scores,
    layer_topk,
    preserved_buffers,
    select,
    snip_scores,
)
from sparsefw_plugins.mask_init.grasp import GraSPConfig, GraSPMaskInit
from sparsefw_plugins.mask_init.magnitude import MagnitudeConfig, MagnitudeMaskInit
from sparsefw_plugins.mask_init.snip import SNIPConfig, SNIPMaskInit

T, F_ = True, False


# ----------------------------------------------------------------------------- helpers
def fake_state(model: nn.Module, density: float, distribution: str = "uniform", seed: int = 0):
    """The parts of a TrainState the mask_init components read."""
    masks = MaskSet(sparsifiable_params(model))
    shapes = {n: tuple(p.shape) for n, p in masks.params.items()}
    masks.targets = distributions.active_counts(shapes, density, distribution)
    sparsity = SparsityConfig(density=density, distribution=distribution)
    return SimpleNamespace(
        model=model, masks=masks, config=SimpleNamespace(sparsity=sparsity),
        loss_fn=F.cross_entropy, forward=model, device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(seed), passes={"forward": 0, "backward": 0},
        steps_per_round=0, step=0,
    )


def linear(weight, bias: bool = False) -> nn.Linear:
    w = torch.tensor(weight, dtype=torch.float32)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def batches_of(data):
    return lambda n: data[:n]


def mlp(widths, seed=0, bias=True, dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def random_batches(n_in, n_out, n, size=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, n_in, generator=g, dtype=dtype),
             torch.randint(0, n_out, (size,), generator=g)) for _ in range(n)]


def as_lists(masks):
    return {n: m.tolist() for n, m in masks.items()}


# ----------------------------------------------------------------------------- selection
def test_layer_topk_ties_lower_index_wins():
    scores = {"a": torch.tensor([[1.0, 3.0], [3.0, 2.0]]), "b": torch.tensor([5.0, 5.0, 5.0])}
    out = layer_topk(scores, {"a": 2, "b": 1})
    assert out["a"].tolist() == [[F_, T], [T, F_]]
    assert out["b"].tolist() == [T, F_, F_]


def test_global_topk_one_threshold_ties_in_layer_order():
    scores = {"a": torch.tensor([1.0, 4.0, 2.0]), "b": torch.tensor([[2.0, 0.5], [4.0, 2.0]])}
    # sorted: 4(a1) 4(b2) 2(a2) 2(b0) 2(b3) 1 0.5 -> k=4 keeps a1, b2, a2, b0
    out = global_topk(scores, 4)
    assert out["a"].tolist() == [F_, T, T]
    assert out["b"].tolist() == [[T, F_], [T, F_]]
    assert sum(int(m.sum()) for m in global_topk(scores, 99).values()) == 7
    assert sum(int(m.sum()) for m in global_topk(scores, 0).values()) == 0


def test_global_budget_rounds_half_up():
    assert global_budget(0.5, [3]) == 2  # 1.5 -> 2
    assert global_budget(0.1, {"a": 10, "b": 15}) == 3  # 2.5 -> 3
    assert global_budget(1.0, [7, 9]) == 16


def test_select_lowest_and_unknown_scope():
    state = SimpleNamespace(masks=SimpleNamespace(targets={"a": 1}),
                            config=SimpleNamespace(sparsity=SimpleNamespace(density=0.5)))
    scores = {"a": torch.tensor([3.0, -1.0, -1.0, 2.0])}
    assert select(scores, state, "layer", lowest=True)["a"].tolist() == [F_, T, F_, F_]
    assert select(scores, state, "global", lowest=True)["a"].tolist() == [F_, T, T, F_]
    assert select(scores, state, "global")["a"].tolist() == [T, F_, F_, T]
    with pytest.raises(ValueError, match="choices"):
        select(scores, state, "per-channel")


# ----------------------------------------------------------------------------- magnitude
def two_layer_model():
    return nn.Sequential(
        linear([[0.5, -2.0, 1.0], [-1.0, 0.1, 1.0]]),  # |w| ties: 1 at flat 2, 3, 5
        linear([[0.2, -0.3], [3.0, 0.0]]),
    )


def test_magnitude_layer_hand_computed():
    model = two_layer_model()
    state = fake_state(model, 0.5)
    assert state.masks.targets == {"0.weight": 3, "1.weight": 2}
    out = MagnitudeMaskInit(MagnitudeConfig()).sparsefw_mask_init(state=state, batches=None)
    # layer 0 keeps -2 then the first two of the three tied 1s (flat 2 and 3)
    assert as_lists(out) == {"0.weight": [[F_, T, T], [T, F_, F_]],
                             "1.weight": [[F_, T], [T, F_]]}


def test_magnitude_global_hand_computed():
    model = two_layer_model()
    state = fake_state(model, 0.3)  # round(0.3 * 10) = 3 weights in total
    out = MagnitudeMaskInit(MagnitudeConfig(scope="global")).sparsefw_mask_init(
        state=state, batches=None)
    # 3.0 (layer 1), 2.0, then the first tied 1.0 in model order (layer 0, flat 2)
    assert as_lists(out) == {"0.weight": [[F_, T, T], [F_, F_, F_]],
                             "1.weight": [[F_, F_], [T, F_]]}


# ----------------------------------------------------------------------------- SNIP
def weighted_sum_loss(logits, y):
    """loss = Σ logits ⊙ y, so that ∇_W = yᵀx by hand."""
    return (logits * y).sum()


def test_snip_hand_computed_with_tie():
    model = nn.Sequential(linear([[1.0, 1.0, 1.0], [2.0, 0.5, -3.0]]))
    x = torch.tensor([[1.0, 2.0, -1.0]])
    y = torch.tensor([[1.0, -1.0]])
    # g = yᵀx = [[1, 2, -1], [-1, -2, 1]]; |g ⊙ w| = [[1, 2, 1], [2, 1, 3]]
    scores = snip_scores(model, [(x, y)], weighted_sum_loss, dict(model.named_parameters()))
    assert scores["0.weight"].tolist() == [[1.0, 2.0, 1.0], [2.0, 1.0, 3.0]]
    state = fake_state(model, 2 / 6)
    state.loss_fn = weighted_sum_loss
    out = SNIPMaskInit(SNIPConfig()).sparsefw_mask_init(state=state, batches=batches_of([(x, y)]))
    # keep 2: the 3, then the first of the tied 2s (flat 1 before flat 3)
    assert as_lists(out) == {"0.weight": [[F_, T, F_], [F_, F_, T]]}
    assert model[0].weight.grad is None
    assert state.passes["backward"] == 1


def test_snip_sums_gradients_over_batches():
    model = nn.Sequential(linear([[1.0, -2.0]]))
    data = [(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0]])),
            (torch.tensor([[2.0, -3.0]]), torch.tensor([[1.0]]))]
    # g = [1, 1] + [2, -3] = [3, -2]; |g ⊙ w| = [3, 4]
    scores = snip_scores(model, data, weighted_sum_loss, {"w": model[0].weight})
    assert scores["w"].tolist() == [[3.0, 4.0]]


def test_snip_matches_direct_autograd():
    model = mlp([4, 5, 3], dtype=torch.float64)
    params = dict(sparsifiable_params(model))
    data = random_batches(4, 3, 2, dtype=torch.float64)
    scores = snip_scores(model, data, F.cross_entropy, params)
    ref = mlp([4, 5, 3], dtype=torch.float64)
    sum(F.cross_entropy(ref(x), y) for x, y in data).backward()
    for name, p in sparsifiable_params(ref).items():
        torch.testing.assert_close(scores[name], (p.grad * p).abs())
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- GraSP
def half_square_loss(logits, y):
    """L = ½ Σ logits², so that ∇_W = (Wx)xᵀ and H g = g xxᵀ by hand."""
    return 0.5 * (logits ** 2).sum()


def test_grasp_hand_computed():
    model = nn.Sequential(linear([[1.0, 1.0], [1.0, -1.0]]))
    x = torch.tensor([[1.0, 2.0]])
    data = [(x, None)]
    # Wx = [3, -1]; g = [[3, 6], [-1, -2]]; xᵀx = [[1, 2], [2, 4]]
    # Hg = g xᵀx = [[15, 30], [-5, -10]]; −w ⊙ Hg = [[-15, -30], [5, -10]]
    scores = grasp_scores(model, data, half_square_loss, {"w": model[0].weight}, temperature=1.0)
    assert scores["w"].tolist() == [[-15.0, -30.0], [5.0, -10.0]]
    # the temperature divides the logits: L, g and H each scale by 1/T², Hg by 1/T⁴
    scaled = grasp_scores(model, data, half_square_loss, {"w": model[0].weight}, temperature=2.0)
    torch.testing.assert_close(scaled["w"], scores["w"] / 16)
    # GraSP keeps the lowest: round(0.5 · 4) = 2 -> -30 and -15
    state = fake_state(model, 0.5)
    state.loss_fn = half_square_loss
    comp = GraSPMaskInit(GraSPConfig(temperature=1.0))
    out = comp.sparsefw_mask_init(state=state, batches=batches_of(data))
    assert as_lists(out) == {"0.weight": [[T, T], [F_, F_]]}
    assert model[0].weight.grad is None
    assert state.passes["backward"] == 3


def test_grasp_keeps_lowest_ties_by_position():
    # w = [[1, 0], [0, 1]] (one input x = [1, 1]): Wx = [1, 1]; g = [[1, 1], [1, 1]];
    # Hg = g·[[1, 1], [1, 1]] = 2s; −w ⊙ Hg = [[-2, 0], [0, -2]] (zeros negated are equal)
    model = nn.Sequential(linear([[1.0, 0.0], [0.0, 1.0]]))
    state = fake_state(model, 0.75)
    state.loss_fn = half_square_loss
    comp = GraSPMaskInit(GraSPConfig(temperature=1.0))
    out = comp.sparsefw_mask_init(state=state, batches=batches_of([(torch.ones(1, 2), None)]))
    assert as_lists(out) == {"0.weight": [[T, T], [F_, T]]}


@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_matches_explicit_hessian(temperature):
    """Hg from double backprop equals an explicit Hessian (of the summed batch losses w.r.t.
    the sparsified weights only) times the gradient; also equals autograd.functional.hvp."""
    model = mlp([3, 4, 3], seed=1, dtype=torch.float64)
    params = sparsifiable_params(model)
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    data = random_batches(3, 3, 2, size=4, seed=3, dtype=torch.float64)
    scores = grasp_scores(model, data, F.cross_entropy, params, temperature=temperature)

    def loss_of(flat):
        parts = [t.view(s) for t, s in zip(flat.split(sizes), shapes, strict=True)]
        weights = dict(zip(names, parts, strict=True))
        return sum(F.cross_entropy(functional_call(model, weights, (x,)) / temperature, y)
                   for x, y in data)

    w = torch.cat([params[n].detach().reshape(-1) for n in names])
    g = torch.autograd.functional.jacobian(loss_of, w)
    hess = torch.autograd.functional.hessian(loss_of, w)
    expect = -w * (hess @ g)
    got = torch.cat([scores[n].reshape(-1) for n in names])
    atol = 1e-9 * float(expect.abs().max())  # scores scale as 1/T⁴
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=atol)
    _, hvp = torch.autograd.functional.hvp(loss_of, w, g)
    torch.testing.assert_close(got, -w * hvp, rtol=1e-6, atol=atol)
    assert all(p.grad is None for p in model.parameters())


def test_scoring_leaves_batchnorm_statistics_and_grads_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    before = {n: b.clone() for n, b in model.named_buffers()}
    data = [(torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 0]))]
    for comp in (SNIPMaskInit(SNIPConfig()), GraSPMaskInit(GraSPConfig())):
        state = fake_state(model, 0.3, "erk")
        out = comp.sparsefw_mask_init(state=state, batches=batches_of(data))
        assert set(out) == {"0.weight", "4.weight"}
        for n, b in model.named_buffers():
            assert torch.equal(b, before[n]), n
        assert all(p.grad is None for p in model.parameters())
    with preserved_buffers(model):
        model(data[0][0])
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())


# ----------------------------------------------------------------------------- properties
COMPONENTS = {
    "magnitude/layer": lambda: MagnitudeMaskInit(MagnitudeConfig(scope="layer")),
    "magnitude/global": lambda: MagnitudeMaskInit(MagnitudeConfig(scope="global")),
    "snip/layer": lambda: SNIPMaskInit(SNIPConfig(scope="layer")),
    "snip/global": lambda: SNIPMaskInit(SNIPConfig(num_batches=2)),
    "grasp/layer": lambda: GraSPMaskInit(GraSPConfig(scope="layer")),
    "grasp/global": lambda: GraSPMaskInit(GraSPConfig(num_batches=2)),
}


@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    density=st.floats(0.01, 1.0),
    distribution=st.sampled_from(distributions.DISTRIBUTIONS),
    method=st.sampled_from(sorted(COMPONENTS)),
    seed=st.integers(0, 2**16),
)
def test_counts_match_targets_or_global_budget(widths, density, distribution, method, seed):
    model = mlp(widths, seed=seed)
    state = fake_state(model, density, distribution, seed)
    data = random_batches(widths[0], widths[-1], 2, size=3, seed=seed)
    out = COMPONENTS[method]().sparsefw_mask_init(state=state, batches=batches_of(data))
    params = state.masks.params
    assert set(out) == set(params)
    for n, m in out.items():
        assert m.dtype == torch.bool and m.shape == params[n].shape
    counts = {n: int(m.sum()) for n, m in out.items()}
    if method.endswith("/layer"):
        assert counts == state.masks.targets
    else:
        total = sum(p.numel() for p in params.values())
        assert sum(counts.values()) == math.floor(density * total + 0.5)
    assert all(p.grad is None for p in model.parameters())


@given(scores=st.lists(st.integers(-3, 3), min_size=1, max_size=12), k=st.integers(0, 12),
       split=st.integers(0, 12))
def test_global_topk_keeps_exactly_k_and_never_a_worse_score(scores, k, split):
    flat = torch.tensor(scores, dtype=torch.float32)
    split = min(split, len(scores))
    out = global_topk({"a": flat[:split], "b": flat[split:]}, k)
    kept = torch.cat([out["a"], out["b"]])
    assert int(kept.sum()) == min(k, len(scores))
    if 0 < kept.sum() < len(scores):
        assert flat[kept].min() >= flat[~kept].max()
        # ties at the threshold: the kept ones come first
        thr = flat[kept].min()
        tied = (flat == thr).nonzero().flatten().tolist()
        kept_tied = [i for i in tied if kept[i]]
        assert kept_tied == tied[: len(kept_tied)]


# ----------------------------------------------------------------------------- engine runs
@pytest.mark.parametrize("name,options", [
    ("magnitude", {}), ("magnitude", {"scope": "global"}), ("snip", {}),
    ("snip", {"scope": "layer", "num_batches": 2}), ("grasp", {}),
])
def test_engine_run(make_config, catalogue, tmp_path, name, options):
    cfg, _ = make_config(mask_init={"name": name, **options}, train={"epochs": 1})
    trainer = Trainer(cfg, catalogue, run_dir=tmp_path)
    metrics = trainer.fit()
    masks = trainer.masks
    counts = {n: int(m.sum()) for n, m in masks.masks.items()}
    if options.get("scope", "layer" if name == "magnitude" else "global") == "layer":
        assert counts == masks.targets
    else:
        assert sum(counts.values()) == global_budget(0.5, masks.numels())
    assert metrics["density"] == pytest.approx(sum(counts.values()) / sum(masks.numels()))
    for n, p in masks.params.items():  # pruned weights stayed exactly zero
        assert not p[~masks.masks[n]].any()
