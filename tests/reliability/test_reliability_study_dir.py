"""One study, one driver, one directory inside its storage; a Ray that does not start or loses its head.

Each test runs a study script as real processes (in their own sessions, so that every Ray process
they start is found and killed at the end): a second driver of a running study, names and storages
that would escape or break the storage, a run that ended before its first trial, the head's GCS
killed mid-study, and a Ray that cannot start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from processes import command_line, kill_session, session_processes, started_drivers, wait_for

from kd_ray.config import EXIT_BAD_INPUT, EXIT_RAY
from kd_ray.study.storage import lock_path

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "studies" / "temperature_sweep.py"
# temperature_sweep with one small teacher member: four temperatures, one trial at a time.
TRIALS = 4


def study_args(epochs: int = 40, every: int = 10) -> list[str]:
    return ["--set", "teacher_members=1", "--set", "teacher_epochs=2", "--set", f"epochs={epochs}",
            "--set", f"eval_every={every}", "--set", "batch_size=256", "--seeds", "1", "--max-concurrent", "1",
            "--quiet", "--pack", "off"]


ARGS = study_args()


@pytest.fixture
def drivers():
    with started_drivers(SCRIPT, REPO) as start:
        yield start


def run_script(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    environment = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    environment.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=timeout, start_new_session=True)


def one_error_line(completed: subprocess.CompletedProcess) -> str:
    errors = [line for line in completed.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, completed.stderr[-3000:]
    assert "Traceback" not in completed.stdout + completed.stderr, completed.stderr[-3000:]
    return errors[0]


def table_rows(study_dir: Path) -> list[str]:
    return pq.read_table(study_dir / "trials.parquet", columns=["trial_id"])["trial_id"].to_pylist()


def lock_holder(storage: Path, name: str) -> bool:
    path = Path(lock_path(str(storage), name))
    return path.is_file() and path.stat().st_size > 0


def begun(study_dir: Path) -> bool:
    return any(study_dir.glob("experiment_state-*.json"))


@pytest.mark.slow
def test_one_driver_per_study_and_a_dead_driver_s_lock_is_recovered(drivers, tmp_path):
    storage = tmp_path / "results"
    argv = [*ARGS, "--storage", str(storage)]
    first = drivers(argv, tmp_path / "first.log")
    wait_for(lambda: lock_holder(storage, "temperature_sweep"), 60, "the first driver's lock", first.proc, first.log)

    # A second driver of the same study, fresh or --resume: refused before any compute, naming the first.
    for extra in ([], ["--resume"]):
        second = run_script([*argv, *extra], tmp_path, timeout=60)
        assert second.returncode == EXIT_BAD_INPUT, second.stderr[-3000:]
        line = one_error_line(second)
        assert "another driver" in line and f"pid {first.proc.pid}" in line, line
        assert "Ray:" not in second.stdout and "teachers:" not in second.stdout  # nothing started
    assert first.proc.poll() is None, "the refused drivers must leave the running one alone"

    # The first driver killed once its study began: the kernel drops its lock, and --resume finishes it.
    study_dir = storage / "temperature_sweep"
    wait_for(lambda: begun(study_dir), 180, "Ray Tune's first saved state", first.proc, first.log)
    os.killpg(first.sid, signal.SIGKILL)
    first.wait(30)
    kill_session(first.sid)
    resumed = run_script([*argv, "--resume"], tmp_path, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows = table_rows(study_dir)
    assert len(rows) == TRIALS and len(set(rows)) == TRIALS


BAD_STUDY_DIRS = {
    "a name of '..'": (["--name", "..", "--resume"], "study name '..'"),
    "a name of '.'": (["--name", "."], "study name '.'"),
    "a name with a slash": (["--name", "a/b"], "study name 'a/b'"),
    "the teacher store's name": (["--name", "teachers"], "storage's own folder"),
    "the locks' name": (["--name", "locks"], "storage's own folder"),
    "a 300-character name": (["--name", "n" * 300], "(300 characters)"),
    "a storage that is a file": (["--storage", "{tmp}/a_file"], "a file, not a directory"),
    "a storage below a file": (["--storage", "{tmp}/a_file/below"], "a part of its path is a file"),
    "a storage that is a symlink loop": (["--storage", "{tmp}/loop"], "leads nowhere"),
    "repeated seeds": (["--seeds", "0,0"], "seeds [0, 0] repeat [0]"),
    "a repeated --set key": (["--set", "alpha=0.5", "--set", "alpha=0.1"], "--set alpha is given twice"),
    "--resume of a study that never existed": (["--name", "never", "--resume"], "no study never"),
}


@pytest.mark.parametrize("case", list(BAD_STUDY_DIRS))
def test_a_study_that_would_escape_or_break_its_storage_is_refused_before_any_compute(case, tmp_path):
    flags, expected = BAD_STUDY_DIRS[case]
    (tmp_path / "a_file").write_text("the user's own file\n")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    storage = tmp_path / "results"
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    completed = run_script(["--storage", str(storage), *ARGS, *flags], tmp_path, timeout=60)
    assert completed.returncode == EXIT_BAD_INPUT, completed.stdout[-2000:] + completed.stderr[-2000:]
    line = one_error_line(completed)
    assert expected in line, line
    assert "Ray:" not in completed.stdout and "teachers:" not in completed.stdout
    # Nothing written beside the user's files, nor above the storage; the storage itself may be made.
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if not p.is_relative_to(storage))
    assert after == [p for p in before if not p.startswith("results")]
    assert (tmp_path / "a_file").read_text() == "the user's own file\n"


@pytest.mark.slow
def test_what_a_run_that_ended_before_its_first_trial_left_blocks_neither_a_rerun_nor_resume(tmp_path):
    # What a run that failed while pickling its Tuner left (Optuna 5.1's NSGA-II sampler once did):
    # its spec, an empty tuner.pkl and an Optuna journal, but no saved Ray Tune state.
    short = [*study_args(epochs=2, every=1), "--set", "temperature=4", "--storage", str(tmp_path / "results")]
    for name, extra in (("rerun", []), ("resumed", ["--resume"])):
        study_dir = tmp_path / "results" / name
        study_dir.mkdir(parents=True)
        (study_dir / "spec.json").write_text('{"base": {}}\n')
        (study_dir / "tuner.pkl").write_bytes(b"")
        (study_dir / "optuna.journal").write_text("")
        completed = run_script([*short, "--name", name, *extra], tmp_path, timeout=300)
        assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
        assert len(table_rows(study_dir)) == 1
        assert (study_dir / "tuner.pkl").stat().st_size > 0  # Ray Tune's own, written anew
        assert not (study_dir / "optuna.journal").exists()


def ray_processes(sid: int, name: str) -> list[int]:
    return [pid for pid in session_processes(sid) if name in command_line(pid)]


@pytest.mark.slow
def test_a_lost_ray_head_ends_the_study_in_one_line_and_resume_finishes_it(drivers, tmp_path):
    storage = tmp_path / "results"
    argv = [*study_args(epochs=150), "--storage", str(storage)]
    driver = drivers(argv, tmp_path / "driver.log")
    study_dir = storage / "temperature_sweep"
    wait_for(lambda: any(study_dir.glob("_trainable*/result.json")), 240, "a trial's first report",
             driver.proc, driver.log)
    gcs = wait_for(lambda: ray_processes(driver.sid, "gcs_server"), 30, "the GCS", driver.proc, driver.log)
    killed = time.monotonic()
    for pid in gcs:
        os.kill(pid, signal.SIGKILL)
    code = driver.wait(120)
    assert code == EXIT_RAY, driver.output()[-3000:]
    # Before Ray's own 60 s limit, after which its core worker would end the process with a line of its own.
    assert time.monotonic() - killed < 60
    output = driver.output()
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "lost Ray's head" in errors[0] and "--resume" in errors[0], output[-3000:]
    assert "Traceback" not in output
    kill_session(driver.sid)

    resumed = run_script([*argv, "--resume"], tmp_path, timeout=500)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows = table_rows(study_dir)
    assert len(rows) == TRIALS and len(set(rows)) == TRIALS


def test_a_local_ray_that_cannot_start_is_one_line_and_exit_5(tmp_path):
    # Ray's files go below RAY_TMPDIR: a file there keeps a local Ray from starting.
    (tmp_path / "not_a_dir").write_text("")
    completed = run_script([*ARGS, "--storage", str(tmp_path / "results")], tmp_path,
                           env={"RAY_TMPDIR": str(tmp_path / "not_a_dir")}, timeout=120)
    assert completed.returncode == EXIT_RAY, completed.stdout[-3000:] + completed.stderr[-3000:]
    line = one_error_line(completed)
    assert "a local Ray did not start" in line and "rerun the same command" in line, line
    assert "--resume" not in line  # nothing of the study exists to resume
