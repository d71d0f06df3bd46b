"""Figures of trial and epoch tables, written as PNGs by ``figures``.

Figures are drawn on matplotlib.figure.Figure objects saved through the Agg canvas, never through
pyplot, so no global backend is switched (a notebook keeps its own) and no display is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kd_ray.analysis._arms import arm_label, factor_levels, fmt_level, resolve_by, split_arms
from kd_ray.analysis._columns import FRACTION_METRICS
from kd_ray.analysis._correlate import correlate
from kd_ray.analysis._load import PathLike, as_float, ensure_flags, has_values, usable_rows
from kd_ray.analysis._stats import check_objectives, default_objectives, mean_ci, pareto_front
from kd_ray.atomic import write_atomic

# Above this many points in one scatter, markers shrink and fade (see _cloud_style).
DENSE_POINTS = 1000
# The per-arm bars, in this order, when present.
BAR_METRICS: tuple[str, ...] = ("test_acc", "test_agreement", "train_agreement", "aug_train_agreement")


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    write_atomic(path, lambda stream: figure.savefig(stream, format="png"))
    return path


def _colors(n: int) -> list[Any]:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i) if n <= 10 else cmap(i / max(1, n - 1)) for i in range(n)]


def _varies(df: pd.DataFrame, column: str) -> bool:
    return column in df.columns and df[column].nunique() > 1


def _axis_label(metric: str) -> str:
    if metric in FRACTION_METRICS:
        return f"{metric} (%)"
    if metric.endswith(("_kl", "_jsd", "_nll", "_loss")):
        return f"{metric} (nats)"
    return metric


def _scale(metric: str, values: np.ndarray | pd.Series) -> np.ndarray:
    array = as_float(pd.Series(values))
    return 100 * array if metric in FRACTION_METRICS else array


def _cloud_style(n_points: int) -> dict[str, Any]:
    """Marker size and opacity of a scatter of n points: matplotlib's size up to DENSE_POINTS, then
    shrinking and fading as 1/sqrt(n), so that where the points crowd still shows."""
    if n_points <= DENSE_POINTS:
        return {"alpha": 0.8}
    shrink = math.sqrt(DENSE_POINTS / n_points)
    return {"s": max(1.0, 36 * shrink), "alpha": max(0.05, 0.8 * shrink), "linewidths": 0}


def _legend(axes: Any, n_points: int, **options: Any) -> None:
    # matplotlib's "best" place tests every point against the legend: seconds for a large study.
    if n_points > DENSE_POINTS:
        options |= {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0}
    axes.legend(**options)


def _scatter_figure(df: pd.DataFrame, by: Sequence[str], x: str, y: str, path: Path) -> Path:
    dense = len(df) > DENSE_POINTS
    figure = _new_figure(9.6 if dense else 6.4, 4.8)  # a dense figure's legend stands beside the axes
    axes = figure.add_subplot()
    arms = split_arms(df, by)
    for color, (key, arm) in zip(_colors(len(arms)), arms):
        r = correlate(arm, x, y, methods=("pearson",), n_boot=0, verbose=False)["r"].iloc[0]
        label = arm_label(by, key) + (f" (r = {r:.2f})" if np.isfinite(r) else f" (n = {len(arm)})")
        xs, ys = _scale(x, arm[x]), _scale(y, arm[y])
        if not dense:
            axes.scatter(xs, ys, color=color, label=label, alpha=0.8)
            continue
        # Thousands of points per arm: a faint cloud per arm, and its mean marked so the arm shows.
        axes.scatter(xs, ys, color=color, **_cloud_style(len(df)))
        complete = np.isfinite(xs) & np.isfinite(ys)
        if complete.any():
            axes.scatter(xs[complete].mean(), ys[complete].mean(), color=color, marker="X", s=90,
                         edgecolors="black", linewidths=0.8, zorder=3, label=label)
    overall = correlate(df, x, y, methods=("pearson", "spearman"), n_boot=0, verbose=False)
    pearson, spearman = overall["r"].iloc[0], overall["r"].iloc[1]
    title = f"{y} vs {x}: overall Pearson r = {pearson:.2f}, Spearman ρ = {spearman:.2f}"
    axes.set_title(title + ("\n× marks each arm's mean" if dense else ""), fontsize=9)
    axes.set_xlabel(_axis_label(x))
    axes.set_ylabel(_axis_label(y))
    _legend(axes, len(df), title=", ".join(by) if by else None, fontsize=7, title_fontsize=7)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _bars_figure(df: pd.DataFrame, by: Sequence[str], metrics: Sequence[str], path: Path) -> Path:
    # The first factor runs along the x axis; combinations of the others are side-by-side bars.
    outer, inner = by[0], list(by[1:])
    outer_levels = factor_levels(df[outer]) + ([None] if df[outer].isna().any() else [])
    inner_arms = split_arms(df, inner)
    width = max(5.0, 1.0 + 0.9 * len(outer_levels) * max(1, len(inner_arms) / 2))
    figure = _new_figure(width, 3.2 * len(metrics))
    colors = _colors(len(inner_arms))
    bar_width = 0.8 / len(inner_arms)
    for row, metric in enumerate(metrics):
        axes = figure.add_subplot(len(metrics), 1, row + 1)
        for j, (key, inner_df) in enumerate(inner_arms):
            means, sds = [], []
            for level in outer_levels:
                in_level = inner_df[outer].isna() if level is None else inner_df[outer] == level
                _, mean, sd, _, _ = mean_ci(_scale(metric, inner_df.loc[in_level.fillna(False), metric]))
                means.append(mean)
                sds.append(0.0 if not np.isfinite(sd) else sd)
            positions = np.arange(len(outer_levels)) - 0.4 + bar_width * (j + 0.5)
            label = arm_label(inner, key) if inner else None
            axes.bar(positions, means, width=bar_width, yerr=sds, capsize=3, color=colors[j], label=label)
        axes.set_xticks(np.arange(len(outer_levels)), [fmt_level(v) for v in outer_levels])
        axes.set_ylabel(_axis_label(metric))
        axes.grid(axis="y", alpha=0.3)
        finite_means = _scale(metric, df[metric])
        finite_means = finite_means[np.isfinite(finite_means)]
        if finite_means.size and metric in FRACTION_METRICS:
            # Agreements sit in a narrow band near the top; a zero baseline would hide the arms' gaps.
            low = max(0.0, float(finite_means.min()) - 5)
            axes.set_ylim(low, min(100.0, float(finite_means.max()) + 5))
        if inner and row == 0:
            axes.legend(title=", ".join(inner), fontsize=7, title_fontsize=7)
    figure.suptitle(f"mean ± sd over seeds, by {outer}", fontsize=10)
    figure.axes[-1].set_xlabel(outer)
    return _save(figure, path)


def _epochs_figure(
    trials: pd.DataFrame, epochs: pd.DataFrame, by: Sequence[str], path: Path
) -> Path | None:
    keys = ["study", "trial_id"]
    arms_of = trials[keys + [c for c in by if c not in keys]]
    merged = epochs.drop(columns=[c for c in by if c in epochs.columns and c not in keys])
    merged = merged.merge(arms_of, on=keys, how="inner")
    panels = [m for m in ("test_agreement", "train_agreement") if has_values(merged, m)]
    if not panels or merged["epoch"].nunique() < 2:
        return None  # no usable trial has a curve to draw
    figure = _new_figure(5.2 * len(panels), 4.2)
    arms = split_arms(merged, by)
    colors = _colors(len(arms))
    shared = None
    for col, metric in enumerate(panels):
        # One y scale for both panels: the gap between train and test agreement is the point.
        axes = figure.add_subplot(1, len(panels), col + 1, sharey=shared)
        shared = shared or axes
        for color, (key, arm) in zip(colors, arms):
            curve = arm.assign(value=_scale(metric, arm[metric])).groupby("epoch")["value"]
            mean, sd = curve.mean(), curve.std(ddof=1).fillna(0.0)
            epochs_axis = mean.index.to_numpy(dtype=float)
            axes.plot(epochs_axis, mean.to_numpy(), color=color, label=arm_label(by, key))
            low, high = (mean - sd).to_numpy(), (mean + sd).to_numpy()
            axes.fill_between(epochs_axis, low, high, color=color, alpha=0.15)
        axes.set_title("test" if metric.startswith("test") else "train (distillation data)", fontsize=10)
        axes.set_xlabel("epoch")
        axes.set_ylabel(_axis_label(metric))
        axes.grid(alpha=0.3)
    figure.axes[0].legend(title=", ".join(by) if by else None, fontsize=7, title_fontsize=7)
    figure.suptitle("agreement over training, mean ± sd over seeds", fontsize=10)
    return _save(figure, path)


def _heatmap_figure(df: pd.DataFrame, by: Sequence[str], path: Path) -> Path:
    metrics = [m for m in ("test_agreement", "test_acc") if has_values(df, m)]
    members = factor_levels(df["teacher_members"])
    temperatures = factor_levels(df["temperature"])
    others = [c for c in by if c not in ("teacher_members", "temperature")]
    figure = _new_figure(4.6 * len(metrics), 0.6 * len(members) + 2.6)
    for col, metric in enumerate(metrics):
        grid = np.full((len(members), len(temperatures)), np.nan)
        for i, m in enumerate(members):
            for j, t in enumerate(temperatures):
                cell = df[(df["teacher_members"] == m).fillna(False) & (df["temperature"] == t).fillna(False)]
                values = _scale(metric, cell[metric])
                values = values[np.isfinite(values)]
                if values.size:
                    grid[i, j] = values.mean()
        axes = figure.add_subplot(1, len(metrics), col + 1)
        image = axes.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        for i in range(len(members)):
            for j in range(len(temperatures)):
                if np.isfinite(grid[i, j]):
                    # viridis is bright at the top: dark text there, light text on the dark end.
                    color = "black" if image.norm(grid[i, j]) > 0.6 else "white"
                    axes.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8, color=color)
        axes.set_xticks(range(len(temperatures)), [fmt_level(t) for t in temperatures])
        axes.set_yticks(range(len(members)), [fmt_level(m) for m in members])
        axes.set_xlabel("temperature τ")
        axes.set_ylabel("teacher members m")
        axes.set_title(_axis_label(metric), fontsize=10)
        figure.colorbar(image, ax=axes)
    note = f"; mean over {', '.join(others)}" if others else ""
    figure.suptitle(f"ensemble size × temperature, mean over seeds{note}", fontsize=10)
    return _save(figure, path)


def _init_lambda_figure(df: pd.DataFrame, epochs: pd.DataFrame | None, path: Path) -> Path:
    # Only interpolated students have a lambda; random and teacher_init arms carry a default 0.
    if "init" in df.columns and (df["init"] == "interpolate").any():
        df = df[df["init"] == "interpolate"]
    lambdas = factor_levels(df["init_lambda"])
    figure = _new_figure(6.4, 4.4)
    axes = figure.add_subplot()
    for metric, style in (("train_agreement", "o-"), ("test_agreement", "s--")):
        if not has_values(df, metric):
            continue
        stats_by_lambda = [mean_ci(_scale(metric, df.loc[df["init_lambda"] == v, metric])) for v in lambdas]
        means = np.array([s[1] for s in stats_by_lambda])
        sds = np.nan_to_num(np.array([s[2] for s in stats_by_lambda]))
        axes.errorbar(lambdas, means, yerr=sds, fmt=style, capsize=3, label=metric)
    axes.set_xlabel("init λ (θ = λ·θ_teacher + (1 − λ)·θ_random)")
    axes.set_ylabel("agreement (%)")
    axes.grid(alpha=0.3)
    # The paper plots the final training loss; without an epochs table the test NLL stands in.
    loss_name, loss = "test_nll", df[["init_lambda", "test_nll"]].rename(columns={"test_nll": "loss"})
    if epochs is not None and has_values(epochs, "train_loss"):
        last = epochs.sort_values("epoch").groupby(["study", "trial_id"], as_index=False).last()
        keys = ["study", "trial_id"]
        joined = df[[*keys, "init_lambda"]].merge(last[[*keys, "train_loss"]], on=keys)
        if has_values(joined, "train_loss"):
            loss_name, loss = "final train_loss", joined.rename(columns={"train_loss": "loss"})
    if has_values(loss, "loss"):
        twin = axes.twinx()
        means = [mean_ci(loss.loc[loss["init_lambda"] == v, "loss"])[1] for v in lambdas]
        twin.plot(lambdas, means, "^:", color="tab:red", label=loss_name)
        twin.set_ylabel(f"{loss_name} (nats)", color="tab:red")
        handles = axes.get_legend_handles_labels()
        twin_handles = twin.get_legend_handles_labels()
        axes.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], fontsize=8)
    else:
        axes.legend(fontsize=8)
    axes.set_title("student initialised between random and teacher weights", fontsize=10)
    return _save(figure, path)


def _pareto_figure(df: pd.DataFrame, objectives: dict[str, str], path: Path) -> Path:
    names = list(objectives)[:2]
    maximize = [n for n in objectives if objectives[n] == "max"]
    minimize = [n for n in objectives if objectives[n] == "min"]
    front = pareto_front(df, maximize=maximize, minimize=minimize, include_failed=True, verbose=False)
    x, y = names
    figure = _new_figure(8.0 if len(df) > DENSE_POINTS else 6.4, 4.8)
    axes = figure.add_subplot()
    axes.scatter(_scale(x, df[x]), _scale(y, df[y]), color="0.7", label="trials", **_cloud_style(len(df)))
    ordered = front.sort_values(x)
    label = f"Pareto front ({len(front)})"
    axes.plot(_scale(x, ordered[x]), _scale(y, ordered[y]), "o-", color="tab:red", label=label)
    axes.set_xlabel(f"{_axis_label(x)} ({objectives[x]})")
    axes.set_ylabel(f"{_axis_label(y)} ({objectives[y]})")
    _legend(axes, len(df), fontsize=8)
    axes.grid(alpha=0.3)
    extra = f"; the front also weighs {', '.join(list(objectives)[2:])}" if len(objectives) > 2 else ""
    axes.set_title(f"non-dominated trials{extra}", fontsize=10)
    return _save(figure, path)


def figures(
    df: pd.DataFrame,
    epochs: pd.DataFrame | None,
    out_dir: PathLike,
    by: str | Sequence[str] | None = None,
    objectives: dict[str, str] | None = None,
    include_failed: bool = False,
) -> list[Path]:
    """Write the figures the table supports as PNGs into out_dir and return their paths.

    - ``<y>_vs_<x>.png``: fidelity–generalization scatter coloured by arm, each arm's Pearson r in
      the legend (test_agreement vs test_acc; also test_kl vs test_nll, test_agreement vs test_ece);
    - ``arms.png``: per-arm bars, mean ± sd of accuracy and agreements (paper Fig. 3 and 11);
    - ``agreement_over_epochs.png``: test and train agreement per eval epoch (Fig. 5);
    - ``members_x_temperature.png``: heat maps when both teacher_members and temperature vary (Fig. 9);
    - ``init_lambda.png``: agreement and loss against init_lambda when it varies (Fig. 6b);
    - ``pareto_front.png``: when ``objectives`` ({column: "max" | "min"}) is given, or by default
      for a searched (Optuna) study on test_agreement and test_acc.
    """
    df = ensure_flags(df)
    by = resolve_by(df, by)
    check_objectives(df, objectives)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kept = usable_rows(df, include_failed, verbose=False)
    written: list[Path] = []
    if kept.empty:
        return written
    for x, y in (("test_agreement", "test_acc"), ("test_kl", "test_nll"), ("test_agreement", "test_ece")):
        if has_values(kept, x, y):
            written.append(_scatter_figure(kept, by, x, y, out / f"{y}_vs_{x}.png"))
    bar_metrics = [m for m in BAR_METRICS if has_values(kept, m)]
    if by and bar_metrics:
        written.append(_bars_figure(kept, by, bar_metrics, out / "arms.png"))
    if epochs is not None and not epochs.empty and has_values(epochs, "test_agreement"):
        keep_all = include_failed or "usable" not in epochs.columns
        usable_epochs = epochs if keep_all else epochs[epochs["usable"]]
        curves = _epochs_figure(kept, usable_epochs, by, out / "agreement_over_epochs.png")
        if curves is not None:
            written.append(curves)
    if _varies(kept, "teacher_members") and _varies(kept, "temperature"):
        written.append(_heatmap_figure(kept, by, out / "members_x_temperature.png"))
    if _varies(kept, "init_lambda"):
        written.append(_init_lambda_figure(kept, epochs, out / "init_lambda.png"))
    objectives = objectives if objectives is not None else default_objectives(kept)
    if objectives and has_values(kept, *objectives):
        written.append(_pareto_figure(kept, objectives, out / "pareto_front.png"))
    return written

