"""``sparsefw.Sparsifier`` in a plain PyTorch loop: the same lifecycle as the Trainer (bit for
bit), with and without a closure, resumable through the user's own ``torch.save``, once per
optimizer step under gradient accumulation, and clear errors for what a loop cannot give."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from sparsefw import Sparsifier, SparsifierError
from sparsefw import config as config_mod
from sparsefw.config import ConfigError
from sparsefw.engine import Trainer
from sparsefw.engine.optim import kernel_options
from sparsefw.hookspecs import hookimpl
from sparsefw.sparsifier import METHOD_SECTIONS

from .conftest import TINY, merge

#: 3 epochs of 8 steps on synthetic data, constant learning rate: 24 steps
BASE = merge(TINY, {
    "train": {"epochs": 3, "batch_size": 16, "log_every": 4},
    "data": {"n_train": 128},
    "model": {"hidden": [32, 16]},
    "lr_schedule": {"name": "constant"},
    "sparsity": {"density": 0.3},
})
EVERY = {"every": 4, "end": 1.0}  # updates at steps 0, 4, ..., 20: six of them

METHODS = {
    "static": {"topology_update": {"name": "static"}},
    "rigl": {"topology_update": {"name": "rigl", **EVERY}},
    "set": {"topology_update": {"name": "set", **EVERY}},
    "snip": {"mask_init": {"name": "snip"}},
    "s2sam": {"topology_update": {"name": "rigl", **EVERY}, "perturb": [{"name": "s2sam"}]},
    "sam": {"perturb": [{"name": "sam", "rho": 0.05}]},
    "agent": {"topology_update": {"name": "rigl", **EVERY},
              "gradient_correct": [{"name": "agent"}]},
    "nm_mdgf": {"sparsity": {"kind": "forward", "density": 0.5, "distribution": "uniform"},
                "mask_init": {"name": "nm"},
                "topology_update": {"name": "nm", "n": 2, "m": 4, "every": 1, "end": 1.0},
                "schedule": [{"name": "mask_decay", "decay": "exponential", "final": 0.01,
                              "until": 0.75}]},
}


def _raw(method: str) -> dict:
    return merge(BASE, METHODS[method])


def _trainer(catalogue, tmp_path, raw) -> Trainer:
    cfg = config_mod.structure(raw, catalogue.registry, source="test.toml")
    return Trainer(cfg, catalogue, run_dir=tmp_path, raw_config=raw)


def _method_sections(raw: dict) -> dict:
    return {k: v for k, v in raw.items() if k in (*METHOD_SECTIONS, "seed")}


class Loop:
    """A user's plain loop: their own model, optimizer and batches (the Trainer's batches,
    so that both see the same data)."""

    def __init__(self, catalogue, tmp_path, raw, *, closure: bool = True, **kw):
        ref = _trainer(catalogue, tmp_path / "ref", raw)  # for the initial weights and data
        self.model = copy.deepcopy(ref.model)
        opt = raw["optimizer"]
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=opt["lr"],
                                         momentum=opt["momentum"], weight_decay=5e-4,
                                         **kernel_options("auto", torch.device("cpu")))
        self.source = ref.train_source
        self.epochs = raw["train"]["epochs"]
        self.epoch = 0
        self.closure = closure
        self.sp = Sparsifier(
            self.model, self.optimizer, _method_sections(raw), catalogue=catalogue,
            total_steps=self.epochs * len(self.source), steps_per_epoch=len(self.source),
            batches=lambda: self.source.epoch(self.epoch), **kw,
        )

    def run_step(self, x, y):
        model, sp = self.model, self.sp
        if self.closure:
            def closure():
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            sp.step(closure, batch=(x, y))
        else:
            sp.zero_grad()
            F.cross_entropy(model(x), y).backward()
            sp.step(batch=(x, y))

    def run(self, stop_at: int | None = None):
        steps = 0
        while self.epoch < self.epochs:
            start = self.sp.state.step % len(self.source)
            for x, y in self.source.epoch(self.epoch, start):
                if stop_at is not None and steps == stop_at:
                    return
                self.run_step(x, y)
                steps += 1
            self.epoch += 1


def _assert_same(model_a, masks_a, model_b, masks_b):
    for (n, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), n
    for n in masks_a.names:
        assert torch.equal(masks_a.masks[n], masks_b.masks[n]), n


@pytest.mark.parametrize("method", list(METHODS))
def test_plain_loop_with_closure_equals_the_trainer(catalogue, tmp_path, method):
    raw = _raw(method)
    trainer = _trainer(catalogue, tmp_path / "trainer", raw)
    trainer.fit()
    loop = Loop(catalogue, tmp_path, raw)
    loop.run()
    assert loop.sp.state.step == trainer.state.step == 24
    _assert_same(trainer.model, trainer.masks, loop.model, loop.sp.masks)
    if "topology_update" in METHODS[method] and method not in ("static", "nm_mdgf"):
        assert float(loop.sp.masks.density()) == pytest.approx(float(trainer.masks.density()))


@pytest.mark.parametrize("method", ["rigl", "agent"])
def test_plain_loop_without_closure_equals_with_one(catalogue, tmp_path, method):
    raw = _raw(method)
    with_closure = Loop(catalogue, tmp_path / "a", raw)
    with_closure.run()
    without = Loop(catalogue, tmp_path / "b", raw, closure=False)
    without.run()
    _assert_same(with_closure.model, with_closure.sp.masks, without.model, without.sp.masks)


def test_no_closure_s2sam_equals_the_closure_and_evaluates_unperturbed(catalogue, tmp_path):
    raw = _raw("s2sam")
    with_closure = Loop(catalogue, tmp_path / "a", raw)
    with_closure.run()
    without = Loop(catalogue, tmp_path / "b", raw, closure=False)
    model, sp = without.model, without.sp
    x, y = next(without.source.epoch(0))
    for _ in range(3):
        without.run_step(x, y)
    # a training forward applies the next step's perturbation; unperturbed() takes it off
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(x)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    with sp.unperturbed():
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n
    # and a no-grad evaluation never perturbs
    fresh = Loop(catalogue, tmp_path / "c", raw, closure=False)
    fresh.run()
    _assert_same(with_closure.model, with_closure.sp.masks, fresh.model, fresh.sp.masks)


def test_sam_without_a_closure_names_the_component(catalogue, tmp_path):
    loop = Loop(catalogue, tmp_path, _raw("sam"), closure=False)
    x, y = next(loop.source.epoch(0))
    with pytest.raises(SparsifierError, match=r"perturb\[0\]:sam needs a closure"):
        loop.run_step(x, y)


def test_agent_without_the_batch_names_the_component(catalogue, tmp_path):
    loop = Loop(catalogue, tmp_path, _raw("agent"))
    F.cross_entropy(loop.model(torch.randn(4, 8)), torch.zeros(4, dtype=torch.long)).backward()
    with pytest.raises(SparsifierError, match=r"gradient_correct\[0\]:agent needs the step's batch"):
        loop.sp.step()


def test_agent_without_batches_is_refused_at_construction(catalogue):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SparsifierError, match="agent needs training batches outside the step"):
        Sparsifier(model, opt, {"gradient_correct": [{"name": "agent"}]}, catalogue=catalogue,
                   total_steps=10, density=0.5)


def test_resume_from_the_users_own_checkpoint_is_bit_identical(catalogue, tmp_path):
    raw = _raw("s2sam")
    whole = Loop(catalogue, tmp_path / "whole", raw)
    whole.run()
    first = Loop(catalogue, tmp_path / "first", raw)
    first.run(stop_at=10)  # mid-epoch, after the update at step 8
    buf = io.BytesIO()
    torch.save({"model": first.model.state_dict(), "optimizer": first.optimizer.state_dict(),
                "sparsifier": first.sp.state_dict(), "epoch": first.epoch}, buf)
    buf.seek(0)
    saved = torch.load(buf)  # weights_only: the Sparsifier state is plain tensors and data
    again = Loop(catalogue, tmp_path / "again", raw)
    again.model.load_state_dict(saved["model"])
    again.optimizer.load_state_dict(saved["optimizer"])
    again.sp.load_state_dict(saved["sparsifier"])
    again.epoch = saved["epoch"]
    again.run()
    assert again.sp.state.step == 24
    _assert_same(whole.model, whole.sp.masks, again.model, again.sp.masks)


@pytest.mark.parametrize("closure", [True, False])
def test_gradient_accumulation_runs_hooks_once_per_optimizer_step(catalogue, closure):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = Sparsifier(model, opt, {"topology_update": {"name": "rigl", "every": 2, "end": 1.0}},
                    catalogue=catalogue, total_steps=8, density=0.25)
    calls: list[str] = []
    sp.plugins.pm.add_hookcall_monitoring(lambda name, impls, kw: calls.append(name),
                                          lambda outcome, name, impls, kw: None)
    # a correction that counts its calls, added to this run's plugin manager
    sp.plugins.pm.register(_CountingCorrection(), name="gradient_correct[0]:count")
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        micro = [(torch.randn(4, 8, generator=gen), torch.randint(0, 4, (4,), generator=gen))
                 for _ in range(4)]
        if closure:
            def run(micro=micro):
                total = 0.0
                for x, y in micro:
                    loss = F.cross_entropy(model(x), y) / 4
                    loss.backward()
                    total += loss.detach()
                return total
            sp.step(run)
        else:
            sp.zero_grad()
            for x, y in micro:
                (F.cross_entropy(model(x), y) / 4).backward()
            sp.step()
    assert sp.state.step == 8
    assert calls.count("sparsefw_gradient_correct") == 8
    assert calls.count("sparsefw_topology_update") == 4  # steps 0, 2, 4, 6
    assert calls.count("sparsefw_schedule") == 8
    assert float(sp.masks.density()) == pytest.approx(0.25, abs=0.01)


class _CountingCorrection:
    @hookimpl
    def sparsefw_gradient_correct(self, state):
        pass


def test_keyword_shortcuts_frozen_and_excluded_parameters(catalogue):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model[0].weight.requires_grad_(False)  # frozen by the user
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sp = Sparsifier(model, opt, catalogue=catalogue, density=0.2, topology="set",
                    dense_layers=["4"], total_steps=6)
    assert sp.masks.names == ["2.weight"]
    assert sp.density == pytest.approx(0.2, abs=1 / 512)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    for _ in range(6):
        sp.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sp.step()
    pruned = ~sp.masks.masks["2.weight"]
    assert bool((model[2].weight[pruned] == 0).all())
    assert int(sp.masks.masks["2.weight"].sum()) == sp.masks.targets["2.weight"]


def test_config_errors_are_the_run_configs(catalogue, tmp_path):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError) as err:
        Sparsifier(model, opt, {"sparsity": {"density": 1.5},
                                "topology_update": {"name": "rigl", "drop_fracton": 0.3},
                                "train": {"epochs": 3}},
                   catalogue=catalogue, total_steps=10)
    text = str(err.value)
    assert "[train] is not a method section" in text
    path = tmp_path / "method.toml"
    path.write_text('[sparsity]\ndensity = 1.5\n[topology_update]\nname = "rigl"\n'
                    'drop_fracton = 0.3\n')
    with pytest.raises(ConfigError) as err:
        Sparsifier(model, opt, str(path), catalogue=catalogue, total_steps=10)
    text = str(err.value)
    assert "method.toml: [sparsity] density must be in (0, 1], got 1.5" in text
    assert "drop_fracton" in text
    sp = Sparsifier(model, opt, '[sparsity]\ndensity = 0.5\n', catalogue=catalogue,
                    total_steps=10)
    assert sp.masks.targets == {"weight": 4}


def test_grad_scaler_and_non_finite_steps(catalogue):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    sp = Sparsifier(model, opt, catalogue=catalogue, density=0.3, topology="rigl",
                    total_steps=6, scaler=scaler)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    for _ in range(6):
        def closure():
            loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            return loss
        sp.step(closure)
    for n in sp.masks.names:
        assert bool((sp.masks.params[n][~sp.masks.masks[n]] == 0).all())


def test_compiled_and_forward_masked_models(catalogue):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = Sparsifier(model, opt, {"sparsity": {"kind": "forward", "density": 0.5,
                                              "distribution": "uniform"},
                                 "mask_init": {"name": "nm"},
                                 "topology_update": {"name": "nm", "n": 2, "m": 4, "every": 1,
                                                     "end": 1.0}},
                    catalogue=catalogue, total_steps=4)
    x = torch.randn(5, 8)
    # the user's own call of the model sees w ⊙ m (dense weights kept, keys unchanged)
    expected = torch.func.functional_call(model, sp.masks.effective(), (x,))
    assert torch.equal(model(x), expected)
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    w = model[0].weight.detach()
    assert int((w != 0).sum()) == w.numel()  # the dense weight is not zeroed
    # hard masks through torch.compile
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    compiled = torch.compile(plain)
    sp = Sparsifier(compiled, opt, catalogue=catalogue, density=0.3, topology="rigl",
                    total_steps=4)
    y = torch.randint(0, 4, (5,))
    for _ in range(4):
        def closure():
            loss = F.cross_entropy(compiled(x), y)
            loss.backward()
            return loss
        sp.step(closure)
    assert sp.state.step == 4
    for n in sp.masks.names:
        assert bool((sp.masks.params[n][~sp.masks.masks[n]] == 0).all())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_dense_warm_up_state_is_cleared_at_the_first_masks(catalogue, optimizer):
    """A user's loop that trained densely before attaching the Sparsifier holds momentum (Adam
    moments) at entries the first masks prune; the first masks clear it there, so pruned
    weights stay zero and every grown connection starts at zero with zero state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-2))
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    for _ in range(3):  # dense warm-up: state everywhere
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    sp = Sparsifier(model, opt, catalogue=catalogue, density=0.3, topology="rigl",
                    total_steps=12, config={"topology_update": {"every": 2, "end": 1.0}})
    grown_any = False
    for step in range(12):
        before = {n: m.clone() for n, m in sp.masks.masks.items()}
        sp.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sp.step()
        for name, p in sp.masks.params.items():
            mask = sp.masks.masks[name]
            grown_any |= bool((mask & ~before[name]).any())
            pruned = ~mask
            assert bool((p.detach()[pruned] == 0).all()), (step, name)
            for key, value in opt.state[p].items():
                if torch.is_tensor(value) and value.shape == p.shape:
                    assert bool((value[pruned] == 0).all()), (step, name, key)
    assert grown_any
