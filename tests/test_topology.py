"""Hand-computed tests of the topology components on tiny tensors: the exact mask after one
update, tie handling, counts, schedules of drop fractions and densities, and state round trips.
Ties always go to the lower flat index (the earlier layer in global selections)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparsefw import config as config_mod
from sparsefw.config import SparsityConfig
from sparsefw.masks import MaskSet
from sparsefw.plugins import build_run
from sparsefw.topology import cosine_fraction, reallocate, select_per_segment
from sparsefw_plugins.topology.dsr import DSR, DSRConfig
from sparsefw_plugins.topology.granet import GraNet, GraNetConfig, cubic_density
from sparsefw_plugins.topology.itop import ITOP, ITOPConfig
from sparsefw_plugins.topology.mest import MEST, MESTConfig, mutation_ratio, scaled_ratio
from sparsefw_plugins.topology.rigl import RigL, RigLConfig
from sparsefw_plugins.topology.set import SET, SETConfig
from sparsefw_plugins.topology.static import StaticConfig, StaticTopology

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS = ("static", "set", "rigl", "dsr", "mest", "itop", "granet")


def fake_state(layers, *, values=None, step=0, total=100, seed=0, density=0.5):
    """A TrainState stand-in: ``layers`` maps name -> (weights, mask, grad) nested lists."""
    params = {n: nn.Parameter(torch.tensor(w, dtype=torch.float32)) for n, (w, _, _) in
              layers.items()}
    ms = MaskSet(params)
    for n, (_, m, g) in layers.items():
        ms.update(n, torch.tensor(m, dtype=torch.bool))
        if g is not None:
            params[n].grad = torch.tensor(g, dtype=torch.float32)
    return SimpleNamespace(
        masks=ms, generator=torch.Generator().manual_seed(seed), values=dict(values or {}),
        metrics={}, step=step, total_steps=total, device=torch.device("cpu"),
        config=SimpleNamespace(sparsity=SparsityConfig(density=density)),
    )


def mask(state, name):
    return state.masks.masks[name].int().tolist()


def update(component, state):
    return component.sparsefw_topology_update(state=state)


# ------------------------------------------------------------------------------ selection
def test_select_per_segment_ties_lower_index_and_device_counts():
    scores = [torch.tensor([3.0, 1.0, 1.0, 2.0]), torch.tensor([[5.0, 5.0], [0.0, 5.0]])]
    cand = [torch.tensor([True, True, True, False]), torch.ones(2, 2, dtype=torch.bool)]
    k = torch.tensor([2, 2])
    small = select_per_segment(scores, cand, k, largest=False)
    assert small[0].tolist() == [False, True, True, False]
    assert small[1].int().tolist() == [[1, 0], [1, 0]]  # 0.0 then the first 5.0
    big = select_per_segment(scores, cand, k, largest=True)
    assert big[0].int().tolist() == [1, 1, 0, 0]  # 3.0, then the first 1.0 (2.0 not a candidate)
    assert big[1].int().tolist() == [[1, 1], [0, 0]]  # three 5.0 tie: lower indices


def test_select_global_segment_prefers_earlier_layer():
    scores = [torch.tensor([0.2, 0.1]), torch.tensor([0.1, 0.3])]
    cand = [torch.ones(2, dtype=torch.bool)] * 2
    out = select_per_segment(scores, cand, torch.tensor([2]), largest=False, single_segment=True)
    assert [o.int().tolist() for o in out] == [[0, 1], [1, 0]]


def test_select_never_picks_non_candidates_even_if_k_too_large():
    out = select_per_segment([torch.tensor([1.0, 2.0, 3.0])], [torch.tensor([True, False, True])],
                             torch.tensor([5]), largest=True)
    assert out[0].tolist() == [True, False, True]


# ------------------------------------------------------------------------------ RigL
def test_rigl_exact_mask_with_tied_drop_and_tied_grow():
    # active |w|: 0.5, 0.1, 0.3, 0.1 -> k = floor(0.25·4) = 1 drops index 1 (tie with 4)
    # grow by |g| among inactive-after-drop {1, 2, 5}: 0.0, 0.4, 0.4 -> index 2 (tie with 5)
    st = fake_state({"a": ([0.5, -0.1, 0.0, 0.3, 0.1, 0.0], [1, 1, 0, 1, 1, 0],
                           [0.0, 0.0, 0.4, 0.0, 0.0, -0.4])}, values={"drop_fraction": 0.25})
    change = update(RigL(RigLConfig()), st)
    assert mask(st, "a") == [1, 0, 1, 1, 1, 0]
    assert int(change.dropped["a"]) == 1 and int(change.grown["a"]) == 1
    assert int(st.metrics["topology/dropped/a"]) == 1
    assert float(st.metrics["topology/itop_rate"]) == pytest.approx(5 / 6)


def test_counts_carried_between_updates_are_recounted_after_an_outside_change():
    """An index update keeps the active counts it leaves for the next one; a mask changed in
    between (another component, a loaded checkpoint) makes the next update count again."""
    seen = []

    class Spy(RigL):
        def drop_counts(self, state, active):
            seen.append(active.tolist())
            return super().drop_counts(state, active)

    st = fake_state({"a": ([0.5, -0.1, 0.0, 0.3, 0.1, 0.0], [1, 1, 0, 1, 1, 0],
                           [0.0, 0.0, 0.4, 0.0, 0.0, -0.4]),
                     "b": ([1.0, 2.0], [1, 0], [0.0, 1.0])}, values={"drop_fraction": 0.5})
    rigl = Spy(RigLConfig())
    update(rigl, st)
    update(rigl, st)  # the counts carried over
    st.masks.update("a", torch.ones(6, dtype=torch.bool))
    update(rigl, st)  # "a" changed from outside: counted again
    assert seen == [[4, 1], [4, 1], [6, 1]]


def test_rigl_regrows_just_dropped_position_which_keeps_its_mask():
    st = fake_state({"a": ([0.5, -0.1, 0.0, 0.3, 0.1, 0.0], [1, 1, 0, 1, 1, 0],
                           [0.0, 0.7, 0.4, 0.0, 0.0, 0.4])}, values={"drop_fraction": 0.25})
    change = update(RigL(RigLConfig()), st)
    assert mask(st, "a") == [1, 1, 0, 1, 1, 0]
    assert int(change.dropped["a"]) == 0 and int(change.grown["a"]) == 0


def test_rigl_without_regrowing_dropped():
    st = fake_state({"a": ([0.5, -0.1, 0.0, 0.3, 0.1, 0.0], [1, 1, 0, 1, 1, 0],
                           [0.0, 0.7, 0.4, 0.0, 0.0, 0.45])}, values={"drop_fraction": 0.25})
    update(RigL(RigLConfig(regrow_dropped=False)), st)
    assert mask(st, "a") == [1, 0, 0, 1, 1, 1]


def test_rigl_cosine_drop_fraction_default_and_skip_option():
    c = RigLConfig(every=10, end=0.5, skip_optimizer_step=True)
    # step 25 of 100, T_end = 50: α = 0.3/2·(1 + cos(π/2)) = 0.15 -> floor(0.15·10) = 1
    st = fake_state({"a": ([float(i + 1) for i in range(10)] + [0.0] * 10, [1] * 10 + [0] * 10,
                           [0.0] * 19 + [1.0])}, step=25)
    change = update(RigL(c), st)
    assert float(st.metrics["topology/drop_fraction"]) == pytest.approx(0.15)
    assert mask(st, "a") == [0] + [1] * 9 + [0] * 9 + [1]
    assert change.skip_optimizer_step is True
    assert cosine_fraction(0.3, 0, 50) == pytest.approx(0.3)
    assert cosine_fraction(0.3, 50, 50) == pytest.approx(0.0)
    assert cosine_fraction(0.3, 80, 50) == pytest.approx(0.0)


# ------------------------------------------------------------------------------ SET / ITOP
def test_set_grows_at_the_only_free_position_and_random_from_generator():
    st = fake_state({"a": ([0.3, 0.1, 0.2, 0.0], [1, 1, 1, 0], None)},
                    values={"drop_fraction": 0.34})
    update(SET(SETConfig(regrow_dropped=False)), st)
    assert mask(st, "a") == [1, 0, 1, 1]
    # regrow_dropped: candidates {1, 3}; the winner is the larger of the generator's draws
    st = fake_state({"a": ([0.3, 0.1, 0.2, 0.0], [1, 1, 1, 0], None)},
                    values={"drop_fraction": 0.34}, seed=7)
    r = torch.rand(4, generator=torch.Generator().manual_seed(7))
    update(SET(SETConfig()), st)
    expect = [1, 0, 1, 0]
    expect[1 if r[1] >= r[3] else 3] = 1
    assert mask(st, "a") == expect


def test_set_constant_drop_fraction_by_default():
    st = fake_state({"a": ([1.0, 2.0, 3.0, 4.0, 0.0], [1, 1, 1, 1, 0], None)}, step=60)
    update(SET(SETConfig(drop_fraction=0.5, regrow_dropped=False)), st)
    assert float(st.metrics["topology/drop_fraction"]) == pytest.approx(0.5)
    # only one free entry and no re-growing of dropped ones: the layer grows fewer
    assert mask(st, "a") == [0, 0, 1, 1, 1]


def test_itop_gradient_growth_and_exploration_rate():
    st = fake_state({"a": ([0.1, 0.5, 0.0, 0.0], [1, 1, 0, 0], [0.0, 0.0, 0.2, 0.9])},
                    values={"drop_fraction": 0.5})
    comp = ITOP(ITOPConfig(grow="gradient"))
    update(comp, st)
    assert mask(st, "a") == [0, 1, 0, 1]
    assert float(st.metrics["topology/itop_rate"]) == pytest.approx(3 / 4)
    assert comp.explored["a"].int().tolist() == [1, 1, 0, 1]
    # a second update explores the last entry: R_s = 1
    st.masks.params["a"].data = torch.tensor([0.0, 0.5, 0.0, 0.2])
    st.masks.params["a"].grad = torch.tensor([0.0, 0.0, 1.0, 0.0])
    update(comp, st)
    assert mask(st, "a") == [0, 1, 1, 0]
    assert float(st.metrics["topology/itop_rate"]) == pytest.approx(1.0)


# ------------------------------------------------------------------------------ MEST
def test_mest_drop_score_magnitude_plus_gradient_versus_magnitude():
    layers = {"a": ([0.1, 0.2, 0.3, 0.0], [1, 1, 1, 0], [1.0, 0.0, 0.0, 0.0])}
    st = fake_state(layers, values={"drop_fraction": 0.34})
    update(MEST(MESTConfig(grad_weight=0.15, regrow_dropped=False)), st)
    assert mask(st, "a") == [1, 0, 1, 1]  # scores 0.25, 0.2, 0.3: index 1 goes
    st = fake_state(layers, values={"drop_fraction": 0.34})
    update(MEST(MESTConfig(score="magnitude", regrow_dropped=False)), st)
    assert mask(st, "a") == [0, 1, 1, 1]


def test_mest_elastic_mutation_ratio_steps():
    ratios, ms = (0.2, 0.1, 0.0), (0.5625, 0.75)
    assert mutation_ratio(ratios, ms, 0.0) == 0.2
    assert mutation_ratio(ratios, ms, 0.5625) == 0.1
    assert mutation_ratio(ratios, ms, 0.74) == 0.1
    assert mutation_ratio(ratios, ms, 0.9) == 0.0
    st = fake_state({"a": ([float(i) for i in range(1, 11)], [1] * 10, None)}, step=10,
                    total=100)
    update(MEST(MESTConfig()), st)  # em: 0.2 of 10 active mutate (dense layer: regrown in place)
    assert float(st.metrics["topology/drop_fraction"]) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        MESTConfig(mutation_ratios=(0.2,), milestones=(0.5,))


def test_mest_ratios_scaled_with_density_by_hand():
    # written for d = 0.1: at d = 0.05 the reference's 0.02/0.01 sparsity points of all weights
    # are 0.4/0.2 of the active ones; at d = 0.02, 1.0 (capped) and 0.5; at d = 0.2, 0.1/0.05
    assert scaled_ratio(0.2, 0.1, 0.05) == pytest.approx(0.4)
    assert scaled_ratio(0.1, 0.1, 0.02) == pytest.approx(0.5)
    assert scaled_ratio(0.2, 0.1, 0.02) == 1.0
    assert scaled_ratio(0.2, 0.1, 0.2) == pytest.approx(0.1)
    layer = {"a": ([float(i) for i in range(1, 11)], [1] * 10, None)}
    for ratio_density, density, expected in ((None, 0.05, 0.2), (0.1, 0.05, 0.4),
                                             (0.1, 0.1, 0.2)):
        st = fake_state(layer, step=10, total=100, density=density)
        update(MEST(MESTConfig(ratio_density=ratio_density)), st)
        assert float(st.metrics["topology/drop_fraction"]) == pytest.approx(expected)
    st = fake_state(layer, step=80, total=100, density=0.05)  # the last phase mutates nothing
    update(MEST(MESTConfig(ratio_density=0.1)), st)
    assert float(st.metrics["topology/drop_fraction"]) == 0.0


# ------------------------------------------------------------------------------ DSR
def test_reallocate_proportional_largest_remainder_and_caps():
    assert reallocate(2, [2, 3], [5, 5]) == [1, 1]  # 0.8 / 1.2: the larger remainder gets it
    assert reallocate(10, [1, 3], [100, 100]) == [3, 7]  # 2.5 / 7.5 tie: earlier layer
    assert reallocate(10, [1, 9], [100, 2]) == [8, 2]  # the full layer's excess moves over
    assert reallocate(5, [0, 0], [1, 10]) == [1, 4]
    assert reallocate(50, [1, 1], [3, 4]) == [3, 4]


def test_dsr_exact_masks_threshold_and_global_count():
    st = fake_state({
        "a": ([0.0005, 0.002, 0.5, 0.0], [1, 1, 1, 0], None),
        "b": ([0.0001, 0.3, 0.4, 0.6, 0.0], [1, 1, 1, 1, 0], None),
    })
    comp = DSR(DSRConfig(initial_threshold=0.001, target_fraction=0.5, regrow_dropped=False))
    change = update(comp, st)
    assert mask(st, "a") == [0, 1, 1, 1] and mask(st, "b") == [0, 1, 1, 1, 1]
    assert comp.target == 4  # round(0.5 · 7)
    assert comp.threshold == pytest.approx(0.002)  # K = 2 < 0.9 · 4: doubled
    assert int(sum(change.dropped.values())) == int(sum(change.grown.values())) == 2


def test_dsr_moves_parameters_between_layers():
    # a loses 2 small weights; b has all the survivors, so b receives both
    st = fake_state({
        "a": ([0.0001, 0.0002, 0.0, 0.0], [1, 1, 0, 0], None),
        "b": ([0.5, 0.6, 0.7, 0.0, 0.0], [1, 1, 1, 0, 0], None),
    })
    comp = DSR(DSRConfig(initial_threshold=0.001, target_fraction=0.1))
    update(comp, st)
    assert mask(st, "a") == [0, 0, 0, 0] and mask(st, "b") == [1, 1, 1, 1, 1]
    assert comp.threshold == pytest.approx(0.0005)  # K = 2 > 1.1 · round(0.5) = 1.1: halved


# ------------------------------------------------------------------------------ GraNet
def test_granet_global_prune_then_regenerate_by_gradient():
    st = fake_state({
        "a": ([0.9, -0.05, 0.3, 0.2], [1, 1, 1, 1], [0.0, 0.1, 0.5, 0.2]),
        "b": ([0.1, 0.6, 0.0, -0.4], [1, 1, 0, 1], [0.3, 0.0, 0.3, 0.1]),
    }, values={"density": 0.5, "drop_fraction": 0.5})
    change = update(GraNet(GraNetConfig()), st)
    # global: keep 4 of 7 -> a1 (0.05), b0 (0.1), a3 (0.2) pruned; then per layer
    # ceil(0.5·2) = 1 dropped: a2 (0.3), b3 (0.4); regrown by |g|: a2 (0.5, itself), b0 (tie b2)
    assert mask(st, "a") == [1, 0, 1, 0] and mask(st, "b") == [1, 1, 0, 0]
    # net changes: b0 was pruned and regrown, so its mask did not change
    assert [int(change.dropped[n]) for n in "ab"] == [2, 1]
    assert [int(change.grown[n]) for n in "ab"] == [0, 0]


def test_granet_cubic_density_and_drop_fraction_schedules():
    assert cubic_density(1.0, 0.1, 0, 0, 100) == pytest.approx(1.0)
    assert cubic_density(1.0, 0.1, 50, 0, 100) == pytest.approx(0.1 + 0.9 * 0.125)
    assert cubic_density(1.0, 0.1, 100, 0, 100) == pytest.approx(0.1)
    assert cubic_density(1.0, 0.1, 150, 0, 100) == pytest.approx(0.1)
    comp = GraNet(GraNetConfig(initial_density=0.8, prune_end=0.5))
    st = fake_state({"a": ([1.0] * 4, [1] * 4, [0.0] * 4)}, step=0, total=200, density=0.2)
    assert comp.drop_fraction(st) == pytest.approx(0.5)
    st.step = 200
    assert comp.drop_fraction(st) == pytest.approx(0.005)
    st.step = 100
    assert comp.density_target(st, [st.masks.masks["a"]]) == pytest.approx(0.2)
    st.step = 50  # half way to prune_end = 100
    assert comp.density_target(st, [st.masks.masks["a"]]) == pytest.approx(0.2 + 0.6 / 8)


def test_granet_measures_initial_density_when_unset():
    comp = GraNet(GraNetConfig())
    st = fake_state({"a": ([1.0, 2.0, 3.0, 4.0], [1, 1, 1, 0], [0.0] * 4)}, density=0.25)
    assert comp.density_target(st, [st.masks.masks["a"]]) == pytest.approx(0.75)
    assert comp.initial_density == pytest.approx(0.75)
    assert comp.sparsefw_state_dict(state=st)["initial_density"] == pytest.approx(0.75)


# ------------------------------------------------------------------------------ static / state
def test_static_changes_nothing():
    st = fake_state({"a": ([1.0, 0.0], [1, 0], [0.0, 5.0])})
    assert StaticTopology(StaticConfig()).sparsefw_topology_update(state=st) is None
    assert mask(st, "a") == [1, 0]


@pytest.mark.parametrize("factory, cfg", [
    (ITOP, ITOPConfig()), (DSR, DSRConfig()), (GraNet, GraNetConfig()),
])
def test_state_dict_round_trip(factory, cfg):
    layers = {"a": ([0.3, 0.0005, 0.2, 0.0], [1, 1, 1, 0], [0.1, 0.2, 0.3, 0.4])}
    st = fake_state(layers, values={"drop_fraction": 0.34, "density": 0.75})
    comp = factory(cfg)
    update(comp, st)
    sd = comp.sparsefw_state_dict(state=st)
    other = factory(cfg)
    other.sparsefw_load_state_dict(state=st, plugin_state=sd)
    assert other.sparsefw_state_dict(state=st).keys() == sd.keys()
    assert torch.equal(other.explored["a"], comp.explored["a"])
    for key in sd:
        if key != "explored":
            assert getattr(other, key if key != "initial_density" else "initial_density") == \
                sd[key]


# ------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("method", METHODS)
def test_config_builds(method, catalogue):
    cfg, _raw = config_mod.load(CONFIGS / f"{method}.toml", catalogue.registry)
    assert cfg.topology_update.name == method
    assert cfg.data.name == "digits" and cfg.sparsity.density == pytest.approx(0.1)
    run = build_run(cfg, catalogue)
    assert run.topology() is not None


def test_configs_round_trip(catalogue):
    for method in METHODS:
        cfg, _ = config_mod.load(CONFIGS / f"{method}.toml", catalogue.registry)
        again = config_mod.structure(config_mod.to_dict(cfg), catalogue.registry)
        assert again == cfg


def test_unknown_option_is_reported(make_config):
    with pytest.raises(config_mod.ConfigError, match="drop_fracton"):
        make_config(topology_update={"name": "rigl", "drop_fracton": 0.3})
    with pytest.raises(config_mod.ConfigError, match="grow"):
        make_config(topology_update={"name": "itop", "grow": "momentum"})
    assert math.isfinite(cosine_fraction(0.3, 1, 0))


def test_maskset_update_at_edits_the_mask_and_its_float_copy():
    p = torch.nn.Parameter(torch.zeros(2, 3))
    ms = MaskSet({"w": p})
    ms.update("w", torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool))
    before = ms.masks["w"]
    # drop 0 and 3, grow 2 and 3: 3 is re-grown (stays active), 0 goes, 2 comes
    ms.update_at("w", torch.tensor([0, 3]), torch.tensor([2, 3]))
    assert ms.masks["w"].tolist() == [[False, True, True], [True, False, False]]
    assert ms.float_mask("w").tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    assert before.tolist() == [[True, True, False], [True, False, False]]  # a copy was edited
