"""Analysis of trial tables: summaries, fidelity–generalization correlations, Pareto fronts,
figures and a Markdown report.

    from kd_ray import analysis
    df = analysis.load_trials("results/augmentation_ablation")      # one study, several, or a glob
    analysis.summarize(df, by=["augmentation", "temperature"])      # mean, sd, n, 95% CI per arm
    analysis.correlate(df, x="test_agreement", y="test_acc", by="augmentation")
    analysis.pareto_front(df, maximize=["test_agreement", "test_acc"])
    analysis.report("results/augmentation_ablation")                # report.md + figures/*.png

Failed trials are never dropped on load: every row carries ``usable`` (status TERMINATED and finite
metrics) and ``excluded_reason``. The statistics functions leave unusable rows out unless
``include_failed=True`` and print how many they left out and why.

This module holds the loading, the statistics and ``kd-ray analyze``. The figures are drawn by
kd_ray.figures and the report is written by kd_ray.report; ``figures`` and ``report`` are
re-exported here and load on first use. None of the three imports torch, Ray or a kd_ray module
outside these three, so tables produced on a cluster can be analysed on a laptop with pandas alone.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import math
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from scipy import stats

if TYPE_CHECKING:  # type checkers cannot follow the lazy re-export in __getattr__
    from kd_ray.figures import figures
    from kd_ray.report import report

__all__ = [
    "METRICS",
    "FIDELITY_METRICS",
    "GENERALIZATION_METRICS",
    "TEACHER_METRICS",
    "CONTROL_METRICS",
    "CONFIG_COLUMNS",
    "STATUSES",
    "load_trials",
    "load_epochs",
    "study_dirs",
    "flag_usable",
    "arm_columns",
    "summarize",
    "mean_ci",
    "present_metrics",
    "format_summary",
    "correlate",
    "pareto_front",
    "control_gap",
    "figures",
    "report",
    "main",
]

# kd_ray.figures and kd_ray.report import their helpers from this module; importing them back at load
# time would be an import cycle, so they are imported on first access.
_REEXPORTS = {"figures": "kd_ray.figures", "report": "kd_ray.report"}


def __getattr__(name: str) -> Any:
    if name in _REEXPORTS:
        value = getattr(importlib.import_module(_REEXPORTS[name]), name)
        globals()[name] = value  # later lookups no longer reach __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_REEXPORTS})


TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
REPORT_FILE = "report.md"
FIGURES_DIR = "figures"

STATUSES = ("TERMINATED", "ERROR", "DIVERGED", "STOPPED")
USABLE_STATUS = "TERMINATED"
NONFINITE = "NONFINITE"  # excluded_reason of a TERMINATED trial whose metrics are not finite

# How closely the student matches its teacher.
FIDELITY_METRICS: tuple[str, ...] = (
    "test_agreement",
    "test_kl",
    "train_agreement",
    "train_kl",
    "aug_train_agreement",
)
# How well the student does on its own.
GENERALIZATION_METRICS: tuple[str, ...] = ("test_acc", "test_nll", "test_ece")
TEACHER_METRICS: tuple[str, ...] = ("teacher_test_acc", "teacher_test_nll", "teacher_test_ece")
CONTROL_METRICS: tuple[str, ...] = ("control_test_agreement",)
# In the column order of the tables.
METRICS: tuple[str, ...] = (
    "test_acc",
    "test_nll",
    "test_ece",
    "test_agreement",
    "test_kl",
    "train_agreement",
    "train_kl",
    "aug_train_agreement",
    "teacher_test_acc",
    "teacher_test_nll",
    "teacher_test_ece",
    "control_test_agreement",
)
# Fractions in [0, 1], shown as percentages; the rest (KL, NLL in nats) are shown as they are.
FRACTION_METRICS: frozenset[str] = frozenset(
    m for m in (*METRICS, "control_gap") if m.endswith(("_acc", "_agreement", "_ece", "_gap"))
)

CONFIG_COLUMNS: tuple[str, ...] = (
    "dataset",
    "teacher_split",
    "distill_split",
    "distill_fraction",
    "extra_data",
    "data_seed",
    "teacher_arch",
    "teacher_members",
    "teacher_epochs",
    "teacher_lr",
    "teacher_seed",
    "norm",
    "student_arch",
    "temperature",
    "alpha",
    "augmentation",
    "mixup_alpha",
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "weight_decay",
    "lr_schedule",
    "init",
    "init_lambda",
    "control",
    "seed",
    "eval_every",
    "device",
    "compile",
)
# Never treatments, so an arm averages over them: replicate seeds, where and how fast a trial ran,
# and what was measured besides the student (control, eval_every) rather than how it was trained.
NON_ARM_COLUMNS: frozenset[str] = frozenset(
    {"seed", "data_seed", "teacher_seed", "device", "compile", "control", "eval_every"}
)

PROVENANCE_COLUMNS: tuple[str, ...] = (
    "kd_ray_version",
    "git_sha",
    "torch_version",
    "ray_version",
    "device_name",
)
STRING_COLUMNS: tuple[str, ...] = (
    "study",
    "trial_id",
    "status",
    "error",
    "dataset",
    "teacher_split",
    "distill_split",
    "teacher_arch",
    "norm",
    "student_arch",
    "augmentation",
    "optimizer",
    "lr_schedule",
    "init",
    "device",
    "teacher_key",
    *PROVENANCE_COLUMNS,
    "config_json",
)
INT_COLUMNS: tuple[str, ...] = (
    "extra_data",
    "data_seed",
    "teacher_members",
    "teacher_epochs",
    "teacher_seed",
    "epochs",
    "batch_size",
    "seed",
    "eval_every",
    "epochs_completed",
    "epoch",
)
FLOAT_COLUMNS: tuple[str, ...] = (
    "distill_fraction",
    "teacher_lr",
    "temperature",
    "alpha",
    "mixup_alpha",
    "lr",
    "weight_decay",
    "init_lambda",
    "train_time_s",
    "train_loss",
    *METRICS,
)
BOOL_COLUMNS: tuple[str, ...] = ("control", "compile")

# A float column whose values are nearly all distinct is a searched (Optuna) dimension, not a factor
# with arms: grouping by it would give one trial per arm.
SEARCH_DIM_MIN_LEVELS = 13

CORRELATION_METHODS: tuple[str, ...] = ("pearson", "spearman", "kendall")
# Fidelity x generalization pairs the report correlates, when the table holds both.
CORRELATION_PAIRS: tuple[tuple[str, str], ...] = (
    ("test_agreement", "test_acc"),
    ("test_agreement", "test_nll"),
    ("test_agreement", "test_ece"),
    ("test_kl", "test_acc"),
    ("test_kl", "test_nll"),
    ("test_kl", "test_ece"),
)
# Metrics in the printed summary, in this order, when present.
SUMMARY_METRICS: tuple[str, ...] = ("test_acc", "test_agreement", "test_kl", "train_agreement")
BAR_METRICS: tuple[str, ...] = ("test_acc", "test_agreement", "train_agreement", "aug_train_agreement")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
PathLike = str | os.PathLike[str]


def study_dirs(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """Resolve study directories from paths, ``trials.parquet`` files or glob patterns.

    An explicit path must hold a ``trials.parquet``; a glob keeps the matches that do (so
    ``results/*`` can skip a teacher store beside the studies) and must match at least one.
    Raises FileNotFoundError naming the offending path.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise FileNotFoundError("no study paths given")
    found: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if any(ch in text for ch in "*?["):
            matches = [_as_study_dir(Path(m)) for m in sorted(glob.glob(text))]
            studies = [m for m in matches if (m / TRIALS_FILE).is_file()]
            if not studies:
                raise FileNotFoundError(f"{text}: no study directory with a {TRIALS_FILE} matches")
            found.extend(studies)
        else:
            path = _as_study_dir(Path(text))
            if not (path / TRIALS_FILE).is_file():
                raise FileNotFoundError(
                    f"{text}: no {TRIALS_FILE} here (expected a study directory <storage>/<study>/)"
                )
            found.append(path)
    unique: list[Path] = []
    for path in found:
        if path.resolve() not in {p.resolve() for p in unique}:
            unique.append(path)
    return unique


def _as_study_dir(path: Path) -> Path:
    return path.parent if path.name in (TRIALS_FILE, EPOCHS_FILE) and path.is_file() else path


def load_trials(paths: PathLike | Iterable[PathLike]) -> pd.DataFrame:
    """Read ``trials.parquet`` of one or many studies into one DataFrame with proper dtypes.

    Every row is kept; ``usable`` and ``excluded_reason`` flag failed trials (see flag_usable).
    Metric columns the tables lack are added as all-null float64 so that callers can rely on them.
    """
    frames = []
    for directory in study_dirs(paths):
        frame = pq.read_table(directory / TRIALS_FILE).to_pandas()
        if "study" not in frame.columns:
            frame.insert(0, "study", directory.name)
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    df = _coerce_dtypes(df)
    for metric in METRICS:
        if metric not in df.columns:
            df[metric] = np.nan
    return flag_usable(df)


def load_epochs(paths: PathLike | Iterable[PathLike]) -> pd.DataFrame:
    """Read ``epochs.parquet`` of one or many studies, flagged with the trial's status and usable.

    Studies without an epochs table contribute nothing; the result may be empty.
    """
    directories = study_dirs(paths)
    frames = []
    for directory in directories:
        if not (directory / EPOCHS_FILE).is_file():
            continue
        frame = pq.read_table(directory / EPOCHS_FILE).to_pandas()
        if "study" not in frame.columns:
            frame.insert(0, "study", directory.name)
        frames.append(frame)
    if not frames:
        empty = pd.DataFrame(
            {c: pd.Series(dtype="string") for c in ("study", "trial_id")}
            | {"epoch": pd.Series(dtype="Int64")}
            | {c: pd.Series(dtype="float64") for c in ("lr", "train_loss", *METRICS)}
            | {"status": pd.Series(dtype="string"), "usable": pd.Series(dtype=bool)}
        )
        return empty
    epochs = _coerce_dtypes(pd.concat(frames, ignore_index=True))
    for metric in METRICS:
        if metric not in epochs.columns:
            epochs[metric] = np.nan
    trials = load_trials(directories)[["study", "trial_id", "status", "usable"]]
    epochs = epochs.drop(columns=[c for c in ("status", "usable") if c in epochs.columns])
    epochs = epochs.merge(trials, on=["study", "trial_id"], how="left")
    # An epoch row whose trial is missing from trials.parquet cannot be attributed to an arm.
    epochs["usable"] = epochs["usable"].fillna(False).astype(bool)
    return epochs


def _coerce_dtypes(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for column in df.columns:
        if column in FLOAT_COLUMNS:
            df[column] = pd.to_numeric(df[column], errors="coerce").astype("float64")
        elif column in INT_COLUMNS:
            values = pd.to_numeric(df[column], errors="coerce")
            finite = values.dropna()
            # Nullable Int64 keeps 3 as "3" after a concat introduced nulls; non-integers stay float.
            if (finite == np.round(finite)).all():
                df[column] = values.astype("Int64")
            else:
                df[column] = values.astype("float64")
        elif column in BOOL_COLUMNS:
            df[column] = df[column].astype("boolean")
        elif column in STRING_COLUMNS:
            df[column] = df[column].astype("string")
    return df


def flag_usable(df: pd.DataFrame) -> pd.DataFrame:
    """Return a copy with ``usable`` (bool) and ``excluded_reason`` (status, NONFINITE or null).

    A trial is usable when its status is TERMINATED, none of its metrics is infinite, and its
    test_acc and test_agreement are present (where the table records those metrics at all).
    """
    df = df.copy()
    status = df["status"].astype("string") if "status" in df.columns else pd.Series("", index=df.index)
    terminated = (status == USABLE_STATUS).fillna(False).to_numpy(dtype=bool)
    finite = np.ones(len(df), dtype=bool)
    for metric in METRICS:
        if metric not in df.columns:
            continue
        values = _as_float(df[metric])
        finite &= ~np.isinf(values)
        if metric in ("test_acc", "test_agreement") and not np.isnan(values).all():
            finite &= ~np.isnan(values)
    df["usable"] = terminated & finite
    reason = status.fillna("UNKNOWN").where(~terminated, NONFINITE)
    df["excluded_reason"] = reason.where(~df["usable"], pd.NA).astype("string")
    return df


def _ensure_flags(df: pd.DataFrame) -> pd.DataFrame:
    return df if {"usable", "excluded_reason"} <= set(df.columns) else flag_usable(df)


def _exclusion_counts(df: pd.DataFrame) -> str:
    """'DIVERGED: 1, ERROR: 2' for the unusable rows, statuses in their usual order; '' if none."""
    excluded = df.loc[~df["usable"], "excluded_reason"].fillna("UNKNOWN")
    counts = excluded.value_counts()
    order = [s for s in (*STATUSES, NONFINITE) if s in counts.index]
    order += sorted(s for s in counts.index if s not in order)
    return ", ".join(f"{reason}: {counts[reason]}" for reason in order)


def _exclusion_message(df: pd.DataFrame) -> str | None:
    n_excluded = int((~df["usable"]).sum())
    if n_excluded == 0:
        return None
    noun = "trial" if n_excluded == 1 else "trials"
    return f"excluded {n_excluded} {noun} ({_exclusion_counts(df)}); pass include_failed=True to keep them"


def _usable_rows(df: pd.DataFrame, include_failed: bool, verbose: bool) -> pd.DataFrame:
    df = _ensure_flags(df)
    if include_failed:
        return df
    message = _exclusion_message(df)
    if message and verbose:
        print(message)
    return df[df["usable"]]


# --------------------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------------------
def _config_columns(df: pd.DataFrame) -> list[str]:
    names = list(CONFIG_COLUMNS)
    # Fields added to TrialConfig after this module was written still appear in config_json.
    if "config_json" in df.columns:
        first = df["config_json"].dropna()
        if not first.empty:
            try:
                names += [k for k in json.loads(str(first.iloc[0])) if k not in names]
            except (json.JSONDecodeError, TypeError):
                pass
    return [c for c in df.columns if c in names]


def arm_columns(df: pd.DataFrame) -> list[str]:
    """The study's factors: config columns that take more than one value in the table.

    NON_ARM_COLUMNS (replicate seeds, device, compile, control, eval_every) are never factors, nor
    is a searched dimension (see _is_search_dim). With several studies in the table ``study`` comes
    first, since trials of different studies are different experiments.
    """
    columns = []
    if "study" in df.columns and df["study"].nunique(dropna=False) > 1:
        columns.append("study")
    for column in _config_columns(df):
        if column in NON_ARM_COLUMNS:
            continue
        if df[column].nunique(dropna=False) > 1 and not _is_search_dim(df, column):
            columns.append(column)
    return columns


def _is_search_dim(df: pd.DataFrame, column: str) -> bool:
    """A float column with at least SEARCH_DIM_MIN_LEVELS distinct values, more than half the
    number of trials: sampled by a search (Optuna), so grouping by it would give arms of one."""
    levels = df[column].nunique(dropna=False)
    is_float = pd.api.types.is_float_dtype(df[column].dtype)
    return is_float and levels >= SEARCH_DIM_MIN_LEVELS and levels > len(df) / 2


def _search_dims(df: pd.DataFrame) -> list[str]:
    return [c for c in _config_columns(df) if _is_search_dim(df, c)]


def _resolve_by(df: pd.DataFrame, by: str | Sequence[str] | None) -> list[str]:
    if by is None:
        return arm_columns(df)
    columns = [by] if isinstance(by, str) else list(by)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        available = ", ".join(arm_columns(df)) or "none vary"
        raise ValueError(f"unknown column(s) for by: {', '.join(missing)} (factors here: {available})")
    return columns


def _levels(series: pd.Series) -> list[Any]:
    """Distinct non-null values: numbers and booleans sorted, names in order of first appearance."""
    values = series.dropna().drop_duplicates()
    if pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
        values = values.sort_values()
    return values.tolist()


def _arms(df: pd.DataFrame, by: Sequence[str]) -> list[tuple[tuple[Any, ...], pd.DataFrame]]:
    """Split df into arms, one per combination of the by columns present, in level order.

    Null is a level of its own, placed last; its key value is None.
    """
    if not by:
        return [((), df)]
    if df.empty:
        return []
    levels = {c: _levels(df[c]) for c in by}
    codes = []
    for column in by:
        code = pd.Categorical(df[column], categories=levels[column]).codes.astype(np.int64)
        code[code < 0] = len(levels[column])
        codes.append(code)
    unique, inverse = np.unique(np.column_stack(codes), axis=0, return_inverse=True)
    inverse = inverse.ravel()
    arms = []
    for group, row in enumerate(unique):
        key = tuple(
            levels[c][int(code)] if code < len(levels[c]) else None for c, code in zip(by, row)
        )
        arms.append((key, df.iloc[np.flatnonzero(inverse == group)]))
    return arms


def _fmt_level(value: Any) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "NA"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _arm_label(by: Sequence[str], key: Sequence[Any]) -> str:
    if not by:
        return "all trials"
    if len(by) == 1:
        return _fmt_level(key[0])
    return ", ".join(f"{c}={_fmt_level(v)}" for c, v in zip(by, key))


def _with_key_dtypes(out: pd.DataFrame, source: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    # Rebuilt from Python scalars, an integer factor with a null level would come back as float.
    for column in by:
        if column in out.columns:
            try:
                out[column] = out[column].astype(source[column].dtype)
            except (TypeError, ValueError):
                pass
    return out


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------
def _finite(values: pd.Series | np.ndarray) -> np.ndarray:
    array = _as_float(pd.Series(values))
    return array[np.isfinite(array)]


def _as_float(values: pd.Series | pd.DataFrame) -> np.ndarray:
    """A float array with NaN for nulls, from any numeric or nullable (Int64, boolean) column(s)."""
    if isinstance(values, pd.DataFrame):
        values = values.apply(pd.to_numeric, errors="coerce")
    else:
        values = pd.to_numeric(values, errors="coerce")
    return values.to_numpy(dtype=float, na_value=np.nan)


def mean_ci(values: pd.Series | np.ndarray, level: float = 0.95) -> tuple[int, float, float, float, float]:
    """n, mean, sd (ddof 1), and the t-distribution confidence interval of the mean.

    Non-finite values are left out. sd and the interval are NaN for fewer than two values.
    """
    array = _finite(values)
    n = int(array.size)
    if n == 0:
        return 0, math.nan, math.nan, math.nan, math.nan
    mean = float(array.mean())
    if n == 1:
        return 1, mean, math.nan, math.nan, math.nan
    sd = float(array.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, df=n - 1)) * sd / math.sqrt(n)
    return n, mean, sd, mean - half, mean + half


def present_metrics(df: pd.DataFrame) -> list[str]:
    """The metric columns (in METRICS order) that hold at least one finite value."""
    return [m for m in METRICS if m in df.columns and _finite(df[m]).size > 0]


def _has_values(df: pd.DataFrame, *columns: str) -> bool:
    return all(c in df.columns and _finite(df[c]).size > 0 for c in columns)


def summarize(
    df: pd.DataFrame,
    by: str | Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    include_failed: bool = False,
    verbose: bool = True,
) -> pd.DataFrame:
    """Per arm and metric: n, mean, sd and the 95% t confidence interval of the mean.

    One row per (arm, metric) with columns ``*by, metric, n, mean, sd, ci_low, ci_high, n_trials,
    n_excluded``. ``by`` defaults to arm_columns(df). Unusable trials are left out (and counted in
    ``n_excluded``) unless include_failed; missing or non-finite metric values are skipped, so ``n``
    counts the values behind each mean while ``n_trials`` counts the arm's trials. ``metrics``
    defaults to the metric columns holding any value; any numeric column may be named.
    """
    df = _ensure_flags(df)
    by = _resolve_by(df, by)
    kept_all = _usable_rows(df, include_failed, verbose)
    if metrics is None:
        metrics = present_metrics(kept_all)
    else:
        missing = [m for m in metrics if m not in df.columns]
        if missing:
            raise ValueError(f"unknown metric column(s): {', '.join(missing)}")
    rows = []
    for key, arm in _arms(df, by):
        kept = arm if include_failed else arm[arm["usable"]]
        for metric in metrics:
            n, mean, sd, low, high = mean_ci(kept[metric])
            rows.append(
                dict(zip(by, key))
                | {
                    "metric": metric,
                    "n": n,
                    "mean": mean,
                    "sd": sd,
                    "ci_low": low,
                    "ci_high": high,
                    "n_trials": len(kept),
                    "n_excluded": len(arm) - len(kept),
                }
            )
    columns = [*by, "metric", "n", "mean", "sd", "ci_low", "ci_high", "n_trials", "n_excluded"]
    out = pd.DataFrame(rows, columns=columns)
    return _with_key_dtypes(out, df, by)


def _fmt_metric(metric: str, value: float, digits: int | None = None) -> str:
    if value is None or not np.isfinite(value):
        return "–" if value is None or np.isnan(value) else str(value)
    if metric in FRACTION_METRICS:
        return f"{100 * value:.{2 if digits is None else digits}f}"
    return f"{value:.{3 if digits is None else digits}f}"


def _metric_header(metric: str) -> str:
    return f"{metric} (%)" if metric in FRACTION_METRICS else metric


def _summary_rows(
    summary: pd.DataFrame, by: Sequence[str], metrics: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    """Arms as rows, 'mean ± sd' per metric, the arm's trial count, and its exclusions if any."""
    show_excluded = bool(summary["n_excluded"].sum() > 0) if not summary.empty else False
    header = [*by, "n", *([] if not show_excluded else ["excluded"]), *map(_metric_header, metrics)]
    rows: list[list[str]] = []
    if summary.empty:
        return header, rows
    keyed = summary.groupby(list(by), dropna=False, sort=False) if by else [((), summary)]
    for _, arm in keyed:
        first = arm.iloc[0]
        cells = [_fmt_level(first[c]) for c in by] + [str(int(first["n_trials"]))]
        if show_excluded:
            cells.append(str(int(first["n_excluded"])))
        for metric in metrics:
            row = arm[arm["metric"] == metric]
            if row.empty or row.iloc[0]["n"] == 0:
                cells.append("–")
                continue
            mean, sd = float(row.iloc[0]["mean"]), float(row.iloc[0]["sd"])
            text = _fmt_metric(metric, mean)
            if np.isfinite(sd):
                text += f" ± {_fmt_metric(metric, sd)}"
            cells.append(text)
        rows.append(cells)
    return header, rows


def format_summary(
    df: pd.DataFrame,
    by: str | Sequence[str] | None = None,
    include_failed: bool = False,
    verbose: bool = True,
) -> str:
    """Plain-text table, one row per arm: n and mean ± sd of test_acc, test_agreement, test_kl,
    train_agreement (those present; fractions as percentages)."""
    df = _ensure_flags(df)
    by = _resolve_by(df, by)
    kept = _usable_rows(df, include_failed, verbose=False)
    metrics = [m for m in SUMMARY_METRICS if m in df.columns and _finite(kept[m]).size > 0]
    summary = summarize(df, by=by, metrics=metrics, include_failed=include_failed, verbose=verbose)
    header, rows = _summary_rows(summary, by, metrics)
    if not rows:
        return f"no usable trials among {len(df)}"
    return _text_table(header, rows)


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Correlations
# --------------------------------------------------------------------------------------------------
def _point_estimate(method: str, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    # Constant input gives NaN with a warning; NaN is the answer we want, the warning is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "pearson":
            result = stats.pearsonr(x, y)
        elif method == "spearman":
            result = stats.spearmanr(x, y)
        elif method == "kendall":
            result = stats.kendalltau(x, y)
        else:
            raise ValueError(f"unknown correlation method {method!r}; use one of {CORRELATION_METHODS}")
    return float(result.statistic), float(result.pvalue)


def _rowwise_pearson(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    xc = xs - xs.mean(axis=1, keepdims=True)
    yc = ys - ys.mean(axis=1, keepdims=True)
    denominator = np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(axis=1) / denominator
    # A resample of one repeated value has no correlation; rounding in the mean would invent one.
    constant = (np.ptp(xs, axis=1) == 0) | (np.ptp(ys, axis=1) == 0)
    return np.where(constant, np.nan, r)


def _rowwise_kendall(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    # tau-b as scipy computes it: sum over pairs of sign(dx)·sign(dy) / sqrt(#untied-x · #untied-y).
    # Chunked so that the (rows, n, n) sign arrays stay small.
    n_rows, n = xs.shape
    out = np.empty(n_rows)
    chunk = max(1, 4_000_000 // max(1, n * n))
    for start in range(0, n_rows, chunk):
        x = xs[start : start + chunk]
        y = ys[start : start + chunk]
        sx = np.sign(x[:, :, None] - x[:, None, :])
        sy = np.sign(y[:, :, None] - y[:, None, :])
        numerator = (sx * sy).sum(axis=(1, 2))
        denominator = np.sqrt((sx * sx).sum(axis=(1, 2)) * (sy * sy).sum(axis=(1, 2)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + chunk] = np.where(denominator > 0, numerator / denominator, np.nan)
    return out


def _bootstrap(
    x: np.ndarray, y: np.ndarray, methods: Sequence[str], n_boot: int, seed: int, level: float
) -> dict[str, tuple[float, float]]:
    """Percentile CIs from resampling (x, y) pairs; one generator per call so that a group's
    interval depends only on its data and the seed, not on the other groups."""
    if n_boot <= 0:
        return {m: (math.nan, math.nan) for m in methods}
    rng = np.random.default_rng(seed)
    index = rng.integers(0, x.size, size=(n_boot, x.size))
    xs, ys = x[index], y[index]
    tail = 100 * (1 - level) / 2
    intervals = {}
    for method in methods:
        if method == "pearson":
            r = _rowwise_pearson(xs, ys)
        elif method == "spearman":
            r = _rowwise_pearson(stats.rankdata(xs, axis=1), stats.rankdata(ys, axis=1))
        else:
            r = _rowwise_kendall(xs, ys)
        r = r[np.isfinite(r)]
        if r.size == 0:
            intervals[method] = (math.nan, math.nan)
        else:
            low, high = np.percentile(r, [tail, 100 - tail])
            intervals[method] = (float(low), float(high))
    return intervals


def _correlate_group(
    frame: pd.DataFrame,
    x: str,
    y: str,
    methods: Sequence[str],
    n_boot: int,
    seed: int,
    level: float,
) -> list[dict[str, Any]]:
    values = _as_float(frame[[x, y]])
    values = values[np.isfinite(values).all(axis=1)]
    n = int(len(values))
    if n < 3:
        return [
            {"method": m, "r": math.nan, "p_value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": n}
            for m in methods
        ]
    xv, yv = values[:, 0], values[:, 1]
    intervals = _bootstrap(xv, yv, methods, n_boot, seed, level)
    rows = []
    for method in methods:
        r, p = _point_estimate(method, xv, yv)
        low, high = intervals[method]
        rows.append({"method": method, "r": r, "p_value": p, "ci_low": low, "ci_high": high, "n": n})
    return rows


def correlate(
    df: pd.DataFrame,
    x: str = "test_agreement",
    y: str = "test_acc",
    by: str | Sequence[str] | None = None,
    methods: Sequence[str] = CORRELATION_METHODS,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    include_failed: bool = False,
    verbose: bool = True,
) -> pd.DataFrame:
    """Pearson, Spearman and Kendall (tau-b) correlation of x with y, overall and within each arm.

    A factor that moves both metrics makes them correlate across its levels whatever their relation
    within a level; the ``within`` rows (one set per combination of the ``by`` columns) hold that
    factor fixed. Columns: ``*by, scope`` (overall | within), ``x, y, method, r, p_value, ci_low,
    ci_high, n``; the by columns are null on overall rows. r and p come from scipy.stats; the CI is the
    bootstrap percentile interval over ``n_boot`` resamples of (x, y) pairs from ``seed`` (NaN when
    n_boot is 0). Groups with fewer than 3 complete pairs give NaN with their n. Unlike summarize,
    ``by`` defaults to no grouping.
    """
    df = _ensure_flags(df)
    for column in (x, y):
        if column not in df.columns:
            raise ValueError(f"unknown column {column!r}")
    for method in methods:
        if method not in CORRELATION_METHODS:
            raise ValueError(f"unknown correlation method {method!r}; use one of {CORRELATION_METHODS}")
    by = [] if by is None else _resolve_by(df, by)
    kept = _usable_rows(df, include_failed, verbose)
    rows = []
    for result in _correlate_group(kept, x, y, methods, n_boot, seed, level):
        rows.append(dict.fromkeys(by) | {"scope": "overall", "x": x, "y": y} | result)
    if by:
        for key, arm in _arms(kept, by):
            for result in _correlate_group(arm, x, y, methods, n_boot, seed, level):
                rows.append(dict(zip(by, key)) | {"scope": "within", "x": x, "y": y} | result)
    columns = [*by, "scope", "x", "y", "method", "r", "p_value", "ci_low", "ci_high", "n"]
    out = pd.DataFrame(rows, columns=columns)
    out["n"] = out["n"].astype(int)
    return _with_key_dtypes(out, df, by)


# --------------------------------------------------------------------------------------------------
# Pareto front and the independent-student control
# --------------------------------------------------------------------------------------------------
def pareto_front(
    df: pd.DataFrame,
    maximize: Sequence[str] = ("test_agreement", "test_acc"),
    minimize: Sequence[str] = (),
    include_failed: bool = False,
    verbose: bool = True,
) -> pd.DataFrame:
    """The non-dominated trials for the given objectives (two or more, any mix of directions).

    A trial is dominated when another is at least as good on every objective and better on one;
    trials with a missing objective are left out; ties on every objective all stay. Rows keep their
    index and are sorted best-first on the first objective.
    """
    maximize, minimize = list(maximize), list(minimize)
    objectives = maximize + minimize
    if not objectives:
        raise ValueError("pareto_front needs at least one objective")
    missing = [c for c in objectives if c not in df.columns]
    if missing:
        raise ValueError(f"unknown objective column(s): {', '.join(missing)}")
    kept = _usable_rows(df, include_failed, verbose)
    # Minimized objectives are negated so that larger is better everywhere.
    values = _as_float(kept[objectives]).copy()
    values[:, len(maximize) :] *= -1
    complete = np.isfinite(values).all(axis=1)
    candidates, values = kept[complete], values[complete]
    dominated = np.zeros(len(values), dtype=bool)
    for i, point in enumerate(values):
        at_least = (values >= point).all(axis=1)
        better = (values > point).any(axis=1)
        dominated[i] = bool((at_least & better).any())
    front = candidates[~dominated]
    return front.sort_values(objectives[0], ascending=objectives[0] in minimize, kind="stable")


def _check_objectives(df: pd.DataFrame, objectives: dict[str, str] | None) -> None:
    if objectives is None:
        return
    if len(objectives) < 2:
        raise ValueError("a Pareto front needs at least two objectives")
    bad = {k: v for k, v in objectives.items() if v not in ("max", "min")}
    if bad:
        raise ValueError(f"objective directions must be 'max' or 'min', got {bad}")
    missing = [c for c in objectives if c not in df.columns]
    if missing:
        raise ValueError(f"unknown objective column(s): {', '.join(missing)}")


def _default_objectives(df: pd.DataFrame) -> dict[str, str] | None:
    # A searched study (continuous dimensions, or Optuna's own columns) is judged by its front.
    optuna_columns = [c for c in df.columns if c.startswith("optuna")]
    if (_search_dims(df) or optuna_columns) and _has_values(df, "test_agreement", "test_acc"):
        return {"test_agreement": "max", "test_acc": "max"}
    return None


def control_gap(df: pd.DataFrame, include_failed: bool = False, verbose: bool = True) -> pd.DataFrame:
    """Trials that ran the independent-student control, with ``control_gap`` =
    test_agreement − control_test_agreement: the agreement owed to knowledge transferred from the
    reference teacher rather than to what any student of that recipe would share with it.
    Empty when no trial ran the control."""
    kept = _usable_rows(df, include_failed, verbose)
    if "control_test_agreement" not in kept.columns:
        return kept.iloc[0:0].assign(control_gap=pd.Series(dtype="float64"))
    ran = kept[np.isfinite(_as_float(kept["control_test_agreement"]))]
    return ran.assign(control_gap=ran["test_agreement"] - ran["control_test_agreement"])


# --------------------------------------------------------------------------------------------------
# Command line: kd-ray analyze
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``kd-ray analyze PATH... [--by a,b] [--out DIR]``: write the report, print the summary."""
    parser = argparse.ArgumentParser(
        prog="kd-ray analyze",
        description="Summarize trial tables, correlate fidelity with generalization, draw the figures "
        "and write report.md next to the tables.",
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="study directories (<storage>/<study>/) or globs"
    )
    parser.add_argument(
        "--by",
        default=None,
        help="comma-separated factor columns defining the arms (default: the config columns that vary, "
        "seeds excluded; '' for one arm)",
    )
    parser.add_argument(
        "--out",
        default=None,
        type=Path,
        help="directory for report.md and figures/ (default: next to the tables)",
    )
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for correlation CIs")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = parser.parse_args(argv)
    by = None if args.by is None else [c.strip() for c in args.by.split(",") if c.strip()]
    try:
        directories = study_dirs(args.paths)
    except FileNotFoundError as error:
        print(f"kd-ray analyze: error: {error}", file=sys.stderr)
        return 2
    # Imported here, not at the top: kd_ray.report imports this module.
    from kd_ray.report import _build_report

    try:
        path, summary_text = _build_report(directories, by, args.out, None, args.n_boot, args.seed)
    except ValueError as error:
        print(f"kd-ray analyze: error: {error}", file=sys.stderr)
        return 2
    print(summary_text)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
