"""``[sparsity] init``: the sparse fan-in rescaling (Evci et al. 2022, arXiv 2010.03533)."""

import math

import pytest
import torch
from hypothesis import given
from torch import nn

from sparsefw import initialisation
from sparsefw.engine import Trainer
from sparsefw.masks import MaskSet, topk_mask
from sparsefw.testing import strategies as sst


def masked(layer: nn.Module, density: float, seed: int) -> MaskSet:
    masks = MaskSet({"weight": layer.weight})
    g = torch.Generator().manual_seed(seed)
    k = max(1, round(density * layer.weight.numel()))
    masks.update("weight", topk_mask(torch.rand(layer.weight.shape, generator=g), k))
    masks.apply_()
    return masks


def test_scales_by_hand():
    # unit 0 keeps 1 of 4 inputs (×2), unit 1 keeps 4 of 4 (×1), unit 2 keeps none (untouched)
    mask = torch.tensor([[True, False, False, False], [True] * 4, [False] * 4])
    assert initialisation.fan_in_scales(mask).tolist() == [2.0, 1.0, 1.0]
    # a conv unit's fan-in counts the kernel: 2·3·3 = 18 inputs, 2 kept -> ×3
    conv = torch.zeros(1, 2, 3, 3, dtype=torch.bool)
    conv[0, 0, 0, :2] = True
    assert initialisation.fan_in_scales(conv).tolist() == [3.0]


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("density", [0.02, 0.1])
def test_output_variance_is_the_dense_layers(kind, density):
    """PyTorch's default init draws U(±1/√F), variance 1/(3F): a dense layer's output on unit
    variance inputs has variance 1/3. Masked to density d it falls to about d/3; rescaled for the
    sparse fan-in it is 1/3 again, per layer and for every unit alike."""
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(1024, 64, bias=False), torch.randn(4096, 1024)
    else:
        layer, x = nn.Conv2d(64, 32, 3, bias=False), torch.randn(64, 64, 6, 6)
    masks = masked(layer, density, seed=1)
    with torch.no_grad():
        before = layer(x).transpose(0, 1).reshape(layer.weight.shape[0], -1).var(1)
        initialisation.apply(masks, "sparse_fan_in")
        after = layer(x).transpose(0, 1).reshape(layer.weight.shape[0], -1).var(1)
    assert before.mean().item() == pytest.approx(density / 3, rel=0.25)
    assert after.mean().item() == pytest.approx(1 / 3, rel=0.1)
    # unit by unit: the units that kept more inputs no longer have the larger outputs
    kept = masks.masks["weight"].reshape(len(after), -1).sum(1)
    many = kept > kept.median()
    if many.any() and (~many).any():
        assert after[many].mean() / after[~many].mean() == pytest.approx(1.0, abs=0.2)


@given(sst.layer_shapes(), sst.densities(), sst.seeds())
def test_support_kept_and_each_unit_scaled_by_its_fan_in(shape, density, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    p = nn.Parameter(w.clone())
    masks = MaskSet({"w": p})
    k = max(1, round(density * p.numel()))
    masks.update("w", topk_mask(torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1)),
                                k))
    masks.apply_()
    start = p.detach().clone()
    initialisation.apply(masks, "sparse_fan_in")
    m = masks.masks["w"]
    assert not p[~m].any()  # pruned entries stay exactly zero
    fan_in = math.prod(shape[1:])
    for i in range(shape[0]):
        kept = int(m[i].sum())
        factor = math.sqrt(fan_in / kept) if kept else 1.0
        torch.testing.assert_close(p[i].detach(), start[i] * factor)


def test_dense_leaves_the_weights():
    layer = nn.Linear(16, 8)
    masks = masked(layer, 0.25, seed=0)
    start = layer.weight.detach().clone()
    initialisation.apply(masks, "dense")
    assert torch.equal(layer.weight, start)
    with pytest.raises(ValueError, match="sparse_fan_in"):
        initialisation.apply(masks, "xavier")


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_the_engine_rescales_after_mask_init(make_config, catalogue, tmp_path, distribution):
    """Same seed, same mask: with ``sparse_fan_in`` every masked unit's first weights are the
    ``dense`` run's times √(F/k); layers kept dense are untouched."""
    runs = {}
    for init in ("dense", "sparse_fan_in"):
        cfg, _ = make_config(sparsity={"density": 0.25, "distribution": distribution,
                                       "init": init, "dense_layers": ["3"]},
                             train={"epochs": 1})
        trainer = Trainer(cfg, catalogue, run_dir=tmp_path / init)
        trainer._init_masks()
        runs[init] = trainer
    dense, scaled = runs["dense"], runs["sparse_fan_in"]
    assert scaled.masks.names == ["1.weight"]
    m = scaled.masks.masks["1.weight"]
    assert torch.equal(m, dense.masks.masks["1.weight"])
    factor = torch.sqrt(m.shape[1] / m.sum(1).double().clamp(min=1)).float()  # 0 kept: all 0
    torch.testing.assert_close(scaled.model.get_parameter("1.weight"),
                               dense.model.get_parameter("1.weight") * factor[:, None])
    assert torch.equal(scaled.model.get_parameter("3.weight"),
                       dense.model.get_parameter("3.weight"))
