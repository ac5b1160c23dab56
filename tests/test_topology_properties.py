"""Property tests (hypothesis) of the topology components' invariants, on emulated states and
through a real Trainer on the tiny config: counts kept, changes reported exactly, masks boolean
and shaped, grown entries starting at zero with zero optimizer state, exact resume."""

from __future__ import annotations

from types import SimpleNamespace

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sparsefw import config as config_mod
from sparsefw.config import SparsityConfig
from sparsefw.engine import Trainer
from sparsefw.engine.trainer import train
from sparsefw.hookspecs import hookimpl
from sparsefw.masks import MaskSet, topk_mask
from sparsefw.plugins import load_catalogue
from sparsefw.registry import EmptyConfig
from sparsefw.topology import select_per_segment
from sparsefw_plugins.topology.dsr import DSR, DSRConfig
from sparsefw_plugins.topology.granet import GraNet, GraNetConfig
from sparsefw_plugins.topology.itop import ITOP, ITOPConfig
from sparsefw_plugins.topology.mest import MEST, MESTConfig, scaled_ratio
from sparsefw_plugins.topology.rigl import RigL, RigLConfig
from sparsefw_plugins.topology.set import SET, SETConfig

DYNAMIC = ("set", "rigl", "dsr", "mest", "itop", "granet")

shapes = st.lists(
    st.one_of(
        st.tuples(st.integers(1, 6), st.integers(1, 6)),
        st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    ),
    min_size=1, max_size=3,
)


def build(method: str, regrow: bool):
    return {
        "set": lambda: SET(SETConfig(regrow_dropped=regrow)),
        "rigl": lambda: RigL(RigLConfig(regrow_dropped=regrow)),
        "dsr": lambda: DSR(DSRConfig(initial_threshold=0.3, regrow_dropped=regrow)),
        "mest": lambda: MEST(MESTConfig(regrow_dropped=regrow)),
        "itop": lambda: ITOP(ITOPConfig(grow="gradient", regrow_dropped=regrow)),
        "granet": lambda: GraNet(GraNetConfig(regrow_dropped=regrow)),
    }[method]()


def emulated_state(layer_shapes, density, seed, alpha, target_density):
    g = torch.Generator().manual_seed(seed)
    params, masks = {}, {}
    for i, shape in enumerate(layer_shapes):
        # few distinct values: plenty of ties in weights and gradients
        w = torch.randint(-3, 4, shape, generator=g).float() / 4
        p = nn.Parameter(w)
        p.grad = torch.randint(-3, 4, shape, generator=g).float() / 4
        params[f"l{i}.weight"] = p
        k = max(1, round(density * w.numel()))
        masks[f"l{i}.weight"] = topk_mask(torch.rand(shape, generator=g), k)
    ms = MaskSet(params)
    for n, m in masks.items():
        ms.update(n, m)
    ms.apply_()
    return SimpleNamespace(
        masks=ms, generator=torch.Generator().manual_seed(seed + 1),
        values={"drop_fraction": alpha, "density": target_density}, metrics={}, step=0,
        total_steps=100, device=torch.device("cpu"),
        config=SimpleNamespace(sparsity=SparsityConfig(density=target_density)),
    )


@pytest.mark.parametrize("direct", [False, True])
@given(
    layer_shapes=shapes, density=st.floats(0.05, 1.0), seed=st.integers(0, 2**16),
    alpha=st.floats(0.0, 1.0), target=st.floats(0.05, 1.0), method=st.sampled_from(DYNAMIC),
    regrow=st.booleans(),
)
def test_update_invariants(direct, layer_shapes, density, seed, alpha, target, method, regrow):
    """``direct``: random growth draws its subsets directly on every layer (as on large CPU
    layers), not by scores."""
    from sparsefw import topology

    state = emulated_state(layer_shapes, density, seed, alpha, target)
    names = state.masks.names
    old = {n: state.masks.masks[n].clone() for n in names}
    comp = build(method, regrow)
    with pytest.MonkeyPatch.context() as mp:
        if direct:
            mp.setattr(topology, "RANDOM_SUBSET_MIN_NUMEL", 0)
        change = comp.sparsefw_topology_update(state=state)
    new = state.masks.masks
    total_before = sum(int(old[n].sum()) for n in names)
    total_after = sum(int(new[n].sum()) for n in names)
    for n in names:
        p = state.masks.params[n]
        assert new[n].dtype == torch.bool and new[n].shape == p.shape
        dropped, grown = old[n] & ~new[n], new[n] & ~old[n]
        assert int(change.dropped[n]) == int(dropped.sum())
        assert int(change.grown[n]) == int(grown.sum())
        assert not (grown & old[n]).any() and not (dropped & ~old[n]).any()
        if method in ("set", "rigl", "mest", "itop"):
            if regrow or int(old[n].sum()) <= p.numel() // 2:
                assert int(new[n].sum()) == int(old[n].sum())  # drop count == grow count
            else:
                assert int(new[n].sum()) <= int(old[n].sum())
        if method == "granet":
            assert int(new[n].sum()) <= int(old[n].sum())
    # without re-growing dropped entries only entries inactive before the update may grow: where
    # there are too few (a full 1x1 layer), fewer grow than were dropped
    if method == "dsr":
        if regrow:
            assert total_after == total_before
        else:
            dropped = sum(int((old[n] & ~new[n]).sum()) for n in names)
            grown = sum(int((new[n] & ~old[n]).sum()) for n in names)
            free = sum(old[n].numel() - int(old[n].sum()) for n in names)
            assert grown == min(dropped, free)
    if method == "granet":
        keep = round(target * sum(p.numel() for p in state.masks.params.values()))
        if regrow:
            assert total_after == min(total_before, keep)
        else:
            assert total_after <= min(total_before, keep)
    rate = float(state.metrics["topology/itop_rate"])
    assert 0.0 < rate <= 1.0


@given(
    layer_shapes=shapes, density=st.floats(0.05, 1.0), seed=st.integers(0, 2**16),
    alpha=st.floats(0.0, 0.5),
)
def test_rigl_drops_smallest_and_grows_largest_gradients(layer_shapes, density, seed, alpha):
    state = emulated_state(layer_shapes, density, seed, alpha, 0.5)
    old = {n: state.masks.masks[n].clone() for n in state.masks.names}
    RigL(RigLConfig(regrow_dropped=False)).sparsefw_topology_update(state=state)
    for n, p in state.masks.params.items():
        new = state.masks.masks[n]
        k = int(alpha * int(old[n].sum()))
        room = p.numel() - int(old[n].sum())
        dropped, grown, kept = old[n] & ~new, new & ~old[n], old[n] & new
        assert int(dropped.sum()) == k
        assert int(grown.sum()) == min(k, room)
        w, gr = p.detach().abs(), p.grad.abs()
        if dropped.any() and kept.any():
            assert w[dropped].max() <= w[kept].min()
        untouched = ~old[n] & ~new
        if grown.any() and untouched.any():
            assert gr[grown].min() >= gr[untouched].max()


@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4), seed=st.integers(0, 2**16),
    largest=st.booleans(), data=st.data(),
)
def test_select_per_segment_matches_brute_force(sizes, seed, largest, data):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.randint(0, 4, (s,), generator=g).float() for s in sizes]
    cand = [torch.rand(s, generator=g) < 0.6 for s in sizes]
    ks = [data.draw(st.integers(0, s)) for s in sizes]
    out = select_per_segment(scores, cand, torch.tensor(ks), largest=largest)
    for sc, c, k, o in zip(scores, cand, ks, out, strict=True):
        idx = [i for i in range(len(sc)) if c[i]]
        idx.sort(key=lambda i: (-sc[i].item() if largest else sc[i].item(), i))
        expect = torch.zeros(len(sc), dtype=torch.bool)
        expect[idx[:k]] = True
        assert torch.equal(o, expect)


# ------------------------------------------------------------------------------ real Trainer
@attrs.define(eq=False)
class Probe:
    """A gradient_correct component that checks, after each topology update and the engine's
    zeroing, that grown entries hold zero weights and zero optimizer state."""

    cfg: EmptyConfig
    prev: dict = attrs.field(factory=dict)
    seen: list = attrs.field(factory=list)

    @hookimpl
    def sparsefw_run_start(self, state):
        self.prev = {n: m.clone() for n, m in state.masks.masks.items()}

    @hookimpl
    def sparsefw_gradient_correct(self, state):
        for n, m in state.masks.masks.items():
            grown = m & ~self.prev[n]
            if not grown.any():
                continue
            p = state.masks.params[n]
            opt = state.optimizer.state.get(p, {})
            bufs = [v for v in opt.values() if torch.is_tensor(v) and v.shape == p.shape]
            self.seen.append((n, int(grown.sum()), bool((p.detach()[grown] == 0).all()),
                              all(bool((b[grown] == 0).all()) for b in bufs), len(bufs)))

    @hookimpl
    def sparsefw_step_end(self, state, metrics):
        self.prev = {n: m.clone() for n, m in state.masks.masks.items()}


PROBES: list[Probe] = []


class ProbePlugin:
    @hookimpl
    def sparsefw_register(self, registry):
        def factory(cfg):
            probe = Probe(cfg)
            PROBES.append(probe)
            return probe

        registry.add("gradient_correct", "probe", factory=factory)


@pytest.fixture(scope="module")
def probe_catalogue():
    return load_catalogue(autoload=False, extra=[("test_probe", ProbePlugin())])


TOPO = {
    "set": {}, "rigl": {}, "mest": {"variant": "plain", "drop_fraction": 0.3},
    "itop": {"grow": "gradient"}, "dsr": {"initial_threshold": 0.05},
    "granet": {"final_density": 0.3, "prune_end": 0.5},
}


def tiny(make_config, method: str, **over):
    """The tiny run config (raw dict) with ``method`` updating every step from step 1 and the
    probe component added."""
    topo = {"name": method, "every": 1, "start": 1, "end": 1.0, **TOPO[method]}
    _, raw = make_config(topology_update=topo, **over)
    return {**raw, "gradient_correct": [{"name": "probe"}]}


@pytest.mark.parametrize("method", DYNAMIC)
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_trainer_grown_weights_start_at_zero_with_zero_state(method, optimizer, probe_catalogue,
                                                             make_config, tmp_path):
    raw = tiny(make_config, method, optimizer={"name": optimizer, "lr": 0.05})
    cfg = config_mod.structure(raw, probe_catalogue.registry)
    PROBES.clear()
    trainer = Trainer(cfg, probe_catalogue, run_dir=tmp_path)
    trainer.fit()
    seen = PROBES[0].seen
    assert seen, f"{method}: no connection grew in the run"
    for name, _count, weights_zero, state_zero, _nbufs in seen:
        assert weights_zero, f"{method}: grown weights of {name} are not zero"
        assert state_zero, f"{method}: optimizer state of grown {name} entries is not zero"
    assert any(nbufs > 0 for *_, nbufs in seen)
    for n, m in trainer.masks.masks.items():
        assert m.dtype == torch.bool
        assert bool((trainer.masks.params[n].detach()[~m] == 0).all())
    if method in ("set", "rigl", "mest", "itop"):
        assert {n: int(m.sum()) for n, m in trainer.masks.masks.items()} == trainer.masks.targets
    if method == "dsr":
        total = sum(int(m.sum()) for m in trainer.masks.masks.values())
        assert total == sum(trainer.masks.targets.values())
    if method == "granet":
        numel = sum(trainer.masks.numels())
        total = sum(int(m.sum()) for m in trainer.masks.masks.values())
        assert total == round(0.3 * numel)


class Stop(Exception):
    pass


@pytest.mark.parametrize(("method", "direct"), [("dsr", False), ("granet", False),
                                              ("itop", False), ("set", True), ("dsr", True)])
def test_resume_reproduces_the_uninterrupted_run(method, direct, catalogue, make_config, tmp_path,
                                                 monkeypatch):
    """``direct``: random growth drawing its subsets directly on every layer (as on large CPU
    layers), from the run's generator, which the checkpoint carries."""
    from sparsefw import topology

    if direct:
        monkeypatch.setattr(topology, "RANDOM_SUBSET_MIN_NUMEL", 0)
    topo = {"name": method, "every": 1, "end": 1.0, **TOPO[method]}
    if method == "itop":
        topo["grow"] = "random"
    cfg, _ = make_config(topology_update=topo)
    full = Trainer(cfg, catalogue, run_dir=tmp_path / "full")
    full.fit()

    part = Trainer(cfg, catalogue, run_dir=tmp_path / "part")
    original = Trainer.step

    def step(self, x, y):
        if self.state.step == part.steps_per_epoch + 1:
            raise Stop
        original(self, x, y)

    monkeypatch.setattr(Trainer, "step", step)
    with pytest.raises(Stop):
        part.fit()
    monkeypatch.setattr(Trainer, "step", original)
    resumed, _ = train(cfg, catalogue, resume=tmp_path / "part")
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), n
    for n in full.masks.names:
        assert torch.equal(full.masks.masks[n], resumed.masks.masks[n])
    comp_full = full.plugins.topology().instance
    comp_res = resumed.plugins.topology().instance
    for n, e in comp_full.explored.items():
        assert torch.equal(e, comp_res.explored[n])


@given(n=st.integers(1, 200), k=st.integers(0, 220), levels=st.integers(1, 6),
       seed=st.integers(0, 10_000), largest=st.booleans(), neg=st.booleans())
def test_topk_selection_equals_the_stable_sort(n, k, levels, seed, largest, neg):
    """The host-count path (partial top-k on integer keys) picks exactly the entries the
    device-count path (stable sort) picks, ties included."""
    from sparsefw.topology import select_per_segment

    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (n,), generator=g).float() * 0.5
    if neg:
        scores = scores - 1.0  # negative scores, and -0.0 tied with 0.0
        scores[torch.rand(n, generator=g) < 0.3] = -0.0
    cand = torch.rand(n, generator=g) < 0.7
    by_sort = select_per_segment([scores], [cand], torch.tensor([k]), largest=largest)[0]
    by_topk = select_per_segment([scores], [cand], [k], largest=largest)[0]
    assert torch.equal(by_sort, by_topk)


@given(st.floats(0, 1), st.floats(0.001, 1), st.floats(0.001, 1))
def test_scaled_mest_ratio_keeps_the_share_of_all_weights(ratio, written_for, density):
    r = scaled_ratio(ratio, written_for, density)
    assert 0 <= r <= 1
    if r < 1:  # the share of all weights mutated is the reference's
        assert r * density == pytest.approx(ratio * written_for)


def _reference_twin(comp):
    """The same component taking the mask path with device counts: one stable sort per layer
    (the selection written out), whole masks built, compared and converted by ``commit``."""
    twin = type(f"Reference{type(comp).__name__}", (type(comp),), {"host_counts": False})
    return twin(comp.cfg)


def _assert_updates_agree(comp, fast, ref, slow, updates: int, move_weights: bool = False):
    """``updates`` updates of ``comp`` on ``fast`` and ``ref`` on ``slow`` (twin states) leave
    the same masks (bool and stored 0/1), reported changes, metrics and ever-active masks after
    each; between updates the gradients (and, with ``move_weights``, the weights) move as in
    training."""
    for _ in range(updates):
        got = comp.sparsefw_topology_update(state=fast)
        want = ref.sparsefw_topology_update(state=slow)
        for n in fast.masks.names:
            assert torch.equal(fast.masks.masks[n], slow.masks.masks[n])
            assert torch.equal(fast.masks.float_mask(n), slow.masks.masks[n].float())
            assert torch.equal(got.dropped[n], want.dropped[n])
            assert torch.equal(got.grown[n], want.grown[n])
            assert torch.equal(comp.explored[n], ref.explored[n])
        assert fast.metrics.keys() == slow.metrics.keys()
        for key, value in fast.metrics.items():
            assert torch.equal(value, slow.metrics[key]), key
        for st_ in (fast, slow):
            st_.masks.apply_()
            for p in st_.masks.params.values():
                p.grad.copy_(p.grad.roll(1) * 0.5)
                if move_weights:
                    p.data.add_(p.grad.roll(2) * 0.25)


@pytest.mark.parametrize("sampled", [False, True])
@given(
    layer_shapes=shapes, density=st.floats(0.05, 1.0), target=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16), alpha=st.floats(0.0, 1.0), regrow=st.booleans(),
    updates=st.integers(1, 3),
)
def test_granet_host_counts_on_cpu_equal_the_sorting_path(sampled, layer_shapes, density, target,
                                                          seed, alpha, regrow, updates):
    """GraNet on CPU masks (counts read to the host, global pruning and per-layer drop and
    regrowth by partial top-k on indices) leaves exactly the masks, reported changes, metrics
    and ever-active masks of its device path (full stable sorts, counts on the device), over a
    few updates; ``sampled``: every layer through the sampled pre-filter."""
    from sparsefw import topology

    fast = emulated_state(layer_shapes, density, seed, alpha, target)
    slow = emulated_state(layer_shapes, density, seed, alpha, target)
    comp = build("granet", regrow)
    ref = type("SortingGraNet", (GraNet,), {"cpu_host_counts": False})(comp.cfg)
    with pytest.MonkeyPatch.context() as mp:
        if sampled:
            mp.setattr(topology, "SAMPLED_MIN_NUMEL", 0)
        _assert_updates_agree(comp, fast, ref, slow, updates, move_weights=True)


@pytest.mark.parametrize("numpy_views", [False, True])
@given(
    layer_shapes=shapes, density=st.floats(0.05, 1.0), seed=st.integers(0, 2**16),
    threshold=st.sampled_from([0.1, 0.25, 0.3, 0.5, 1.0]), regrow=st.booleans(),
    updates=st.integers(1, 3),
)
def test_dsr_index_path_equals_the_whole_mask_path(numpy_views, layer_shapes, density, seed,
                                                   threshold, regrow, updates):
    """DSR on CPU masks (pruned entries found as indices, the shares grown at indices, masks
    edited there) leaves exactly the masks, reported changes, metrics, thresholds and
    ever-active masks of its whole-mask path, over a few reallocations; ``numpy_views``: the
    pruned entries found and the masks edited through numpy views (large CPU layers)."""
    from sparsefw import masks as masks_mod

    fast = emulated_state(layer_shapes, density, seed, 0.0, 0.5)
    slow = emulated_state(layer_shapes, density, seed, 0.0, 0.5)
    cfg = DSRConfig(initial_threshold=threshold, regrow_dropped=regrow)
    comp = DSR(cfg)
    ref = type("WholeMaskDSR", (DSR,), {"cpu_host_counts": False})(cfg)
    with pytest.MonkeyPatch.context() as mp:
        if numpy_views:
            mp.setattr(masks_mod, "NUMPY_MIN_NUMEL", 0)
        _assert_updates_agree(comp, fast, ref, slow, updates, move_weights=True)
        assert comp.threshold == ref.threshold and comp.target == ref.target


@pytest.mark.parametrize("sampled", [False, True])
@given(
    layer_shapes=shapes, density=st.floats(0.05, 1.0), seed=st.integers(0, 2**16),
    alpha=st.floats(0.0, 1.0), regrow=st.booleans(), updates=st.integers(1, 3),
)
def test_snfs_index_path_equals_the_whole_mask_path(sampled, layer_shapes, density, seed, alpha,
                                                    regrow, updates):
    """SNFS on CPU masks (drop and growth chosen as indices, masks edited there) leaves exactly
    the masks, reported changes, metrics and ever-active masks of its whole-mask path (stable
    sorts), over a few updates, the dense momentum moving between them; ``sampled``: every
    layer through the sampled pre-filter and the numpy edits."""
    from sparsefw import masks as masks_mod
    from sparsefw import topology
    from sparsefw_plugins.topology.snfs import SNFS, SNFSConfig

    fast = emulated_state(layer_shapes, density, seed, alpha, 0.5)
    slow = emulated_state(layer_shapes, density, seed, alpha, 0.5)
    for st_ in (fast, slow):  # the gradients' own tensors: the momentum moves as they do
        st_.dense_momentum = {n: p.grad for n, p in st_.masks.params.items()}
    cfg = SNFSConfig(regrow_dropped=regrow)
    comp = SNFS(cfg)
    ref = type("WholeMaskSNFS", (SNFS,), {"cpu_host_counts": False})(cfg)
    with pytest.MonkeyPatch.context() as mp:
        if sampled:
            mp.setattr(topology, "SAMPLED_MIN_NUMEL", 0)
            mp.setattr(masks_mod, "NUMPY_MIN_NUMEL", 0)
        _assert_updates_agree(comp, fast, ref, slow, updates, move_weights=True)


@pytest.mark.parametrize("sampled", [False, True])
@given(
    layer_shapes=shapes, density=st.floats(0.05, 1.0), seed=st.integers(0, 2**16),
    alpha=st.floats(0.0, 1.0), method=st.sampled_from(("set", "rigl", "mest", "itop")),
    regrow=st.booleans(), updates=st.integers(1, 3),
)
def test_index_update_equals_the_whole_mask_update(sampled, layer_shapes, density, seed, alpha,
                                                   method, regrow, updates):
    """The index path (``update_by_index``: indices chosen, masks edited in place at them,
    counts from the indices) leaves exactly the masks, float masks, reported changes, metrics
    and ever-active masks of the whole-mask path with stable sorts, over a few updates;
    ``sampled``: every layer through the sampled pre-filter and the numpy edits of large CPU
    layers."""
    from sparsefw import masks as masks_mod
    from sparsefw import topology

    fast = emulated_state(layer_shapes, density, seed, alpha, 0.5)
    slow = emulated_state(layer_shapes, density, seed, alpha, 0.5)
    comp = build(method, regrow)
    ref = _reference_twin(comp)
    with pytest.MonkeyPatch.context() as mp:
        if sampled:  # (and the masks edited through numpy views)
            mp.setattr(topology, "SAMPLED_MIN_NUMEL", 0)
            mp.setattr(masks_mod, "NUMPY_MIN_NUMEL", 0)
        _assert_updates_agree(comp, fast, ref, slow, updates)
