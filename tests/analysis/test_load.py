"""Loading: study directories, dtypes from the schemas, and the usable flags of failed trials."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from handmade import trial_row, write_study

from kd_ray import analysis


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
    epochs = analysis.load_epochs(directory)
    assert epochs.empty
    # Even empty, the epochs frame has the columns callers select.
    assert {"study", "trial_id", "epoch", "usable", *analysis.METRICS} <= set(epochs.columns)
    assert str(epochs["epoch"].dtype) == "Int64"


def test_load_epochs_flags_rows_of_failed_trials(aug_study: Path) -> None:
    epochs = analysis.load_epochs(aug_study)
    assert len(epochs) == 13 * 4
    assert not epochs.loc[epochs["trial_id"] == "mixup-4", "usable"].any()
    assert epochs.loc[epochs["trial_id"] == "baseline-1", "usable"].all()
    assert str(epochs["epoch"].dtype) == "Int64"


def test_study_dirs_accepts_a_trials_file_and_drops_duplicates(aug_study: Path) -> None:
    assert analysis.study_dirs([aug_study / "trials.parquet", aug_study]) == [aug_study]
