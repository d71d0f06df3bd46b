"""A validated study as the runner takes it (``RunPlan``), what a run gives back (``StudyResult``), and the
keys a trial's parameter travels under through Ray Tune. Plain values only: this module imports no Ray,
so planning a study never starts it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any

from kd_ray.config import TrialConfig

ARM_KEY = "arm"  # an explicit arm travels through Tune's grid as one dict-valued parameter
# A pack (kd_ray.packs.run) travels as one parameter too: {"pack_id", "size", "students": [config, ...]};
# its reports hold each student's metrics under "students/<index>".
PACK_KEY = "pack"
STUDENTS_KEY = "students"
# What ASHA stops a grid study's trials on; a search names its own metrics.
GRID_METRICS = ("test_agreement",)
GRID_MODES = ("max",)


def flatten_arm(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's Tune parameter with its arm's fields (under ``ARM_KEY``) set beside the others."""
    config = dict(config)
    arm = config.pop(ARM_KEY, None) or {}  # pop first: {**config, **config.pop(...)} keeps the key
    return {**config, **arm}


@dataclass(frozen=True)
class RunPlan:
    """What the runner needs of a validated study, as plain values, made by ``from_study``.

    A grid study has ``search_space=None`` and ``num_samples=1``; ``metrics`` and ``modes`` are then
    the ones ASHA stops trials on. An Optuna search samples ``num_samples`` trials from
    ``search_space`` (TPE for one metric, NSGA-II for several)."""

    # The study's own values, each under its name in ``kd_ray.study.spec.Study`` (its meaning is there).
    name: str
    study_dir: str
    storage_path: str
    teacher_store: str
    base: TrialConfig
    axes: dict[str, list[Any]]
    arms: list[dict[str, Any]]
    seeds: list[int]
    scheduler: str
    asha_grace_epochs: int
    cpus_per_trial: float
    gpus_per_trial: float
    max_concurrent_trials: int | None
    max_failures: int
    resume: bool
    address: str | None
    data_dir: str | None
    retrain_teachers: bool
    pack: str
    verbose: int
    # Made from the study's values.
    trackers: tuple[str, ...]  # each tracker once: tensorboard | mlflow | wandb
    search_space: dict[str, tuple] | None
    metrics: tuple[str, ...]
    modes: tuple[str, ...]
    num_samples: int
    search_seed: int
    spec: dict[str, Any]  # what decides the trials, stored beside the tables (kd_ray.study.guards)

    @classmethod
    def from_study(cls, study: Any) -> RunPlan:
        """The plan of ``study``, a validated ``kd_ray.study.spec.Study`` (which sits above this module and
        is not imported): every field above shares its name with one of the study's, except those made
        here from its search, trackers and spec."""
        search = study.search
        made = {
            "trackers": tuple(dict.fromkeys(study.trackers)),
            "search_space": dict(search.space) if search else None,
            "metrics": search.metrics if search else GRID_METRICS,
            "modes": search.modes if search else GRID_MODES,
            "num_samples": search.num_samples if search else 1,
            "search_seed": search.seed if search else 0,
            "spec": study.spec(),
        }
        # Copies: the plan stays as it was made if the study changes afterwards.
        same_name = {f.name: copy.copy(getattr(study, f.name)) for f in fields(cls) if f.name not in made}
        return cls(**same_name, **made)


@dataclass
class StudyResult:
    """A study's tables as it left them: ``partial`` when fewer than ``expected`` trials finished."""

    study_dir: str
    trials: Any  # pandas.DataFrame
    epochs: Any  # pandas.DataFrame
    partial: bool
    finished: int
    expected: int
