"""The Markdown report of one or several studies, written by ``report`` with summary.csv,
correlations.csv and the figures."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kd_ray.analysis._arms import arm_label, fmt_level, resolve_by, search_dims
from kd_ray.analysis._columns import CONTROL_GAP, FRACTION_METRICS, PROVENANCE_COLUMNS
from kd_ray.analysis._correlate import BOOTSTRAP_MAX_N, CORRELATION_METHODS, correlate
from kd_ray.analysis._figures import figures
from kd_ray.analysis._load import (
    PathLike,
    exclusion_counts,
    exclusion_message,
    finite_values,
    has_values,
    partial_studies,
    print_notes,
    read_epochs,
    read_trials,
    study_dirs,
)
from kd_ray.analysis._stats import check_objectives, control_gap, default_objectives, pareto_front, summarize
from kd_ray.analysis._text import SUMMARY_METRICS, fmt_metric, markdown_table, metric_header, summary_rows
from kd_ray.atomic import write_text
from kd_ray.tables import Completeness

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"

# Fidelity x generalization pairs the report correlates, when the table holds both.
CORRELATION_PAIRS: tuple[tuple[str, str], ...] = (
    ("test_agreement", "test_acc"),
    ("test_agreement", "test_nll"),
    ("test_agreement", "test_ece"),
    ("test_kl", "test_acc"),
    ("test_kl", "test_nll"),
    ("test_kl", "test_ece"),
)


def _default_out_dir(directories: Sequence[Path]) -> Path:
    # Next to the tables: the study directory itself, or the storage directory holding several.
    if len(directories) == 1:
        return directories[0]
    return Path(os.path.commonpath([str(d.resolve()) for d in directories]))


def _correlation_section(
    kept: pd.DataFrame, by: Sequence[str], n_boot: int, seed: int
) -> tuple[str, pd.DataFrame]:
    pairs = [(x, y) for x, y in CORRELATION_PAIRS if has_values(kept, x, y)]
    if not pairs:
        return "No fidelity–generalization pair has values.", pd.DataFrame()
    results = [
        correlate(kept, x, y, by=list(by) or None, n_boot=n_boot, seed=seed, include_failed=True)
        for x, y in pairs
    ]
    table = pd.concat(results, ignore_index=True)
    header = ["x", "y", "group", "n"]
    header += [f"{name} [95% CI] (p)" for name in ("Pearson r", "Spearman ρ", "Kendall τ")]
    rows = []
    group_columns = [*by, "scope", "x", "y"]
    for _, group in table.groupby(group_columns, dropna=False, sort=False):
        first = group.iloc[0]
        label = "overall" if first["scope"] == "overall" else arm_label(by, [first[c] for c in by])
        cells = [first["x"], first["y"], label, str(int(first["n"]))]
        for method in CORRELATION_METHODS:
            row = group[group["method"] == method].iloc[0]
            if not np.isfinite(row["r"]):
                cells.append("–")
            else:
                interval = f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
                cells.append(f"{row['r']:.2f} {interval} (p = {row['p_value']:.2g})")
        rows.append(cells)
    note = (
        "Overall rows pool every trial; within rows hold the arm fixed, so a factor that moves both "
        "metrics cannot pass for a correlation between them. CIs: bootstrap percentile intervals "
        f"({n_boot} resamples, seed {seed})"
    )
    if n_boot > 0 and (table["n"] > BOOTSTRAP_MAX_N).any():
        note += (
            f" for groups of up to {BOOTSTRAP_MAX_N} trials; larger groups: Fisher z intervals (standard "
            "error 1/√(n − 3) for Pearson, √((1 + r²/2)/(n − 3)) for Spearman after Bonett & Wright 2000, "
            "√(0.437/(n − 4)) for Kendall after Fieller, Hartley & Pearson 1957)"
        )
    note += "."
    return note + "\n\n" + markdown_table(header, rows), table


def _detail_rows(summary: pd.DataFrame, by: Sequence[str]) -> list[list[str]]:
    rows = []
    for _, row in summary.iterrows():
        if row["n"] == 0:
            continue
        metric = row["metric"]
        ci = "–"
        if np.isfinite(row["ci_low"]):
            ci = f"[{fmt_metric(metric, row['ci_low'])}, {fmt_metric(metric, row['ci_high'])}]"
        digits = 3 if metric in FRACTION_METRICS else 4
        mean, sd = fmt_metric(metric, row["mean"], digits), fmt_metric(metric, row["sd"], digits)
        cells = [metric_header(metric), str(int(row["n"])), mean, sd, ci]
        rows.append([fmt_level(row[c]) for c in by] + cells)
    return rows


def _provenance_section(df: pd.DataFrame) -> str:
    lines = []
    studies = df["study"].value_counts(sort=False) if "study" in df.columns else pd.Series(dtype=int)
    if len(studies):
        lines.append("Studies: " + ", ".join(f"`{s}` ({n} trials)" for s, n in studies.items()) + ".")
    columns = [c for c in PROVENANCE_COLUMNS if c in df.columns]
    if "device_name" not in columns and "device" in df.columns:
        columns.append("device")
    if columns:
        counts = df[columns].astype("string").fillna("–").value_counts(sort=False).reset_index()
        rows = [[str(v) for v in row.iloc[:-1]] + [str(row.iloc[-1])] for _, row in counts.iterrows()]
        lines.append(markdown_table([*columns, "trials"], rows))
    if "teacher_key" in df.columns:
        lines.append(f"Teacher ensembles: {df['teacher_key'].nunique()} distinct (`teacher_key`).")
    if has_values(df, "train_time_s"):
        total = float(finite_values(df["train_time_s"]).sum())
        lines.append(f"Student training time: {total / 3600:.2f} h over {len(df)} trials.")
    return "\n\n".join(lines) if lines else "The tables carry no provenance columns."


def _excluded_section(df: pd.DataFrame) -> str:
    failed = df[~df["usable"]]
    if failed.empty:
        return "None: every trial terminated with finite metrics."
    rows = []
    for _, row in failed.iterrows():
        error = row.get("error")
        text = "" if error is None or pd.isna(error) else str(error).strip()
        # A traceback ends with the exception itself; its first line says nothing.
        last_line = text.splitlines()[-1][:160] if text else ""
        rows.append([str(row.get("study", "")), str(row["trial_id"]), str(row["excluded_reason"]), last_line])
    return markdown_table(["study", "trial_id", "reason", "error"], rows)


def report(
    paths: PathLike | Iterable[PathLike],
    by: str | Sequence[str] | None = None,
    out_dir: PathLike | None = None,
    objectives: dict[str, str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> Path:
    """Write ``report.md``, ``figures/*.png``, ``summary.csv`` and ``correlations.csv`` for one or
    several studies and return the report's path.

    ``by`` defaults to arm_columns of the loaded trials; ``out_dir`` to the study directory (the
    common parent of several). The report holds the per-arm summary, correlations overall and within
    arms, the independent-student control where it ran, the Pareto front for a searched study (or the
    given ``objectives``), the figures, the excluded trials and the provenance of the trials.
    Prints how many trials the statistics leave out, if any, and on stderr what loading changed or
    doubts (copies of trials dropped, trials sharing an id kept, long text cells shortened), which the
    report says too.
    """
    # --- load and check the tables ---
    directories = study_dirs(paths)
    trials, trial_notes = read_trials(directories)
    epochs, epoch_notes = read_epochs(directories)
    notes = [*trial_notes, *epoch_notes]
    by = resolve_by(trials, by)
    check_objectives(trials, objectives)
    out = Path(out_dir) if out_dir is not None else _default_out_dir(directories)
    out.mkdir(parents=True, exist_ok=True)
    print_notes(notes)
    message = exclusion_message(trials)
    if message:
        print(message)
    partial = partial_studies(directories)
    _print_partial_studies(partial)
    kept = trials[trials["usable"]]

    # --- statistics and figures ---
    summary = summarize(trials, by=by, verbose=False)
    correlation_text, correlation_table = _correlation_section(kept, by, n_boot, seed)
    figure_paths = figures(trials, epochs, out / FIGURES_DIR, by=by, objectives=objectives)

    # --- the document, section by section ---
    parts = [
        *_heading_section(trials, kept, directories, notes, partial, by),
        *_summary_section(summary, kept, by),
        "## Fidelity vs generalization",
        correlation_text,
        *_control_section(kept, by),
        *_pareto_section(kept, by, objectives),
        *_figures_section(figure_paths, out),
        "## Excluded trials",
        _excluded_section(trials),
        "## Provenance",
        _provenance_section(trials),
    ]

    # --- write ---
    report_path = out / REPORT_FILE
    write_text(report_path, "\n\n".join(parts) + "\n")
    write_text(out / "summary.csv", summary.to_csv(index=False))
    if not correlation_table.empty:
        write_text(out / "correlations.csv", correlation_table.to_csv(index=False))
    return report_path


def _print_partial_studies(partial: Sequence[tuple[Path, Completeness]]) -> None:
    for directory, completeness in partial:
        print(f"partial study {directory}: {completeness.finished} of {completeness.expected} trials in "
              "(still running, or interrupted)", file=sys.stderr)


def _heading_section(
    trials: pd.DataFrame,
    kept: pd.DataFrame,
    directories: Sequence[Path],
    notes: Sequence[str],
    partial: Sequence[tuple[Path, Completeness]],
    by: Sequence[str],
) -> list[str]:
    """The title, what was loaded and left out, and what the arms vary."""
    names = ", ".join(f"`{s}`" for s in trials["study"].drop_duplicates())
    n_excluded = len(trials) - len(kept)
    replicates = [c for c in ("seed",) if c in trials.columns and trials[c].nunique() > 1]
    searched = search_dims(trials)
    return [
        f"# kd_ray report: {names}",
        f"{len(trials)} trials loaded from {', '.join(f'`{d}`' for d in directories)}; "
        f"{len(kept)} usable, {n_excluded} excluded from the statistics"
        + (f" ({exclusion_counts(trials)})." if n_excluded else "."),
        *[f"**Loading note**: {note}." for note in notes],
        *[
            f"**Partial study** `{directory.name}`: {c.finished} of {c.expected} trials are in (it is still "
            "running, or was interrupted: rerun it with `--resume`); the statistics are of those trials."
            for directory, c in partial
        ],
        "Arms vary " + (", ".join(f"`{c}`" for c in by) if by else "nothing (one arm)")
        + (f"; replicates over {', '.join(f'`{c}`' for c in replicates)}" if replicates else "")
        + (f"; searched (not arms): {', '.join(f'`{c}`' for c in searched)}" if searched else "")
        + ".",
    ]


def _summary_section(summary: pd.DataFrame, kept: pd.DataFrame, by: Sequence[str]) -> list[str]:
    """Mean ± sd per arm of the main metrics, then every metric with its confidence interval."""
    main_metrics = [m for m in SUMMARY_METRICS if has_values(kept, m)]
    header, rows = summary_rows(summary[summary["metric"].isin(main_metrics)], by, main_metrics)
    detail_rows = _detail_rows(summary, by)
    return [
        "## Summary",
        "Mean ± sd per arm; fractions in percent, KL and NLL in nats; n = usable trials.",
        markdown_table(header, rows) if rows else "No usable trials.",
        "### All metrics with 95% confidence intervals",
        "t-distribution intervals for the mean; n counts the finite values behind each mean.",
        markdown_table([*by, "metric", "n", "mean", "sd", "95% CI"], detail_rows)
        if detail_rows
        else "No usable trials.",
    ]


def _control_section(kept: pd.DataFrame, by: Sequence[str]) -> list[str]:
    """The independent-student control gap per arm; nothing where the control did not run."""
    gap = control_gap(kept, verbose=False)
    if gap.empty:
        return []
    gap_metrics = ["test_agreement", "control_test_agreement", CONTROL_GAP]
    gap_summary = summarize(gap, by=by, metrics=gap_metrics, verbose=False)
    gap_header, gap_rows = summary_rows(gap_summary, by, gap_metrics)
    return [
        "## Independent-student control",
        "control_gap = test_agreement − control_test_agreement: the agreement a student owes to its "
        "own teacher beyond what a student distilled from an independent teacher shares with it "
        "(paper §3.2).",
        markdown_table(gap_header, gap_rows),
    ]


def _pareto_section(kept: pd.DataFrame, by: Sequence[str], objectives: dict[str, str] | None) -> list[str]:
    """The non-dominated trials on the given objectives (a searched study's by default); nothing
    without objectives or values for them."""
    objectives = objectives if objectives is not None else default_objectives(kept)
    if not objectives or not has_values(kept, *objectives):
        return []
    maximize = [c for c, d in objectives.items() if d == "max"]
    minimize = [c for c, d in objectives.items() if d == "min"]
    front = pareto_front(kept, maximize=maximize, minimize=minimize, verbose=False)
    dims = search_dims(kept)
    columns = [c for c in ("study", "trial_id", *by, *dims) if c in front.columns] + list(objectives)
    front_rows = [
        [fmt_metric(c, row[c]) if c in objectives else fmt_level(row[c]) for c in columns]
        for _, row in front.iterrows()
    ]
    return [
        "## Pareto front",
        "Non-dominated trials on " + ", ".join(f"{c} ({d})" for c, d in objectives.items()) + ".",
        markdown_table([metric_header(c) if c in objectives else c for c in columns], front_rows),
    ]


def _figures_section(figure_paths: Sequence[Path], out: Path) -> list[str]:
    """A link per figure, relative to the report; nothing without figures."""
    if not figure_paths:
        return []
    return ["## Figures", *[f"![{path.stem}]({path.relative_to(out).as_posix()})" for path in figure_paths]]
