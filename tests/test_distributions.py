"""Layer-wise density allocation (uniform, ER, ERK) and the dense-layer rules."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sparsefw import distributions
from sparsefw.distributions import DISTRIBUTIONS, active_counts, allocate
from sparsefw.engine import Trainer
from sparsefw.masks import sparsifiable_params
from sparsefw.testing import strategies as sst


def raw_score(shape, method):
    """Independent restatement of the scores: ERK Σdims/Πdims, ER (n_in+n_out)/(n_in·n_out)."""
    if method == "erk":
        return sum(shape) / math.prod(shape)
    n_out, n_in = shape[0], math.prod(shape[1:])
    return (n_in + n_out) / (n_in * n_out)


# ------------------------------------------------------------------------------ hand-computed
def test_uniform_is_the_target_everywhere():
    assert allocate({"a": (4, 4), "b": (2, 3, 3, 3)}, 0.3, "uniform") == {"a": 0.3, "b": 0.3}


def test_erk_by_hand():
    # a: 10x10 (raw 20/100 = 0.2), b: 10x40 (raw 50/400 = 0.125), density 0.5 of 500:
    # eps = 250 / (0.2·100 + 0.125·400) = 250 / 70; a: 0.714 (71.4 -> 71), b: 0.446 (178.6 -> 179)
    dens = allocate({"a": (10, 10), "b": (10, 40)}, 0.5, "erk")
    eps = 250 / 70
    assert dens["a"] == pytest.approx(0.2 * eps)
    assert dens["b"] == pytest.approx(0.125 * eps)
    assert active_counts({"a": (10, 10), "b": (10, 40)}, 0.5, "erk") == {"a": 71, "b": 179}


def test_erk_makes_small_layers_dense_and_resolves():
    # a tiny layer whose raw ERK density exceeds 1 becomes dense; the rest share the remainder
    shapes = {"small": (2, 2), "big": (100, 100)}
    dens = allocate(shapes, 0.5, "erk")
    assert dens["small"] == 1.0
    assert dens["big"] == pytest.approx((0.5 * 10004 - 4) / 10000)


def test_conv_scores_by_hand():
    # (c_out, c_in, h, w) = (8, 4, 3, 3): ERK Σ/Π = 18/288; ER with the kernel folded into n_in
    # = (36 + 8)/(36·8); without the kernel both are (4 + 8)/(4·8)
    assert distributions.raw_score((8, 4, 3, 3), "erk") == pytest.approx(18 / 288)
    assert distributions.raw_score((8, 4, 3, 3), "er") == pytest.approx((36 + 8) / (36 * 8))
    for method in ("er", "erk"):
        assert distributions.raw_score((8, 4, 3, 3), method, kernel=False) == pytest.approx(12 / 32)
        # a Linear layer scores the same under all four
        assert distributions.raw_score((10, 8), method, kernel=False) == pytest.approx(18 / 80)
        assert distributions.raw_score((10, 8), method) == pytest.approx(18 / 80)


def rigl_sparsities(tf_shapes, sparsity, include_kernel):
    """Independent port of google-research/rigl ``sparse_utils.get_sparsities_erdos_renyi``
    (no custom sparsity map, ``erk_power_scale`` 1) on TensorFlow kernel shapes — conv
    ``(h, w, c_in, c_out)``, dense ``(n_in, n_out)``; returns a *sparsity* per layer. Every layer
    at the maximal raw probability is made dense while ε·max > 1; ε balances the ones kept by the
    sparse layers against the zeros the dense layers lack."""
    dense = set()
    while True:
        rhs, divisor, raw = 0.0, 0.0, {}
        for name, shape in tf_shapes.items():
            n = math.prod(shape)
            if name in dense:
                rhs -= n * sparsity
                continue
            rhs += n * (1 - sparsity)
            if include_kernel:
                raw[name] = sum(shape) / n
            else:
                n_in, n_out = shape[-2:]
                raw[name] = (n_in + n_out) / (n_in * n_out)
            divisor += raw[name] * n
        eps = rhs / divisor
        top = max(raw.values())
        if top * eps <= 1:
            break
        dense |= {name for name, r in raw.items() if r == top}
    return {name: 0.0 if name in dense else 1 - eps * raw[name] for name in tf_shapes}


def to_tf(shape):
    """PyTorch weight shape -> TensorFlow kernel shape."""
    if len(shape) == 4:
        c_out, c_in, h, w = shape
        return (h, w, c_in, c_out)
    return tuple(reversed(shape))


@given(sst.shape_dicts(max_features=64, max_channels=64), sst.densities(max_value=0.99),
       st.booleans())
def test_er_and_erk_match_rigl(shapes, density, kernel):
    """``erk`` with the kernel is rigl's ``include_kernel=True``; ``er`` without it (and ``erk``
    without it) is ``include_kernel=False``."""
    expected = rigl_sparsities({n: to_tf(s) for n, s in shapes.items()}, 1 - density, kernel)
    methods = ["erk"] if kernel else ["er", "erk"]
    for method in methods:
        dens = allocate(shapes, density, method, kernel=kernel)
        for n in shapes:
            assert dens[n] == pytest.approx(1 - expected[n], rel=1e-9, abs=1e-12), (method, n)


def test_resnet32_stem_under_the_two_er_conventions():
    """The review's numbers: on ResNet-32 at d = 0.1 the stem's ER density is 0.419 with the
    kernel folded into n_in and 0.914 with channels only (rigl's ``erdos_renyi``)."""
    from sparsefw.models.resnet_cifar import ResNetCifarConfig, build_resnet32

    model = build_resnet32(ResNetCifarConfig(), input_shape=(3, 32, 32), num_classes=10)
    shapes = {n: tuple(p.shape) for n, p in sparsifiable_params(model).items()}
    stem = next(iter(shapes))
    with_kernel = allocate(shapes, 0.1, "er")[stem]
    channels = allocate(shapes, 0.1, "er", kernel=False)[stem]
    assert (round(with_kernel, 3), round(channels, 3)) == (0.419, 0.914)
    tf = {n: to_tf(s) for n, s in shapes.items()}
    assert channels == pytest.approx(1 - rigl_sparsities(tf, 0.9, False)[stem])


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01])
def test_density_out_of_range(bad):
    with pytest.raises(ValueError, match="density"):
        allocate({"a": (3, 3)}, bad)


def test_unknown_method_lists_choices():
    with pytest.raises(ValueError, match="erk"):
        allocate({"a": (3, 3)}, 0.5, "erx")


# ------------------------------------------------------------------------------ properties
@given(sst.shape_dicts(), sst.densities(), st.sampled_from(DISTRIBUTIONS))
def test_counts_hit_the_global_target(shapes, density, method):
    counts = active_counts(shapes, density, method)
    numels = {n: math.prod(s) for n, s in shapes.items()}
    assert set(counts) == set(shapes)
    for n, c in counts.items():
        assert isinstance(c, int) and 1 <= c <= numels[n]  # every layer density in (0, 1]
    target = density * sum(numels.values())
    assert abs(sum(counts.values()) - target) <= len(shapes)


@given(sst.shape_dicts(), sst.densities(), st.sampled_from(DISTRIBUTIONS))
def test_densities_average_to_the_target(shapes, density, method):
    dens = allocate(shapes, density, method)
    numels = {n: math.prod(s) for n, s in shapes.items()}
    assert all(0 < d <= 1 for d in dens.values())
    total = sum(dens[n] * numels[n] for n in shapes)
    assert total == pytest.approx(density * sum(numels.values()), rel=1e-9)


@given(sst.shape_dicts(min_layers=2), sst.densities(), st.sampled_from(["er", "erk"]))
def test_scores_proportional_among_sparse_layers(shapes, density, method):
    dens = allocate(shapes, density, method)
    sparse = [n for n in shapes if dens[n] < 1.0]
    dense = [n for n in shapes if dens[n] == 1.0]
    ratios = [dens[n] / raw_score(shapes[n], method) for n in sparse]
    for r in ratios:
        assert r == pytest.approx(ratios[0], rel=1e-9)
    # the layers made dense are exactly those with the highest raw scores
    if sparse and dense:
        assert min(raw_score(shapes[n], method) for n in dense) >= max(
            raw_score(shapes[n], method) for n in sparse
        )


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Linear(8, 8))
        self.head = nn.Linear(8, 10)


#: pattern -> parameters it keeps dense (module names and parameter names both match)
EXCLUDES = {
    "stem": {"stem.weight"},
    "head.weight": {"head.weight"},
    "body.*": {"body.0.weight", "body.1.weight"},
    "body.1": {"body.1.weight"},
    "nothing": set(),
}


@given(st.sets(st.sampled_from(sorted(EXCLUDES))), sst.densities(), st.sampled_from(DISTRIBUTIONS))
def test_dense_layers_are_excluded(patterns, density, method):
    params = sparsifiable_params(Net(), patterns)
    names = {"stem.weight", "body.0.weight", "body.1.weight", "head.weight"}
    excluded = set().union(*(EXCLUDES[p] for p in patterns))
    assert set(params) == names - excluded  # biases and norms are never sparsified
    if params:
        counts = active_counts({n: tuple(p.shape) for n, p in params.items()}, density, method)
        assert set(counts) == set(params)


def test_dense_layers_stay_dense_in_a_run(make_config, catalogue, tmp_path):
    # the synthetic MLP is Sequential(Flatten, Linear "1", ReLU, Linear "3")
    cfg, _ = make_config(sparsity={"density": 0.3, "dense_layers": ["3"]},
                         train={"epochs": 1})
    trainer = Trainer(cfg, catalogue, run_dir=tmp_path)
    metrics = trainer.fit()
    assert trainer.masks.names == ["1.weight"]
    head = trainer.model.get_parameter("3.weight")
    assert torch.count_nonzero(head) == head.numel()
    assert metrics["density"] == pytest.approx(trainer.masks.targets["1.weight"] / (16 * 8))



#: built-in model -> its input layer (what ``first_layer_dense`` keeps dense); docs/methods/erk.md
FIRST_LAYERS = {
    "mlp": "1.weight", "lenet5": "features.0.weight", "resnet20": "stem.0.0.weight",
    "resnet32": "stem.0.0.weight", "resnet56": "stem.0.0.weight", "wrn": "stem.weight",
    "vgg16": "features.0.0.weight", "vgg19": "features.0.0.weight", "vit": "patch_embed.weight",
    "torchvision": "conv1.weight", "torchvision_vit": "conv_proj.weight", "gpt": None,
}


@pytest.mark.parametrize("name", sorted(FIRST_LAYERS))
def test_first_layer_of_each_built_in_model(catalogue, name):
    from sparsefw import config as config_mod
    from sparsefw.masks import first_layer

    entry = catalogue.registry.get("model", name)
    options = config_mod.CONVERTER.structure({}, entry.config)
    shape = (64,) if name == "gpt" else (1, 8, 8) if name == "mlp" else (3, 32, 32)
    model = entry.factory(options, input_shape=shape, num_classes=10)
    assert first_layer(model) == FIRST_LAYERS[name]
    every = sparsifiable_params(model)
    kept = sparsifiable_params(model, first_layer_dense=True)
    assert set(every) - set(kept) == ({FIRST_LAYERS[name]} if FIRST_LAYERS[name] else set())


def test_first_layer_dense_in_a_run(make_config, catalogue, tmp_path):
    cfg, _ = make_config(sparsity={"density": 0.3, "first_layer_dense": True},
                         train={"epochs": 1})
    trainer = Trainer(cfg, catalogue, run_dir=tmp_path)
    trainer.fit()
    assert trainer.masks.names == ["3.weight"]
    first = trainer.model.get_parameter("1.weight")
    assert torch.count_nonzero(first) == first.numel()


def test_every_built_in_model_has_its_first_layer_listed(catalogue):
    assert set(catalogue.registry.names("model")) == set(FIRST_LAYERS)


@pytest.mark.parametrize("recipe", ["imagenet_rigl", "imagenet_set", "imagenet_static"])
def test_imagenet_recipes_keep_the_stem_dense(catalogue, recipe):
    from pathlib import Path

    from sparsefw import config as config_mod

    path = Path(__file__).resolve().parent.parent / "configs" / f"{recipe}.toml"
    cfg, _ = config_mod.load(path, catalogue.registry)
    sp = cfg.sparsity
    assert (sp.distribution, sp.density, sp.first_layer_dense) == ("erk", 0.2, True)
    model = catalogue.registry.get("model", cfg.model.name).factory(
        cfg.model.options, input_shape=(3, 224, 224), num_classes=1000)
    params = sparsifiable_params(model, sp.dense_layers, sp.first_layer_dense)
    assert "conv1.weight" not in params and "layer1.0.conv1.weight" in params
