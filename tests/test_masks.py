"""MaskSet: hard masks keep pruned weights, gradients and optimizer state exactly zero; forward
masks train dense weights behind a masked forward; topk_mask; checkpoints; an end-to-end run."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from sparsefw import sharding
from sparsefw.config import OptimizerConfig
from sparsefw.engine import Trainer
from sparsefw.engine.optim import build_optimizer
from sparsefw.masks import MaskSet, sparsifiable_params, topk_mask
from sparsefw.testing import strategies as sst

OPTIMIZERS = [
    OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4),
    OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    OptimizerConfig(name="sgd", lr=0.05, momentum=0.0, weight_decay=0.0),
    OptimizerConfig(name="adamw", lr=1e-2, weight_decay=1e-2),
]


def engine_step(model, masks, optimizer, x, y):
    """One step in the engine's order: forward/backward, mask grads, step. The engine does not
    re-apply the masks after the step: masked gradients must keep pruned weights at zero."""
    optimizer.zero_grad(set_to_none=True)
    effective = masks.effective()
    out = functional_call(model, effective, (x,)) if effective else model(x)
    F.cross_entropy(out, y).backward()
    masks.mask_grads_()
    optimizer.step()


def _masked_set(model, masks_drawn, kind):
    ms = MaskSet(sparsifiable_params(model), kind=kind)
    for n, m in masks_drawn.items():
        ms.update(n, m)
    return ms


def _batch(model, seed):
    x = sst.example_input(model, batch=6, seed=seed)
    y = torch.arange(6) % model.num_classes
    return x, y


# ------------------------------------------------------------------------------ hard masks
@given(st.data(), sst.small_models(), st.sampled_from(OPTIMIZERS), sst.seeds())
def test_hard_masks_keep_pruned_state_exactly_zero(data, model, opt_cfg, seed):
    masks = _masked_set(model, data.draw(sst.random_masks(model)), "hard")
    masks.apply_()
    optimizer = build_optimizer(opt_cfg, model.parameters(), torch.device("cpu"))
    for i in range(3):
        x, y = _batch(model, seed + i)
        engine_step(model, masks, optimizer, x, y)
        for n, p in masks.params.items():
            pruned = ~masks.masks[n]
            assert torch.all(p[pruned] == 0), n
            assert torch.all(p.grad[pruned] == 0), n
            state = optimizer.state[p]
            keys = ["momentum_buffer"] if opt_cfg.name == "sgd" else ["exp_avg", "exp_avg_sq"]
            for k in keys:
                if state.get(k) is not None:
                    assert torch.all(state[k][pruned] == 0), (n, k)


def test_zero_where_clears_weight_and_optimizer_state():
    lin = nn.Linear(3, 2)
    ms = MaskSet({"w": lin.weight})
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    where = torch.tensor([[True, False, False], [False, False, True]])
    ms.zero_where("w", where, opt)
    assert torch.all(lin.weight[where] == 0) and torch.all(lin.weight[~where] != 0)
    buf = opt.state[lin.weight]["momentum_buffer"]
    assert torch.all(buf[where] == 0) and torch.all(buf[~where] != 0)


@pytest.mark.parametrize("grown_zero", [False, True])
@pytest.mark.parametrize("numpy_views", [False, True])
@given(shape=st.sampled_from([(4, 5), (3, 2, 3), (7,)]), seed=st.integers(0, 2**16),
       optimizer=st.sampled_from(["sgd", "adamw"]))
def test_zero_at_after_update_at_equals_the_whole_mask_upkeep(numpy_views, grown_zero, shape,
                                                              seed, optimizer, monkeypatch):
    """After an :meth:`MaskSet.update_at` edit (dropped and grown entries overlapping),
    :meth:`MaskSet.zero_at` at the edited indices leaves exactly the weight and optimizer state
    of the whole-mask upkeep (``zero_where(old ^ new)`` then ``apply_``); ``numpy_views``: the
    edits and the upkeep through numpy views (large CPU layers); ``grown_zero``: only the
    dropped indices are looked at, which is exact because the masked gradients kept weight
    and state zero at the pruned entries."""
    import sparsefw.masks as masks_mod
    monkeypatch.setattr(masks_mod, "NUMPY_MIN_NUMEL", 0 if numpy_views else 1 << 62)
    g = torch.Generator().manual_seed(seed)
    twins = []
    for _ in range(2):
        p = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
        ms = MaskSet({"w": p})
        ms.update("w", torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5)
        ms.apply_()
        opt = (torch.optim.SGD([p], lr=0.1, momentum=0.9) if optimizer == "sgd"
               else torch.optim.AdamW([p], lr=0.1))
        for _ in range(2):
            p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
            ms.mask_grads_()
            opt.step()
        twins.append((p, ms, opt))
    n = twins[0][0].numel()
    drop = torch.randperm(n, generator=g)[: n // 3]
    grow = torch.randperm(n, generator=g)[: n // 3]  # overlaps drop: re-grown entries
    (p1, ms1, opt1), (p2, ms2, opt2) = twins
    for ms in (ms1, ms2):
        ms.take_edits()
    old1, old2 = ms1.masks["w"], ms2.masks["w"]
    ms1.update_at("w", drop, grow)
    ms2.update_at("w", drop, grow)
    edits = ms1.take_edits()
    assert ms1.zero_at("w", edits["w"], old1, opt1, grown_zero=grown_zero)
    ms2.zero_where("w", old2 ^ ms2.masks["w"], opt2)
    ms2.apply_()
    assert torch.equal(ms1.masks["w"], ms2.masks["w"])
    assert torch.equal(ms1.float_mask("w"), ms2.masks["w"].float())
    assert torch.equal(p1, p2)
    for key, value in opt1.state[p1].items():
        if torch.is_tensor(value) and value.shape == p1.shape:
            assert torch.equal(value, opt2.state[p2][key]), key
    assert torch.all(p1[~ms1.masks["w"]] == 0)


def test_take_edits_reports_indices_and_whole_replacements():
    ms = MaskSet({"a": nn.Parameter(torch.ones(4)), "b": nn.Parameter(torch.ones(4))})
    ms.take_edits()
    ms.update_at("a", torch.tensor([0]), torch.tensor([1]))
    ms.update_at("a", torch.tensor([2]), torch.tensor([0]))
    ms.update("b", torch.tensor([True, False, True, False]))
    ms.update_at("b", torch.tensor([0]), torch.tensor([1]))  # after a whole replacement
    edits = ms.take_edits()
    assert edits["a"].dropped.tolist() == [0, 2] and edits["a"].grown.tolist() == [1, 0]
    assert edits["b"] is None
    assert ms.take_edits() == {}


# ------------------------------------------------------------------------------ forward masks
@given(st.data(), sst.small_models(), sst.seeds(), st.sampled_from([0.0, 0.25]))
def test_forward_masks_train_dense_weights(data, model, seed, decay):
    drawn = data.draw(sst.random_masks(model, min_active=1))
    masks = _masked_set(model, drawn, "forward")
    masks.decay = decay
    before = {n: p.detach().clone() for n, p in masks.params.items()}
    x, y = _batch(model, seed)

    # the forward equals the model run on explicitly masked weights
    eff = masks.effective()
    manual = {}
    for n, p in masks.params.items():
        m = masks.masks[n].to(p.dtype)
        manual[n] = p.detach() * (m + decay * (1 - m))
    with torch.no_grad():
        torch.testing.assert_close(functional_call(model, eff, (x,)),
                                   functional_call(model, manual, (x,)), rtol=0, atol=0)

    # straight-through: the dense weight gets the gradient of the masked product everywhere
    out = functional_call(model, masks.effective(), (x,))
    F.cross_entropy(out, y).backward()
    for p in masks.params.values():
        assert p.grad is not None and p.grad.shape == p.shape
    masks.mask_grads_()  # a no-op for forward masks
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    grads = {n: p.grad.clone() for n, p in masks.params.items()}
    optimizer.step()
    masks.apply_()  # a no-op for forward masks
    changed = 0
    for n, p in masks.params.items():
        pruned = ~masks.masks[n]
        # pruned entries keep their dense value and take the plain SGD update
        torch.testing.assert_close(p.detach()[pruned], before[n][pruned] - 0.5 * grads[n][pruned])
        changed += int((p.detach()[pruned] != before[n][pruned]).sum())
    if any((~m).any() for m in masks.masks.values()):
        assert changed > 0


def test_forward_masks_pruned_entries_receive_gradient():
    lin = nn.Linear(4, 3, bias=False)
    ms = MaskSet({"weight": lin.weight}, kind="forward")
    ms.update("weight", torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool))
    x = torch.ones(2, 4)
    functional_call(lin, ms.effective(), (x,)).sum().backward()
    # d/dw of Σ (w⊙m)x with a straight-through mask is x summed over the batch: 2 everywhere
    assert torch.all(lin.weight.grad == 2)
    assert MaskSet({"weight": lin.weight}).effective() == {}  # hard masks: weights used as is


# ------------------------------------------------------------------------------ topk_mask
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40), st.data())
def test_topk_keeps_the_k_largest_lowest_index_first(values, data):
    k = data.draw(st.integers(0, len(values)))
    scores = torch.tensor(values, dtype=torch.float32)
    mask = topk_mask(scores, k)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert int(mask.sum()) == k
    expected = sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]
    assert sorted(torch.nonzero(mask).flatten().tolist()) == sorted(expected)


@given(sst.layer_shapes(), sst.seeds(), st.data())
def test_topk_on_weight_shapes(shape, seed, data):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    k = data.draw(st.integers(0, scores.numel()))
    mask = topk_mask(scores, k)
    assert mask.shape == scores.shape and int(mask.sum()) == k
    if 0 < k < scores.numel():
        assert scores[mask].min() >= scores[~mask].max()


def test_topk_by_hand():
    s = torch.tensor([[0.5, 2.0, 0.5], [2.0, -1.0, 0.5]])
    assert topk_mask(s, 3).tolist() == [[True, True, False], [True, False, False]]
    assert topk_mask(s, 0).sum() == 0 and topk_mask(s, 6).all()


# ------------------------------------------------------------------------------ bookkeeping
@given(st.data(), sst.small_models(), st.sampled_from(["hard", "forward"]))
def test_state_dict_round_trip(data, model, kind):
    ms = _masked_set(model, data.draw(sst.random_masks(model)), kind)
    ms.decay = 0.0 if kind == "hard" else 0.3
    ms.targets = {n: int(m.sum()) for n, m in ms.masks.items()}
    sd = ms.state_dict()
    other = MaskSet(sparsifiable_params(model), kind=kind)
    other.load_state_dict(sd)
    assert other.decay == ms.decay and other.targets == ms.targets
    for n in ms.names:
        assert torch.equal(other.masks[n], ms.masks[n])
    # the state dict holds copies: later edits of the live set do not change it
    name = ms.names[0]
    ms.update(name, ~ms.masks[name])
    assert torch.equal(sd["masks"][name], other.masks[name])


def test_state_dict_mismatch_is_an_error():
    a = MaskSet({"w": nn.Parameter(torch.ones(2, 2))})
    with pytest.raises(ValueError, match="forward"):
        MaskSet({"w": nn.Parameter(torch.ones(2, 2))}, kind="forward").load_state_dict(
            a.state_dict())
    with pytest.raises(ValueError, match="do not match"):
        MaskSet({"v": nn.Parameter(torch.ones(2, 2))}).load_state_dict(a.state_dict())


def test_update_checks_shape_and_dtype():
    ms = MaskSet({"w": nn.Parameter(torch.ones(2, 3))})
    with pytest.raises(ValueError, match="bool of shape"):
        ms.update("w", torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool of shape"):
        ms.update("w", torch.ones(2, 3))
    with pytest.raises(ValueError, match="hard, forward"):
        MaskSet({}, kind="soft")


def test_density_accounting():
    ms = MaskSet({"a": nn.Parameter(torch.ones(2, 5)), "b": nn.Parameter(torch.ones(10))})
    ms.update("a", torch.tensor([[1, 1, 0, 0, 0]] * 2, dtype=torch.bool))
    assert ms.active_counts().tolist() == [4, 10]
    assert float(ms.density()) == pytest.approx(14 / 20)
    assert ms.summary() == {"density": 0.7, "density/a": 0.4, "density/b": 1.0}


@given(seed=st.integers(0, 2**16), shape=st.sampled_from([(3, 4), (2, 3, 2), (5,)]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_masks_are_stored_once_and_read_as_bool(seed, shape, dtype):
    """One stored representation (0/1 in the parameter's dtype); ``masks[name]`` reads it as
    the bool mask last given, a mask built from the stored one after a release, and each
    change counts in ``version``."""
    p = nn.Parameter(torch.ones(shape, dtype=dtype))
    ms = MaskSet({"w": p})
    assert ms.masks["w"].dtype == torch.bool and bool(ms.masks["w"].all())
    given_mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    ms.update("w", given_mask)
    assert ms.masks["w"] is given_mask and ms.version["w"] == 1
    assert torch.equal(ms.float_mask("w"), given_mask.to(dtype))
    assert ms.masks.held() == [given_mask]
    ms.masks.release()
    assert ms.masks.held() == []
    rebuilt = ms.masks["w"]
    assert rebuilt is not given_mask and torch.equal(rebuilt, given_mask)
    assert ms.masks["w"] is rebuilt  # kept until the next release
    assert list(ms.masks) == ["w"] and len(ms.masks) == 1 and "w" in ms.masks
    ms.update_at("w", torch.tensor([0]), torch.tensor([]).long())
    assert ms.version["w"] == 2 and not bool(ms.masks["w"].reshape(-1)[0])
    assert torch.equal(ms.float_mask("w"), ms.masks["w"].to(dtype))
    sd = ms.state_dict()
    assert torch.equal(sd["masks"]["w"], ms.masks["w"])
    assert sd["masks"]["w"] is not ms.masks["w"]  # a copy


def test_between_steps_masks_cost_one_float_per_weight(make_config, catalogue, tmp_path):
    """After each optimizer step no bool mask is held: the masks' memory is the stored 0/1
    masks alone (4 bytes per fp32 weight), RigL updates included."""
    cfg, _ = make_config(sparsity={"density": 0.3}, model={"name": "mlp", "hidden": [16]},
                         topology_update={"name": "rigl", "every": 2})
    trainer = Trainer(cfg, catalogue, run_dir=tmp_path)
    trainer.fit()
    masks = trainer.masks
    assert masks.masks.held() == []
    assert max(masks.version.values()) > 2  # the updates ran
    got = sharding.memory_per_rank(trainer.model, masks)["masks"]
    assert got == 4 * sum(masks.numels())


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_short_run_keeps_pruned_weights_zero(make_config, catalogue, tmp_path, distribution):
    cfg, _ = make_config(sparsity={"density": 0.3, "distribution": distribution},
                         model={"name": "mlp", "hidden": [16, 12]})
    trainer = Trainer(cfg, catalogue, run_dir=tmp_path)
    metrics = trainer.fit()
    masks = trainer.masks
    for n, p in masks.params.items():
        assert torch.all(p[~masks.masks[n]] == 0), n
        assert int(masks.masks[n].sum()) == masks.targets[n], n
        assert torch.count_nonzero(p[masks.masks[n]]) > 0
    total = sum(masks.numels())
    assert metrics["density"] == pytest.approx(sum(masks.targets.values()) / total)
    assert abs(sum(masks.targets.values()) - 0.3 * total) <= len(masks)
