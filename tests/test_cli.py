"""Tests for kd_ray.cli: `kd-ray trial` and `kd-ray teachers`, in-process and as a console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kd_ray.train.trial
from kd_ray.cli import main
from kd_ray.config import TrialConfig
from kd_ray.train.setup import FINAL_METRICS
from kd_ray.train.teachers import WEIGHTS, TeacherStore


def _command() -> list[str]:
    script = Path(sys.executable).parent / "kd-ray"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "kd_ray.cli"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # The environment carries KD_RAY_DATA and KD_RAY_TEACHERS of the session (see conftest.py).
    return subprocess.run(
        [*_command(), *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
    )


def _set_args(cfg: TrialConfig, **changes) -> list[str]:
    """``--set`` arguments for the fields where ``cfg`` (plus changes) differs from the defaults."""
    defaults = TrialConfig().to_dict()
    values = {**cfg.to_dict(), **changes}
    args: list[str] = []
    for key, value in values.items():
        if value != defaults[key]:
            args += ["--set", f"{key}={value}"]
    return args


@pytest.fixture
def no_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("compute started for an input that should have been refused")

    monkeypatch.setattr(kd_ray.train.trial, "run_trial", refuse)
    monkeypatch.setattr(kd_ray.train.trial, "TrialData", refuse)
    monkeypatch.setattr(kd_ray.train.trial, "ensure_members", refuse)


# --- kd-ray trial ------------------------------------------------------------------------------


def test_trial_subprocess_json(base_cfg, session_store, shared_teacher) -> None:
    keys_before = session_store.keys()
    proc = _run("trial", *_set_args(base_cfg, epochs=1), "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    for key in (*FINAL_METRICS, "status", "teacher_key", "config_json", "epochs_completed"):
        assert key in result, key
    assert result["status"] == "TERMINATED"
    assert result["epochs_completed"] == 1
    assert result["teacher_key"] == base_cfg.teacher_key()
    assert TrialConfig.from_dict(json.loads(result["config_json"])) == base_cfg.replace(epochs=1)
    assert 0.0 <= result["test_agreement"] <= 1.0
    table = "\n".join(lines[:-1])
    assert "test agreement" in table and "teacher" in table
    assert "teacher member" not in proc.stderr  # --quiet, and the teachers came from the store
    assert session_store.keys() == keys_before  # nothing was trained


@pytest.mark.parametrize(
    ("setting", "needles"),
    [
        ("temprature=1", ("temprature", "did you mean 'temperature'")),
        ("alpha=2", ("alpha=", "out of range")),
        ("oops", ("oops", "key=value")),
        ("epochs=two", ("epochs=",)),
        ("augmentation=colorjitter", ("augmentation=", "colorjitter", "mnist1d")),
    ],
)
def test_bad_input_exits_2_with_one_line(
    setting: str, needles: tuple[str, ...], no_compute: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["trial", "--set", setting, "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kd-ray: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(
    ("setting", "field"), [("temprature=1", "temprature"), ("augmentation=colorjitter", "augmentation")]
)
def test_bad_input_console_script_fails_fast(setting: str, field: str, session_store, kd_dirs) -> None:
    keys_before = session_store.keys()
    started = time.perf_counter()
    proc = _run("trial", "--set", setting, timeout=60)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], proc.stderr
    assert elapsed < 10
    assert session_store.keys() == keys_before


def test_trial_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trial", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--set" in out and "--json" in out
    assert "temperature" in out  # the fields are listed


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


# --- kd-ray teachers ---------------------------------------------------------------------------


def test_teachers_list(session_store, shared_teacher, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["teachers", "list"]) == 0  # the store comes from KD_RAY_TEACHERS
    out = capsys.readouterr().out
    keys = session_store.keys()
    assert f"{len(keys)} members" in out.splitlines()[0]
    for key in shared_teacher:
        line = next(line for line in out.splitlines() if line.startswith(key))
        assert "mnist1d" in line and "test_acc=" in line


def test_teachers_verify(session_store, shared_teacher) -> None:
    proc = _run("teachers", "verify", "--store", session_store.root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    for key in shared_teacher:
        assert f"{key}: ok" in lines
    assert lines[-1] == f"{len(session_store.keys())} members checked, 0 bad"


def test_teachers_verify_finds_and_deletes_bad_members(
    session_store, shared_teacher, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "store"
    shutil.copytree(session_store.root, root)
    bad = shared_teacher[0]
    path = root / "members" / bad / WEIGHTS
    path.write_bytes(path.read_bytes()[:-100])

    assert main(["teachers", "verify", "--store", str(root)]) == 1
    out = capsys.readouterr().out
    bad_line = next(line for line in out.splitlines() if line.startswith(f"{bad}: BAD"))
    assert WEIGHTS in bad_line
    assert f"{shared_teacher[1]}: ok" in out
    assert out.strip().splitlines()[-1].endswith("1 bad")

    assert main(["teachers", "verify", "--store", str(root), "--delete-bad"]) == 0
    assert f"{bad}: deleted" in capsys.readouterr().out
    store = TeacherStore(root)
    assert bad not in store.keys() and shared_teacher[1] in store.keys()
    assert main(["teachers", "verify", "--store", str(root)]) == 0
    assert session_store.verify(bad) == []  # the session's own copy is untouched
