"""Statistics over the usable trials: per-arm summaries with t intervals, Pareto fronts and the
independent-student control gap."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from kd_ray.analysis._arms import resolve_by, restore_key_dtypes, search_dims, split_arms
from kd_ray.analysis._columns import CONTROL_GAP
from kd_ray.analysis._load import as_float, ensure_flags, finite_values, has_values, usable_rows
from kd_ray.tables import FRACTION_METRICS, METRICS


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------
def mean_ci(
    values: pd.Series | np.ndarray, level: float = 0.95, bounds: tuple[float, float] | None = None
) -> tuple[int, float, float, float, float]:
    """n, mean, sd (ddof 1), and the t-distribution confidence interval of the mean.

    Non-finite values are left out. sd and the interval are NaN for fewer than two values. With
    ``bounds`` (a fraction's are (0, 1)) the interval is cut to them: the mean cannot lie outside.
    """
    array = finite_values(values)
    n = int(array.size)
    if n == 0:
        return 0, math.nan, math.nan, math.nan, math.nan
    mean = float(array.mean())
    if n == 1:
        return 1, mean, math.nan, math.nan, math.nan
    sd = float(array.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, df=n - 1)) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return n, mean, sd, low, high


def present_metrics(df: pd.DataFrame) -> list[str]:
    """The metric columns (in METRICS order) that hold at least one finite value."""
    return [m for m in METRICS if has_values(df, m)]


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
    df = ensure_flags(df)
    by = resolve_by(df, by)
    kept_all = usable_rows(df, include_failed, verbose)
    if metrics is None:
        metrics = present_metrics(kept_all)
    else:
        missing = [m for m in metrics if m not in df.columns]
        if missing:
            raise ValueError(f"unknown metric column(s): {', '.join(missing)}")
    rows = []
    for key, arm in split_arms(df, by):
        kept = arm if include_failed else arm[arm["usable"]]
        for metric in metrics:
            n, mean, sd, low, high = mean_ci(kept[metric], bounds=(0.0, 1.0) if metric in FRACTION_METRICS else None)
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
    return restore_key_dtypes(out, df, by)


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
    kept = usable_rows(df, include_failed, verbose)
    # Minimized objectives are negated so that larger is better everywhere.
    values = as_float(kept[objectives]).copy()
    values[:, len(maximize) :] *= -1
    complete = np.isfinite(values).all(axis=1)
    candidates, values = kept[complete], values[complete]
    front = candidates[_non_dominated(values)]
    return front.sort_values(objectives[0], ascending=objectives[0] in minimize, kind="stable")


def _non_dominated(values: np.ndarray) -> np.ndarray:
    """Mask of the rows no other row dominates (larger is better in every column).

    A row's dominators come before it in descending lexicographic order, and a dominated dominator
    is itself dominated by a row of the front, so each row is checked against the front found so
    far: O(rows · front) rather than O(rows²).
    """
    order = np.lexsort(tuple(-values[:, j] for j in reversed(range(values.shape[1]))))
    on_front = np.zeros(len(values), dtype=bool)
    front = np.empty((0, values.shape[1]))
    for i in order:
        point = values[i]
        if not ((front >= point).all(axis=1) & (front > point).any(axis=1)).any():
            on_front[i] = True
            front = np.vstack([front, point])
    return on_front


def check_objectives(df: pd.DataFrame, objectives: dict[str, str] | None) -> None:
    """Raise ValueError unless objectives is None or names two or more columns of df, each 'max' or 'min'."""
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


def default_objectives(df: pd.DataFrame) -> dict[str, str] | None:
    """test_agreement and test_acc, both maximized, for a searched study; None for a grid."""
    # A searched study (continuous dimensions, or Optuna's own columns) is judged by its front.
    optuna_columns = [c for c in df.columns if c.startswith("optuna")]
    if (search_dims(df) or optuna_columns) and has_values(df, "test_agreement", "test_acc"):
        return {"test_agreement": "max", "test_acc": "max"}
    return None


def control_gap(df: pd.DataFrame, include_failed: bool = False, verbose: bool = True) -> pd.DataFrame:
    """Trials that ran the independent-student control, with ``control_gap`` =
    test_agreement − control_test_agreement: the agreement owed to knowledge transferred from the
    reference teacher rather than to what any student of that recipe would share with it.
    Empty when no trial ran the control."""
    kept = usable_rows(df, include_failed, verbose)
    if "control_test_agreement" not in kept.columns:
        return kept.iloc[0:0].assign(**{CONTROL_GAP: pd.Series(dtype="float64")})
    ran = kept[np.isfinite(as_float(kept["control_test_agreement"]))]
    return ran.assign(**{CONTROL_GAP: ran["test_agreement"] - ran["control_test_agreement"]})
