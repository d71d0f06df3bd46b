"""A study's tables from its Ray Tune trials: each trial's rows, written while the study runs.

``LiveTables`` is a Ray Tune callback: a trial that finishes (completes, is stopped by the scheduler,
or fails for good) is written at once as its own part, and the parts are compacted into
``trials.parquet`` and ``epochs.parquet`` every few seconds and when the experiment ends, so the
tables grow as the study runs and an interrupted study keeps every finished trial. After the Tuner,
``record_finished_trials`` adds any finished trial Ray Tune's saved state knows and the tables lack.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from typing import Any

from ray import tune
from ray.tune.experiment import Trial

from kd_ray import tables
from kd_ray.study.plan import (
    ENDED_AT,
    OPTUNA_NUMBER_KEY,
    OPTUNA_NUMBERS_KEY,
    PACK_KEY,
    REPORTED_KEY,
    STARTED_AT,
    STUDENTS_KEY,
    trial_fields,
)
from kd_ray.tables import EPOCH_TIMESTAMP, ERROR, STOPPED, packed_trial_id

RESULT_FILE = "result.json"  # Ray Tune's log of a trial's reports, one JSON object a line
# How many trials each study expects, by its directory, as the newest LiveTables made in this process for
# it says: a restored Tuner runs the LiveTables it pickled when it began, whose count predates any
# growth of the study's seeds since.
_EXPECTED: dict[str, int] = {}


def _nan_to_none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _utc(seconds: Any) -> datetime.datetime | None:
    """UTC seconds since the epoch (a report's time) as a timezone-aware datetime; None for none."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds):
        return None
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)


def trial_rows(
    study_name: str, trial_id: str, config: dict[str, Any], metrics: dict[str, Any],
    error: BaseException | str | None, history,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A trial's row and its epoch rows, from what Ray Tune holds of it: its config, its last report
    (``metrics``), the error it failed with (None if it did not) and every report it made
    (``history``: a DataFrame, flattened as Ray Tune's ``Result.metrics_dataframe``, or None)."""
    optuna_number = config.get(OPTUNA_NUMBER_KEY)
    config = trial_fields(config)
    row = {"study": study_name, "trial_id": trial_id, **config, OPTUNA_NUMBER_KEY: optuna_number}
    epochs = []
    if error is not None:
        row.update(status=ERROR, error=f"{type(error).__name__}: {error}"[:2000])
    elif metrics.get("final"):
        row.update({k: _nan_to_none(v) for k, v in metrics.items() if k not in row})
    else:
        row.update(status=STOPPED, error="stopped early by the scheduler")
    if history is not None and len(history):
        reports = history[history["final"] != True] if "final" in history else history  # noqa: E712
        if "epoch" in reports:
            # A retried trial reports again the epochs after its last checkpoint: one row per
            # epoch, the last report of it (the one the trial's state continued from).
            reports = reports.drop_duplicates(subset="epoch", keep="last").sort_values("epoch", kind="stable")
        for record in reports.to_dict("records"):
            values = {k: _nan_to_none(v) for k, v in record.items()}
            # When the evaluation was reported: kd_ray's own time, else Ray Tune's (whole seconds).
            values[EPOCH_TIMESTAMP] = _utc(record.get(REPORTED_KEY)) or _utc(record.get(EPOCH_TIMESTAMP))
            epochs.append({**values, "study": study_name, "trial_id": trial_id})
        if row["status"] == STOPPED and len(reports):
            last = reports.iloc[-1].to_dict()
            row.update({
                k: _nan_to_none(v) for k, v in last.items()
                if k in row or k.startswith(("test_", "train_", "aug_", "teacher_", "val_"))
            })
            row["epochs_completed"] = int(last.get("epoch", 0))
    # When it began and ended: a trial that did not finish ended at its last report.
    row[STARTED_AT] = _utc(metrics.get(STARTED_AT))
    row[ENDED_AT] = _utc(metrics.get(ENDED_AT) if metrics.get("final") else metrics.get(REPORTED_KEY))
    return row, epochs


def student_rows(
    study_name: str, trial_id: str, config: dict[str, Any], metrics: dict[str, Any],
    error: BaseException | str | None, history,
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """``trial_rows`` of every student a Ray Tune trial (``trial_id``) trained: one for a plain trial (a pack of
    one, its own ``pack_id``), one per student of a pack, whose ``trial_id`` is the Ray Tune trial's and its index
    and whose ``pack_id`` is the pack's. Every row's ``ray_trial_id`` is ``trial_id``."""
    pack = config.get(PACK_KEY)
    if pack is None:
        row, epochs = trial_rows(study_name, trial_id, config, metrics, error, history)
        for name, value in (("pack_id", trial_id), ("pack_size", 1), ("pack_time_share", 1.0)):
            row.setdefault(name, value)
        row["ray_trial_id"] = trial_id
        return [(row, epochs)]
    out = []
    reported = metrics.get(STUDENTS_KEY) or {}
    numbers = pack.get(OPTUNA_NUMBERS_KEY) or [None] * len(pack[STUDENTS_KEY])
    for index, student in enumerate(pack[STUDENTS_KEY]):
        mine = reported.get(str(index)) or {}
        # A pack's times are in every report: a student without its final report began and ended with the pack.
        times = {key: metrics[key] for key in (STARTED_AT, REPORTED_KEY) if key in metrics}
        final = {**times, **mine, "final": True} if metrics.get("final") and mine else times
        own = _own_history(history, f"{STUDENTS_KEY}/{index}/")
        student_config = {**student, OPTUNA_NUMBER_KEY: numbers[index]}
        row, epochs = trial_rows(study_name, packed_trial_id(trial_id, index), student_config, final, error, own)
        row.update(pack_id=str(pack["pack_id"]), pack_size=len(pack[STUDENTS_KEY]), ray_trial_id=trial_id)
        out.append((row, epochs))
    return out


def _own_history(history, prefix: str):
    """A pack's reports of one student (their columns under ``prefix``), with the time of each report."""
    if history is None or f"{prefix}epoch" not in history:
        return None
    columns = [c for c in history.columns if c.startswith(prefix)]
    own = history[history[f"{prefix}epoch"].notna()]
    times = [c for c in (REPORTED_KEY, EPOCH_TIMESTAMP) if c in history and f"{prefix}{c}" not in history]
    return own[columns + times].rename(columns={c: c[len(prefix):] for c in columns})


def collect_rows(study_name: str, results) -> tuple[list[dict], list[dict]]:
    """Trial rows and epoch rows from a ResultGrid."""
    trials, epochs = [], []
    for result in results:
        metrics = result.metrics or {}
        trial_id = str(metrics.get("trial_id") or os.path.basename(result.path))
        for row, rows in student_rows(study_name, trial_id, result.config or {}, metrics, result.error,
                                      result.metrics_dataframe):
            trials.append(row)
            epochs += rows
    return trials, epochs


def _history(trial_dir: str):
    """A trial's reports from its result.json in ``trial_dir``, flattened as Ray Tune flattens them."""
    import pandas as pd

    path = os.path.join(trial_dir, RESULT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        reports = [json.loads(line) for line in handle if line.strip()]
    return pd.json_normalize(reports, sep="/") if reports else None


def _live_error(trial) -> BaseException | str:
    """The error a trial just failed with, as Ray Tune's results give it (the exception, else the text
    of its error file), from the driver's own copy of the trial directory: the copy in storage is
    synchronised later."""
    import ray.cloudpickle

    pickled, text = trial.pickled_error_file, trial.error_file
    if pickled and os.path.isfile(pickled):
        with open(pickled, "rb") as handle:
            return ray.cloudpickle.load(handle)
    if text and os.path.isfile(text):
        with open(text) as handle:
            return handle.read()
    return _saved_error(trial)


def _saved_error(trial) -> BaseException | str:
    """The error of a failed trial from the study's storage, as Ray Tune's ResultGrid gives it."""
    return trial.get_pickled_error() or trial.get_error() or "the trial failed; Ray Tune recorded no error"


class LiveTables(tune.Callback):
    """Each trial that finishes is written as its own part at once; the parts are compacted into the
    tables every ``every_s`` seconds (less often as compacting grows slower), as soon as
    ``every_parts`` are pending, and when the experiment ends, an interrupted one included.

    A driver killed between two compactions leaves its newest trials as parts: the next run of the
    study folds them in before it starts. Ray Tune pickles its callbacks with the Tuner and a resumed
    study runs that copy, so this holds only plain values the resumed run shares (same storage and
    name), its counters start again in ``setup``, and the count it records is the newest one made in this
    process for its study (a grown study expects more trials than it did when the copy was pickled)."""

    def __init__(self, study_name: str, study_dir: str, expected: int, every_s: float = 2.0,
                 every_parts: int = 64) -> None:
        self.study_name = study_name
        self.study_dir = study_dir
        self.expected = expected
        _EXPECTED[study_dir] = expected
        self.every_s = every_s
        self.every_parts = every_parts
        self.setup()

    def setup(self, **info) -> None:
        self.pending = 0
        self.due = time.monotonic() + self.every_s

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._write(trial, error=None)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._write(trial, error=_live_error(trial))

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if self.pending and (self.pending >= self.every_parts or time.monotonic() >= self.due):
            self._compact()

    def on_experiment_end(self, trials: list, **info) -> None:
        self._compact()

    def _write(self, trial, error: BaseException | str | None) -> None:
        # The driver's copy of the trial directory holds every report: Ray Tune logs each there as it
        # arrives (a resumed trial's earlier reports included).
        for row, epochs in student_rows(self.study_name, trial.trial_id, trial.config, trial.last_result or {},
                                        error, _history(trial.local_path)):
            tables.write_trial_part(self.study_dir, row, epochs)
            self.pending += 1

    def _compact(self) -> None:
        started = time.monotonic()
        tables.compact_trial_parts(self.study_dir, _EXPECTED.get(self.study_dir, self.expected))
        self.pending = 0
        # Compacting rewrites both tables: as they grow, it runs less often, a tenth of the time at most.
        self.due = time.monotonic() + max(self.every_s, 10 * (time.monotonic() - started))


def record_finished_trials(study_name: str, study_dir: str, expected: int, experiment_dir: str | None = None) -> int:
    """Unless the trials table holds ``expected`` trials already, write a part for each trial that
    Ray Tune's saved experiment state (in ``experiment_dir``, the study's own by default; a growth's in its
    folder) records as finished and the table lacks; returns how many.
    The state read is the one saved before an interrupt stopped the running trials, so a trial cut
    short is not taken for finished (the Tuner's own ResultGrid marks those terminated).

    Such trials come from a study begun without live tables (its saved Tuner has no LiveTables) or
    a part lost with its driver."""
    recorded = tables.table_trial_ids(study_dir)
    if len(recorded) >= expected:
        return 0
    analysis = tune.ExperimentAnalysis(experiment_dir or study_dir)
    added = 0
    for trial in analysis.trials:
        if trial.status not in (Trial.TERMINATED, Trial.ERROR):
            continue
        error = _saved_error(trial) if trial.status == Trial.ERROR else None
        rows = student_rows(study_name, trial.trial_id, trial.config, trial.last_result or {}, error,
                            analysis.trial_dataframes.get(trial.trial_id))
        if all(row["trial_id"] in recorded for row, _ in rows):
            continue
        for row, epochs in rows:
            tables.write_trial_part(study_dir, row, epochs)
            added += 1
    return added
