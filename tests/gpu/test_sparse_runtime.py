"""The sparse runtime (:mod:`sparsefw.runtime`) on CUDA: 2:4 semi-structured layers (Ampere or
later, fp16/bf16) and BSR/CSR layers give the masked model's outputs, both when the layout is
forced and when the autotune chooses; skipped without CUDA. Speed is measured by
``benchmarks/bench_sparse.py``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsefw import runtime
from sparsefw.export import materialize_, semi_structured_problem
from sparsefw.runtime_layers import SemiStructuredLinear, SparseLinear

pytestmark = pytest.mark.gpu
_PROBLEM = semi_structured_problem()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_sparse_gpu = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")


@pytest.fixture(autouse=True)
def exact_fp32_matmul():
    """fp32 products without TF32, so dense and sparse kernels agree to 1e-4."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128)).to("cuda", dtype)


@needs_sparse_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["2:4", None], ids=["forced", "autotuned"])
def test_semi_structured_runtime_equals_the_2of4_model(dtype, layout):
    model = _mlp(dtype).eval()
    materialize_(model, n=2, m=4, names=["0.weight", "2.weight"])
    x = torch.randn(64, 256, device="cuda", dtype=dtype)
    rt = runtime.to_runtime(model, x, batch_sizes=(1, 64), repeats=3, layout=layout)
    if layout == "2:4":
        assert all(set(c.layouts) == {"2:4"} for c in rt.choices)
        assert all(isinstance(rt.module.get_submodule(c.name), SemiStructuredLinear)
                   for c in rt.choices)
    with torch.inference_mode():
        for b in (1, 64):
            torch.testing.assert_close(rt.module(x[:b]), model(x[:b]), atol=2e-2, rtol=2e-2)


@needs_sparse_gpu
def test_semi_structured_runtime_saves_pickled_and_loads(tmp_path):
    model = _mlp(torch.float16).eval()
    materialize_(model, n=2, m=4, names=["0.weight", "2.weight"])
    x = torch.randn(32, 256, device="cuda", dtype=torch.float16)
    rt = runtime.to_runtime(model, x, batch_sizes=(32,), layout="2:4")
    assert runtime.save_runtime(rt.module, tmp_path / "rt.pt") == "pickle"  # not scriptable
    loaded = runtime.load_runtime(tmp_path / "rt.pt")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), rt.module(x))


def _block_masked(model: nn.Module, block: int, density: float) -> dict[str, torch.Tensor]:
    """Masks of whole ``block``×``block`` tiles at ``density``, written into the weights."""
    g = torch.Generator(device="cuda").manual_seed(1)
    masks = {}
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            o, i = p.shape
            tiles = torch.rand(o // block, i // block, device="cuda", generator=g) < density
            masks[name] = tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return masks


@needs_cuda
@pytest.mark.parametrize("layout", ["bsr", "csr", None], ids=["bsr", "csr", "autotuned"])
def test_bsr_and_csr_runtime_equal_the_masked_model(layout):
    model = _mlp().eval()
    masks = _block_masked(model, 16, 0.2)
    x = torch.randn(32, 256, device="cuda")
    rt = runtime.to_runtime(model, x, masks=masks, batch_sizes=(1, 32), repeats=3, layout=layout)
    if layout == "bsr":
        for c in rt.choices:
            layer = rt.module.get_submodule(c.name)
            assert isinstance(layer, SparseLinear) and layer.blocksize == 16
            assert set(c.layouts) == {"bsr"}
    ref = _mlp().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in masks:
                p.mul_(masks[name])
        for b in (1, 5, 32):
            assert (rt.module(x[:b]) - ref(x[:b])).abs().max().item() <= 1e-4
