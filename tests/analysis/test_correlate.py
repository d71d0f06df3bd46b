"""Correlations: estimates, p-values and intervals equal scipy's on the values they report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from handmade import trial_row, write_study
from scipy import stats

from kd_ray import analysis

# ---------------------------------------------------------------------------------------------------
# Correlations
# ---------------------------------------------------------------------------------------------------
SCIPY = {"pearson": stats.pearsonr, "spearman": stats.spearmanr, "kendall": stats.kendalltau}


def test_correlate_equals_scipy_overall_and_within(aug_study: Path) -> None:
    df = analysis.load_trials(aug_study)
    result = analysis.correlate(
        df, x="test_agreement", y="test_acc", by="augmentation", n_boot=200, verbose=False
    )
    usable = df[df["usable"]]
    expected_columns = ["scope", "x", "y", "method", "r", "p_value", "ci_low", "ci_high", "n"]
    assert list(result.columns) == ["augmentation", *expected_columns]
    for _, row in result.iterrows():
        group = usable if row["scope"] == "overall" else usable[usable["augmentation"] == row["augmentation"]]
        expected = SCIPY[row["method"]](group["test_agreement"], group["test_acc"])
        assert row["r"] == pytest.approx(expected.statistic)
        assert row["p_value"] == pytest.approx(expected.pvalue)
        assert row["n"] == len(group)
    overall = result[(result["scope"] == "overall") & (result["method"] == "pearson")]
    within = result[(result["scope"] == "within") & (result["method"] == "pearson")]
    # The planted confound: negative across arms, positive inside each arm.
    assert overall["r"].iloc[0] < -0.5 and (within["r"] > 0.9).all()
    assert overall["augmentation"].isna().all()


def test_correlate_small_group_is_nan_with_n(tmp_path: Path) -> None:
    rows = [
        trial_row("s", f"a{i}", augmentation="a", seed=i, test_acc=0.5 + i / 10, test_agreement=0.6 + i / 9)
        for i in range(4)
    ]
    rows += [
        trial_row("s", f"b{i}", augmentation="b", seed=i, test_acc=0.5 + i / 10, test_agreement=0.6)
        for i in range(2)
    ]
    df = analysis.load_trials(write_study(tmp_path, "s", rows))
    result = analysis.correlate(df, by="augmentation", n_boot=50)
    small = result[result["augmentation"] == "b"]
    assert len(small) == 3 and small["r"].isna().all() and small["ci_low"].isna().all()
    assert (small["n"] == 2).all()


def test_bootstrap_ci_contains_estimate_and_is_reproducible(aug_study: Path) -> None:
    df = analysis.load_trials(aug_study)

    def run(seed: int) -> pd.DataFrame:
        return analysis.correlate(
            df, x="test_kl", y="test_acc", by="augmentation", n_boot=300, seed=seed, verbose=False
        )

    first, again, other = run(11), run(11), run(12)
    pd.testing.assert_frame_equal(first, again)
    assert not np.allclose(first["ci_low"], other["ci_low"], equal_nan=True)
    finite = first[np.isfinite(first["r"])]
    assert ((finite["ci_low"] <= finite["r"] + 1e-12) & (finite["r"] <= finite["ci_high"] + 1e-12)).all()
    no_boot = analysis.correlate(df, n_boot=0, verbose=False)
    assert no_boot["ci_low"].isna().all()


def test_bootstrap_statistics_match_scipy_on_resamples() -> None:
    # The vectorized resample statistics must be the same estimators as the point estimates.
    rng = np.random.default_rng(0)
    xs = rng.integers(0, 5, size=(6, 9)).astype(float)  # ties, as resampling makes them
    ys = xs + rng.integers(0, 3, size=(6, 9))
    # Resample i takes the positions index[i] of the pooled values: here, exactly the row xs[i].
    x, y, index = xs.ravel(), ys.ravel(), np.arange(xs.size).reshape(xs.shape)
    pearson = analysis.resample_correlations(x, y, index, "pearson")
    spearman = analysis.resample_correlations(x, y, index, "spearman")
    kendall = analysis.resample_correlations(x, y, index, "kendall")
    for i in range(6):
        assert pearson[i] == pytest.approx(stats.pearsonr(xs[i], ys[i]).statistic)
        assert spearman[i] == pytest.approx(stats.spearmanr(xs[i], ys[i]).statistic)
        assert kendall[i] == pytest.approx(stats.kendalltau(xs[i], ys[i]).statistic)




def test_resample_statistics_equal_scipy_on_resamples_drawn_with_replacement() -> None:
    rng = np.random.default_rng(1)
    x = np.round(rng.normal(size=30), 1)  # ties within the sample, and repeats from resampling
    y = np.round(x + rng.normal(size=30), 1)
    index = rng.integers(0, 30, size=(40, 30))
    index[0] = 7  # one resample of a single point repeated: no correlation
    for method, scipy_method in SCIPY.items():
        values = analysis.resample_correlations(x, y, index, method)
        assert values.shape == (40,) and np.isnan(values[0])
        for b in range(1, 40):
            assert values[b] == pytest.approx(scipy_method(x[index[b]], y[index[b]]).statistic, abs=1e-12)
    one = analysis.resample_correlations(x, y, np.arange(30), "kendall")
    assert one.shape == () and float(one) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)


def test_bootstrap_interval_equals_scipy_bootstrap(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    agreement = rng.uniform(0.8, 0.9, size=40)
    rows = [
        trial_row("s", f"t{i}", seed=i, test_agreement=a, test_acc=0.3 + 0.5 * a + rng.normal(0, 0.01))
        for i, a in enumerate(agreement)
    ]
    df = analysis.load_trials(write_study(tmp_path, "s", rows))
    result = analysis.correlate(df, n_boot=400, seed=3, level=0.9, verbose=False).set_index("method")
    x, y = df["test_agreement"].to_numpy(), df["test_acc"].to_numpy()
    for method, scipy_method in SCIPY.items():
        expected = stats.bootstrap(
            (x, y), lambda a, b, f=scipy_method: f(a, b).statistic, paired=True, vectorized=False, n_resamples=400,
            confidence_level=0.9, method="percentile", rng=np.random.default_rng(3),
        ).confidence_interval
        assert result.loc[method, "ci_low"] == pytest.approx(expected.low, abs=1e-12)
        assert result.loc[method, "ci_high"] == pytest.approx(expected.high, abs=1e-12)


def test_a_large_group_takes_the_fisher_interval(tmp_path: Path) -> None:
    n = analysis.BOOTSTRAP_MAX_N + 100
    rng = np.random.default_rng(2)
    agreement = rng.uniform(0.8, 0.9, size=n)
    accuracy = 0.3 + 0.5 * agreement + rng.normal(0, 0.03, size=n)
    rows = [trial_row("s", f"t{i}", seed=i, test_agreement=a, test_acc=b) for i, (a, b) in
            enumerate(zip(agreement, accuracy))]
    df = analysis.load_trials(write_study(tmp_path, "s", rows))
    result = analysis.correlate(df, n_boot=1000, verbose=False).set_index("method")
    assert (result["n"] == n).all()
    pearson = stats.pearsonr(agreement, accuracy).confidence_interval(0.95)
    assert (result.loc["pearson", "ci_low"], result.loc["pearson", "ci_high"]) == pytest.approx(
        (pearson.low, pearson.high), abs=1e-12
    )
    z975 = stats.norm.ppf(0.975)
    for method, se in (("spearman", lambda r: np.sqrt((1 + r * r / 2) / (n - 3))),
                       ("kendall", lambda r: np.sqrt(0.437 / (n - 4)))):
        r = result.loc[method, "r"]
        expected = np.tanh(np.arctanh(r) + np.array([-1, 1]) * z975 * se(r))
        assert (result.loc[method, "ci_low"], result.loc[method, "ci_high"]) == pytest.approx(tuple(expected))
    # At this size the normal-theory interval and the bootstrap agree to within the bootstrap's own noise.
    for method, scipy_method in SCIPY.items():
        boot = stats.bootstrap(
            (agreement, accuracy), lambda a, b, f=scipy_method: f(a, b).statistic, paired=True, vectorized=False,
            n_resamples=300, method="percentile", rng=np.random.default_rng(0),
        ).confidence_interval
        assert result.loc[method, "ci_low"] == pytest.approx(boot.low, abs=0.03), method
        assert result.loc[method, "ci_high"] == pytest.approx(boot.high, abs=0.03), method
    assert analysis.correlate(df, n_boot=0, verbose=False)["ci_low"].isna().all()
