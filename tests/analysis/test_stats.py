"""Statistics: summaries against numpy and the t interval, Pareto fronts and the control gap."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from handmade import AUGMENTATIONS
from scipy import stats

from kd_ray import analysis


# ---------------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------------
def test_summarize_matches_numpy_and_t_interval(aug_study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    df = analysis.load_trials(aug_study)
    summary = analysis.summarize(df)
    assert "excluded 2 trials (ERROR: 1, DIVERGED: 1)" in capsys.readouterr().out
    assert list(summary["augmentation"].drop_duplicates()) == list(AUGMENTATIONS)
    for augmentation in AUGMENTATIONS:
        values = df[(df["augmentation"] == augmentation) & df["usable"]]["test_acc"].to_numpy()
        row = summary[(summary["augmentation"] == augmentation) & (summary["metric"] == "test_acc")].iloc[0]
        assert row["n"] == 4 and row["n_trials"] == 4
        assert row["mean"] == pytest.approx(values.mean())
        assert row["sd"] == pytest.approx(values.std(ddof=1))
        half = stats.t.ppf(0.975, 3) * values.std(ddof=1) / 2
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((values.mean() - half, values.mean() + half))
        assert row["n_excluded"] == (0 if augmentation == "baseline" else 1)


def test_summarize_missing_values_and_include_failed(aug_study: Path) -> None:
    df = analysis.load_trials(aug_study)
    summary = analysis.summarize(df, verbose=False).set_index(["augmentation", "metric"])
    # baseline-0 has no test_kl: the arm has 4 trials but 3 KL values.
    assert summary.loc[("baseline", "test_kl"), "n"] == 3
    assert summary.loc[("baseline", "test_kl"), "n_trials"] == 4
    # Metrics absent from the whole table are not summarized.
    assert "aug_train_agreement" not in summary.index.get_level_values("metric")
    everything = analysis.summarize(df, include_failed=True).set_index(["augmentation", "metric"])
    # The diverged trial's finite accuracy now counts, its infinite KL still does not.
    assert everything.loc[("mixup", "test_acc"), "n"] == 5
    assert everything.loc[("mixup", "test_kl"), "n"] == 4
    assert everything.loc[("combaug", "test_acc"), "n"] == 4  # the errored trial has no metrics
    assert everything.loc[("combaug", "test_acc"), "n_trials"] == 5


def test_summarize_single_value_and_explicit_by(aug_study: Path) -> None:
    df = analysis.load_trials(aug_study)
    per_trial = analysis.summarize(df, by=["augmentation", "seed"], metrics=["test_acc"], verbose=False)
    assert len(per_trial) == 14  # combinations present; arms of failed trials only have n = 0
    assert (per_trial["n"] <= 1).all() and per_trial["sd"].isna().all()
    overall = analysis.summarize(df, by=[], metrics=["test_acc"], verbose=False)
    assert overall["n"].tolist() == [12]
    with pytest.raises(ValueError, match="nonsense"):
        analysis.summarize(df, by="nonsense")


def test_mean_ci_edge_cases() -> None:
    assert analysis.mean_ci([])[0] == 0
    n, mean, sd, low, high = analysis.mean_ci([0.5, np.nan, np.inf])
    assert (n, mean) == (1, 0.5) and math.isnan(sd) and math.isnan(low)


# ---------------------------------------------------------------------------------------------------
# Pareto front and control
# ---------------------------------------------------------------------------------------------------
def test_pareto_front_hand_made() -> None:
    df = pd.DataFrame(
        {
            "status": "TERMINATED",
            "trial_id": list("abcdefg"),
            "test_agreement": [0.9, 0.8, 0.7, 0.85, 0.6, 0.9, np.nan],
            "test_acc": [0.6, 0.7, 0.75, 0.65, 0.5, 0.6, 0.99],
            "test_kl": [0.3, 0.2, 0.1, 0.4, 0.05, 0.3, 0.01],
        }
    )
    front = analysis.pareto_front(df, maximize=["test_agreement", "test_acc"])
    # a does not beat d's accuracy nor b its agreement, so d stays; e is dominated; f ties a and both
    # stay; g lacks an objective.
    assert front["trial_id"].tolist() == ["a", "f", "d", "b", "c"]
    three = analysis.pareto_front(df, maximize=["test_agreement", "test_acc"], minimize=["test_kl"])
    assert set(three["trial_id"]) == {"a", "b", "c", "d", "e", "f"}
    only_kl = analysis.pareto_front(df, maximize=["test_acc"], minimize=["test_kl"])
    assert set(only_kl["trial_id"]) == {"c", "e"}  # c beats a, b, d, f on both


def test_control_gap(aug_study: Path) -> None:
    gap = analysis.control_gap(analysis.load_trials(aug_study), verbose=False)
    assert len(gap) == 12
    np.testing.assert_allclose(gap["control_gap"], gap["test_agreement"] - gap["control_test_agreement"])
    per_arm = gap.groupby("augmentation")["control_gap"].mean()
    assert per_arm["baseline"] == pytest.approx(0.05) and per_arm["combaug"] == pytest.approx(0.07)


def test_pareto_front_equals_the_pairwise_definition_on_many_ties() -> None:
    rng = np.random.default_rng(4)
    values = rng.integers(0, 6, size=(400, 3)).astype(float)  # coarse values: ties and duplicates
    df = pd.DataFrame({"status": "TERMINATED", "trial_id": [f"t{i}" for i in range(400)],
                       "test_agreement": values[:, 0], "test_acc": values[:, 1], "test_kl": values[:, 2]})
    front = analysis.pareto_front(df, maximize=["test_agreement", "test_acc"], minimize=["test_kl"], verbose=False)
    oriented = values * np.array([1, 1, -1])
    expected = {
        f"t{i}" for i, point in enumerate(oriented)
        if not ((oriented >= point).all(axis=1) & (oriented > point).any(axis=1)).any()
    }
    assert set(front["trial_id"]) == expected and len(front) == len(expected)
    assert front["test_agreement"].is_monotonic_decreasing


def test_fraction_intervals_stay_within_zero_and_one():
    from kd_ray import analysis

    n, mean, sd, low, high = analysis.mean_ci(pd.Series([0.999, 0.97, 1.0]), bounds=(0.0, 1.0))
    assert n == 3 and high == 1.0 and low < mean
    unbounded = analysis.mean_ci(pd.Series([0.999, 0.97, 1.0]))
    assert unbounded[4] > 1.0  # the plain t-interval runs past 100%
    rows = pd.DataFrame({"study": "s", "trial_id": ["a", "b", "c"], "status": "TERMINATED", "seed": [0, 1, 2],
                         "test_agreement": [0.999, 0.97, 1.0], "test_nll": [0.1, 0.2, 0.9]})
    summary = analysis.summarize(rows, by=[], verbose=False)
    agreement = summary[summary["metric"] == "test_agreement"].iloc[0]
    assert agreement["ci_high"] <= 1.0
    nll = summary[summary["metric"] == "test_nll"].iloc[0]
    assert nll["ci_low"] < 0  # a loss is not a fraction: its interval is not cut
