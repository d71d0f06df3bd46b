"""Arms: the factors a study varies, their levels, and the split of a table into one frame per arm.

An arm is one combination of the factor columns (``by``); the trials of an arm differ only in their
replicate seeds. A float column sampled by a search (Optuna) is a searched dimension, never a factor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from kd_ray.analysis._columns import CONFIG_COLUMNS

# Never treatments, so an arm averages over them: replicate seeds, where and how fast a trial ran,
# and what was measured besides the student (control, eval_every) rather than how it was trained.
NON_ARM_COLUMNS: frozenset[str] = frozenset(
    {"seed", "data_seed", "teacher_seed", "device", "compile", "control", "eval_every"}
)

# A float column whose values are nearly all distinct is a searched (Optuna) dimension, not a factor
# with arms: grouping by it would give one trial per arm.
SEARCH_DIM_MIN_LEVELS = 13


def config_columns(df: pd.DataFrame) -> list[str]:
    """The TrialConfig columns df holds, in df's column order."""
    return [c for c in df.columns if c in CONFIG_COLUMNS]


def arm_columns(df: pd.DataFrame) -> list[str]:
    """The study's factors: config columns that take more than one value in the table.

    NON_ARM_COLUMNS (replicate seeds, device, compile, control, eval_every) are never factors, nor
    is a searched dimension (see is_search_dim). With several studies in the table ``study`` comes
    first, since trials of different studies are different experiments.
    """
    columns = []
    if "study" in df.columns and df["study"].nunique(dropna=False) > 1:
        columns.append("study")
    for column in config_columns(df):
        if column in NON_ARM_COLUMNS:
            continue
        if df[column].nunique(dropna=False) > 1 and not is_search_dim(df, column):
            columns.append(column)
    return columns


def is_search_dim(df: pd.DataFrame, column: str) -> bool:
    """A float column with at least SEARCH_DIM_MIN_LEVELS distinct values, more than half the
    number of trials: sampled by a search (Optuna), so grouping by it would give arms of one."""
    levels = df[column].nunique(dropna=False)
    is_float = pd.api.types.is_float_dtype(df[column].dtype)
    return is_float and levels >= SEARCH_DIM_MIN_LEVELS and levels > len(df) / 2


def search_dims(df: pd.DataFrame) -> list[str]:
    return [c for c in config_columns(df) if is_search_dim(df, c)]


def resolve_by(df: pd.DataFrame, by: str | Sequence[str] | None) -> list[str]:
    """The factor columns of ``by`` as a list; None means arm_columns(df). Unknown columns raise
    ValueError naming them and the factors the table has."""
    if by is None:
        return arm_columns(df)
    columns = [by] if isinstance(by, str) else list(by)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        available = ", ".join(arm_columns(df)) or "none vary"
        raise ValueError(f"unknown column(s) for by: {', '.join(missing)} (factors here: {available})")
    return columns


def factor_levels(series: pd.Series) -> list[Any]:
    """Distinct non-null values: numbers and booleans sorted, names in order of first appearance."""
    values = series.dropna().drop_duplicates()
    if pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
        values = values.sort_values()
    return values.tolist()


def split_arms(df: pd.DataFrame, by: Sequence[str]) -> list[tuple[tuple[Any, ...], pd.DataFrame]]:
    """Split df into arms, one per combination of the by columns present, in level order.

    Null is a level of its own, placed last; its key value is None.
    """
    if not by:
        return [((), df)]
    if df.empty:
        return []
    levels = {c: factor_levels(df[c]) for c in by}
    codes = {}
    arm = np.zeros(len(df), dtype=np.int64)
    for column in by:
        code = pd.Categorical(df[column], categories=levels[column]).codes.astype(np.int64)
        code[code < 0] = len(levels[column])
        codes[column] = code
        # The arm's number so far, renumbered densely so that it never overflows; order is kept.
        _, arm = np.unique(arm * (len(levels[column]) + 1) + code, return_inverse=True)
    order = np.argsort(arm, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(arm[order]) != 0])
    arms = []
    for rows in np.split(order, starts[1:]):
        first = rows[0]
        key = tuple(
            levels[c][int(codes[c][first])] if codes[c][first] < len(levels[c]) else None for c in by
        )
        arms.append((key, df.iloc[rows]))
    return arms


def fmt_level(value: Any) -> str:
    """A factor level as text: NA for null, floats without trailing zeros."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "NA"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def arm_label(by: Sequence[str], key: Sequence[Any]) -> str:
    if not by:
        return "all trials"
    if len(by) == 1:
        return fmt_level(key[0])
    return ", ".join(f"{c}={fmt_level(v)}" for c, v in zip(by, key))


def restore_key_dtypes(out: pd.DataFrame, source: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Give out's by columns the dtypes they have in source."""
    # Rebuilt from Python scalars, an integer factor with a null level would come back as float.
    for column in by:
        if column in out.columns:
            try:
                out[column] = out[column].astype(source[column].dtype)
            except (TypeError, ValueError):
                pass
    return out
