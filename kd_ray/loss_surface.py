"""The distillation loss surface of one trial (paper Fig. 6c): the plane through the teacher's weights,
the student's initial weights and the final student's.

    from kd_ray import loss_surface
    cfg = loss_surface.preset_config("local")
    result = loss_surface.run(cfg, "results/loss_surface")

The trial is self-distillation from one teacher (``teacher_members=1``, ``student_arch ==
teacher_arch``) with normalisation that keeps a network's function fixed by its weights (``norm``
group or none; BatchNorm's running statistics are not on the plane). The teacher comes from the
teacher store (trained when missing, as a trial does); the student is built and trained as a trial
builds and trains it, in float32, and its initial and final weights are kept.

The plane has its origin at the teacher and the orthonormal basis (u, v) that Gram-Schmidt gives for
(init - teacher, final - teacher), over every floating-point weight of the network: the teacher sits
at (0, 0), the initial student at (|init - teacher|, 0), the final student at (a_f, b_f) with b_f > 0.
At each point teacher + a u + b v of a grid spanning the three points (plus a margin) the table
holds the distillation loss (the trial's KD loss against the teacher, at its temperature and alpha,
on the clean distillation data) and the train agreement with the teacher on that data. The grid's
axes include the three points' own coordinates, so the table holds the values at each of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kd_ray.atomic import write_atomic
from kd_ray.config import ConfigError, TrialConfig
from kd_ray.progress import Progress
from kd_ray.provenance import versions
from kd_ray.study.presets import STUDIES
from kd_ray.tables import LOSS_SURFACE_FILE, LOSS_SURFACE_SCHEMA, PLANE_POINTS, to_table, write_table
from kd_ray.train.distill import fit, predict
from kd_ray.train.losses import kd_loss
from kd_ray.train.metrics import agreement
from kd_ray.train.setup import TrialData, check_runnable, resolve_device, student_recipe
from kd_ray.train.teachers import TeacherStore, default_store, ensure_members, load_ensemble
from kd_ray.train.trial import build_student_state

FIGURE_FILE = "loss_surface.png"
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SurfacePreset:
    base: dict[str, Any]  # TrialConfig fields
    grid: int  # grid points per axis (the three points' own coordinates are added)
    margin: float = 0.3  # how far the grid reaches beyond the three points, as a fraction of their span


# The trials of the initialization study (paper E8: group norm, m = 1, self-distillation, tau = 1),
# its student from a random init.
PRESETS = {
    "local": SurfacePreset(base=STUDIES["initialization"].presets["local"].base, grid=15),
    "paper": SurfacePreset(base=STUDIES["initialization"].presets["paper"].base, grid=21),
}


def preset_config(name: str, overrides: dict[str, Any] | None = None) -> TrialConfig:
    return TrialConfig.from_dict({**PRESETS[name].base, **(overrides or {})})


# --- the plane ----------------------------------------------------------------------------------


def flatten(state: State) -> torch.Tensor:
    """The floating-point entries of a state dict, in its order, as one float64 vector on the CPU."""
    return torch.cat([v.detach().reshape(-1).double().cpu() for v in state.values() if v.is_floating_point()])


def unflatten(vector: torch.Tensor, like: State) -> State:
    """A state dict shaped like ``like`` whose floating-point entries are taken from ``vector``."""
    needed = sum(v.numel() for v in like.values() if v.is_floating_point())
    if needed != vector.numel():
        raise ValueError(f"a vector of {vector.numel()} weights does not fit a state of {needed}")
    out, start = {}, 0
    for name, value in like.items():
        if not value.is_floating_point():
            out[name] = value
            continue
        size = value.numel()
        out[name] = vector[start : start + size].reshape(value.shape).to(value.dtype)
        start += size
    return out


@dataclass(frozen=True)
class Plane:
    """The plane origin + a u + b v, with u and v orthonormal (float64 vectors)."""

    origin: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    points: dict[str, tuple[float, float]]  # teacher, init, final: their (a, b) by construction

    def point(self, a: float, b: float) -> torch.Tensor:
        return self.origin + a * self.u + b * self.v

    def coordinates(self, vector: torch.Tensor) -> tuple[float, float]:
        """(a, b) of the projection of ``vector`` onto the plane."""
        offset = vector - self.origin
        return float(offset @ self.u), float(offset @ self.v)


def plane_through(teacher: torch.Tensor, init: torch.Tensor, final: torch.Tensor) -> Plane:
    """The plane through three weight vectors, origin at ``teacher``; u along ``init - teacher``."""
    to_init, to_final = init - teacher, final - teacher
    init_distance = float(to_init.norm())
    if init_distance == 0.0:
        raise ValueError("the student's initial weights equal the teacher's: the three points span no plane")
    u = to_init / init_distance
    along = float(to_final @ u)
    across = to_final - along * u
    across_norm = float(across.norm())
    if across_norm <= 1e-9 * max(float(to_final.norm()), init_distance):
        raise ValueError("the final student lies on the line through the teacher and its initial weights: "
                         "the three points span no plane")
    points = {"teacher": (0.0, 0.0), "init": (init_distance, 0.0), "final": (along, across_norm)}
    return Plane(teacher, u, across / across_norm, points)


def grid_axes(plane: Plane, size: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Per axis: ``size`` evenly spaced values from below the lowest to above the highest of the three
    points (by ``margin`` of their span), together with the three points' own values."""
    axes = []
    for axis in (0, 1):
        values = [p[axis] for p in plane.points.values()]
        low, high = min(values), max(values)
        reach = margin * (high - low)
        axes.append(np.union1d(np.linspace(low - reach, high + reach, size), values))
    return axes[0], axes[1]


# --- training and evaluation ---------------------------------------------------------------------


def check_config(cfg: TrialConfig, grid: int, margin: float) -> None:
    """Refuse, before any compute, a config whose trial has no loss plane (ConfigError naming the field)."""
    check_runnable(cfg)
    if cfg.teacher_members != 1:
        raise ConfigError(f"teacher_members={cfg.teacher_members}: the loss plane passes through one teacher's "
                          "weights; use teacher_members=1")
    if cfg.student_arch != cfg.teacher_arch:
        raise ConfigError(f"student_arch={cfg.student_arch!r} with teacher_arch={cfg.teacher_arch!r}: the plane "
                          "holds teacher and student weights alike, so they need one architecture")
    if cfg.norm == "batch":
        raise ConfigError("norm='batch': a network's function on the plane must be fixed by its weights "
                          "(BatchNorm running statistics are not); use norm=group or norm=none")
    if cfg.init == "interpolate" and cfg.init_lambda == 1.0:
        raise ConfigError("init_lambda=1.0 starts the student at the teacher: the three points span no plane")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ConfigError(f"grid={grid!r} must be an integer >= 2 (points per axis)")
    if not (math.isfinite(margin) and margin >= 0):
        raise ConfigError(f"margin={margin!r} must be a finite number >= 0")


@dataclass
class TrainedPair:
    """A teacher and the student distilled from it, with what evaluating the plane needs."""

    cfg: TrialConfig
    teacher_key: str
    teacher: State
    init: State
    final: State
    model: torch.nn.Module  # the student network, whose weights ``evaluate`` replaces
    x: torch.Tensor  # the clean distillation inputs
    y: torch.Tensor
    teacher_log_probs: torch.Tensor  # the teacher's on ``x``


def snapshot(model: torch.nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_pair(cfg: TrialConfig, store: TeacherStore | str | None = None, data_dir: str | None = None,
               progress: Progress | None = None) -> TrainedPair:
    """The teacher from the store (trained when missing) and the student trained as ``run_trial`` trains
    it (in float32), keeping the student's initial and final weights."""
    store = store if isinstance(store, TeacherStore) else TeacherStore(store or default_store())
    device = resolve_device(cfg.device)
    data = TrialData(cfg, device, data_dir)
    ensure_members(cfg, store, data.arrays, device, progress=progress)
    ensemble = load_ensemble(cfg, store, device)
    recipe = student_recipe(cfg)  # the float32 path: the plane is evaluated in float32 too
    _, teacher_distill = data.teacher_log_probs(ensemble)
    state = build_student_state(cfg, recipe, ensemble, data, device, None)
    init = snapshot(state.model)
    if progress:
        progress(f"training the student ({cfg.student_arch}, {cfg.epochs} epochs)")
    fit(state, data.x, data.y, recipe, data.augment_spec, teacher=ensemble.log_probs)
    return TrainedPair(cfg, ensemble.key, ensemble.final_states[0], init, snapshot(state.model), state.model,
                       data.x, data.y, teacher_distill)


def evaluate(pair: TrainedPair, weights: State) -> tuple[float, float]:
    """(distillation loss, train agreement with the teacher) of the student network with ``weights``."""
    device = next(pair.model.parameters()).device
    pair.model.load_state_dict({k: v.to(device) for k, v in weights.items()})
    logits = predict(pair.model, pair.x)
    loss = kd_loss(logits, pair.teacher_log_probs, pair.y, temperature=pair.cfg.temperature, alpha=pair.cfg.alpha,
                   loss=pair.cfg.loss, jsd_beta=pair.cfg.jsd_beta)
    return float(loss), agreement(pair.teacher_log_probs, logits)


def surface(pair: TrainedPair, grid: int, margin: float, progress: Progress | None = None
            ) -> tuple[Plane, pd.DataFrame]:
    """The plane of ``pair`` and its table: a row per grid point, b-major."""
    like = pair.final
    plane = plane_through(flatten(pair.teacher), flatten(pair.init), flatten(like))
    a_values, b_values = grid_axes(plane, grid, margin)
    points = {f"{name}_{axis}": plane.points[name][i] for name in PLANE_POINTS for i, axis in enumerate("ab")}
    rows = []
    for j, b in enumerate(b_values):
        for a in a_values:
            loss, agree = evaluate(pair, unflatten(plane.point(float(a), float(b)), like))
            rows.append({"a": float(a), "b": float(b), "loss": loss, "agreement": agree, **points})
        if progress and (j + 1) % max(1, len(b_values) // 5) == 0:
            progress(f"loss plane: {j + 1}/{len(b_values)} rows of {len(a_values)} points")
    return plane, pd.DataFrame(rows)


# --- the table and the figure --------------------------------------------------------------------


def contour_figure(table: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Distillation loss (log scale) and train agreement over the plane, the three points marked."""
    figure = Figure(figsize=(11, 4.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    first = table.iloc[0]
    panels = (("loss", "distillation loss (log10)", "viridis"), ("agreement", "train agreement", "magma"))
    for index, (column, label, cmap) in enumerate(panels):
        grid = table.pivot(index="b", columns="a", values=column)
        values = np.log10(np.maximum(grid.to_numpy(), 1e-12)) if column == "loss" else grid.to_numpy()
        axes = figure.add_subplot(1, 2, index + 1)
        filled = axes.contourf(grid.columns.to_numpy(), grid.index.to_numpy(), values, levels=20, cmap=cmap)
        figure.colorbar(filled, ax=axes, label=label)
        for name, marker in zip(PLANE_POINTS, ("*", "o", "s")):
            a, b = first[f"{name}_a"], first[f"{name}_b"]
            axes.plot([a], [b], marker=marker, color="white", markeredgecolor="black", markersize=11, linestyle="")
            axes.annotate(name, (a, b), textcoords="offset points", xytext=(7, 7), fontsize=10,
                          bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.75, "linewidth": 0})
        axes.set_xlabel("a (along init - teacher)")
        axes.set_ylabel("b")
        axes.set_title(label)
    if title:
        figure.suptitle(title)
    write_atomic(path, lambda stream: figure.savefig(stream, format="png"))
    return Path(path)


@dataclass
class SurfaceResult:
    table_path: Path
    figure_path: Path
    table: pd.DataFrame
    plane: Plane
    pair: TrainedPair


def run(cfg: TrialConfig, out_dir: str | Path, grid: int = 21, margin: float = 0.3, *,
        store: TeacherStore | str | None = None, data_dir: str | None = None,
        progress: Progress | None = None) -> SurfaceResult:
    """Check, train, evaluate the plane, write ``loss_surface.parquet`` and ``loss_surface.png`` to ``out_dir``."""
    check_config(cfg, grid, margin)
    pair = train_pair(cfg, store, data_dir, progress)
    plane, table = surface(pair, grid, margin, progress)
    out_dir = Path(out_dir)
    device = next(pair.model.parameters()).device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    provenance = {"teacher_key": pair.teacher_key, "config_json": cfg.to_json(), **versions(),
                  "device_name": device_name}
    rows = [{**row, **provenance} for row in table.to_dict("records")]
    table_path = Path(write_table(to_table(rows, LOSS_SURFACE_SCHEMA), str(out_dir / LOSS_SURFACE_FILE)))
    title = f"{cfg.dataset}, {cfg.student_arch} (norm {cfg.norm}), tau {cfg.temperature:g}, {cfg.epochs} epochs"
    figure_path = contour_figure(table, out_dir / FIGURE_FILE, title)
    return SurfaceResult(table_path, figure_path, table, plane, pair)
