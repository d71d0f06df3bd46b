"""Tests for kd_ray.analysis on hand-built trial and epoch tables written to tmp_path."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kd_ray import analysis

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AUGMENTATIONS = ("baseline", "mixup", "combaug")
# Per arm: (mean agreement, mean accuracy). Across arms accuracy falls as agreement rises, within an
# arm it rises with agreement: the overall and within-arm correlations have opposite signs.
ARM_CENTRES = {"baseline": (0.80, 0.74), "mixup": (0.86, 0.70), "combaug": (0.92, 0.66)}
SEEDS = (0, 1, 2, 3)

CONFIG_DEFAULTS: dict[str, Any] = {
    "dataset": "mnist1d",
    "teacher_split": "full",
    "distill_split": "train",
    "distill_fraction": 1.0,
    "extra_data": 0,
    "data_seed": 0,
    "teacher_arch": "conv1d",
    "teacher_members": 3,
    "teacher_epochs": 30,
    "teacher_lr": 0.05,
    "teacher_seed": 0,
    "norm": "batch",
    "student_arch": "conv1d",
    "temperature": 4.0,
    "alpha": 0.0,
    "augmentation": "baseline",
    "mixup_alpha": 1.0,
    "epochs": 20,
    "batch_size": 128,
    "optimizer": "sgd",
    "lr": 0.05,
    "weight_decay": 1e-4,
    "lr_schedule": "cosine",
    "init": "random",
    "init_lambda": 0.0,
    "control": False,
    "seed": 0,
    "eval_every": 5,
    "device": "auto",
    "compile": False,
}


def trial_row(study: str, trial_id: str, status: str = "TERMINATED", **values: Any) -> dict[str, Any]:
    config = {k: values.pop(k, v) for k, v in CONFIG_DEFAULTS.items()}
    metrics = {m: values.pop(m, np.nan) for m in analysis.METRICS}
    row = {"study": study, "trial_id": trial_id, "status": status, "error": values.pop("error", None)}
    row |= config | metrics
    row |= {
        "epochs_completed": values.pop("epochs_completed", config["epochs"]),
        "train_time_s": values.pop("train_time_s", 12.5),
        "teacher_key": "t" + str(config["teacher_members"]),
        "kd_ray_version": "0.1.0",
        "git_sha": "abc1234",
        "torch_version": "2.13.0",
        "ray_version": "2.60.0",
        "device_name": "cpu",
        "config_json": json.dumps(config, sort_keys=True),
    }
    row |= values
    return row


def write_study(
    root: Path, name: str, rows: list[dict[str, Any]], epochs: list[dict[str, Any]] | None = None
) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(directory / "trials.parquet", index=False)
    if epochs is not None:
        pd.DataFrame(epochs).to_parquet(directory / "epochs.parquet", index=False)
    return directory


def augmentation_rows() -> list[dict[str, Any]]:
    rng = np.random.default_rng(7)
    rows = []
    for augmentation in AUGMENTATIONS:
        agree0, acc0 = ARM_CENTRES[augmentation]
        for seed in SEEDS:
            offset = (seed - 1.5) * 0.01 + rng.normal(0, 0.002)
            agreement = agree0 + offset
            rows.append(
                trial_row(
                    "aug",
                    f"{augmentation}-{seed}",
                    augmentation=augmentation,
                    seed=seed,
                    control=True,
                    test_agreement=agreement,
                    test_acc=acc0 + 0.8 * offset + rng.normal(0, 0.001),
                    test_kl=0.5 - agreement / 2 + rng.normal(0, 0.003),
                    test_nll=1.2 - acc0 + rng.normal(0, 0.01),
                    test_ece=0.05 + rng.normal(0, 0.005),
                    train_agreement=0.99 - 0.1 * AUGMENTATIONS.index(augmentation) + rng.normal(0, 0.004),
                    train_kl=0.05,
                    teacher_test_acc=0.72,
                    control_test_agreement=agreement - 0.05 - 0.01 * AUGMENTATIONS.index(augmentation),
                )
            )
    # A terminated trial whose KL was not recorded: it counts, but not towards test_kl's n.
    rows[0]["test_kl"] = np.nan
    diverged = {"test_acc": 0.01, "test_agreement": 0.01, "test_kl": np.inf}
    rows.append(
        trial_row("aug", "mixup-4", "DIVERGED", augmentation="mixup", seed=4, control=True, **diverged)
    )
    error = "Traceback (most recent call last):\nRuntimeError: boom"
    rows.append(
        trial_row("aug", "combaug-5", "ERROR", augmentation="combaug", seed=5, control=True, error=error)
    )
    return rows


def epoch_rows(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for trial in trials:
        if trial["status"] == "ERROR":
            continue
        for epoch in (5, 10, 15, 20):
            fraction = epoch / 20
            row = {
                "study": trial["study"],
                "trial_id": trial["trial_id"],
                "epoch": epoch,
                "lr": 0.05 * (1 - fraction),
                "train_loss": 1.0 - 0.5 * fraction,
            }
            for metric in analysis.METRICS:
                value = trial[metric]
                row[metric] = value * (0.7 + 0.3 * fraction) if np.isfinite(value) else value
            rows.append(row)
    return rows


@pytest.fixture()
def aug_study(tmp_path: Path) -> Path:
    rows = augmentation_rows()
    return write_study(tmp_path, "aug", rows, epoch_rows(rows))


@pytest.fixture()
def mtau_study(tmp_path: Path) -> Path:
    rows = []
    for m in (1, 3, 5):
        for tau in (1.0, 4.0):
            for seed in (0, 1):
                agreement = 0.7 + 0.03 * m + (0.04 if tau > 1 else 0) + 0.005 * seed
                metrics = {
                    "test_agreement": agreement,
                    "test_acc": 0.6 + 0.01 * m,
                    "train_agreement": agreement + 0.1,
                }
                trial_id = f"m{m}-t{tau:g}-{seed}"
                config = {"teacher_members": m, "temperature": tau, "seed": seed}
                rows.append(trial_row("mtau", trial_id, **config, **metrics))
    return write_study(tmp_path, "mtau", rows)


@pytest.fixture()
def lambda_study(tmp_path: Path) -> Path:
    rows, epochs = [], []
    for lam in (0.0, 0.25, 0.375, 0.5, 1.0):
        for seed in (0, 1):
            agreement = 0.79 if lam < 0.375 else 0.99
            trial_id = f"l{lam:g}-{seed}"
            metrics = {
                "test_agreement": agreement - 0.01 * seed,
                "train_agreement": agreement,
                "test_acc": 0.7,
                "test_nll": 1.0,
            }
            config = {"init": "interpolate", "init_lambda": lam, "seed": seed}
            rows.append(trial_row("lambda", trial_id, **config, **metrics))
            for epoch in (10, 20):
                epochs.append(
                    {
                        "study": "lambda",
                        "trial_id": trial_id,
                        "epoch": epoch,
                        "lr": 0.01,
                        "train_loss": 0.5 - lam / 4 + 0.1 * (epoch == 10),
                        "test_agreement": agreement,
                        "train_agreement": agreement,
                    }
                )
    return write_study(tmp_path, "lambda", rows, epochs)


@pytest.fixture()
def optuna_study(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    rows = []
    for i in range(30):
        lr = float(10 ** rng.uniform(-3, -1))
        tau = float(rng.uniform(1, 8))
        metrics = {"test_agreement": float(rng.uniform(0.7, 0.9)), "test_acc": float(rng.uniform(0.6, 0.75))}
        config = {"lr": lr, "temperature": tau, "optuna_trial_number": i}
        rows.append(trial_row("search", f"t{i:02d}", **config, **metrics))
    return write_study(tmp_path, "search", rows)


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------
def test_load_trials_keeps_and_flags_failed_trials(aug_study: Path) -> None:
    df = analysis.load_trials(aug_study)
    assert len(df) == 14
    assert df["usable"].dtype == bool
    flagged = df.set_index("trial_id")
    assert not flagged.loc["mixup-4", "usable"] and flagged.loc["mixup-4", "excluded_reason"] == "DIVERGED"
    assert not flagged.loc["combaug-5", "usable"] and flagged.loc["combaug-5", "excluded_reason"] == "ERROR"
    assert flagged.loc["baseline-0", "usable"] and pd.isna(flagged.loc["baseline-0", "excluded_reason"])
    for metric in analysis.METRICS:
        assert df[metric].dtype == np.float64
    assert str(df["seed"].dtype) == "Int64"
    assert str(df["teacher_members"].dtype) == "Int64"
    assert str(df["control"].dtype) == "boolean"
    assert pd.api.types.is_string_dtype(df["augmentation"])


def test_terminated_trial_with_infinite_metric_is_flagged(tmp_path: Path) -> None:
    rows = [
        trial_row("s", "a", test_acc=0.5, test_agreement=0.5),
        trial_row("s", "b", test_acc=0.5, test_agreement=0.5, test_kl=np.inf),
    ]
    df = analysis.load_trials(write_study(tmp_path, "s", rows))
    assert df["usable"].tolist() == [True, False]
    assert df["excluded_reason"].iloc[1] == analysis.NONFINITE


def test_load_several_studies_by_list_and_glob(aug_study: Path, mtau_study: Path, tmp_path: Path) -> None:
    by_list = analysis.load_trials([aug_study, mtau_study])
    by_glob = analysis.load_trials(str(tmp_path / "*"))
    assert set(by_list["study"]) == {"aug", "mtau"}
    assert len(by_glob) == len(by_list) == 14 + 12
    # Integer factors stay integers after the concat.
    assert str(by_list["teacher_members"].dtype) == "Int64"
    assert analysis.arm_columns(by_list)[0] == "study"


def test_missing_study_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        analysis.load_trials(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        analysis.load_trials(tmp_path / "empty")


def test_missing_optional_columns_are_tolerated(tmp_path: Path) -> None:
    rows = [trial_row("s", str(i), seed=i, test_acc=0.5 + i / 100, test_agreement=0.8) for i in range(3)]
    dropped = ["control_test_agreement", "aug_train_agreement", "teacher_test_ece", "git_sha"]
    frame = pd.DataFrame(rows).drop(columns=dropped)
    directory = tmp_path / "s"
    directory.mkdir()
    frame.to_parquet(directory / "trials.parquet", index=False)
    df = analysis.load_trials(directory)
    assert df["control_test_agreement"].isna().all()
    assert analysis.control_gap(df).empty
    assert analysis.load_epochs(directory).empty


def test_load_epochs_flags_rows_of_failed_trials(aug_study: Path) -> None:
    epochs = analysis.load_epochs(aug_study)
    assert len(epochs) == 13 * 4
    assert not epochs.loc[epochs["trial_id"] == "mixup-4", "usable"].any()
    assert epochs.loc[epochs["trial_id"] == "baseline-1", "usable"].all()
    assert str(epochs["epoch"].dtype) == "Int64"


# ---------------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------------
def test_default_arms_exclude_seed(aug_study: Path, optuna_study: Path) -> None:
    assert analysis.arm_columns(analysis.load_trials(aug_study)) == ["augmentation"]
    # lr and temperature were searched, not gridded: no arms.
    assert analysis.arm_columns(analysis.load_trials(optuna_study)) == []


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


def test_format_summary(aug_study: Path) -> None:
    text = analysis.format_summary(analysis.load_trials(aug_study), verbose=False)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["augmentation", "n", "excluded"]
    assert "test_agreement (%)" in lines[0] and "test_kl" in lines[0]
    assert len(lines) == 2 + 3 and "±" in lines[2]


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
    pearson = analysis._rowwise_pearson(xs, ys)
    kendall = analysis._rowwise_kendall(xs, ys)
    for i in range(6):
        assert pearson[i] == pytest.approx(stats.pearsonr(xs[i], ys[i]).statistic)
        assert kendall[i] == pytest.approx(stats.kendalltau(xs[i], ys[i]).statistic)


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


# ---------------------------------------------------------------------------------------------------
# Figures, report, command line
# ---------------------------------------------------------------------------------------------------
def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_figures_are_valid_pngs(
    aug_study: Path, mtau_study: Path, lambda_study: Path, optuna_study: Path, tmp_path: Path
) -> None:
    scatters = {"test_acc_vs_test_agreement", "test_nll_vs_test_kl", "test_ece_vs_test_agreement"}
    cases = {
        aug_study: scatters | {"arms", "agreement_over_epochs"},
        mtau_study: {"test_acc_vs_test_agreement", "arms", "members_x_temperature"},
        lambda_study: {"test_acc_vs_test_agreement", "arms", "agreement_over_epochs", "init_lambda"},
        optuna_study: {"test_acc_vs_test_agreement", "pareto_front"},
    }
    for study, expected in cases.items():
        out = tmp_path / "figures" / study.name
        paths = analysis.figures(analysis.load_trials(study), analysis.load_epochs(study), out)
        assert {p.stem for p in paths} == expected
        for path in paths:
            assert_png(path)


def test_two_factor_bars_and_explicit_objectives(aug_study: Path, mtau_study: Path, tmp_path: Path) -> None:
    df = analysis.load_trials([aug_study, mtau_study])
    objectives = {"test_agreement": "max", "test_kl": "min"}
    paths = analysis.figures(df, None, tmp_path / "f", by=["study", "temperature"], objectives=objectives)
    assert {"arms", "pareto_front"} <= {p.stem for p in paths}
    for path in paths:
        assert_png(path)


def test_report_renders_from_fixture_study(aug_study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = analysis.report(aug_study, n_boot=100)
    assert path == aug_study / "report.md"
    text = path.read_text()
    assert "excluded 2 trials" in capsys.readouterr().out
    headings = [
        "# kd_ray report: `aug`",
        "## Summary",
        "## Fidelity vs generalization",
        "## Independent-student control",
        "## Figures",
        "## Excluded trials",
        "## Provenance",
    ]
    found = [line for line in text.splitlines() if line.startswith("#") and "All metrics" not in line]
    assert found == headings
    assert "abc1234" in text and "2.13.0" in text
    assert "RuntimeError: boom" in text and "Traceback" not in text  # the exception, not the preamble
    for link in [line for line in text.splitlines() if line.startswith("![")]:
        assert_png(aug_study / link.split("(", 1)[1].rstrip(")"))
    assert (aug_study / "summary.csv").is_file() and (aug_study / "correlations.csv").is_file()


def test_report_of_several_studies_goes_to_common_parent(
    lambda_study: Path, optuna_study: Path, tmp_path: Path
) -> None:
    path = analysis.report([lambda_study, optuna_study], n_boot=0)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    assert "`lambda`" in text and "`search`" in text


def test_main_prints_summary_and_report_path(
    aug_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert analysis.main([str(aug_study), "--by", "augmentation", "--out", str(out), "--n-boot", "50"]) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "combaug" in printed and "±" in printed
    assert f"report: {out / 'report.md'}" in printed
    assert (out / "report.md").is_file() and (out / "figures").is_dir()


def test_report_when_every_trial_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [trial_row("bad", f"x{i}", "ERROR", seed=i, error="OSError: disk full") for i in range(3)]
    study = write_study(tmp_path, "bad", rows)
    assert analysis.main([str(study)]) == 0
    printed = capsys.readouterr().out
    assert "excluded 3 trials (ERROR: 3)" in printed and "no usable trials among 3" in printed
    text = (study / "report.md").read_text()
    assert "0 usable" in text and "OSError: disk full" in text and "## Figures" not in text


def test_null_factor_level_is_an_arm_of_its_own(tmp_path: Path) -> None:
    rows = [trial_row("s", f"t{i}", seed=i, test_acc=0.5 + i / 20, test_agreement=0.7) for i in range(6)]
    frame = pd.DataFrame(rows)
    frame["teacher_members"] = pd.array([1, 1, 3, 3, None, None], dtype="Int64")
    (tmp_path / "s").mkdir()
    frame.to_parquet(tmp_path / "s" / "trials.parquet", index=False)
    df = analysis.load_trials(tmp_path / "s")
    summary = analysis.summarize(df, metrics=["test_acc"])
    assert summary["teacher_members"].tolist()[:2] == [1, 3] and pd.isna(summary["teacher_members"].iloc[2])
    assert summary["n"].tolist() == [2, 2, 2]
    assert summary["mean"].iloc[2] == pytest.approx((0.7 + 0.75) / 2)


def test_main_rejects_path_without_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_study_here"
    assert analysis.main([str(missing)]) == 2
    error = capsys.readouterr().err
    assert str(missing) in error and "trials.parquet" in error and error.count("\n") == 1


def test_main_rejects_unknown_factor(aug_study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert analysis.main([str(aug_study), "--by", "colour"]) == 2
    assert "colour" in capsys.readouterr().err


@pytest.mark.parametrize("first", ["analysis", "figures", "report"])
def test_import_without_torch_or_ray(first: str) -> None:
    # Each module first in turn: the three import one another, and a cycle shows only in some orders.
    code = textwrap.dedent(
        f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "ray"):
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        import kd_ray.{first}
        import kd_ray.analysis
        import kd_ray.figures
        import kd_ray.report
        from kd_ray import analysis
        assert analysis.figures is kd_ray.figures.figures and analysis.report is kd_ray.report.report
        assert not any(m.split(".")[0] in ("torch", "ray") for m in sys.modules)
        print("ok")
        """
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_metric_groups_partition_the_metrics() -> None:
    groups = (
        analysis.FIDELITY_METRICS
        + analysis.GENERALIZATION_METRICS
        + analysis.TEACHER_METRICS
        + analysis.CONTROL_METRICS
    )
    assert sorted(groups) == sorted(analysis.METRICS) and len(set(groups)) == len(groups)


def test_mean_ci_edge_cases() -> None:
    assert analysis.mean_ci([])[0] == 0
    n, mean, sd, low, high = analysis.mean_ci([0.5, np.nan, np.inf])
    assert (n, mean) == (1, 0.5) and math.isnan(sd) and math.isnan(low)
