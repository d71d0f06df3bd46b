"""What a study shows while it runs, and where else it logs: Ray Tune's progress table with each trial's
arm and the student's metrics, a line per finished trial with done/total and the time left, and the
logger callback of each experiment tracker (``--log tensorboard|mlflow|wandb``).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from ray import tune
from ray.tune.experiment import Trial

from kd_ray.atomic import is_uri
from kd_ray.config import ConfigError
from kd_ray.progress import log, time_left_s, trial_done_line
from kd_ray.study.plan import PACK_KEY, PACK_MEAN_KEY, flatten_arm
from kd_ray.study.trackers import TENSORBOARD_DIR, MLflowRuns, TensorBoardRuns, WandbRuns
from kd_ray.tables import FIDELITY_METRICS, GENERALIZATION_METRICS

# What a person watches a study for: the student's test agreement and test accuracy.
CONSOLE_METRICS = (FIDELITY_METRICS[0], GENERALIZATION_METRICS[0])
TABLE_EVERY_S = 60  # Ray Tune's progress table at most this often; a line per finished trial between


def arm_columns(search_space: dict[str, tuple] | None, axes: dict[str, list], arms: list[dict[str, Any]],
                seeds: list[int]) -> dict[str, str]:
    """What tells a study's trials apart, as Tune config keys and their labels: the axes, the arms'
    fields and the seed, or a search's dimensions. A trial's config is its flat TrialConfig, so each key
    is the field's own name."""
    if search_space is not None:
        return {name: name for name in search_space}
    columns = {axis: axis for axis in axes}
    for name in dict.fromkeys(name for arm in arms for name in arm):
        columns[name] = name
    if len(seeds) > 1:
        columns["seed"] = "seed"
    return columns


def shown_metrics(packed: bool) -> dict[str, str]:
    """The metrics the console shows, as keys of a trial's reports and their labels: the student's, or a
    pack's means over its students (``pack_mean/…``)."""
    if packed:
        return {f"{PACK_MEAN_KEY}/{metric}": f"mean {metric}" for metric in CONSOLE_METRICS}
    return {metric: metric for metric in CONSOLE_METRICS}


def reported(result: dict[str, Any], key: str) -> Any:
    """The value of a report at ``key``, a path through its nested dicts (``pack_mean/test_agreement``)."""
    for part in key.split("/"):
        if not isinstance(result, dict) or part not in result:
            return None
        result = result[part]
    return result


class TrialsDone(tune.Callback):
    """One line per finished trial: done/total, its arm and metrics, time elapsed and about how long is left."""

    def __init__(self, arm_labels: list[str]) -> None:
        self.arm_labels = arm_labels
        self.setup()

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info) -> None:
        self.total = total_num_samples or 0
        self.started = time.monotonic()
        self.durations: list[float] = []  # of the trials that finished cleanly in this run

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        # A trial ASHA stopped completes without its final report.
        self._print(trials, trial, "done" if (trial.last_result or {}).get("final") else "stopped early")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(trials, trial, "ERROR")

    def _print(self, trials: list, trial, outcome: str) -> None:
        result = trial.last_result or {}
        if outcome != "ERROR" and isinstance(result.get("time_total_s"), (int, float)):
            self.durations.append(float(result["time_total_s"]))
        # The trial itself is still RUNNING (or already ERROR) when Tune calls back.
        others = [t for t in trials if t is not trial]
        done = 1 + sum(t.status in (Trial.TERMINATED, Trial.ERROR) for t in others)
        running = sum(t.status == Trial.RUNNING for t in others)
        total = max(self.total, len(trials))
        left = time_left_s(statistics.mean(self.durations), total - done, running + 1) if self.durations else None
        config = flatten_arm(trial.config)  # a study stored with its arms under ARM_KEY: flat as today's
        packed = PACK_KEY in config
        if packed:
            arm = {"pack": config[PACK_KEY]["pack_id"], "students": config[PACK_KEY]["size"]}
        else:
            arm = {label: config[label] for label in self.arm_labels if label in config}
        values = {label: reported(result, key) for key, label in shown_metrics(packed).items()}
        metrics = {label: value for label, value in values.items() if isinstance(value, (int, float))}
        log(trial_done_line(done, total, outcome, arm, metrics, time.monotonic() - self.started, left))


def progress_table(columns: dict[str, str], packed: bool = False) -> tune.CLIReporter:
    """Ray Tune's own table, with the trial's arm and the student's metrics (a pack's: their means over its
    students) rather than the first metrics Tune finds in a report (the teacher's, the same for every trial of
    a seed)."""
    return tune.CLIReporter(
        metric_columns={"epoch": "epoch", **shown_metrics(packed)},
        parameter_columns=columns, max_report_frequency=TABLE_EVERY_S,
    )


def tracker_callbacks(trackers: tuple[str, ...], name: str, study_dir: str,
                      label_fields: list[str] | None = None) -> list[tune.Callback]:
    """A callback per tracker the study logs to (the study checked the packages), each logging one run per
    student (``kd_ray.study.trackers``), named by ``label_fields`` (the fields that tell the study's
    students apart; the seed is always among them)."""
    fields = [*dict.fromkeys([*(label_fields or []), "seed"])]
    callbacks: list[tune.Callback] = []
    for tracker in trackers:
        if tracker == "tensorboard":
            # tensorboardX writes local files: with a URI storage, the runs stay beside the driver.
            logdir = os.path.join(study_dir if not is_uri(study_dir) else os.path.abspath(name), TENSORBOARD_DIR)
            callbacks.append(TensorBoardRuns(name, fields, logdir))
            log(f"tensorboard: a run per student, tensorboard --logdir {logdir}")
        elif tracker == "mlflow":
            import mlflow

            # Where the runs go is MLflow's own setting (MLFLOW_TRACKING_URI, else MLflow's default).
            callbacks.append(MLflowRuns(name, fields))
            log(f"mlflow: experiment '{name}', a parent run '{name}' with a run per student, "
                f"at {mlflow.get_tracking_uri()}")
        elif tracker == "wandb":
            project = os.environ.get("WANDB_PROJECT", "kd_ray")
            # Run files go to WANDB_DIR, else beside the tables.
            run_dir = os.environ.get("WANDB_DIR") or (study_dir if not is_uri(study_dir) else None)
            if run_dir:
                os.makedirs(run_dir, exist_ok=True)
            callbacks.append(WandbRuns(name, fields, project, os.environ.get("WANDB_MODE"), run_dir))
            log(f"wandb: project '{project}', group '{name}', a run per student, files in {run_dir or '.'}/wandb")
        else:
            raise ConfigError(f"tracker {tracker!r} is not allowed; choose from tensorboard, mlflow, wandb")
    return callbacks
