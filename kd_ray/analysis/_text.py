"""Tables as text: metric values formatted for people, the plain-text summary printed after a study,
and the Markdown tables of the report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from kd_ray.analysis._arms import fmt_level, resolve_by
from kd_ray.analysis._columns import FRACTION_METRICS
from kd_ray.analysis._load import ensure_flags, has_values, usable_rows
from kd_ray.analysis._stats import summarize

# Metrics in the printed summary, in this order, when present.
SUMMARY_METRICS: tuple[str, ...] = ("test_acc", "test_agreement", "test_kl", "train_agreement")


def fmt_metric(metric: str, value: float, digits: int | None = None) -> str:
    """Fractions as percentages (2 decimals), the rest with 3 decimals; '–' for a missing value."""
    if value is None or not np.isfinite(value):
        return "–" if value is None or np.isnan(value) else str(value)
    if metric in FRACTION_METRICS:
        return f"{100 * value:.{2 if digits is None else digits}f}"
    return f"{value:.{3 if digits is None else digits}f}"


def metric_header(metric: str) -> str:
    return f"{metric} (%)" if metric in FRACTION_METRICS else metric


def summary_rows(
    summary: pd.DataFrame, by: Sequence[str], metrics: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    """Arms as rows, 'mean ± sd' per metric, the arm's trial count, and its exclusions if any."""
    show_excluded = bool(summary["n_excluded"].sum() > 0) if not summary.empty else False
    header = [*by, "n", *([] if not show_excluded else ["excluded"]), *map(metric_header, metrics)]
    rows: list[list[str]] = []
    if summary.empty:
        return header, rows
    keyed = summary.groupby(list(by), dropna=False, sort=False) if by else [((), summary)]
    for _, arm in keyed:
        first = arm.iloc[0]
        cells = [fmt_level(first[c]) for c in by] + [str(int(first["n_trials"]))]
        if show_excluded:
            cells.append(str(int(first["n_excluded"])))
        for metric in metrics:
            row = arm[arm["metric"] == metric]
            if row.empty or row.iloc[0]["n"] == 0:
                cells.append("–")
                continue
            mean, sd = float(row.iloc[0]["mean"]), float(row.iloc[0]["sd"])
            text = fmt_metric(metric, mean)
            if np.isfinite(sd):
                text += f" ± {fmt_metric(metric, sd)}"
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
    df = ensure_flags(df)
    by = resolve_by(df, by)
    kept = usable_rows(df, include_failed, verbose=False)
    metrics = [m for m in SUMMARY_METRICS if has_values(kept, m)]
    summary = summarize(df, by=by, metrics=metrics, include_failed=include_failed, verbose=verbose)
    header, rows = summary_rows(summary, by, metrics)
    if not rows:
        return f"no usable trials among {len(df)}"
    return text_table(header, rows)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def escape(cell: Any) -> str:
        return str(cell).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(escape(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
