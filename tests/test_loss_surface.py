"""The loss plane through teacher, initial and final student: its geometry, its refusals, and a tiny
end-to-end run that writes the table and the figure."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from kd_ray.config import ConfigError
from kd_ray.loss_surface import (
    PRESETS,
    check_config,
    evaluate,
    flatten,
    grid_axes,
    plane_through,
    preset_config,
    run,
    unflatten,
)
from kd_ray.models.archs import build_model
from kd_ray.tables import LOSS_SURFACE_SCHEMA

REPO = Path(__file__).resolve().parent.parent


def three_points(seed: int = 0, size: int = 50) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(size, generator=generator, dtype=torch.float64) * scale for scale in (1.0, 3.0, 2.0))


def test_the_basis_is_orthonormal_and_the_plane_passes_through_its_three_points():
    teacher, init, final = three_points()
    plane = plane_through(teacher, init, final)
    assert float(plane.u @ plane.u) == pytest.approx(1.0, abs=1e-12)
    assert float(plane.v @ plane.v) == pytest.approx(1.0, abs=1e-12)
    assert float(plane.u @ plane.v) == pytest.approx(0.0, abs=1e-12)
    for name, vector in (("teacher", teacher), ("init", init), ("final", final)):
        a, b = plane.points[name]
        torch.testing.assert_close(plane.point(a, b), vector, rtol=0, atol=1e-10)
        assert plane.coordinates(vector) == pytest.approx((a, b), abs=1e-10)
    assert plane.points["teacher"] == (0.0, 0.0)
    assert plane.points["init"] == (pytest.approx(float((init - teacher).norm())), 0.0)
    assert plane.points["final"][1] > 0
    # A point off the plane projects onto it: its offset from the projection is orthogonal to u and v.
    off = teacher + torch.randn(50, dtype=torch.float64)
    residual = off - plane.point(*plane.coordinates(off))
    assert abs(float(residual @ plane.u)) < 1e-10 and abs(float(residual @ plane.v)) < 1e-10


def test_the_grid_spans_the_points_and_holds_their_coordinates():
    plane = plane_through(*three_points(1))
    a_values, b_values = grid_axes(plane, 5, 0.25)
    for a, b in plane.points.values():
        assert a in a_values and b in b_values
    a_points = [p[0] for p in plane.points.values()]
    span = max(a_points) - min(a_points)
    assert a_values[0] == pytest.approx(min(a_points) - 0.25 * span)
    assert a_values[-1] == pytest.approx(max(a_points) + 0.25 * span)
    assert 5 <= len(a_values) <= 8 and (pd.Series(a_values).diff().dropna() > 0).all()


def test_degenerate_points_span_no_plane():
    teacher, init, final = three_points(2)
    with pytest.raises(ValueError, match="initial weights equal the teacher's"):
        plane_through(teacher, teacher.clone(), final)
    with pytest.raises(ValueError, match="on the line through the teacher"):
        plane_through(teacher, init, teacher + 2.5 * (init - teacher))


def test_flatten_and_unflatten_round_trip_a_state_dict():
    torch.manual_seed(0)
    state = build_model("mlp", (1, 40), 10, norm="group").state_dict()
    vector = flatten(state)
    assert vector.dtype == torch.float64 and vector.numel() == sum(v.numel() for v in state.values())
    back = unflatten(vector, state)
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)
    with pytest.raises(ValueError, match="does not fit"):
        unflatten(vector[:-1], state)


@pytest.mark.parametrize("change, field", [
    ({"teacher_members": 3}, "teacher_members=3"),
    ({"student_arch": "mlp4"}, "student_arch='mlp4'"),
    ({"norm": "batch"}, "norm='batch'"),
    ({"init": "interpolate", "init_lambda": 1.0}, "init_lambda=1.0"),
    ({"student_arch": "conv2d"}, "student_arch='conv2d'"),
])
def test_configs_without_a_plane_are_refused_before_compute(change, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")):
        check_config(preset_config("local", change), 11, 0.3)


def test_bad_grid_or_margin_is_refused():
    cfg = preset_config("local")
    with pytest.raises(ConfigError, match="grid=1"):
        check_config(cfg, 1, 0.3)
    with pytest.raises(ConfigError, match="margin=-0.1"):
        check_config(cfg, 5, -0.1)


def test_the_presets_are_the_initialization_recipe():
    for name in ("local", "paper"):
        cfg = preset_config(name)
        assert (cfg.teacher_members, cfg.norm, cfg.init) == (1, "group", "random")
        assert cfg.student_arch == cfg.teacher_arch
        check_config(cfg, PRESETS[name].grid, PRESETS[name].margin)
    assert preset_config("paper").student_arch == "preresnet20" and preset_config("paper").dataset == "cifar100"
    assert PRESETS["local"].grid < PRESETS["paper"].grid == 21


TINY = {"epochs": 2, "teacher_epochs": 2, "device": "cpu"}


def test_a_tiny_run_writes_the_plane_table_and_figure(tmp_path, session_store):
    cfg = preset_config("local", TINY)
    result = run(cfg, tmp_path / "surface", grid=4, margin=0.2, store=session_store)
    pair, plane = result.pair, result.plane

    # The table: the schema, one row per grid point, the three points' coordinates on every row.
    table = pq.read_table(result.table_path)
    assert table.schema.equals(LOSS_SURFACE_SCHEMA)
    frame = table.to_pandas()
    a_values, b_values = grid_axes(plane, 4, 0.2)
    assert len(frame) == len(a_values) * len(b_values)
    assert frame["agreement"].between(0, 1).all() and (frame["loss"] > 0).all()
    assert (frame["config_json"] == cfg.to_json()).all() and (frame["teacher_key"] == pair.teacher_key).all()
    for name in ("teacher", "init", "final"):
        assert (frame[f"{name}_a"] == plane.points[name][0]).all()
        assert (frame[f"{name}_b"] == plane.points[name][1]).all()

    # Each point's coordinates map back to its weights, and the grid's value there is the direct one.
    for name in ("teacher", "init", "final"):
        weights = getattr(pair, name)
        on_plane = unflatten(plane.point(*plane.points[name]), weights)
        for key, value in weights.items():
            torch.testing.assert_close(on_plane[key], value.cpu(), rtol=0, atol=1e-5)
        a, b = plane.points[name]
        row = frame[(frame["a"] == a) & (frame["b"] == b)]
        assert len(row) == 1, name
        loss, agreement = evaluate(pair, weights)
        assert row["loss"].iloc[0] == pytest.approx(loss, rel=1e-5), name
        assert row["agreement"].iloc[0] == pytest.approx(agreement, abs=1e-3), name
    # At the teacher the student network is the teacher: full agreement, and the loss is the lowest there.
    teacher_row = frame[(frame["a"] == 0.0) & (frame["b"] == 0.0)].iloc[0]
    assert teacher_row["agreement"] == pytest.approx(1.0, abs=1e-3)
    assert teacher_row["loss"] == pytest.approx(frame["loss"].min(), rel=1e-6)

    # The teacher is the stored member, the initial student the trial's own start.
    from kd_ray.train.setup import TrialData, student_recipe
    from kd_ray.train.teachers import load_ensemble
    from kd_ray.train.trial import build_student_state

    data = TrialData(cfg, torch.device("cpu"), None)
    ensemble = load_ensemble(cfg, session_store, torch.device("cpu"))
    assert all(torch.equal(pair.teacher[k], ensemble.final_states[0][k]) for k in pair.teacher)
    fresh = build_student_state(cfg, student_recipe(cfg), ensemble, data, torch.device("cpu"), None).model
    assert all(torch.equal(pair.init[k], v) for k, v in fresh.state_dict().items())
    assert any(not torch.equal(pair.init[k], pair.final[k]) for k in pair.init)  # the student trained

    png = result.figure_path.read_bytes()
    assert result.figure_path.name == "loss_surface.png" and png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def load_script():
    spec = importlib.util.spec_from_file_location("kd_ray_studies_loss_surface", REPO / "studies" / "loss_surface.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_writes_its_outputs_and_refuses_bad_input(tmp_path, capsys):
    script = load_script()
    argv = ["--storage", str(tmp_path), "--grid", "3", "--quiet"] + [f"--set={k}={v}" for k, v in TINY.items()]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert f"table: {tmp_path / 'loss_surface' / 'loss_surface.parquet'}" in out
    assert (tmp_path / "loss_surface" / "loss_surface.png").is_file()
    assert "teacher: distillation loss" in out and "final: distillation loss" in out

    for bad, field in ((["--set", "teacher_members=2"], "teacher_members=2"), (["--grid", "1"], "grid=1"),
                       (["--set", "temprature=1"], "temprature")):
        assert script.main(["--storage", str(tmp_path / "bad"), *bad]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("loss_surface: error:") and field in lines[0]
    assert not (tmp_path / "bad").exists()
