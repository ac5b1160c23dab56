"""``[optimizer] implementation = "fused_masked"``: sparsefw's kernel that folds the hard masks
into the SGD update (:mod:`sparsefw.kernels`). It must equal the mask pass followed by torch's
fused SGD bit for bit — weights, momentum buffers and the masked ``.grad`` — for every option,
every tensor size (torch's fused kernel rounds its scalar tail differently from its vectors) and
every kind of parameter, and whole runs with it must equal runs without it."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsefw import Sparsifier, kernels
from sparsefw import config as config_mod
from sparsefw.config import ConfigError
from sparsefw.engine import Trainer
from sparsefw.kernels.masked_sgd import MaskedSGD
from sparsefw.testing.resume import assert_same_run, interrupted_and_resumed

from .conftest import kernels_or_skip, merge
from .test_sparsifier import BASE, METHODS


@pytest.fixture(scope="module", autouse=True)
def built():
    """Build (or load) the kernel once for the module (:func:`kernels_or_skip`)."""
    kernels_or_skip()


def _options(draw_mom, draw_damp, nesterov, maximize, wd, lr):
    nesterov = nesterov and draw_mom > 0 and draw_damp == 0
    return dict(lr=lr, momentum=draw_mom, dampening=draw_damp, weight_decay=wd,
                nesterov=nesterov, maximize=maximize)


@given(
    # sizes around torch's vector widths (8 with AVX2, 16 with AVX-512): tails of every length
    sizes=st.lists(st.integers(1, 70), min_size=1, max_size=4),
    density=st.floats(0.0, 1.0),
    momentum=st.sampled_from([0.0, 0.9]),
    dampening=st.sampled_from([0.0, 0.1]),
    nesterov=st.booleans(),
    maximize=st.booleans(),
    wd=st.sampled_from([0.0, 5e-4, 0.1]),
    lr=st.floats(1e-4, 1.0),
    steps=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_the_kernel_equals_the_mask_pass_then_torchs_fused_sgd(
        sizes, density, momentum, dampening, nesterov, maximize, wd, lr, steps, seed):
    g = torch.Generator().manual_seed(seed)
    opts = _options(momentum, dampening, nesterov, maximize, wd, lr)
    shapes = [(s,) if i % 2 else (s, 3) for i, s in enumerate(sizes)]
    masks = [(torch.rand(s, generator=g) < density).float() for s in shapes]
    weights = [torch.randn(s, generator=g) * m for s, m in zip(shapes, masks, strict=True)]
    bias = torch.randn(5, generator=g)  # never masked

    ref = [w.clone().requires_grad_() for w in weights] + [bias.clone().requires_grad_()]
    ours = [w.clone().requires_grad_() for w in weights] + [bias.clone().requires_grad_()]
    # the bias in a group of its own with its own learning rate
    ref_opt = torch.optim.SGD([{"params": ref[:-1]}, {"params": ref[-1:], "lr": lr / 2}],
                              fused=True, **opts)
    opt = MaskedSGD([{"params": ours[:-1]}, {"params": ours[-1:], "lr": lr / 2}], **opts)
    opt.mask_source = lambda: (ours[:-1], masks)

    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g) for p in ref]
        for p, q, gr in zip(ref, ours, grads, strict=True):
            p.grad, q.grad = gr.clone(), gr.clone()
        torch._foreach_mul_([p.grad for p in ref[:-1]], masks)  # the engine's mask pass
        ref_opt.step()
        opt.step()
        for p, q in zip(ref, ours, strict=True):
            assert torch.equal(p.detach(), q.detach())
            assert torch.equal(p.grad, q.grad)  # .grad holds the masked gradient
            if momentum:
                assert torch.equal(ref_opt.state[p]["momentum_buffer"],
                                   opt.state[q]["momentum_buffer"])
    for w, m in zip(ours, masks, strict=False):  # pruned weights stay exactly zero
        assert not w.detach()[m == 0].any()


@pytest.mark.parametrize("nesterov", [False, True])
def test_every_tail_length_rounds_as_torch_does(nesterov):
    """Tensors of 1 to 40 entries (every position of the vector/scalar boundary for 8- and
    16-float vectors), momentum past its first step, where the two roundings differ."""
    torch.manual_seed(1)
    sizes = range(1, 41)
    masks = [(torch.rand(n) < 0.7).float() for n in sizes]
    weights = [torch.randn(n) * m for n, m in zip(sizes, masks, strict=True)]
    ref = [w.clone().requires_grad_() for w in weights]
    ours = [w.clone().requires_grad_() for w in weights]
    opts = dict(lr=0.1, momentum=0.9, dampening=0.0 if nesterov else 0.1, weight_decay=5e-4,
                nesterov=nesterov)
    ref_opt = torch.optim.SGD(ref, fused=True, **opts)
    opt = MaskedSGD(ours, **opts)
    opt.mask_source = lambda: (ours, masks)
    for _ in range(4):
        grads = [torch.randn(n) for n in sizes]
        for p, q, gr, m in zip(ref, ours, grads, masks, strict=True):
            p.grad, q.grad = gr * m, gr.clone()
        ref_opt.step()
        opt.step()
    for p, q in zip(ref, ours, strict=True):
        assert torch.equal(p.detach(), q.detach()), p.numel()
        assert torch.equal(ref_opt.state[p]["momentum_buffer"], opt.state[q]["momentum_buffer"])


def test_without_write_back_the_update_is_the_same_and_grad_stays_unmasked():
    torch.manual_seed(2)
    masks = [(torch.rand(37, 5) < 0.2).float()]
    ref = [(torch.randn(37, 5) * masks[0]).requires_grad_()]
    ours = [ref[0].detach().clone().requires_grad_()]
    ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, weight_decay=1e-3, fused=True)
    opt = MaskedSGD(ours, lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt.mask_source = lambda: (ours, masks)
    opt.keep_masked_grads = False
    for _ in range(3):
        grad = torch.randn(37, 5)
        ref[0].grad, ours[0].grad = grad * masks[0], grad.clone()
        ref_opt.step()
        opt.step()
        assert torch.equal(ref[0].detach(), ours[0].detach())
        assert torch.equal(ours[0].grad, grad)  # left as it was
    assert torch.equal(ref_opt.state[ref[0]]["momentum_buffer"],
                       opt.state[ours[0]]["momentum_buffer"])


def test_the_step_bumps_autograd_version_counters():
    """Written through raw pointers, the tensors are still marked modified (a graph that saved
    a weight before the step then fails loudly in backward, as with torch's optimizers)."""
    w = torch.randn(20, requires_grad=True)
    opt = MaskedSGD([w], lr=0.1, momentum=0.9)
    mask = (torch.rand(20) < 0.5).float()
    opt.mask_source = lambda: ([w], [mask])
    saved = (w * w).sum()  # saves w for its backward
    w.grad = torch.randn(20)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_parameters_the_kernel_does_not_take_go_through_torch():
    """float64 and non-contiguous parameters, masked or not: the mask pass and torch's SGD."""
    torch.manual_seed(0)
    wide = torch.randn(6, 4, dtype=torch.float64)
    strided = torch.randn(4, 6).t()  # not contiguous
    plain = torch.randn(4, 6)
    masks = [(torch.rand(t.shape) < 0.5).to(t.dtype) for t in (wide, strided, plain)]
    tensors = [t * m for t, m in zip((wide, strided, plain), masks, strict=True)]
    ref = [t.clone().requires_grad_() for t in tensors]
    ours = [t.clone().requires_grad_() for t in tensors]
    ours[1] = tensors[1].t().contiguous().t().requires_grad_()  # keep the stride
    opts = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref_opt = torch.optim.SGD(ref, fused=True, **opts)
    opt = MaskedSGD(ours, **opts)
    opt.mask_source = lambda: (ours, masks)
    for _ in range(3):
        grads = [torch.randn(t.shape, dtype=t.dtype) for t in tensors]
        for p, q, gr, m in zip(ref, ours, grads, masks, strict=True):
            p.grad, q.grad = gr * m, gr.clone()
        ref_opt.step()
        opt.step()
    assert not ours[1].is_contiguous()
    for p, q in zip(ref, ours, strict=True):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(ref_opt.state[p]["momentum_buffer"], opt.state[q]["momentum_buffer"])


#: no topology section: mask_init and the jsonl observer only
METHODS_HERE = {**METHODS, "mask_init_only": {}}


def _raw(method: str, implementation: str) -> dict:
    return merge(merge(BASE, METHODS_HERE[method]),
                 {"optimizer": {"implementation": implementation, "weight_decay": 5e-4}})


@pytest.mark.parametrize("method", ["mask_init_only", "static", "rigl", "s2sam", "set"])
def test_a_run_with_the_kernel_equals_one_with_torchs_fused_sgd(catalogue, tmp_path, method):
    """Whole Trainer runs, topology updates (which zero weights and momentum at indices) and
    S²-SAM (which keeps the masked ``.grad`` tensors by reference) included."""
    runs = []
    for impl in ("fused", "fused_masked"):
        raw = _raw(method, impl)
        cfg = config_mod.structure(raw, catalogue.registry, source="test.toml")
        trainer = Trainer(cfg, catalogue, run_dir=tmp_path / impl, raw_config=raw)
        trainer.fit()
        runs.append(trainer)
    fused, masked = runs
    assert isinstance(masked.optimizer, MaskedSGD)
    # gradients nobody reads after the step are not written back; RigL's, SET's and
    # S²-SAM's components may read them
    assert masked.optimizer.keep_masked_grads is (method not in ("mask_init_only", "static"))
    assert masked.state.step == fused.state.step == 24
    assert_same_run(fused, masked)
    a, b = fused.optimizer.state_dict()["state"], masked.optimizer.state_dict()["state"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"]) for k in a)


def test_kill_and_resume_with_the_kernel_is_bit_identical(catalogue, make_config, tmp_path):
    cfg, raw = make_config(train={"epochs": 3, "checkpoint_every": 1},
                           topology_update={"name": "rigl", "every": 2, "end": 1.0},
                           optimizer={"implementation": "fused_masked"})
    full, resumed = interrupted_and_resumed(cfg, raw, catalogue, tmp_path, 5)
    assert isinstance(full.optimizer, MaskedSGD) and isinstance(resumed.optimizer, MaskedSGD)
    assert resumed.state.step == full.state.step
    assert_same_run(full, resumed)


def test_the_sparsifier_leaves_the_mask_pass_to_the_optimizer(catalogue, monkeypatch):
    """In ``sparsifier.step`` the engine makes no mask pass of its own; the gradients are
    masked after the step all the same."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)
    sections = {"sparsity": {"density": 0.3}, "mask_init": {"name": "random"}}
    sp = Sparsifier(model, opt, sections, catalogue=catalogue, total_steps=10)
    passes = []
    real = sp.masks.mask_grads_
    monkeypatch.setattr(sp.masks, "mask_grads_", lambda: (passes.append(1), real())[1])
    x, y = torch.randn(8, 12), torch.randint(0, 3, (8,))

    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        sp.step(closure)
    assert passes == []
    assert opt.keep_masked_grads  # the loop owns its gradients
    for name, p in sp.masks.params.items():
        pruned = ~sp.masks.masks[name]
        assert not p.grad[pruned].any() and not p.detach()[pruned].any()
    # a post_backward of its own (a framework's callback) still masks: the optimizer may not
    # be the next thing to run
    sp.post_backward()
    assert passes == [1]


@pytest.mark.parametrize("section, value, says", [
    ("optimizer", {"name": "adamw"}, 'name = "sgd"'),
    ("sparsity", {"kind": "forward"}, "[sparsity] kind"),
])
def test_what_the_kernel_cannot_run_is_a_config_error(catalogue, tmp_path, section, value, says):
    raw = merge(_raw("static", "fused_masked"), {section: value})
    cfg = config_mod.structure(raw, catalogue.registry, source="run.toml")
    with pytest.raises(ConfigError) as info:
        Trainer(cfg, catalogue, run_dir=tmp_path, raw_config=raw, config_source="run.toml")
    msg = str(info.value)
    assert "run.toml" in msg and '[optimizer] implementation = "fused_masked"' in msg
    assert says in msg


def test_without_ninja_the_kernel_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "ninja", None)  # import ninja raises ImportError
    with pytest.raises(kernels.KernelUnavailable, match=r"ninja.*sparsefw\[kernels\]"):
        kernels.load_kernels.__wrapped__()


def test_a_slow_load_is_announced_and_a_failed_build_is_unavailable(monkeypatch, capfd):
    from torch.utils import cpp_extension

    def slow(**kwargs):
        import time

        time.sleep(0.3)
        return "module"

    monkeypatch.setattr(kernels, "NOTICE_AFTER_S", 0.01)
    monkeypatch.setattr(cpp_extension, "load", slow)
    assert kernels.load_kernels.__wrapped__() == "module"
    assert "building its CPU kernels" in capfd.readouterr().err

    def broken(**kwargs):
        raise RuntimeError("Error building extension 'sparsefw_kernels'")

    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.raises(kernels.KernelUnavailable, match="failed to build: Error building"):
        kernels.load_kernels.__wrapped__()
