"""Every studies/*.py script end to end at a tiny scale: exit code 0, one trials.parquet row per
trial the preset defines, and a report; bad input exits 2 with one line naming the field."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kd_ray.config import TrialConfig
from kd_ray.study.presets import STUDIES, Preset

REPO = Path(__file__).resolve().parents[2]
STUDIES_DIR = REPO / "studies"
# reproduce.py runs all the others; tests/findings/test_document.py covers the document it writes. loss_surface.py
# evaluates one trial's loss plane, no grid of trials; tests/test_loss_surface.py runs it.
SCRIPTS = sorted(p.stem for p in STUDIES_DIR.glob("*.py")
                 if not p.name.startswith("_") and p.stem not in ("reproduce", "loss_surface"))

# Flags every run gets: one student epoch, one teacher epoch, one seed, large batches, less output.
TINY = ["--set", "epochs=1", "--set", "steps=0", "--set", "teacher_epochs=1", "--set", "batch_size=256", "--seeds", "1",
        "--quiet"]
# Per script, flags that collapse an axis (or merge arms) to keep the run to a handful of trials; the
# expected row count below follows the same rule the scripts document: a --set field leaves the grid.
EXTRA = {
    "alpha_sweep": ["--set", "teacher_members=1"],
    "augmentation_ablation": ["--set", "temperature=4", "--set", "teacher_members=1"],
    "augmentation_convnet": ["--set", "temperature=4", "--set", "teacher_members=1"],
    "dataset_size": ["--set", "distill_fraction=0.25", "--set", "extra_data=0", "--set", "teacher_members=1"],
    "divergence": ["--set", "temperature=4", "--set", "teacher_members=1"],
    "ensemble_size": [],
    "initialization": ["--set", "init_lambda=0.5"],
    "optuna_search": ["--num-samples", "2", "--set", "teacher_members=1"],
    "small_teacher": [],
    "student_capacity": [],
    "synthetic_data": ["--set", "extra_data=1000"],
    "temperature_sweep": ["--set", "teacher_members=1"],
    "training_duration": [],
}
def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"kd_ray_studies_{name}", STUDIES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def local_preset(name: str) -> Preset:
    """The local preset the script runs without --dataset: the registry's, adapted as the script adapts it."""
    study = STUDIES[name]
    preset = study.presets["local"]
    return study.adapt(preset, None) if study.adapt else preset


def overrides_of(argv: list[str]) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")


def expected_rows(name: str, argv: list[str]) -> int:
    """Trials the local preset defines under these flags: arms x axes x seeds (Optuna: num_samples)."""
    if name == "optuna_search":
        return int(argv[argv.index("--num-samples") + 1])
    preset = local_preset(name)
    sets = overrides_of(argv)
    axes = [values for axis, values in preset.axes.items() if axis not in sets]
    arms = []
    for arm in preset.arms:
        kept = {k: v for k, v in arm.items() if k not in sets}
        if kept and kept not in arms:
            arms.append(kept)
    seeds = int(argv[argv.index("--seeds") + 1])
    return math.prod(len(v) for v in axes) * max(1, len(arms)) * seeds


def trial_dirs(study_dir: Path) -> list[Path]:
    """Ray Tune's trial directories: a trial per config, or a pack of configs (kd_ray.packs.run)."""
    return [p for p in study_dir.iterdir() if p.is_dir() and p.name.startswith(("_trainable", "pack"))]


def check_study_dir(study_dir: Path, rows: int, argv: list[str]) -> pd.DataFrame:
    trials = pd.read_parquet(study_dir / "trials.parquet")
    assert len(trials) == rows >= 2
    # A row per student; a Ray Tune trial per pack (a config trained alone is a pack of one).
    assert len(trial_dirs(study_dir)) == trials["pack_id"].nunique()
    assert (trials.groupby("pack_id")["pack_size"].agg(["first", "size"]).pipe(lambda t: t["first"] == t["size"])).all()
    assert (trials["status"] == "TERMINATED").all(), trials[["status", "error"]]
    assert trials["trial_id"].is_unique
    for key, value in overrides_of(argv).items():  # every --set reached every trial
        assert (trials[key] == getattr(TrialConfig.from_dict({key: value}), key)).all(), key
    assert trials["test_agreement"].between(0, 1).all() and trials["test_acc"].between(0, 1).all()
    epochs = pd.read_parquet(study_dir / "epochs.parquet")
    assert len(epochs) == rows  # one evaluation (epoch 1) per trial
    report = study_dir / "report.md"
    assert report.is_file() and report.stat().st_size > 0
    return trials


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    """One storage for the module's runs, so they share its teacher store."""
    return tmp_path_factory.mktemp("scripts_storage")


def test_every_script_has_a_tiny_override_set_and_a_registry_entry():
    assert set(SCRIPTS) == set(EXTRA) == set(STUDIES)
    for name in SCRIPTS:
        module = load_script(name)
        assert callable(module.main)
        assert module.__doc__ and f'study_main("{name}", __doc__, argv)' in (STUDIES_DIR / f"{name}.py").read_text()


# --- bad input: exit 2, one line naming the field, nothing run ------------------------------------


@pytest.mark.parametrize(
    "script, argv, field",
    [
        ("temperature_sweep", ["--set", "temprature=1"], "temprature"),
        ("ensemble_size", ["--seeds", "0"], "--seeds"),
        ("temperature_sweep", ["--set", "augmentation=colorjitter", "--dataset", "mnist1d"], "augmentation"),
        ("augmentation_ablation", ["--set", "augmentation=colorjitter", "--dataset", "mnist1d"], "augmentation"),
        ("training_duration", ["--set", "optimizer=adamw"], "optimizer"),
        ("optuna_search", ["--num-samples", "0"], "num_samples"),
    ],
)
def test_bad_input_exits_2_with_one_line(script, argv, field, tmp_path, capsys):
    import ray

    ray_was_running = ray.is_initialized()
    code = load_script(script).main([*argv, "--storage", str(tmp_path / "s"), "--quiet"])
    captured = capsys.readouterr()
    assert code == 2
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{script}: error:")
    assert field in lines[0]
    assert not (tmp_path / "s").exists()
    if not ray_was_running:
        assert not ray.is_initialized()


def test_unknown_field_suggests_the_right_one(tmp_path, capsys):
    assert load_script("temperature_sweep").main(["--set", "temprature=1", "--storage", str(tmp_path)]) == 2
    assert "did you mean 'temperature'" in capsys.readouterr().err


# --- every script in process, on one local Ray ----------------------------------------------------




@pytest.mark.parametrize("name", SCRIPTS)
def test_script_runs_end_to_end(name, ray_local, storage, capsys):
    argv = [*TINY, *EXTRA[name], "--storage", str(storage)]
    rows = expected_rows(name, argv)
    code = load_script(name).main(argv)
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert ray_local.is_initialized()
    study_dir = storage / name
    trials = check_study_dir(study_dir, rows, argv)
    assert f"report: {study_dir / 'report.md'}" in out

    preset = local_preset(name)
    sets = overrides_of(argv)
    for axis, values in preset.axes.items():  # each remaining axis value got its trials
        if axis not in sets:
            assert sorted(trials[axis].unique()) == sorted(values), axis
    overridden = {key for arm in preset.arms or [] for key in arm}  # an arm's own values replace the base's
    for key, value in preset.base.items():  # the preset's base reached every trial
        if key not in sets and key not in overridden:
            assert (trials[key] == value).all(), key
    if name == "optuna_search":
        assert (study_dir / "optuna.journal").is_file()
        assert trials["temperature"].between(1.0, 16.0).all()
    if name == "initialization":
        assert sorted(trials["init"]) == ["interpolate", "random", "teacher_init"]
    if name == "training_duration":
        assert sorted(zip(trials["optimizer"], trials["lr"])) == [("adam", 1e-3), ("sgd", 0.05)]


# --- one script as a real subprocess, a second driver on the same local Ray ------------------------


def test_ensemble_size_script_as_a_subprocess(ray_local, storage):
    """``python studies/ensemble_size.py --address ...``: runs after the in-process run of the same
    script, so its teachers come from the shared store and only its trials run."""
    argv = [*TINY, *EXTRA["ensemble_size"], "--storage", str(storage), "--name", "ensemble_size_cli",
            "--address", ray_local.get_runtime_context().gcs_address]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    proc = subprocess.run([sys.executable, str(STUDIES_DIR / "ensemble_size.py"), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ray_local.is_initialized()
    rows = expected_rows("ensemble_size", argv)
    assert rows == 3  # the local preset's three ensemble sizes
    study_dir = storage / "ensemble_size_cli"
    trials = check_study_dir(study_dir, rows, argv)
    assert sorted(trials["teacher_members"]) == [1, 3, 8]
    # The printed summary: a header naming the axis and the metrics, then one line per ensemble size.
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("teacher_members") and "test_agreement" in line)
    body = [line.split()[0] for line in lines[header + 2 : header + 2 + rows]]
    assert body == ["1", "3", "8"]
    assert f"report: {study_dir / 'report.md'}" in proc.stdout
    # Same flags, same teachers: the in-process run of this script already trained all eight members.
    in_process = storage / "ensemble_size" / "trials.parquet"
    if in_process.exists():
        assert "8 members needed, 8 in the store" in proc.stdout
        assert sorted(pd.read_parquet(in_process)["teacher_key"]) == sorted(trials["teacher_key"])


def test_epochs_on_a_study_with_a_step_budget_is_refused(capsys):
    from kd_ray.study.cli import study_main

    assert study_main("dataset_size", None, ["--set", "epochs=3", "--storage", "/tmp/kd_ray_never_written"]) == 2
    err = capsys.readouterr().err
    assert "epochs=3 would be ignored: this preset fixes steps=" in err and err.count("\n") == 1
