"""The sparse runtime (:mod:`sparsefw.runtime`): every built-in model family's runtime gives the
masked model's outputs, whatever layout each layer gets; the layers are exact for drawn shapes,
densities and row counts; saved runtimes load with torch alone; the dense fallback keeps the
original module. Speed is measured by ``benchmarks/bench_sparse.py``, never here."""

from __future__ import annotations

import copy
import importlib
import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sparsefw import runtime, timing
from sparsefw.masks import sparsifiable_params
from sparsefw.models.gpt import GPTConfig
from sparsefw.models.mlp import MLPConfig
from sparsefw.models.vit import TorchvisionViTConfig, ViTConfig
from sparsefw.models.wrn import WRNConfig
from sparsefw.registry import EmptyConfig, Registry
from sparsefw.runtime_layers import SparseLinear

#: (model name, config, one sample's shape, classes): one small instance per built-in family
FAMILIES = [
    ("mlp", MLPConfig(hidden=(64, 32)), (1, 8, 8), 10),
    ("lenet5", EmptyConfig(), (1, 28, 28), 10),
    ("resnet20", None, (3, 16, 16), 10),
    ("vgg16", None, (3, 32, 32), 10),
    ("wrn", WRNConfig(depth=10, widen=1), (3, 16, 16), 10),
    ("vit", ViTConfig(patch_size=4, dim=32, depth=2, heads=2), (3, 16, 16), 10),
    ("gpt", GPTConfig(dim=32, depth=2, heads=2), (12,), 50),
    ("torchvision_vit", TorchvisionViTConfig(arch="vit_b_16", patch_size=8, num_layers=1,
                                             num_heads=2, hidden_dim=32, mlp_dim=64),
     (3, 16, 16), 10),
]


@pytest.fixture(scope="module")
def registry() -> Registry:
    reg = Registry()
    for mod in ("sparsefw_plugins.builtin_models", "sparsefw_plugins.nm.models"):
        importlib.import_module(mod).sparsefw_register(registry=reg)
    return reg


def build(registry, name, cfg, shape, classes, density=0.1, seed=0):
    """A model of ``name`` with random hard masks at ``density`` (per layer) and an input."""
    torch.manual_seed(seed)
    entry = registry.get("model", name)
    model = entry.factory(cfg if cfg is not None else entry.config(), input_shape=shape,
                          num_classes=classes).eval()
    masks = {n: torch.rand_like(p) < density for n, p in sparsifiable_params(model).items()}
    if name == "gpt":
        x = torch.randint(0, classes, (4, *shape)).float()
    else:
        x = torch.randn(4, *shape)
    return model, masks, x


def masked_output(model, masks, x):
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
        return ref(x)


@pytest.mark.parametrize("layout", [None, "csr", "bsr"], ids=["autotuned", "csr", "bsr"])
@pytest.mark.parametrize("family", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_runtime_equals_masked_model_for_every_family(registry, family, layout):
    model, masks, x = build(registry, *family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rt = runtime.to_runtime(model, x, masks=masks, batch_sizes=(1, 4), repeats=1, layout=layout)
    with torch.no_grad():
        for b in (1, 3, 4):
            got, want = rt.module(x[:b]), masked_output(model, masks, x[:b])
            assert got.shape == want.shape
            assert (got - want).abs().max().item() <= 1e-4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    if layout == "csr":  # every masked Linear / 1x1 conv got the sparse layer
        assert rt.choices and all(set(c.layouts) == {"csr"} for c in rt.choices)
        assert all(isinstance(rt.module.get_submodule(c.name), SparseLinear) for c in rt.choices)


@given(widths=st.lists(st.integers(1, 24), min_size=2, max_size=4),
       density=st.floats(0.0, 1.0), layout=st.sampled_from(["csr", "bsr"]),
       batch=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_runtime_of_drawn_mlps_equals_the_masked_model(widths, density, layout, batch, seed):
    from sparsefw.models import MLP

    torch.manual_seed(seed)
    model = MLP(widths[0], tuple(widths[1:-1]), widths[-1]).eval()
    masks = {n: torch.rand_like(p) < density for n, p in sparsifiable_params(model).items()}
    x = torch.randn(batch, widths[0])
    rt = runtime.to_runtime(model, x, masks=masks, batch_sizes=(1, batch), layout=layout)
    with torch.no_grad():
        assert (rt.module(x) - masked_output(model, masks, x)).abs().max().item() <= 1e-4


def test_channel_pruned_model_stays_physically_smaller(registry):
    from sparsefw.channels import count_params

    model, masks, x = build(registry, "mlp", MLPConfig(hidden=(64, 32)), (1, 8, 8), 10)
    masks["3.weight"][:, :20] = False  # 20 of the 64 hidden units feed nothing
    rt = runtime.to_runtime(model, x, masks=masks, batch_sizes=(2,), repeats=1)
    assert rt.channels_removed >= 20
    assert count_params(rt.module) < count_params(model)
    assert (rt.module(x) - masked_output(model, masks, x)).abs().max() <= 1e-4


@given(out_f=st.integers(1, 40), in_f=st.integers(1, 40), density=st.floats(0.0, 1.0),
       rows=st.lists(st.integers(1, 9), min_size=1, max_size=3, unique=True),
       layouts=st.lists(st.sampled_from(["dense", "csr", "bsr"]), min_size=3, max_size=3),
       bias=st.booleans(), lead=st.sampled_from([(), (2,)]), seed=st.integers(0, 2**16))
def test_sparse_linear_equals_linear(out_f, in_f, density, rows, layouts, bias, lead, seed):
    g = torch.Generator().manual_seed(seed)
    bs = next((b for b in (4, 2, 1) if out_f % b == 0 and in_f % b == 0), 1)
    w = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) < density)
    b = torch.randn(out_f, generator=g) if bias else None
    rows = sorted(rows)
    layer = SparseLinear(w, b, rows, layouts[:len(rows)], blocksize=bs)
    for n in (1, *rows, 11):
        x = torch.randn(*lead, n, in_f, generator=g)
        assert layer.layout_for(x.numel() // in_f) in layouts[:len(rows)]
        torch.testing.assert_close(layer(x), nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)


@given(out_c=st.integers(1, 12), in_c=st.integers(1, 12), density=st.floats(0.0, 1.0),
       layout=st.sampled_from(["dense", "csr", "bsr"]), hw=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_sparse_conv1x1_equals_conv(out_c, in_c, density, layout, hw, seed):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(in_c, out_c, 1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape, generator=g) < density)
    layer = SparseLinear(conv.weight, conv.bias, [1], [layout], blocksize=1, conv1x1=True)
    x = torch.randn(3, in_c, hw, hw + 1, generator=g)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-5, rtol=1e-5)


def test_block_size_fits_block_masks_only():
    w = torch.zeros(64, 64)
    w[:16, 16:32] = 1.0  # one 16x16 block
    assert runtime.block_size(w) == 16
    assert runtime.block_size(torch.zeros(64, 64)) == 0
    torch.manual_seed(0)
    scattered = torch.randn(64, 64) * (torch.rand(64, 64) < 0.05)
    assert runtime.block_size(scattered) == 0  # 5% unstructured fills no block


def test_dense_fallback_keeps_the_original_module(registry, monkeypatch):
    """When no sparse layout is measured faster, every layer stays the original dense one."""
    model, masks, x = build(registry, "mlp", MLPConfig(hidden=(64, 32)), (1, 8, 8), 10)

    def dense_always_wins(candidates, **_kw):
        return {k: (1.0 if k == "dense" else 2.0) for k in candidates}

    monkeypatch.setattr(timing, "median_times", dense_always_wins)
    monkeypatch.setattr(runtime, "CACHE", {})
    rt = runtime.to_runtime(model, x, masks=masks, batch_sizes=(1, 4))
    assert all(c.layouts == ("dense", "dense") for c in rt.choices)
    assert not any(isinstance(m, SparseLinear) for m in rt.module.modules())
    assert [c.speedups() for c in rt.choices] == [(1.0, 1.0)] * len(rt.choices)


def test_pick_keeps_the_baseline_within_the_margin():
    assert timing.pick({"dense": 1.0, "csr": 0.97}, "dense", 0.05) == "dense"
    assert timing.pick({"dense": 1.0, "csr": 0.5, "bsr": 0.6}, "dense", 0.05) == "csr"
    assert timing.pick({"dense": 1.0, "csr": 1.5}, "dense", 0.0) == "dense"


def test_saved_runtime_loads_with_torch_alone(registry, tmp_path):
    """TorchScript: a fresh interpreter that never imports sparsefw runs the saved model."""
    model, masks, x = build(registry, "mlp", MLPConfig(hidden=(64, 32)), (1, 8, 8), 10)
    rt = runtime.to_runtime(model, x, masks=masks, batch_sizes=(4,), layout="csr")
    path = tmp_path / "rt.pt"
    assert runtime.save_runtime(rt.module, path) == "torchscript"
    torch.save(x, tmp_path / "x.pt")
    want = masked_output(model, masks, x)
    torch.save(want, tmp_path / "want.pt")
    code = (
        "import sys, torch\n"
        f"m = torch.jit.load({str(path)!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}); w = torch.load({str(tmp_path / 'want.pt')!r})\n"
        "assert (m(x) - w).abs().max() <= 1e-4\n"
        "assert not any(k.startswith('sparsefw') for k in sys.modules), 'sparsefw imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    assert (runtime.load_runtime(path)(x) - want).abs().max() <= 1e-4


def test_runtime_state_dict_is_plain_tensors(registry, tmp_path):
    model, masks, x = build(registry, "mlp", MLPConfig(hidden=(64, 32)), (1, 8, 8), 10)
    rt = runtime.to_runtime(model, x, masks=masks, batch_sizes=(4,), layout="csr")
    torch.save(rt.module.state_dict(), tmp_path / "sd.pt")
    sd = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert all(t.layout == torch.strided for t in sd.values())


def test_bad_arguments():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="layout"):
        runtime.to_runtime(model, torch.randn(2, 4), layout="coo")
    with pytest.raises(ValueError, match="batch_sizes"):
        runtime.to_runtime(model, torch.randn(2, 4), batch_sizes=(0,))
    with pytest.raises(ValueError, match="no Linear/Conv weight"):
        runtime.to_runtime(model, torch.randn(2, 4), masks={"0.bias": torch.ones(4, dtype=bool)})
    with pytest.raises(ValueError, match="blocksize"):
        SparseLinear(torch.ones(4, 4), None, [1], ["bsr"])


def test_export_runtime_cli_writes_a_runtime_equal_to_the_masked_run(make_config, catalogue,
                                                                      tmp_path, capsys):
    from sparsefw import cli
    from sparsefw.engine import train
    from sparsefw.engine.checkpoint import load

    cfg, raw = make_config(model={"name": "mlp", "hidden": [64]},
                           sparsity={"density": 0.1, "distribution": "uniform"})
    trainer, _ = train(cfg, catalogue, run_dir=tmp_path / "run", raw_config=raw)
    out = tmp_path / "rt.pt"
    assert cli.main(["export", str(tmp_path / "run"), "--runtime", "--out", str(out),
                     "--batch-sizes", "1,8"]) == 0
    printed = capsys.readouterr().out
    assert "| layer | kind |" in printed and str(out) in printed
    meta = json.loads(out.with_name("rt.json").read_text())
    assert meta["batch_sizes"] == [1, 8] and meta["layers"]
    model = runtime.load_runtime(out)
    payload = load(tmp_path / "run" / "checkpoint.pt")
    x = torch.randn(8, 8)
    want = masked_output(trainer.model.eval(), payload["masks"]["masks"], x)
    assert (model(x) - want).abs().max() <= 1e-4

