"""``sparsefw compare`` and :mod:`sparsefw.stats`, checked against hand computations on a
sweep directory written by hand (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsefw import cli
from sparsefw.commands import compare
from sparsefw.config import ConfigError
from sparsefw.stats import interpolate, mean_std, paired, t_cdf_two_sided, t_quantile

PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ statistics
def test_t_quantiles_match_the_closed_forms_and_tables():
    # ν = 1 (Cauchy): tan(π(p − ½)); ν = 2: (2p − 1) / √(2p(1 − p))
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-10)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-10)
    # printed tables (Student's t, two-sided 95%), four decimals
    for df, value in ((3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert round(t_quantile(0.975, df), 4) == value
    assert t_quantile(0.025, 4) == -t_quantile(0.975, 4)
    assert t_quantile(0.5, 7) == 0.0


def test_t_cdf_small_cases_by_hand():
    # ν = 1: (2/π) atan(t); ν = 2: t / √(t² + 2); ν = 3: (2/π)(θ + sin θ cos θ), θ = atan(t/√3)
    assert t_cdf_two_sided(1.0, 1) == pytest.approx(0.5)
    assert t_cdf_two_sided(1.0, 2) == pytest.approx(1 / math.sqrt(3))
    theta = math.atan(1 / math.sqrt(3))
    assert t_cdf_two_sided(1.0, 3) == pytest.approx(
        2 / math.pi * (theta + math.sin(theta) * math.cos(theta)))
    with pytest.raises(ValueError):
        t_cdf_two_sided(1.0, 0)


@given(st.floats(0.51, 0.9999), st.integers(1, 60))
def test_t_quantile_inverts_the_cdf(p, df):
    q = t_quantile(p, df)
    assert t_cdf_two_sided(q, df) == pytest.approx(2 * p - 1, abs=1e-9)


@given(st.integers(1, 200))
def test_t_quantiles_shrink_towards_the_normal_one(df):
    assert t_quantile(0.975, df) > t_quantile(0.975, df + 1) > 1.959963


def test_paired_differences_by_hand():
    # differences 0.01, 0.02, 0.03: mean 0.02, s = 0.01, half-width t(0.975, 2) · 0.01 / √3
    result = paired({0: 0.91, 1: 0.93, 2: 0.95, 7: 0.5}, {0: 0.90, 1: 0.91, 2: 0.92})
    half = 4.302652729749464 * 0.01 / math.sqrt(3)
    assert result.n == 3 and result.agree == 3
    assert result.mean == pytest.approx(0.02) and result.std == pytest.approx(0.01)
    assert (result.low, result.high) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    assert result.text() == "+2.00 [-0.48, +4.48] 3/3"
    # a zero difference does not agree with either sign; one seed has no interval
    assert paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 2.0, 1: 2.0, 2: 4.0}).agree == 2
    single = paired({0: 0.5}, {0: 0.25})
    assert single.n == 1 and math.isnan(single.low) and single.text() == "+25.00 1/1"
    assert paired({}, {}).text() == "-"


def test_mean_std_and_interpolation_by_hand():
    assert mean_std([1.0, 2.0, 6.0]) == (3.0, pytest.approx(math.sqrt(7)))
    assert mean_std([4.0]) == (4.0, 0.0)
    assert interpolate([1, 2, 4], [0.5, 0.7, 0.8], 3) == pytest.approx(0.75)
    assert interpolate([1, 2, 4], [0.5, 0.7, 0.8], 2) == 0.7
    assert math.isnan(interpolate([1, 2], [0.5, 0.7], 0.5))
    assert interpolate([1, 1, 2], [0.5, 0.6, 0.7], 1) == 0.6


# ------------------------------------------------------------------------------ a hand-made sweep
#: per seed, the test accuracy after epochs 1 and 2. `double` costs twice the passes of `base`
#: per epoch (as SAM does); `single` has base's passes.
CURVES = {
    "base": {0: [0.80, 0.90], 1: [0.82, 0.91], 2: [0.78, 0.92]},
    "double": {0: [0.86, 0.91], 1: [0.91, 0.93], 2: [0.90, 0.95]},
    "single": {0: [0.70, 0.88], 1: [0.75, 0.95]},
}
PASSES_PER_EPOCH = {"base": 10, "double": 20, "single": 10}  # forward = backward per epoch


def write_sweep(root: Path) -> Path:
    runs = []
    for method, seeds in CURVES.items():
        for seed, accs in seeds.items():
            run_dir = root / "runs" / method / "default" / f"seed{seed}"
            run_dir.mkdir(parents=True)
            n = PASSES_PER_EPOCH[method]
            records = [{"kind": "eval", "step": 10 * (e + 1), "epoch": e, "test/acc": a,
                        "density": 0.5, "density/w": 0.5, "passes/forward": n * (e + 1),
                        "passes/backward": n * (e + 1), "passes/eval_forward": e + 1}
                       for e, a in enumerate(accs)]
            (run_dir / "metrics.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in records))
            (run_dir / "result.json").write_text(json.dumps({
                "method": method, "seed": seed, "status": "ok", "test/acc": accs[-1],
                "cpu_s": 2.0 * n, "layer_flops": {"w": 6}, "batch_size": 2,
                "steps_per_epoch": 10}))
            runs.append({"method": method, "point": [], "seed": seed,
                         "run_dir": f"/elsewhere/runs/{method}/default/seed{seed}"})
    (root / "sweep.json").write_text(json.dumps({"methods": list(CURVES), "runs": runs}))
    return root


def test_compare_statistics_by_hand(tmp_path):
    plan, runs = compare.load_runs(write_sweep(tmp_path))
    rows = compare.compare(plan, runs, "base")[()]
    assert [c.method for c in rows] == ["base", "double", "single"]
    base, double, single = rows
    assert base.acc_mean == pytest.approx(0.91) and base.acc_std == pytest.approx(0.01)
    t2 = 4.302652729749464 / math.sqrt(3)

    # equal epochs (2): differences 0.01, 0.02, 0.03
    e = double.equal_epochs
    assert (e.n, e.mean, e.std, e.agree) == (3, pytest.approx(0.02), pytest.approx(0.01), 3)
    assert e.high == pytest.approx(0.02 + t2 * 0.01)
    # equal compute: base ends at 40 passes, where `double` is at its first evaluation:
    # 0.86 − 0.90, 0.91 − 0.91, 0.90 − 0.92 = −0.04, 0, −0.02: mean −0.02, s = 0.02, 2 of 3
    c = double.equal_compute
    assert (c.n, c.mean, c.std, c.agree) == (3, pytest.approx(-0.02), pytest.approx(0.02), 2)
    assert c.low == pytest.approx(-0.02 - t2 * 0.02)
    assert double.compute_ratio == pytest.approx(2.0) and double.cpu_s == pytest.approx(40.0)
    # the base's final accuracy (0.90, 0.91, 0.92) is first reached at epochs 2, 1, 2 (base
    # itself: 2, 2, 2): 5/3 epochs, −1/6; in passes 80, 40, 80 against 40: 200/3, +2/3
    assert double.reached == 3
    assert double.epochs_to == pytest.approx(5 / 3)
    assert double.epochs_to_change == pytest.approx(-1 / 6)
    assert double.compute_to == pytest.approx(200 / 3)
    assert double.compute_to_change == pytest.approx(2 / 3)

    # `single` ran two seeds; seed 1 reaches 0.91 at epoch 2, seed 0 never reaches 0.90
    assert single.n == 2 and single.equal_epochs.n == 2 and single.reached == 1
    assert single.epochs_to == 2.0 and single.epochs_to_change == pytest.approx(0.0)
    # same passes: equal compute is equal epochs
    assert single.equal_compute == single.equal_epochs


def test_compare_in_flops_uses_the_effective_sparse_estimate(tmp_path):
    plan, runs = compare.load_runs(write_sweep(tmp_path))
    base = next(r for r in runs if r.method == "base" and r.seed == 0)
    # per epoch (10 + 2·10) · 2 samples · 6 FLOPs · density 0.5
    assert base.xs("flops") == [180.0, 360.0]
    rows = compare.compare(plan, runs, "base", compute="flops")[()]
    assert rows[1].equal_compute.mean == pytest.approx(-0.02)


def test_compare_cli_writes_table_and_plots(tmp_path, capsys):
    sweep_dir = write_sweep(tmp_path / "sw")
    assert cli.main(["compare", str(sweep_dir), "--base", "base"]) == 0
    out = capsys.readouterr().out
    assert "| double | 3 | 93.00 ± 2.00 | +2.00 [-0.48, +4.48] 3/3 | -2.00 [" in out
    assert "| 2.00× |" in out and "1.7 (-17%)" in out and "2.0 (+0%) (1/2)" in out
    assert (sweep_dir / "compare.md").read_text().startswith("# Compared with base")
    assert (sweep_dir / "compare_default.png").read_bytes()[:8] == PNG


def test_compare_rejects_an_unknown_base(tmp_path):
    plan, runs = compare.load_runs(write_sweep(tmp_path))
    with pytest.raises(ConfigError, match="choices: base, double, single"):
        compare.compare(plan, runs, "rigl")
