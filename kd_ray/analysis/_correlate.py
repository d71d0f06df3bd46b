"""Correlations of fidelity with generalization (Pearson, Spearman, Kendall's tau-b), overall and
within arms, with confidence intervals.

The estimates and p-values are scipy's. The intervals are percentile bootstrap intervals
(``scipy.stats.bootstrap``) for groups of up to BOOTSTRAP_MAX_N trials; larger groups take the Fisher
z interval, which at that size agrees with the bootstrap and costs nothing: for Pearson scipy's own
(standard error 1/sqrt(n − 3)), for Spearman with the standard error of Bonett & Wright (2000),
sqrt((1 + r²/2) / (n − 3)), for Kendall with that of Fieller, Hartley & Pearson (1957),
sqrt(0.437 / (n − 4)). A group costs O(n log n), and a bootstrapped one O(n_boot · n²) more, with n
at most BOOTSTRAP_MAX_N.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import special, stats

from kd_ray.analysis._arms import resolve_by, restore_key_dtypes, split_arms
from kd_ray.analysis._load import as_float, ensure_flags, usable_rows

CORRELATION_METHODS: tuple[str, ...] = ("pearson", "spearman", "kendall")
# Largest group whose interval is bootstrapped; one resample of n trials costs O(n²) for Kendall.
BOOTSTRAP_MAX_N = 200


def _check_method(method: str) -> None:
    if method not in CORRELATION_METHODS:
        raise ValueError(f"unknown correlation method {method!r}; use one of {CORRELATION_METHODS}")


def _point_estimate(method: str, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    # Constant input gives NaN with a warning; NaN is the answer we want, the warning is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "pearson":
            result = stats.pearsonr(x, y)
        elif method == "spearman":
            result = stats.spearmanr(x, y)
        else:
            result = stats.kendalltau(x, y)
    return float(result.statistic), float(result.pvalue)


# --------------------------------------------------------------------------------------------------
# Resamples
# --------------------------------------------------------------------------------------------------
# A bootstrap resample takes original point i c_i times, so all three statistics of a resample follow
# from its counts c and sums over the n original points: no resample is sorted, and the counts and
# ranks are integers (or halves), so the sums are exact and each statistic equals scipy's on the
# resample itself up to the final division. Pearson: weighted moments, one matrix product for all
# resamples. Spearman: the same on midranks, which come from cumulative counts in value order.
# Kendall's tau-b: with a_ij = sign(x_i − x_j)·sign(y_i − y_j), concordant minus discordant pairs are
# c·A·c / 2 (copies of one point tie on both sides), over untied-x and untied-y pair counts.
def resample_correlations(x: np.ndarray, y: np.ndarray, index: np.ndarray, method: str) -> np.ndarray:
    """The correlation of each resample ``(x[index[b]], y[index[b]])``: one value per row of ``index``
    (one in all for a 1-d ``index``), equal to scipy.stats' on the resample; NaN where x or y is
    constant in it. Kendall's costs O(len(x)²) memory and time per resample."""
    _check_method(method)
    return _Resamples(np.asarray(x, dtype=float), np.asarray(y, dtype=float), np.asarray(index)).correlation(method)


class _Resamples:
    def __init__(self, x: np.ndarray, y: np.ndarray, index: np.ndarray) -> None:
        self.x, self.y, self.shape = x, y, index.shape[:-1]
        rows = index.reshape(-1, index.shape[-1])
        self.size = rows.shape[1]
        flat = (rows + x.size * np.arange(len(rows))[:, None]).ravel()
        self.counts = np.bincount(flat, minlength=len(rows) * x.size).reshape(len(rows), x.size).astype(float)
        self.x_groups, self.y_groups = _ValueGroups(x, self.counts), _ValueGroups(y, self.counts)

    def correlation(self, method: str) -> np.ndarray:
        if method == "pearson":
            # Centred on the sample's means, so that the moments do not cancel for a narrow range.
            r = self._weighted_pearson(self.x - self.x.mean(), self.y - self.y.mean())
        elif method == "spearman":
            r = self._weighted_pearson(self.x_groups.midranks(self.size), self.y_groups.midranks(self.size))
        else:
            signs = np.sign(self.x[:, None] - self.x[None, :]) * np.sign(self.y[:, None] - self.y[None, :])
            concordance = ((self.counts @ signs) * self.counts).sum(axis=1) / 2
            untied = self.x_groups.untied_pairs(self.size) * self.y_groups.untied_pairs(self.size)
            with np.errstate(invalid="ignore", divide="ignore"):
                r = concordance / np.sqrt(untied)
        constant = self.x_groups.constant(self.size) | self.y_groups.constant(self.size)
        return np.where(constant, np.nan, r).reshape(self.shape)

    def _weighted_pearson(self, xv: np.ndarray, yv: np.ndarray) -> np.ndarray:
        # xv, yv: per original point (n,) or per resample and point (rows, n).
        c, size = self.counts, self.size
        sx, sy = (c * xv).sum(axis=1), (c * yv).sum(axis=1)
        sxx, syy, sxy = (c * xv * xv).sum(axis=1), (c * yv * yv).sum(axis=1), (c * xv * yv).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (sxy - sx * sy / size) / np.sqrt((sxx - sx * sx / size) * (syy - sy * sy / size))


class _ValueGroups:
    """The resamples' counts summed over each set of equal values, in value order."""

    def __init__(self, values: np.ndarray, counts: np.ndarray) -> None:
        _, self.group = np.unique(values, return_inverse=True)
        order = np.argsort(self.group, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(self.group[order]) != 0])
        self.counts = np.add.reduceat(counts[:, order], starts, axis=1)  # (rows, distinct values)

    def constant(self, size: int) -> np.ndarray:
        return self.counts.max(axis=1) == size

    def untied_pairs(self, size: int) -> np.ndarray:
        return (size * size - (self.counts * self.counts).sum(axis=1)) / 2

    def midranks(self, size: int) -> np.ndarray:
        # 1-based average ranks as scipy.stats.rankdata gives them, less their mean (size + 1) / 2.
        before = np.cumsum(self.counts, axis=1) - self.counts
        return (before + (self.counts + 1) / 2 - (size + 1) / 2)[:, self.group]


# --------------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------------
def _bootstrap_intervals(
    x: np.ndarray, y: np.ndarray, methods: Sequence[str], n_boot: int, seed: int, level: float
) -> dict[str, tuple[float, float]]:
    """Percentile intervals over n_boot resamples of the (x, y) pairs, from a generator of its own so
    that a group's interval depends only on its data and the seed. Resamples with a constant side
    have no correlation and are left out of the percentiles."""

    def statistic(index: np.ndarray, axis: int = -1) -> np.ndarray:
        resamples = _Resamples(x, y, index)
        return np.stack([resamples.correlation(method) for method in methods])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns of the degenerate resamples left out below
        result = stats.bootstrap(
            (np.arange(x.size),), statistic, n_resamples=n_boot, vectorized=True, confidence_level=level,
            method="percentile", rng=np.random.default_rng(seed),
        )
    tail = 100 * (1 - level) / 2
    intervals = {}
    for method, values in zip(methods, np.atleast_2d(result.bootstrap_distribution)):
        values = values[np.isfinite(values)]
        if values.size == 0:
            intervals[method] = (math.nan, math.nan)
        else:
            low, high = np.percentile(values, [tail, 100 - tail])
            intervals[method] = (float(low), float(high))
    return intervals


def _fisher_interval(method: str, x: np.ndarray, y: np.ndarray, r: float, level: float) -> tuple[float, float]:
    n = x.size
    if method == "pearson":
        interval = stats.pearsonr(x, y).confidence_interval(confidence_level=level)
        return float(interval.low), float(interval.high)
    if method == "spearman":
        se = math.sqrt((1 + r * r / 2) / (n - 3))
    else:
        se = math.sqrt(0.437 / (n - 4))
    with np.errstate(divide="ignore"):
        z = np.arctanh(r)
    half = float(special.ndtri(0.5 + level / 2)) * se
    return float(np.tanh(z - half)), float(np.tanh(z + half))


def _correlate_group(
    frame: pd.DataFrame,
    x: str,
    y: str,
    methods: Sequence[str],
    n_boot: int,
    seed: int,
    level: float,
) -> list[dict[str, Any]]:
    values = as_float(frame[[x, y]])
    values = values[np.isfinite(values).all(axis=1)]
    n = len(values)
    if n < 3:
        return [
            {"method": m, "r": math.nan, "p_value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": n}
            for m in methods
        ]
    xv, yv = values[:, 0], values[:, 1]
    estimates = {method: _point_estimate(method, xv, yv) for method in methods}
    if n_boot <= 0:
        intervals = {m: (math.nan, math.nan) for m in methods}
    elif n <= BOOTSTRAP_MAX_N:
        intervals = _bootstrap_intervals(xv, yv, methods, n_boot, seed, level)
    else:
        intervals = {m: _fisher_interval(m, xv, yv, estimates[m][0], level) for m in methods}
    rows = []
    for method in methods:
        r, p = estimates[method]
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
    ci_high, n``; the by columns are null on overall rows. r and p come from scipy.stats. The CI is the
    bootstrap percentile interval over ``n_boot`` resamples of (x, y) pairs from ``seed`` for a group
    of up to BOOTSTRAP_MAX_N pairs, and the Fisher z interval for a larger one (see the module); NaN
    when n_boot is 0. Groups with fewer than 3 complete pairs give NaN with their n. Unlike summarize,
    ``by`` defaults to no grouping.
    """
    df = ensure_flags(df)
    for column in (x, y):
        if column not in df.columns:
            raise ValueError(f"unknown column {column!r}")
    for method in methods:
        _check_method(method)
    by = [] if by is None else resolve_by(df, by)
    kept = usable_rows(df, include_failed, verbose)
    rows = []
    for result in _correlate_group(kept, x, y, methods, n_boot, seed, level):
        rows.append(dict.fromkeys(by) | {"scope": "overall", "x": x, "y": y} | result)
    if by:
        for key, arm in split_arms(kept, by):
            for result in _correlate_group(arm, x, y, methods, n_boot, seed, level):
                rows.append(dict(zip(by, key)) | {"scope": "within", "x": x, "y": y} | result)
    columns = [*by, "scope", "x", "y", "method", "r", "p_value", "ci_low", "ci_high", "n"]
    out = pd.DataFrame(rows, columns=columns)
    out["n"] = out["n"].astype(int)
    return restore_key_dtypes(out, df, by)
