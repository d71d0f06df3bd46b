"""Live tables: finished trials reach trials.parquet and epochs.parquet while a study runs, as parts
compacted into the tables (one row per trial, the last write winning), with the study's completeness
recorded in the trials table; analysis says when it reads a partial study. The slow test runs a
study of a few hundred tiny trials as a real driver process, watches its tables grow, interrupts it
and resumes it to complete tables."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from processes import Driver

from kd_ray import analysis, cli, tables
from kd_ray.tables import (
    COMPLETE,
    EPOCHS_FILE,
    EPOCHS_PART,
    EPOCHS_SCHEMA,
    PARTIAL,
    PARTS_DIR,
    TRIAL_PART,
    TRIALS_FILE,
    TRIALS_SCHEMA,
    Completeness,
    compact_trial_parts,
    read_completeness,
    write_trial_part,
)


def trial(trial_id: str, seed: int, agreement: float, **values) -> dict:
    return {"study": "live", "trial_id": trial_id, "status": "TERMINATED", "dataset": "mnist1d", "seed": seed,
            "temperature": 4.0, "test_agreement": agreement, "test_acc": 0.5 + agreement / 4, "epochs_completed": 2,
            **values}


def epochs_of(trial_id: str, count: int, loss: float = 1.0) -> list[dict]:
    return [{"study": "live", "trial_id": trial_id, "epoch": e, "train_loss": loss / e, "test_agreement": 0.1 * e}
            for e in range(1, count + 1)]


def parts_left(study_dir: Path) -> list[str]:
    directory = study_dir / PARTS_DIR
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


# --- parts, compaction and completeness ----------------------------------------------------------


def test_parts_compact_into_one_row_per_trial_and_the_last_write_wins(tmp_path):
    study_dir = tmp_path / "live"
    assert compact_trial_parts(str(study_dir), 3) is None  # nothing to write: no tables appear
    assert not study_dir.exists() or not (study_dir / TRIALS_FILE).exists()

    write_trial_part(str(study_dir), trial("a", 0, 0.6), epochs_of("a", 2))
    write_trial_part(str(study_dir), trial("b", 1, 0.7), epochs_of("b", 2))
    assert compact_trial_parts(str(study_dir), 3) == Completeness(2, 3)
    assert parts_left(study_dir) == []
    assert read_completeness(str(study_dir)) == Completeness(2, 3)
    assert read_completeness(str(study_dir)).state == PARTIAL
    assert pq.read_schema(study_dir / TRIALS_FILE).equals(TRIALS_SCHEMA, check_metadata=False)
    assert pq.read_schema(study_dir / EPOCHS_FILE).equals(EPOCHS_SCHEMA, check_metadata=False)

    # Trial b again (its trial ran again after a lost driver, with three epochs now) and a new trial c.
    write_trial_part(str(study_dir), trial("b", 1, 0.9), epochs_of("b", 3, loss=2.0))
    write_trial_part(str(study_dir), trial("c", 2, 0.8), epochs_of("c", 1))
    assert compact_trial_parts(str(study_dir), 3) == Completeness(3, 3)
    assert read_completeness(str(study_dir)).state == COMPLETE
    trials = pd.read_parquet(study_dir / TRIALS_FILE).set_index("trial_id")
    assert sorted(trials.index) == ["a", "b", "c"]
    assert trials.loc["b", "test_agreement"] == 0.9 and trials.loc["a", "test_agreement"] == 0.6
    epochs = pd.read_parquet(study_dir / EPOCHS_FILE)
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert epochs.groupby("trial_id").size().to_dict() == {"a": 2, "b": 3, "c": 1}
    assert epochs.loc[epochs["trial_id"] == "b", "train_loss"].tolist() == [2.0, 1.0, pytest.approx(2 / 3)]

    # Nothing pending and the completeness recorded: the tables are left as they are.
    mtime = os.stat(study_dir / TRIALS_FILE).st_mtime_ns
    assert compact_trial_parts(str(study_dir), 3) is None
    assert os.stat(study_dir / TRIALS_FILE).st_mtime_ns == mtime


def test_parts_a_crash_left_behind_fold_in_again_without_duplicates(tmp_path):
    study_dir = tmp_path / "live"
    write_trial_part(str(study_dir), trial("a", 0, 0.6), epochs_of("a", 2))
    compact_trial_parts(str(study_dir), 2)
    # A driver killed after writing the tables but before deleting the parts, and one killed between
    # a trial's epochs part and its trial part: the first is folded in again, the second is dropped.
    write_trial_part(str(study_dir), trial("a", 0, 0.6), epochs_of("a", 2))
    write_trial_part(str(study_dir), trial("b", 1, 0.7), epochs_of("b", 2))
    os.unlink(study_dir / PARTS_DIR / f"b{TRIAL_PART}")
    assert parts_left(study_dir) == [f"a{EPOCHS_PART}", f"a{TRIAL_PART}", f"b{EPOCHS_PART}"]
    assert compact_trial_parts(str(study_dir), 2) == Completeness(1, 2)
    assert parts_left(study_dir) == []
    assert pd.read_parquet(study_dir / TRIALS_FILE)["trial_id"].tolist() == ["a"]
    assert pd.read_parquet(study_dir / EPOCHS_FILE)["trial_id"].tolist() == ["a", "a"]


def test_tables_from_before_a_column_existed_compact_into_the_current_schema(tmp_path):
    study_dir = tmp_path / "live"
    old_schema = pa.schema([f for f in TRIALS_SCHEMA if f.name != "train_time_s"])
    old = tables.to_table([trial("a", 0, 0.6)], old_schema)
    tables.write_table(old, str(study_dir / TRIALS_FILE))
    tables.write_table(tables.to_table(epochs_of("a", 2), EPOCHS_SCHEMA), str(study_dir / EPOCHS_FILE))
    assert read_completeness(str(study_dir)) is None  # tables that record no completeness

    # No part pending: the completeness is recorded all the same.
    assert compact_trial_parts(str(study_dir), 2) == Completeness(1, 2)
    write_trial_part(str(study_dir), trial("b", 1, 0.7, train_time_s=3.0), epochs_of("b", 1))
    assert compact_trial_parts(str(study_dir), 2) == Completeness(2, 2)
    assert pq.read_schema(study_dir / TRIALS_FILE).equals(TRIALS_SCHEMA, check_metadata=False)
    trials = pd.read_parquet(study_dir / TRIALS_FILE).set_index("trial_id")
    assert pd.isna(trials.loc["a", "train_time_s"]) and trials.loc["b", "train_time_s"] == 3.0


def _study(tmp_path: Path, name: str, expected: int | None) -> Path:
    rows = [trial(f"t{seed}", seed, 0.6 + 0.03 * seed, temperature=t) for seed in range(3) for t in (1.0, 4.0)]
    for i, row in enumerate(rows):
        row["trial_id"] = f"t{i}"
    epochs = [e for row in rows for e in epochs_of(row["trial_id"], 2)]
    tables.write_study_tables(str(tmp_path / name), rows, epochs, expected=expected)
    return tmp_path / name


def test_analysis_says_when_it_reads_a_partial_study(tmp_path, capsys):
    partial = _study(tmp_path, "running", expected=20)
    assert cli.main(["analyze", str(partial), "--n-boot", "0"]) == 0
    err = capsys.readouterr().err
    assert f"partial study {partial}: 6 of 20 trials in" in err
    assert len([line for line in err.splitlines() if "partial study" in line]) == 1
    report = (partial / analysis.REPORT_FILE).read_text()
    assert "**Partial study** `running`: 6 of 20 trials are in" in report

    complete = _study(tmp_path, "done", expected=6)
    older = _study(tmp_path, "older", expected=None)  # tables that record no completeness
    assert cli.main(["analyze", str(complete), str(older), "--n-boot", "0", "--out", str(tmp_path / "both")]) == 0
    assert "partial" not in capsys.readouterr().err
    assert "Partial" not in (tmp_path / "both" / analysis.REPORT_FILE).read_text()


# --- the callback on a real local Ray ------------------------------------------------------------


def test_live_rows_are_the_rows_of_ray_tunes_results_errors_included(ray_local, tmp_path):
    from ray import tune

    from kd_ray.study.live_tables import LiveTables, collect_rows

    def trainable(config):  # defined here so that Ray ships it by value to its workers
        from ray import tune

        tune.report({"epoch": 1, "train_loss": 0.5, "test_agreement": 0.7})
        if config["outcome"] == "fails":
            raise ValueError("a trial that fails for good")
        if config["outcome"] == "done":
            tune.report({"epoch": 1, "final": True, "status": "TERMINATED", "epochs_completed": 1,
                         "test_agreement": 0.7})

    study_dir = tmp_path / "live"
    results = tune.Tuner(
        trainable, param_space={"outcome": tune.grid_search(["done", "fails", "quits"])},
        run_config=tune.RunConfig(name="live", storage_path=str(tmp_path), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[LiveTables("live", str(study_dir), expected=3)]),
    ).fit()
    assert read_completeness(str(study_dir)) == Completeness(3, 3)
    trials = pd.read_parquet(study_dir / TRIALS_FILE).sort_values("trial_id", ignore_index=True)
    assert sorted(trials["status"]) == ["ERROR", "STOPPED", "TERMINATED"]
    assert trials.loc[trials["status"] == "ERROR", "error"].str.contains("a trial that fails for good").all()
    rows, epoch_rows = collect_rows("live", results)
    pd.testing.assert_frame_equal(
        trials, tables.to_table(rows, TRIALS_SCHEMA).to_pandas().sort_values("trial_id", ignore_index=True))
    epochs = pd.read_parquet(study_dir / EPOCHS_FILE).sort_values("trial_id", ignore_index=True)
    assert len(epochs) == 3
    pd.testing.assert_frame_equal(
        epochs, tables.to_table(epoch_rows, EPOCHS_SCHEMA).to_pandas().sort_values("trial_id", ignore_index=True))


# --- a study of a few hundred tiny trials, as a real driver -----------------------------------------

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "studies" / "temperature_sweep.py"
TEMPERATURES = (1.0, 4.0, 8.0, 16.0)
SEEDS = 50
EXPECTED = len(TEMPERATURES) * SEEDS
# One shared one-member teacher of one epoch; students of one epoch, evaluated once.
ARGS = ["--set", "teacher_members=1", "--set", "teacher_epochs=1", "--set", "teacher_sharing=shared",
        "--set", "epochs=1", "--set", "eval_every=1", "--set", "batch_size=256", "--seeds", str(SEEDS), "--quiet",
        "--pack", "off"]  # a Ray Tune trial per config: the tables fill as each one finishes


@pytest.fixture
def drivers():
    started: list[Driver] = []

    def start(argv: list[str], log: Path) -> Driver:
        started.append(Driver(SCRIPT, argv, log, REPO))
        return started[-1]

    yield start
    for driver in started:
        driver.close()


def wait_for_rows(study_dir: Path, more_than: int, driver: Driver, timeout: float = 300) -> Completeness:
    """The completeness the live tables record, once they hold more than ``more_than`` trials and
    while the driver still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.proc.poll() is not None:
            pytest.fail(f"the driver exited ({driver.proc.returncode}) before its tables held more than "
                        f"{more_than} trials:\n{driver.output()[-3000:]}")
        completeness = read_completeness(str(study_dir))
        if completeness is not None and completeness.finished > more_than:
            return completeness
        time.sleep(0.2)
    pytest.fail(f"the tables held no more than {more_than} trials after {timeout} s:\n{driver.output()[-3000:]}")


def check_live_tables(study_dir: Path, at_least: int) -> pd.DataFrame:
    """Tables read while the study runs: the trials in so far, each with its epoch row."""
    trials = pd.read_parquet(study_dir / TRIALS_FILE)  # first: the epochs of these are written before them
    epochs = pd.read_parquet(study_dir / EPOCHS_FILE)
    assert at_least <= len(trials) < EXPECTED
    assert trials["trial_id"].is_unique and (trials["status"] == "TERMINATED").all()
    assert set(trials["trial_id"]) <= set(epochs["trial_id"])
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    return trials


def finished_in_saved_state(study_dir: Path) -> set[str]:
    """The trials Ray Tune's saved experiment state records as finished."""
    from ray import tune

    return {t.trial_id for t in tune.ExperimentAnalysis(str(study_dir)).trials if t.status in ("TERMINATED", "ERROR")}


@pytest.mark.slow
def test_a_study_has_live_tables_and_an_interrupted_one_resumes_to_complete_tables(tmp_path, drivers, capsys):
    storage = tmp_path / "storage"
    study_dir = storage / "temperature_sweep"
    argv = [*ARGS, "--storage", str(storage)]

    # 1. The tables grow while the study runs, and record how many of how many trials are in.
    first = drivers(argv, tmp_path / "run1.log")
    early = wait_for_rows(study_dir, 0, first)
    assert early.expected == EXPECTED and early.state == PARTIAL
    later = wait_for_rows(study_dir, early.finished + 20, first)
    check_live_tables(study_dir, at_least=later.finished)

    # 2. Ctrl-C: exit 3, and the tables hold exactly the trials that finished, marked partial.
    first.proc.send_signal(signal.SIGINT)
    assert first.wait(120) == 3, first.output()[-3000:]
    assert "is PARTIAL" in first.output()
    interrupted = pd.read_parquet(study_dir / TRIALS_FILE)
    completeness = read_completeness(str(study_dir))
    assert completeness == Completeness(len(interrupted), EXPECTED) and completeness.state == PARTIAL
    assert len(interrupted) < EXPECTED, "the study ended before the interrupt"
    assert interrupted["trial_id"].is_unique and (interrupted["status"] == "TERMINATED").all()
    assert set(interrupted["trial_id"]) == finished_in_saved_state(study_dir)
    assert parts_left(study_dir) == []
    # A finished trial whose row was lost (a driver killed between the two): the resumed run takes
    # it from Ray Tune's saved state, which records it as finished, so it is not run again.
    lost = sorted(interrupted["trial_id"])[0]
    kept_rows = [row for row in pq.read_table(study_dir / TRIALS_FILE).to_pylist() if row["trial_id"] != lost]
    kept_epochs = [row for row in pq.read_table(study_dir / EPOCHS_FILE).to_pylist() if row["trial_id"] != lost]
    tables.write_study_tables(str(study_dir), kept_rows, kept_epochs, expected=EXPECTED)
    assert lost not in set(pd.read_parquet(study_dir / TRIALS_FILE)["trial_id"])

    # 3. --resume: the tables grow from there, and analysis reads them mid-study and says so.
    second = drivers([*argv, "--resume"], tmp_path / "run2.log")
    live = wait_for_rows(study_dir, len(interrupted) + 5, second)
    assert lost not in set(pd.read_parquet(study_dir / TRIALS_FILE)["trial_id"])  # it is not run again
    capsys.readouterr()
    assert cli.main(["analyze", str(study_dir), "--n-boot", "0", "--out", str(tmp_path / "mid")]) == 0
    err = capsys.readouterr().err
    said = re.search(rf"partial study {re.escape(str(study_dir))}: (\d+) of {EXPECTED} trials in", err)
    assert said and live.finished <= int(said.group(1)) < EXPECTED
    assert "**Partial study**" in (tmp_path / "mid" / analysis.REPORT_FILE).read_text()
    assert second.wait(300) == 0, second.output()[-3000:]

    # 4. Complete tables: every trial once, the interrupted run's rows as they were, and the same
    # rows as Ray Tune's own record of the study gives.
    assert read_completeness(str(study_dir)) == Completeness(EXPECTED, EXPECTED)
    trials = pd.read_parquet(study_dir / TRIALS_FILE)
    epochs = pd.read_parquet(study_dir / EPOCHS_FILE)
    assert len(trials) == EXPECTED and trials["trial_id"].is_unique
    assert (trials["status"] == "TERMINATED").all()
    assert set(zip(trials["temperature"], trials["seed"])) == {(t, s) for t in TEMPERATURES for s in range(SEEDS)}
    assert len(epochs) == EXPECTED and set(epochs["trial_id"]) == set(trials["trial_id"])
    assert (epochs["epoch"] == 1).all()
    before = interrupted.set_index("trial_id")
    after = trials.set_index("trial_id").loc[before.index]
    for column in ("test_agreement", "test_acc", "train_time_s", "config_json"):
        assert after[column].tolist() == before[column].tolist(), column
    assert parts_left(study_dir) == []

    from ray import tune

    from kd_ray.study.live_tables import collect_rows

    rows, epoch_rows = collect_rows("temperature_sweep", tune.ResultGrid(tune.ExperimentAnalysis(str(study_dir))))
    recorded = tables.to_table(rows, TRIALS_SCHEMA).to_pandas().sort_values("trial_id", ignore_index=True)
    pd.testing.assert_frame_equal(trials.sort_values("trial_id", ignore_index=True), recorded)
    recorded_epochs = tables.to_table(epoch_rows, EPOCHS_SCHEMA).to_pandas()
    pd.testing.assert_frame_equal(epochs.sort_values("trial_id", ignore_index=True),
                                  recorded_epochs.sort_values("trial_id", ignore_index=True))
