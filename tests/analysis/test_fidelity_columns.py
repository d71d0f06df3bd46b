"""The fidelity columns beyond agreement and KL (top-5 overlap, JSD, agreement where the teacher is right
and where it is wrong): read and summarised like the others, and absent from older tables without harm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from handmade import trial_row, write_study

from kd_ray import analysis

NEW_COLUMNS = [f"{split}_{name}" for split in ("test", "val")
               for name in ("top5_overlap", "jsd", "agreement_teacher_right", "agreement_teacher_wrong")]


def test_the_new_columns_are_metrics_with_their_units() -> None:
    assert set(NEW_COLUMNS) <= set(analysis.METRICS)
    assert {"test_jsd", "val_jsd"}.isdisjoint(analysis.FRACTION_METRICS)  # nats
    assert set(NEW_COLUMNS) - {"test_jsd", "val_jsd"} <= analysis.FRACTION_METRICS


def test_a_table_with_the_new_columns_is_read_and_summarised(tmp_path: Path) -> None:
    rows = [trial_row("s", str(i), seed=i, test_acc=0.7, test_agreement=0.8, test_top5_overlap=0.9 + i / 100,
                      test_jsd=0.05, test_agreement_teacher_wrong=0.4 + i / 10) for i in range(3)]
    df = analysis.load_trials(write_study(tmp_path, "s", rows))
    assert df["test_top5_overlap"].tolist() == [0.9, 0.91, 0.92]
    summary = analysis.summarize(df, by=["student_arch"])
    metrics = set(summary["metric"])
    assert {"test_top5_overlap", "test_jsd", "test_agreement_teacher_wrong"} <= metrics
    assert "val_jsd" not in metrics  # all NaN: not measured, not summarised


def test_an_older_table_without_the_new_columns_loads_with_them_null(tmp_path: Path) -> None:
    rows = [trial_row("s", str(i), seed=i, test_acc=0.5 + i / 100, test_agreement=0.8) for i in range(3)]
    older = pd.DataFrame(rows).drop(columns=NEW_COLUMNS)
    directory = tmp_path / "s"
    directory.mkdir()
    older.to_parquet(directory / "trials.parquet", index=False)
    epochs = pd.DataFrame([{"study": "s", "trial_id": str(i), "epoch": 1, "test_agreement": 0.8} for i in range(3)])
    epochs.to_parquet(directory / "epochs.parquet", index=False)
    df = analysis.load_trials(directory)
    assert df["usable"].all()
    for column in NEW_COLUMNS:
        assert df[column].dtype == np.float64 and df[column].isna().all()
    loaded = analysis.load_epochs(directory)
    assert len(loaded) == 3 and loaded["test_jsd"].isna().all()
    assert "test_jsd" not in set(analysis.summarize(df, by=["student_arch"])["metric"])
