"""A study's storage failing mid-study, on real filesystems: a small tmpfs that fills up (a second
writer takes the last free byte), a tmpfs remounted read-only, a study directory moved away. Each
time the study ends with one line naming the storage and exit code 4, Ray Tune's saved state and
every stored teacher member stay whole, and after the fix --resume finishes the study with
complete tables. Also: a cut-off saved Ray Tune state refused on --resume, and two studies sharing
one teacher store started at the same moment.

The studies run in this process on the module's local Ray (``ray_local``), through the study
script's own ``main``. Mounting needs root: without it those tests skip, saying so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from kd_ray.study.guards import check_saved_state
from kd_ray.study.storage import LOCKS_DIR, SPEC_FILE
from kd_ray.train.teachers import TeacherStore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 4
# temperature_sweep with one teacher member: four temperatures, one trial at a time, four evaluations
# (and checkpoints) each.
ARGS = ["--set", "teacher_members=1", "--set", "teacher_epochs=2", "--set", f"epochs={EPOCHS}",
        "--set", "eval_every=1", "--set", "batch_size=256", "--seeds", "1", "--max-concurrent", "1", "--quiet",
        "--pack", "off"]  # a Ray Tune trial per config, one after another (packs: tests/packs/test_packs_on_ray.py)
NAME = "temperature_sweep"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"kd_ray_reliability_storage_{name}", REPO / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = load_script(NAME)


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    """The study script in this process: its exit code and the error lines it printed."""
    capsys.readouterr()
    code = SCRIPT.main(argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith(f"{NAME}: error:")]


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)``: a fresh tmpfs of that size (e.g. '24m') mounted in tmp_path, unmounted after."""
    mounted = []

    def mount(size: str) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        done = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)) if os.geteuid() == 0 else None
        if done is None or done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip() if done else 'not root'}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        _mount("-o", "remount,rw", str(point))
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def files_and_digests(storage: Path) -> dict[str, str]:
    """Every file of a storage and its digest, but the study locks (``locks/``), which each run rewrites
    with its driver's pid: they are the storage's bookkeeping, not a study's files."""
    return {str(p): digest(p) for p in sorted(storage.rglob("*"))
            if p.is_file() and p.relative_to(storage).parts[0] != LOCKS_DIR}


def finished_trials(study_dir: Path) -> int:
    """Trials in the live trials table (0 before it exists)."""
    try:
        return pq.read_metadata(study_dir / "trials.parquet").num_rows
    except (OSError, ValueError):
        return 0


def checkpoints(study_dir: Path) -> int:
    return len(list(study_dir.glob("_trainable*/checkpoint_*/state.pt")))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def members(store: Path) -> dict[str, str]:
    """Every file of every stored teacher member, with its sha256."""
    return {str(p.relative_to(store)): digest(p) for p in sorted((store / "members").rglob("*")) if p.is_file()}


def act_mid_study(study_dir: Path, action, after_trials: int = 1):
    """Start a thread that runs ``action()`` once ``after_trials`` trials are in the tables and the next
    trial has checkpointed; returns (thread, what ``action`` saw of the study then)."""
    seen: dict = {}

    def watch() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if finished_trials(study_dir) >= after_trials and checkpoints(study_dir) > after_trials * EPOCHS:
                seen["trials"] = (study_dir / "trials.parquet").read_bytes()
                action()
                seen["done"] = True
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, seen


def assert_complete(study_dir: Path, kept: bytes) -> None:
    """Four TERMINATED trials, each evaluation once; the trials finished before the fault kept their rows."""
    trials = pd.read_parquet(study_dir / "trials.parquet")
    epochs = pd.read_parquet(study_dir / "epochs.parquet")
    assert len(trials) == 4 and trials["trial_id"].is_unique
    assert (trials["status"] == "TERMINATED").all(), trials[["status", "error"]]
    for trial_id, rows in epochs.groupby("trial_id"):
        assert list(rows["epoch"]) == list(range(1, EPOCHS + 1)), trial_id
    assert set(epochs["trial_id"]) == set(trials["trial_id"])
    before = pq.read_table(pa_buffer(kept)).to_pandas().set_index("trial_id")
    after = trials.set_index("trial_id")
    for trial_id, row in before.iterrows():
        assert after.loc[trial_id, "test_agreement"] == row["test_agreement"], trial_id


def pa_buffer(data: bytes):
    import pyarrow as pa

    return pa.BufferReader(data)


def assert_stopped_whole(study_dir: Path, store: Path, stored: dict[str, str], kept: bytes) -> None:
    """After the fault: Ray Tune's saved state reads back, the members are as they were, the trials
    table read at the fault is there unchanged, and no temporary file is left beside any of them."""
    check_saved_state(str(study_dir))  # raises if cut off
    assert members(store) == stored
    assert (study_dir / "trials.parquet").read_bytes() == kept
    assert (study_dir / SPEC_FILE).is_file()
    assert not [p for p in study_dir.rglob(".*.tmp")], "a temporary file was left behind"


def test_a_full_storage_ends_the_study_in_one_line_and_resume_finishes_it(ray_local, tmpfs, capsys):
    storage = tmpfs("24m")
    study_dir, store = storage / NAME, storage / "teachers"
    argv = [*ARGS, "--storage", str(storage)]
    ballast = storage / "ballast"

    def fill() -> None:  # another writer takes every free byte
        with open(ballast, "wb") as handle:
            try:
                while True:
                    handle.write(b"\0" * (1 << 20))
                    handle.flush()
            except OSError:
                pass

    thread, seen = act_mid_study(study_dir, fill)
    code, errors = run(argv, capsys)
    thread.join(10)
    assert seen.get("done"), "the storage was never filled mid-study"
    assert code == 4, errors
    assert len(errors) == 1, errors
    assert f"the storage {study_dir} ran out of space" in errors[0] and "--resume" in errors[0], errors[0]
    assert shutil.disk_usage(storage).free < 1 << 20  # it really is full
    stored = members(store)
    assert stored and TeacherStore(store).verify(TeacherStore(store).keys()[0]) == []
    assert_stopped_whole(study_dir, store, stored, seen["trials"])

    ballast.unlink()  # space freed
    code, errors = run([*argv, "--resume"], capsys)
    assert code == 0, errors
    assert members(store) == stored  # the teacher was not trained again
    assert_complete(study_dir, seen["trials"])


def test_a_storage_turned_read_only_ends_the_study_in_one_line_and_resume_finishes_it(ray_local, tmpfs, capsys):
    storage = tmpfs("64m")
    study_dir, store = storage / NAME, storage / "teachers"
    argv = [*ARGS, "--storage", str(storage)]

    def read_only() -> None:
        done = _mount("-o", "remount,ro", str(storage))
        assert done.returncode == 0, done.stderr

    thread, seen = act_mid_study(study_dir, read_only)
    code, errors = run(argv, capsys)
    thread.join(10)
    assert seen.get("done"), "the storage was never made read-only mid-study"
    assert code == 4 and len(errors) == 1, errors
    assert f"the storage {study_dir} turned read-only" in errors[0] and "--resume" in errors[0], errors[0]
    stored = members(store)
    assert_stopped_whole(study_dir, store, stored, seen["trials"])

    assert _mount("-o", "remount,rw", str(storage)).returncode == 0
    code, errors = run([*argv, "--resume"], capsys)
    assert code == 0, errors
    assert members(store) == stored
    assert_complete(study_dir, seen["trials"])


def test_a_study_directory_moved_away_mid_study_is_one_line_and_resume_finishes_it(ray_local, tmp_path, capsys):
    storage = tmp_path / "storage"
    study_dir, store = storage / NAME, storage / "teachers"
    moved = storage / f"{NAME}.moved"
    argv = [*ARGS, "--storage", str(storage)]

    thread, seen = act_mid_study(study_dir, lambda: study_dir.rename(moved))
    code, errors = run(argv, capsys)
    thread.join(10)
    assert seen.get("done"), "the study directory was never moved mid-study"
    assert code == 4 and len(errors) == 1, errors
    assert f"the storage {study_dir} disappeared" in errors[0] and "--resume" in errors[0], errors[0]
    assert not study_dir.exists(), "the vanished study directory was made again, empty, in its place"
    stored = members(store)
    assert_stopped_whole(moved, store, stored, seen["trials"])

    moved.rename(study_dir)  # put back
    code, errors = run([*argv, "--resume"], capsys)
    assert code == 0, errors
    assert members(store) == stored
    assert_complete(study_dir, seen["trials"])


def test_a_teacher_store_that_cannot_be_written_is_one_line_naming_it(ray_local, tmpfs, tmp_path, capsys):
    storage = tmp_path / "storage"
    teachers = tmpfs("8m")
    storage.mkdir()
    (storage / "teachers").symlink_to(teachers)  # the teacher store on a filesystem of its own
    assert _mount("-o", "remount,ro", str(teachers)).returncode == 0
    code, errors = run([*ARGS, "--set", "temperature=4", "--storage", str(storage)], capsys)
    assert code == 4 and len(errors) == 1, errors
    assert f"the storage {storage / 'teachers'} turned read-only" in errors[0], errors[0]
    # The study had not begun: the way on is the same command, not --resume (which needs a study).
    assert errors[0].endswith("then rerun the same command"), errors[0]
    assert list(teachers.iterdir()) == [] and not (storage / "temperature_sweep").exists()


def test_a_read_only_storage_is_one_line_before_any_compute(tmpfs, capsys):
    storage = tmpfs("8m")
    assert _mount("-o", "remount,ro", str(storage)).returncode == 0
    code, errors = run([*ARGS, "--set", "temperature=4", "--storage", str(storage)], capsys)
    assert code == 4 and len(errors) == 1, errors
    assert f"the storage {storage} turned read-only" in errors[0], errors[0]
    assert errors[0].endswith("then rerun the same command"), errors[0]
    assert list(storage.iterdir()) == []


# --- a saved state that cannot be read ----------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_study(ray_local, tmp_path_factory) -> Path:
    """A finished one-trial study, to be copied and damaged."""
    storage = tmp_path_factory.mktemp("finished")
    code = SCRIPT.main([*ARGS, "--set", "temperature=4", "--storage", str(storage)])
    assert code == 0
    return storage


def _truncate_state(study_dir: Path) -> Path:
    [state] = study_dir.glob("experiment_state-*.json")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    return state


def _empty_tuner(study_dir: Path) -> Path:
    (study_dir / "tuner.pkl").write_bytes(b"")
    return study_dir / "tuner.pkl"


def _foreign_tuner(study_dir: Path) -> Path:
    (study_dir / "tuner.pkl").write_bytes(b"not a pickle of Ray Tune's")
    return study_dir / "tuner.pkl"


@pytest.mark.parametrize("damage", [_truncate_state, _empty_tuner, _foreign_tuner],
                         ids=["cut-off-experiment-state", "empty-tuner-pkl", "foreign-tuner-pkl"])
def test_a_resume_refuses_a_saved_state_it_cannot_read_and_changes_nothing(finished_study, damage, tmp_path, capsys):
    storage = tmp_path / "storage"
    shutil.copytree(finished_study, storage)
    study_dir = storage / NAME
    damaged = damage(study_dir)
    before = files_and_digests(storage)
    code, errors = run([*ARGS, "--set", "temperature=4", "--storage", str(storage), "--resume"], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert f"cannot resume the study in {study_dir}" in errors[0], errors[0]
    assert (damaged.name in errors[0]) or ("Tuner" in errors[0]), errors[0]
    assert "another --name" in errors[0]
    after = files_and_digests(storage)
    assert after == before  # nothing written, nothing deleted: the finished trial's files are all there
    assert len(pd.read_parquet(study_dir / "trials.parquet")) == 1


# --- a resume is held to the stored spec ------------------------------------------------------------------

FINISHED = [*ARGS, "--set", "temperature=4"]
CHANGES = [
    ("another-epochs", ["--set", "epochs=5"], [f"epochs: stored {EPOCHS}, requested 5"]),
    # More seeds alone grow the study (tests/study/test_study_growth.py); with another change they are refused.
    ("more-seeds-and-epochs", ["--seeds", "2", "--set", "epochs=5"],
     ["seeds: stored [0], requested [0, 1]", f"epochs: stored {EPOCHS}, requested 5"]),
    ("another-scheduler", ["--scheduler", "asha"], ['scheduler: stored "fifo", requested "asha"']),
    ("another-value", ["--set", "temperature=8"], ["temperature: stored 4.0, requested 8.0"]),
    ("two-changes", ["--set", "lr=0.5", "--set", "optimizer=adam"], ["lr: stored ", ", requested 0.5",
                                                                     'optimizer: stored "sgd", requested "adam"']),
]


def changed(argv: list[str], change: list[str]) -> list[str]:
    """``argv`` with ``change`` applied: a ``--set KEY=...`` in it replaces the one for KEY (each key is
    given once), other flags are added."""
    keys = {value.split("=")[0] for flag, value in zip(change, change[1:]) if flag == "--set"}
    kept, i = [], 0
    while i < len(argv):
        if argv[i] == "--set" and argv[i + 1].split("=")[0] in keys:
            i += 2
            continue
        kept.append(argv[i])
        i += 1
    return [*kept, *change]


@pytest.mark.parametrize("case_id, change, needles", CHANGES, ids=[c[0] for c in CHANGES])
def test_a_resume_that_changes_the_study_is_refused_naming_each_difference(finished_study, case_id, change, needles,
                                                                           capsys):
    """Ray Tune would resume the stored trials and ignore the change: refused before any compute."""
    before = files_and_digests(finished_study)
    started = time.perf_counter()
    code, errors = run([*changed(FINISHED, change), "--storage", str(finished_study), "--resume"], capsys)
    assert code == 2 and len(errors) == 1, errors
    line = errors[0]
    assert f"stored in {finished_study / NAME / SPEC_FILE}" in line, line
    for needle in needles:
        assert needle in line, (needle, line)
    assert "Drop the change" in line and "another --name" in line, line
    assert time.perf_counter() - started < 20
    assert files_and_digests(finished_study) == before


def test_a_resume_of_the_same_study_runs_nothing_again(finished_study, tmp_path, capsys):
    """The stored spec, with other resources (they are not part of it): nothing finished runs again."""
    storage = tmp_path / "storage"
    shutil.copytree(finished_study, storage)
    [trial_dir] = (storage / NAME).glob("_trainable*")
    log = (trial_dir / "result.json").read_bytes()
    code, errors = run([*FINISHED, "--max-concurrent", "2", "--storage", str(storage), "--resume"], capsys)
    assert code == 0, errors
    assert (trial_dir / "result.json").read_bytes() == log
    trials = pd.read_parquet(storage / NAME / "trials.parquet")
    assert len(trials) == 1 and trials["status"].item() == "TERMINATED"


# --- one teacher store, two studies started at the same moment ------------------------------------------

CONCURRENT_ARGS = ["--set", "teacher_members=1", "--set", "teacher_epochs=15", "--set", "epochs=1",
                   "--set", "batch_size=256", "--set", "temperature=4", "--seeds", "1", "--quiet"]


def test_two_studies_started_together_share_one_sound_teacher(ray_local, tmp_path):
    """Two drivers on one Ray (this module's) need the same new member at the same moment: their two
    teacher tasks run side by side, the store's lock lets one train it while the other waits and loads
    it, and both studies finish on that one member."""
    storage = tmp_path / "storage"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    address = ray_local.get_runtime_context().gcs_address
    procs = [subprocess.Popen([sys.executable, str(REPO / "studies" / f"{NAME}.py"), *CONCURRENT_ARGS,
                               "--storage", str(storage), "--name", name, "--address", address], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in ("first", "second")]
    outputs = [proc.communicate(timeout=400)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [out[-3000:] for out in outputs]
    # Both found the member missing and sent a task to train it: the race was real.
    assert all("1 members needed, 0 in the store" in out for out in outputs), [out[-3000:] for out in outputs]
    store = TeacherStore(storage / "teachers")
    [key] = store.keys()
    assert store.verify(key) == []
    assert [p.name for p in (storage / "teachers" / "members").iterdir()] == [key]  # no staging left
    keys = {pd.read_parquet(storage / name / "trials.parquet")["teacher_key"].item() for name in ("first", "second")}
    assert len(keys) == 1
    for name in ("first", "second"):
        trials = pd.read_parquet(storage / name / "trials.parquet")
        assert len(trials) == 1 and (trials["status"] == "TERMINATED").all()
