"""One experiment-tracker run per student (``--log tensorboard|mlflow|wandb``).

A Ray Tune trial trains one student, or a pack of several (its reports hold each student's metrics
under ``students/<index>/``). Each tracker here is a Ray Tune ``LoggerCallback`` on the driver that turns
a trial into one run per student: named by its label (the axes, arm fields and seed that tell the study's
students apart, e.g. ``temperature=4,seed=1``), its parameters the student's full TrialConfig, its steps
the evaluation epochs. The final report is not a new step: its metrics close the run (MLflow's metrics
measured only after training, W&B's summary, TensorBoard's HParams). Ray's bookkeeping (``pid``,
``node_id``, ``training_iteration``, ...) is not logged.

Ray Tune pickles its callbacks with the Tuner and a resumed study runs that copy: each callback holds
plain values until its first run opens, and reopens the runs of a resumed study (MLflow: found by tag;
W&B: by run id; TensorBoard: the same directory).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from ray.tune.logger import LoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS

from kd_ray.config import TrialConfig
from kd_ray.study.live_tables import student_rows
from kd_ray.study.plan import ENDED_AT, OPTUNA_NUMBER_KEY, PACK_KEY, REPORTED_KEY, STARTED_AT, STUDENTS_KEY
from kd_ray.tables import METRICS

# Keys of a report that are not a student's metrics: Ray Tune's own, where and when the report was made, and
# the report's bookkeeping (the epoch is the step; ``final`` marks the last report).
NOT_METRICS = frozenset(AUTO_RESULT_KEYS) | {
    "node_id", "trial_id", "experiment_tag", "done", "date", "epoch", "final", "should_checkpoint", "experiment_id",
    STARTED_AT, ENDED_AT, REPORTED_KEY, OPTUNA_NUMBER_KEY}
TENSORBOARD_DIR = "tensorboard"  # in the study directory: a run (event-file directory) per student
STUDY_TAG, LEVEL_TAG, TRIAL_TAG, PACK_TAG = "kd_ray_study", "kd_ray_level", "kd_ray_trial_id", "pack_id"


@dataclass(frozen=True)
class Student:
    """One student of a Ray Tune trial, as the trackers name it."""

    trial_id: str  # its trial_id in trials.parquet (live_tables.student_rows names it)
    pack_id: str  # the pack it trained in, as trials.parquet names it (a lone trial: its own trial id)
    index: str | None  # the key of its metrics under students/ in a pack's reports; None for a lone trial
    config: dict[str, Any]  # its full flat TrialConfig
    label: str  # what tells it apart from the study's other students, e.g. "temperature=4,seed=1"
    arm: str  # the label without the seed: the seeds of an arm share it


def _format(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def student_label(config: dict[str, Any], label_fields: list[str], exclude: tuple[str, ...] = ()) -> str:
    """``field=value`` of each label field the config has, joined by commas (``temperature=4,seed=1``)."""
    return ",".join(f"{name}={_format(config[name])}" for name in label_fields
                    if name in config and name not in exclude)


def students_of(study: str, trial_id: str, config: dict[str, Any], label_fields: list[str]) -> list[Student]:
    """The students a Ray Tune trial trains, each with the ``trial_id`` and ``pack_id`` of its row in the
    trials table (``live_tables.student_rows`` names them: a pack's students by the pack and their index,
    a lone trial by its own trial id). A lone trial's parameter may be flat or hold its arm under ``arm``."""
    rows = [row for row, _ in student_rows(study, trial_id, config, {}, None, None)]
    indices = [str(i) for i in range(len(rows))] if PACK_KEY in config else [None]
    names = TrialConfig.field_names()
    students = []
    for row, index in zip(rows, indices):
        full = TrialConfig.from_dict({name: row[name] for name in names if name in row}).to_dict()
        label = student_label(full, label_fields) or row["trial_id"]
        arm = student_label(full, label_fields, exclude=("seed",)) or label
        students.append(Student(row["trial_id"], row["pack_id"], index, full, label, arm))
    return students


def student_metrics(result: dict[str, Any], student: Student) -> dict[str, Any] | None:
    """The student's own part of a report (None if the report has none of it)."""
    if student.index is None:
        return result
    return (result.get(STUDENTS_KEY) or {}).get(student.index)


def numeric_metrics(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a student's report that are not Ray's bookkeeping (an evaluation's ``lr`` is the
    learning rate of that epoch; the final report's config fields are left out by ``StudentRuns``)."""
    return {key: float(value) for key, value in values.items()
            if key not in NOT_METRICS and not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value)}


def plain_value(value: Any) -> int | float | str | bool:
    """A config value as trackers take a parameter: numbers, strings and booleans as they are, else text."""
    return value if isinstance(value, (int, float, str, bool)) else str(value)


class StudentRuns(LoggerCallback):
    """A run per student: ``open_run`` when its trial starts (again, on a resume), ``log_epoch`` at each
    evaluation, ``close_run`` with the final report's metrics (the last evaluation's, for a trial stopped
    early) when its trial ends. A subclass writes one tracker."""

    def __init__(self, study: str, label_fields: list[str]) -> None:
        self.study = study
        self.label_fields = list(label_fields)
        self.runs: dict[str, Any] = {}  # by the student's trial id: the tracker's open run
        self.last: dict[str, dict[str, float]] = {}  # by trial id: its last metrics, the final ones once known
        self.logged: dict[str, set[str]] = {}  # by trial id: the metrics logged at its evaluations
        self.students: dict[str, list[Student]] = {}  # by Ray Tune trial id

    def __getstate__(self) -> dict[str, Any]:
        # Pickled with the Tuner: plain values only, no open run.
        return {**self.__dict__, "runs": {}, "last": {}, "logged": {}, "students": {}}

    def trial_students(self, trial) -> list[Student]:
        if trial.trial_id not in self.students:
            self.students[trial.trial_id] = students_of(self.study, trial.trial_id, trial.config, self.label_fields)
        return self.students[trial.trial_id]

    def log_trial_start(self, trial) -> None:
        for student in self.trial_students(trial):
            if student.trial_id not in self.runs:
                self.runs[student.trial_id] = self.open_run(student, trial)
                self.logged[student.trial_id] = set()

    def log_trial_result(self, iteration: int, trial, result: dict[str, Any]) -> None:
        for student in self.trial_students(trial):
            own = student_metrics(result, student)
            if not own or student.trial_id not in self.runs:
                continue
            metrics = numeric_metrics(own)
            epoch = int(own.get("epoch", result.get("epoch", 0)))
            self.last[student.trial_id] = {**metrics, "epoch": epoch}
            if not result.get("final"):
                self.log_epoch(self.runs[student.trial_id], student, epoch, metrics)
                self.logged[student.trial_id] |= set(metrics)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        for student in self.trial_students(trial):
            self._close(student, failed)

    def on_experiment_end(self, trials: list, **info) -> None:
        # An interrupted study ends without its trials' ends: close what is open, as not finished.
        for trial in trials:
            for student in self.trial_students(trial):
                self._close(student, failed=True)

    def _close(self, student: Student, failed: bool) -> None:
        run = self.runs.pop(student.trial_id, None)
        if run is None:
            return
        last = dict(self.last.pop(student.trial_id, {}))
        epoch = int(last.pop("epoch", 0))
        final = {k: v for k, v in last.items() if k in METRICS}
        self.close_run(run, student, epoch, final, self.logged.pop(student.trial_id, set()), failed)

    # --- what a tracker writes ---

    def open_run(self, student: Student, trial) -> Any:
        raise NotImplementedError

    def log_epoch(self, run: Any, student: Student, epoch: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def close_run(self, run: Any, student: Student, epoch: int, final: dict[str, float], logged: set[str],
                  failed: bool) -> None:
        """``final``: the student's final metrics (METRICS only); ``logged``: those logged at its epochs."""
        raise NotImplementedError


class TensorBoardRuns(StudentRuns):
    """An event-file directory per student, ``<study_dir>/tensorboard/<label>/``: a scalar per metric at
    each evaluation epoch, and the HParams plugin's summaries (the label fields first, then the rest of
    the config; the final metrics), so that TensorBoard's HParams tab tabulates the students."""

    def __init__(self, study: str, label_fields: list[str], logdir: str) -> None:
        super().__init__(study, label_fields)
        self.logdir = logdir
        self.claimed: dict[str, str] = {}  # a run directory's name -> the student it holds

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "claimed": {}}

    def run_dirname(self, student: Student) -> str:
        """The student's label, made a safe directory name; with its trial id where two students share one."""
        name = "".join(c if c.isalnum() or c in "_.,=+-" else "_" for c in student.label)
        if self.claimed.setdefault(name, student.trial_id) != student.trial_id:
            name = f"{name}_{student.trial_id}"
        return name

    def open_run(self, student: Student, trial) -> Any:
        from tensorboardX import SummaryWriter

        return SummaryWriter(os.path.join(self.logdir, self.run_dirname(student)))

    def log_epoch(self, run: Any, student: Student, epoch: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            run.add_scalar(name, value, global_step=epoch)
        run.flush()

    def close_run(self, run: Any, student: Student, epoch: int, final: dict[str, float], logged: set[str],
                  failed: bool) -> None:
        from tensorboardX.summary import hparams

        ordered = [*(f for f in self.label_fields if f in student.config), *student.config]
        params = {name: plain_value(student.config[name]) for name in dict.fromkeys(ordered)}
        experiment, session_start, session_end = hparams(params, final)
        for summary in (experiment, session_start, session_end):
            run.file_writer.add_summary(summary)
        # HParams shows each metric's last scalar: those measured only after training get theirs at the
        # last epoch (no new step); the others already have it from the last evaluation.
        for name, value in final.items():
            if name not in logged:
                run.add_scalar(name, value, global_step=epoch)
        run.close()


class MLflowRuns(StudentRuns):
    """A parent MLflow run per study (named after it, reused on a resume: found by its tags) and a child
    run per student: named by its label, its full TrialConfig as parameters, tags ``kd_ray_trial_id``
    and ``pack_id``, metrics at step = epoch. Runs go where MLflow's own setting says."""

    def __init__(self, study: str, label_fields: list[str]) -> None:
        super().__init__(study, label_fields)
        self.parent_id: str | None = None
        self.client = None

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "parent_id": None, "client": None}

    def _client(self):
        from mlflow.tracking import MlflowClient

        if self.client is None:
            self.client = MlflowClient()
        return self.client

    def _experiment_id(self) -> str:
        client = self._client()
        experiment = client.get_experiment_by_name(self.study)
        return experiment.experiment_id if experiment is not None else client.create_experiment(self.study)

    def _find_run(self, experiment_id: str, tags: dict[str, str]) -> str | None:
        query = " and ".join(f"tags.{key} = '{value}'" for key, value in tags.items())
        found = self._client().search_runs([experiment_id], filter_string=query, max_results=1)
        return found[0].info.run_id if found else None

    def _parent(self, experiment_id: str) -> str:
        if self.parent_id is None:
            tags = {STUDY_TAG: self.study, LEVEL_TAG: "study"}
            client = self._client()
            self.parent_id = self._find_run(experiment_id, tags)
            if self.parent_id is None:
                self.parent_id = client.create_run(experiment_id, tags=tags, run_name=self.study).info.run_id
            else:
                client.update_run(self.parent_id, status="RUNNING")
        return self.parent_id

    def open_run(self, student: Student, trial) -> Any:
        from mlflow.entities import Param

        client = self._client()
        experiment_id = self._experiment_id()
        parent_id = self._parent(experiment_id)
        run_id = self._find_run(experiment_id, {STUDY_TAG: self.study, TRIAL_TAG: student.trial_id})
        if run_id is not None:  # a resumed student: its run goes on
            client.update_run(run_id, status="RUNNING")
            return run_id
        tags = {"mlflow.parentRunId": parent_id, STUDY_TAG: self.study, LEVEL_TAG: "student",
                TRIAL_TAG: student.trial_id, PACK_TAG: student.pack_id, "kd_ray_arm": student.arm}
        run_id = client.create_run(experiment_id, tags=tags, run_name=student.label).info.run_id
        params = [Param(name, str(plain_value(value))) for name, value in student.config.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
            client.log_batch(run_id, params=params[start:start + 100])
        return run_id

    def log_epoch(self, run: Any, student: Student, epoch: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(name, value, now, epoch) for name, value in metrics.items()]
        for start in range(0, len(entries), 1000):  # MLflow takes at most 1000 metrics a batch
            self._client().log_batch(run, metrics=entries[start:start + 1000])

    def close_run(self, run: Any, student: Student, epoch: int, final: dict[str, float], logged: set[str],
                  failed: bool) -> None:
        after_training = {name: value for name, value in final.items() if name not in logged}
        if after_training:
            self.log_epoch(run, student, epoch, after_training)
        self._client().set_terminated(run, status="FAILED" if failed else "FINISHED")

    def on_experiment_end(self, trials: list, **info) -> None:
        super().on_experiment_end(trials, **info)
        if self.parent_id is not None:
            self._client().set_terminated(self.parent_id, status="FINISHED")


class WandbRuns(StudentRuns):
    """A W&B run per student in the study's group: named by its label, ``config`` its full TrialConfig with
    ``arm`` (the label without the seed: group the runs table by ``arm`` to put an arm's seeds together),
    ``kd_ray_trial_id`` and ``pack_id``; each evaluation at step = epoch, the final metrics in its summary.
    Its id is the student's trial id, so a resumed student goes on in its own run."""

    def __init__(self, study: str, label_fields: list[str], project: str, mode: str | None,
                 run_dir: str | None) -> None:
        super().__init__(study, label_fields)
        self.project = project
        self.mode = mode
        self.run_dir = run_dir

    def open_run(self, student: Student, trial) -> Any:
        import wandb

        config = {**student.config, "arm": student.arm, TRIAL_TAG: student.trial_id, PACK_TAG: student.pack_id}
        # Several runs at once in the driver (reinit="create_new"); none takes over its console or samples
        # the machine's stats: the driver is shared by every student of the study.
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True)
        return wandb.init(project=self.project, group=self.study, name=student.label, id=student.trial_id,
                          resume="allow", config=config, mode=self.mode, dir=self.run_dir, reinit="create_new",
                          settings=settings)

    def log_epoch(self, run: Any, student: Student, epoch: int, metrics: dict[str, float]) -> None:
        run.log({"epoch": epoch, **metrics}, step=epoch)

    def close_run(self, run: Any, student: Student, epoch: int, final: dict[str, float], logged: set[str],
                  failed: bool) -> None:
        run.summary.update(final)
        run.finish(exit_code=1 if failed else 0)
