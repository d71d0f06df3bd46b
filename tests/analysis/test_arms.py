"""Arms: which columns are factors, and nulls as a level of their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from handmade import trial_row

from kd_ray import analysis


def test_default_arms_exclude_seed(aug_study: Path, optuna_study: Path) -> None:
    assert analysis.arm_columns(analysis.load_trials(aug_study)) == ["augmentation"]
    # lr and temperature were searched, not gridded: no arms.
    assert analysis.arm_columns(analysis.load_trials(optuna_study)) == []


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


def test_arms_of_two_factors_with_nulls_match_a_groupby(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 600
    rows = [trial_row("s", f"t{i}", seed=i, test_acc=float(rng.uniform(0.5, 0.9)), test_agreement=0.8)
            for i in range(n)]
    frame = pd.DataFrame(rows)
    frame["temperature"] = rng.choice([1.0, 2.0, 4.0, np.nan], size=n)
    frame["augmentation"] = rng.choice(["noise", "baseline", "mixup"], size=n)
    (tmp_path / "s").mkdir()
    frame.to_parquet(tmp_path / "s" / "trials.parquet", index=False)
    df = analysis.load_trials(tmp_path / "s")
    summary = analysis.summarize(df, by=["temperature", "augmentation"], metrics=["test_acc"], verbose=False)
    # Levels: numbers sorted with null last, names in order of first appearance.
    order = list(dict.fromkeys(df["augmentation"]))
    expected_keys = [(t, a) for t in (1.0, 2.0, 4.0, None) for a in order]
    keys = [(None if pd.isna(t) else t, a) for t, a in zip(summary["temperature"], summary["augmentation"])]
    assert keys == expected_keys
    for (t, a), mean in zip(keys, summary["mean"]):
        in_arm = (df["temperature"].isna() if t is None else df["temperature"] == t) & (df["augmentation"] == a)
        assert mean == pytest.approx(df.loc[in_arm.fillna(False), "test_acc"].mean())
