"""The driver of a study interrupted (SIGINT) and killed (SIGKILL) mid-study, as real processes: each
time, rerunning the same command with --resume goes on without re-running finished trials, and the
last run writes complete, consistent tables. Ray's processes of the killed driver do not outlive it.

A study script runs as a subprocess in its own session (start_new_session), so that every process it
starts, Ray's included, can be found by session id and is killed at the end of the test if still there.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from processes import Driver, command_line, session_processes, started_drivers
from ray_results import epoch_reports, parse_epoch_reports

from kd_ray.tables import PARTS_DIR, TRIAL_PART, Completeness, read_completeness

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "studies" / "temperature_sweep.py"
# temperature_sweep with one teacher member: four temperatures, one trial each, run one at a time so
# that a finished trial is followed by a running one. 150 epochs, evaluated and checkpointed every 10.
# result.json reaches the study directory in bursts, with each snapshot of Ray Tune's saved state: at
# least every 10 s, and whenever a trial has checkpointed ten times since the last one. The fifteen
# evaluations let the resumed run's next trial be seen mid-run at any of its first twelve, the snapshot
# of its tenth checkpoint included, whatever the load (at 120 epochs only the first nine, and the
# snapshots of a whole resumed run once all fell outside them).
EPOCHS, EVERY = 150, 10
ARGS = ["--set", "teacher_members=1", "--set", "teacher_epochs=2", "--set", f"epochs={EPOCHS}",
        "--set", f"eval_every={EVERY}", "--set", "batch_size=256", "--seeds", "1", "--max-concurrent", "1", "--quiet",
        "--pack", "off"]  # a Ray Tune trial per config, one after another (packs: tests/packs/test_packs_on_ray.py)
TEMPERATURES = {1.0, 4.0, 8.0, 16.0}
RAY_CORE = ("gcs_server", "raylet", "ray::ImplicitFunc", "default_worker.py")


def describe(pids: list[int]) -> list[str]:
    return [f"{pid} {command_line(pid)[:120]}" for pid in pids]


def is_ray_core(pid: int) -> bool:
    text = command_line(pid)
    try:
        text += " " + Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        pass
    return any(name in text for name in RAY_CORE)


@pytest.fixture
def drivers():
    """Start drivers; at the end, kill whatever is left in their sessions (each process by its pid)."""
    with started_drivers(SCRIPT, REPO) as start:
        yield start


def wait_for(condition, timeout: float, driver: Driver | None = None, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if driver is not None and driver.proc.poll() is not None:
            pytest.fail(
                f"the driver exited ({driver.proc.returncode}) while waiting for {what}:\n{driver.output()[-3000:]}"
            )
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}" + (f":\n{driver.output()[-3000:]}" if driver else ""))


def trial_dirs(study_dir: Path) -> list[Path]:
    if not study_dir.is_dir():
        return []
    return sorted(p for p in study_dir.iterdir() if p.is_dir() and p.name.startswith("_trainable"))


def finished(study_dir: Path) -> dict[str, tuple[str, str]]:
    """Trials whose final report is logged: trial dir -> (progress.csv, result.json) contents."""
    out = {}
    for directory in trial_dirs(study_dir):
        try:
            result = (directory / "result.json").read_text()
            progress = (directory / "progress.csv").read_text()
        except OSError:
            continue
        lines = result.splitlines()
        try:
            if lines and json.loads(lines[-1]).get("final"):
                out[directory.name] = (progress, result)
        except ValueError:
            continue
    return out


def final_trial_ids(done: dict[str, tuple[str, str]]) -> set[str]:
    """The trial_ids of finished trials (as ``finished`` gives them), from their final reports."""
    return {json.loads(result.splitlines()[-1])["trial_id"] for _, result in done.values()}


def trials_on_disk(study_dir: Path) -> set[str]:
    """The trial_ids in the trials table or waiting as parts to be compacted into it."""
    table = study_dir / "trials.parquet"
    ids = set(pq.read_table(table, columns=["trial_id"])["trial_id"].to_pylist()) if table.is_file() else set()
    parts = study_dir / PARTS_DIR
    return ids | ({p.name[: -len(TRIAL_PART)] for p in parts.glob(f"*{TRIAL_PART}")} if parts.is_dir() else set())


def recorded_terminated(study_dir: Path) -> set[str]:
    """Trial dirs that Ray Tune's saved experiment state records as TERMINATED: a resumed run does
    not run these again."""
    states = sorted(study_dir.glob("experiment_state-*.json"))
    if not states:
        return set()
    try:
        state = json.loads(states[-1].read_text())
    except (OSError, ValueError):
        return set()
    done = set()
    for trial_json, _ in state["trial_data"]:
        trial = json.loads(trial_json)
        if trial.get("status") == "TERMINATED":
            done.add(Path(trial["relative_logdir"]).name)
    return done


def test_killed_then_interrupted_driver_resumes_to_complete_tables(tmp_path, drivers):
    storage = tmp_path / "storage"
    study_dir = storage / "temperature_sweep"
    argv = [*ARGS, "--storage", str(storage)]

    # 1. SIGKILL the driver once Ray Tune's saved state records a finished trial.
    first = drivers(argv, tmp_path / "run1.log")
    wait_for(lambda: recorded_terminated(study_dir), 300, first, "a first trial recorded as finished")
    first.proc.kill()
    killed_at = time.monotonic()
    assert first.wait(30) == -signal.SIGKILL
    recorded = recorded_terminated(study_dir)
    done_first = {name: files for name, files in finished(study_dir).items() if name in recorded}
    assert 1 <= len(done_first) < len(TEMPERATURES), "the study ended before the driver was killed"
    # Every finished trial is on disk: in the tables, or as a part the next run compacts into them.
    assert final_trial_ids(done_first) <= trials_on_disk(study_dir)
    # Ray's core processes (GCS, raylet, trial workers) die with the driver that started them.
    wait_for(lambda: not [p for p in session_processes(first.sid) if is_ray_core(p)], 30, None,
             "the killed driver's Ray core processes to exit")

    # 2. --resume, then Ctrl-C (SIGINT to the driver) once a further trial has finished: the study is
    # reported as partial (exit 3) and its tables hold the finished trials, marked partial.
    second = drivers([*argv, "--resume"], tmp_path / "run2.log")

    def new_finish_and_one_mid_run() -> bool:
        recorded = recorded_terminated(study_dir)
        if not recorded - set(done_first):
            return False
        done = finished(study_dir)
        # Mid-run: evaluated at least once, with room left before its end (Tune records a finished
        # trial in its saved state only at its next snapshot, which can take a few evaluations). A
        # trial the saved state records as finished is not mid-run, even while its result.json is
        # still the one of an earlier snapshot.
        return any(1 <= len(logged) <= EPOCHS // EVERY - 3 for logged in (
            epoch_reports(d) for d in trial_dirs(study_dir)
            if d.name not in done and d.name not in recorded and (d / "result.json").is_file()))

    wait_for(new_finish_and_one_mid_run, 300, second, "a trial finished by the resumed run and one mid-run")
    second.proc.send_signal(signal.SIGINT)
    assert second.wait(120) == 3, second.output()[-3000:]
    assert "is PARTIAL" in second.output() and "--resume" in second.output()
    done_second = finished(study_dir)
    assert set(pd.read_parquet(study_dir / "trials.parquet")["trial_id"]) == final_trial_ids(done_second)
    assert read_completeness(str(study_dir)) == Completeness(len(done_second), len(TEMPERATURES))
    assert set(done_first) < set(done_second) <= recorded_terminated(study_dir)  # the interrupt saved the state
    assert len(done_second) < len(TEMPERATURES), "the study ended before the driver was interrupted"
    for name, files in done_first.items():
        assert done_second[name] == files, f"{name} was run again"
    # The trial the interrupt stopped after some checkpoints: it must go on from the last one.
    interrupted = {d.name: epoch_reports(d) for d in trial_dirs(study_dir)
                   if d.name not in done_second and (d / "result.json").is_file()}
    interrupted = {name: logged for name, logged in interrupted.items() if logged}
    assert interrupted, "no trial was stopped mid-run by the interrupt"

    # 3. --resume again: the study completes; finished trials were not run again.
    third = drivers([*argv, "--resume"], tmp_path / "run3.log")
    assert third.wait(400) == 0, third.output()[-3000:]
    assert "report:" in third.output()
    after = finished(study_dir)
    for name, files in done_second.items():
        assert after[name] == files, f"{name} was run again"
    for name, logged in interrupted.items():
        old = [r["epoch"] for r in logged]
        resumed = [r["epoch"] for r in parse_epoch_reports(after[name][1])]
        assert resumed[: len(old)] == old  # the interrupted run's reports stay as they were
        # The resumed trial reports its checkpoint's epoch again first (the last the interrupted run
        # reported, or one it checkpointed before the interrupt took its report), then goes on.
        again = resumed[len(old)]
        assert again in (old[-1], old[-1] + EVERY), name
        assert resumed[len(old) + 1:] == list(range(again + EVERY, EPOCHS + 1, EVERY)), name  # no epoch run twice

    trials = pd.read_parquet(study_dir / "trials.parquet")
    table = pd.read_parquet(study_dir / "epochs.parquet")
    assert len(trials) == len(TEMPERATURES) and trials["trial_id"].is_unique
    assert (trials["status"] == "TERMINATED").all(), trials[["status", "error"]]
    assert set(trials["temperature"]) == TEMPERATURES
    assert (trials["epochs_completed"] == EPOCHS).all()
    assert trials["teacher_key"].nunique() == 1
    for column in ("test_acc", "test_agreement", "train_agreement", "aug_train_agreement"):
        assert trials[column].between(0, 1).all(), column
    assert set(table["trial_id"]) == set(trials["trial_id"])
    for row in trials.itertuples():
        rows = table[table["trial_id"] == row.trial_id]
        assert list(rows["epoch"]) == list(range(EVERY, EPOCHS + 1, EVERY)), row.trial_id  # one row per eval epoch
        assert rows["test_agreement"].iloc[-1] == pytest.approx(row.test_agreement)
    # Each trial finished before an interrupt keeps the row of its own final report.
    by_id = trials.set_index("trial_id")
    for _, result in done_second.values():
        final = json.loads(result.splitlines()[-1])
        assert by_id.loc[final["trial_id"], "test_agreement"] == pytest.approx(final["test_agreement"])

    # Nothing of the killed driver's Ray outlives it for long: its two agent processes exit on their
    # own once their raylet is gone (docs/reliability.md; `ray stop --force` ends them at once).
    wait_for(lambda: not session_processes(first.sid), max(5.0, 150 - (time.monotonic() - killed_at)), None,
             f"the killed driver's Ray processes to exit: {describe(session_processes(first.sid))}")
    assert not session_processes(second.sid) and not session_processes(third.sid)
