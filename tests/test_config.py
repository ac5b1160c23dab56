"""Configs: every problem reported together (file, section, key), ``extends``, ``--set``,
strict types, component options and the ``structure(to_dict(cfg)) == cfg`` round trip."""

import textwrap

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsefw import config
from sparsefw.config import ConfigError, in_range, one_of
from sparsefw.testing import strategies as sst


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(fn, *args, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return info.value.problems


# ------------------------------------------------------------------------------ all at once
def test_four_problems_in_one_error(tmp_path, catalogue):
    path = write(tmp_path / "bad.toml", """
        [optimizer]
        name = "sgd"
        momentun = 0.9

        [sparsity]
        density = 1.5

        [mask_init]
        name = "randmo"

        [[topology_update]]
        name = "static"

        [[topology_update]]
        name = "static"
        """)
    with pytest.raises(ConfigError) as info:
        config.load(path, catalogue.registry)
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert all(p.startswith("bad.toml: [") for p in problems)
    typo, density, name, topo = problems
    assert "[optimizer]" in typo and "momentun" in typo and "valid keys:" in typo
    assert "momentum" in typo.split("valid keys:")[1]
    assert "[sparsity]" in density and "density" in density and "(0, 1]" in density
    assert "[mask_init] name:" in name and "'randmo'" in name
    assert "choices: " in name and "random" in name and "dense" in name
    assert "[topology_update]" in topo and "at most one" in topo and "got 2" in topo
    # the message holds every problem too, with a count
    assert str(info.value).startswith("4 problems in the configuration:")
    assert all(p in str(info.value) for p in problems)


def test_every_bad_value_of_a_section_is_reported(catalogue):
    problems = problems_of(config.structure, {"sparsity": {"density": 0.0, "kind": "soft",
                                                           "distribution": "erx"}},
                           catalogue.registry, "x.toml")
    assert len(problems) == 3
    for key, text in [("density", "(0, 1]"), ("kind", "hard, forward"), ("distribution", "erk")]:
        assert any(f"x.toml: [sparsity] {key}" in p and text in p for p in problems), key


def test_unknown_section_and_non_table(catalogue):
    problems = problems_of(config.structure, {"traing": {}, "train": [1], "seed": "3"},
                           catalogue.registry, "x.toml")
    assert any("unknown section or key 'traing'" in p and "train" in p for p in problems)
    assert any("[train] must be a table" in p for p in problems)
    assert any("seed must be an integer" in p for p in problems)


def test_missing_and_unknown_component_names(catalogue):
    problems = problems_of(config.structure, {
        "mask_init": {}, "schedule": [{"name": "cosine"}, {"name": "cosinus"}],
        "logging": {"observers": ["jsonl", "csv"]}}, catalogue.registry, "x.toml")
    assert len(problems) == 3
    assert "[mask_init] name: required key missing; choices:" in problems[0]
    assert "[[schedule]] #1 name: unknown schedule 'cosinus'" in problems[1]
    assert "constant" in problems[1] and "cosine" in problems[1]
    assert "[logging] observers: unknown observer 'csv'" in problems[2]
    assert "jsonl" in problems[2]


# ------------------------------------------------------------------------------ component options
def test_component_option_errors(catalogue):
    problems = problems_of(config.structure, {"schedule": [
        {"name": "cosine", "value": "rho", "until": 2},
        {"name": "constant", "constnt": 1.0},
        {"name": "cosine", "start": "high"},
    ]}, catalogue.registry, "x.toml")
    assert len(problems) == 3
    assert problems[0] == "x.toml: [[schedule]] #0 until must be in (0, 1], got 2.0"
    assert "[[schedule]] #1" in problems[1] and "constnt" in problems[1]
    assert "value, constant" in problems[1]
    assert problems[2] == "x.toml: [[schedule]] #2 start: expected float, got str 'high'"


def test_component_options_structured(catalogue):
    cfg = config.structure({"schedule": [{"name": "cosine", "value": "drop_fraction",
                                          "start": 0.3, "until": 0.75}]}, catalogue.registry)
    (sel,) = cfg.schedule
    assert sel.name == "cosine"
    assert sel.options == catalogue.registry.get("schedule", "cosine").config(
        value="drop_fraction", start=0.3, until=0.75)


# ------------------------------------------------------------------------------ strict types
@pytest.mark.parametrize(("section", "key", "value", "expect"), [
    ("optimizer", "lr", "0.1", "expected float, got str"),
    ("train", "epochs", True, "expected int, got bool"),
    ("train", "epochs", 2.0, "expected int, got float"),
    ("train", "compile", 1, "expected bool, got int"),
    ("train", "device", 0, "expected str, got int"),
    ("sparsity", "dense_layers", "fc", "expected an array, got str"),
    ("optimizer", "betas", [0.9, "x"], "expected float, got str"),
    ("model", "hidden", [8, 1.5], "expected int, got float"),
])
def test_strict_types(catalogue, section, key, value, expect):
    raw = {section: {key: value}}
    if section == "model":
        raw[section]["name"] = "mlp"
    (problem,) = problems_of(config.structure, raw, catalogue.registry, "x.toml")
    assert problem.startswith(f"x.toml: [{section}] {key}")
    assert expect in problem


def test_int_is_accepted_where_a_float_is_expected(catalogue):
    cfg = config.structure({"optimizer": {"lr": 1, "betas": [0, 0]}}, catalogue.registry)
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.betas == (0.0, 0.0)


# ------------------------------------------------------------------------------ extends
def test_extends_merges_tables_relative_to_the_file(tmp_path, catalogue):
    write(tmp_path / "base" / "root.toml", """
        seed = 7
        [train]
        epochs = 5
        batch_size = 32
        """)
    write(tmp_path / "base" / "mid.toml", """
        extends = "root.toml"
        [train]
        batch_size = 16
        [[schedule]]
        name = "constant"
        """)
    child = write(tmp_path / "exp" / "child.toml", """
        extends = "../base/mid.toml"
        [train]
        epochs = 2
        [[schedule]]
        name = "cosine"
        value = "rho"
        """)
    raw = config.read_toml(child)
    assert "extends" not in raw
    assert raw["seed"] == 7
    assert raw["train"] == {"epochs": 2, "batch_size": 16}  # tables merged key by key
    assert raw["schedule"] == [{"name": "cosine", "value": "rho"}]  # arrays replaced
    cfg, raw2 = config.load(child, catalogue.registry)
    assert raw2 == raw
    assert (cfg.seed, cfg.train.epochs, cfg.train.batch_size) == (7, 2, 16)
    assert [s.name for s in cfg.schedule] == ["cosine"]


def test_extends_loop_is_detected(tmp_path):
    write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "sub/../a.toml"\n')
    (problem,) = problems_of(config.read_toml, tmp_path / "a.toml")
    assert "extends loops: a.toml -> b.toml -> a.toml" in problem
    write(tmp_path / "self.toml", 'extends = "self.toml"\n')
    assert "loops" in problems_of(config.read_toml, tmp_path / "self.toml")[0]


def test_extends_errors(tmp_path):
    write(tmp_path / "a.toml", 'extends = "missing.toml"\n')
    assert "missing.toml: file not found" in problems_of(config.read_toml, tmp_path / "a.toml")[0]
    write(tmp_path / "b.toml", "extends = 3\n")
    assert "extends must be a path string" in problems_of(config.read_toml, tmp_path / "b.toml")[0]
    write(tmp_path / "c.toml", "[train\n")
    assert "not valid TOML" in problems_of(config.read_toml, tmp_path / "c.toml")[0]


# ------------------------------------------------------------------------------ --set
def test_parse_override_types():
    assert config.parse_override("train.epochs=3") == (["train", "epochs"], 3)
    assert config.parse_override("optimizer.lr = 0.05") == (["optimizer", "lr"], 0.05)
    assert config.parse_override("train.compile=true") == (["train", "compile"], True)
    assert config.parse_override("train.device=cpu") == (["train", "device"], "cpu")
    assert config.parse_override('train.device="cuda:1"') == (["train", "device"], "cuda:1")
    assert config.parse_override('sparsity.dense_layers=["fc", "conv1"]')[1] == ["fc", "conv1"]
    assert config.parse_override("x.y=a=b") == (["x", "y"], "a=b")


def test_overrides_with_array_index():
    raw = {"perturb": [{"name": "sam", "rho": 0.05}, {"name": "pgd"}], "train": {"epochs": 3}}
    out = config.apply_overrides(raw, ["perturb.0.rho=0.1", "perturb.1.steps=2",
                                       "train.epochs=1", "sparsity.density=0.2"])
    assert out["perturb"] == [{"name": "sam", "rho": 0.1}, {"name": "pgd", "steps": 2}]
    assert out["train"] == {"epochs": 1} and out["sparsity"] == {"density": 0.2}
    assert raw["perturb"][0]["rho"] == 0.05  # the input is not modified


@pytest.mark.parametrize("bad", ["train.epochs", "perturb.5.rho=1", "perturb.x.rho=1",
                                 "train.epochs.deeper=1"])
def test_bad_overrides(bad):
    raw = {"perturb": [{"name": "sam"}], "train": {"epochs": 3}}
    (problem,) = problems_of(config.apply_overrides, raw, [bad])
    assert bad in problem


def test_overrides_through_load(tmp_path, catalogue):
    path = write(tmp_path / "run.toml", """
        [train]
        epochs = 5
        [[schedule]]
        name = "cosine"
        value = "drop_fraction"
        """)
    cfg, raw = config.load(path, catalogue.registry, [
        "train.epochs=1", "optimizer.lr=0.5", "schedule.0.until=0.5", "train.device=cpu",
        'sparsity.dense_layers=["3"]'])
    assert cfg.train.epochs == 1 and cfg.train.device == "cpu"
    assert cfg.optimizer.lr == 0.5 and cfg.sparsity.dense_layers == ("3",)
    assert cfg.schedule[0].options.until == 0.5 and cfg.schedule[0].options.value == "drop_fraction"
    assert raw["schedule"][0]["until"] == 0.5
    # a value the type does not allow is reported like any other problem
    (problem,) = problems_of(config.load, path, catalogue.registry, ["optimizer.lr=fast"])
    assert problem == "run.toml: [optimizer] lr: expected float, got str 'fast'"
    (problem,) = problems_of(config.load, path, catalogue.registry, ["schedule.0.until=2"])
    assert problem.startswith("run.toml: [[schedule]] #0 until")


# ------------------------------------------------------------------------------ round trip
def test_round_trip_defaults_and_tiny(catalogue, make_config):
    cfg = config.structure({}, catalogue.registry)
    assert config.structure(config.to_dict(cfg), catalogue.registry) == cfg
    tiny, _ = make_config(topology_update={"name": "static", "every": 3},
                          schedule=[{"name": "cosine", "value": "drop_fraction", "until": 0.5}])
    assert config.structure(config.to_dict(tiny), catalogue.registry) == tiny


@given(
    density=sst.densities(),
    distribution=st.sampled_from(["uniform", "er", "erk"]),
    epochs=st.integers(1, 500),
    lr=st.floats(1e-6, 10.0),
    dense=st.lists(st.sampled_from(["fc", "conv1", "*.head"]), unique=True),
    observers=st.lists(st.sampled_from(["jsonl", "progress", "tensorboard"]), unique=True),
    schedules=st.lists(st.tuples(st.sampled_from(["lr_scale", "rho"]), st.floats(0.01, 1.0)),
                       max_size=2, unique_by=lambda t: t[0]),
    max_steps=st.none() | st.integers(1, 10_000),
)
def test_round_trip_property(catalogue, density, distribution, epochs, lr, dense, observers,
                             schedules, max_steps):
    raw = {
        "seed": 3,
        "train": {"epochs": epochs, "max_steps": max_steps},
        "optimizer": {"name": "adamw", "lr": lr, "betas": [0.8, 0.9]},
        "sparsity": {"density": density, "distribution": distribution, "dense_layers": dense},
        "logging": {"observers": observers},
        "schedule": [{"name": "cosine", "value": v, "until": u} for v, u in schedules],
        "topology_update": {"name": "static", "every": 7, "end": 0.5},
    }
    cfg = config.structure(raw, catalogue.registry)
    plain = config.to_dict(cfg)
    assert config.structure(plain, catalogue.registry) == cfg
    assert config.to_dict(config.structure(plain, catalogue.registry)) == plain


# ------------------------------------------------------------------------------ validators
def test_validators():
    @attrs.frozen
    class C:
        x: float = attrs.field(default=0.5, validator=in_range(0, 1))
        y: float = attrs.field(default=0.0, validator=in_range(0, 1, lo_open=False, hi_open=True))
        z: int | None = attrs.field(default=None, validator=in_range(lo=0))
        w: str = attrs.field(default="a", validator=one_of("a", "b"))

    C(x=1.0, y=0.0, z=None)
    with pytest.raises(ValueError, match=r"x must be in \(0, 1\], got 0"):
        C(x=0)
    with pytest.raises(ValueError, match=r"y must be in \[0, 1\), got 1"):
        C(y=1.0)
    with pytest.raises(ValueError, match=r"z must be in \(0, inf\]"):
        C(z=0)
    with pytest.raises(ValueError, match="w = 'c' is not one of: a, b"):
        C(w="c")


def test_config_error_counts():
    assert str(ConfigError(["only one"])) == "1 problem in the configuration:\n  - only one"
    assert ConfigError(["a", "b"]).problems == ["a", "b"]
    assert isinstance(ConfigError([]), ValueError)


def test_problems_inside_duplicated_single_sections_are_reported(tmp_path, catalogue):
    path = tmp_path / "dup.toml"
    path.write_text(
        "[sparsity]\ndensity = 1.5\n[mask_init]\nname = \"randon\"\n"
        "[[topology_update]]\nname = \"rigl\"\ndrop_fracton = 0.3\n"
        "[[topology_update]]\nname = \"set\"\n"
    )
    with pytest.raises(ConfigError) as err:
        config.load(path, catalogue.registry)
    problems = err.value.problems
    assert len(problems) == 4
    assert any("density must be in (0, 1]" in p for p in problems)
    assert any("'randon'; choices:" in p and "random" in p for p in problems)
    assert any("at most one topology_update" in p for p in problems)
    assert any("drop_fracton" in p and "valid keys" in p and "[[topology_update]]" in p
               for p in problems)


def test_merge_tables_does_not_mutate_its_inputs():
    base, over = {"a": {"b": 1}}, {"a": {"c": [1]}}
    merged = config.merge_tables(base, over)
    assert merged == {"a": {"b": 1, "c": [1]}}
    assert base == {"a": {"b": 1}} and over == {"a": {"c": [1]}}
    merged["a"]["c"].append(2)
    assert over == {"a": {"c": [1]}}
