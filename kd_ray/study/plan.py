"""A validated study as the runner takes it (``RunPlan``), what a run gives back (``StudyResult``), and the
keys a trial's parameter travels under through Ray Tune. Plain values only: this module imports no Ray,
so planning a study never starts it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any

from kd_ray.config import MAX_VAL_FRACTION, ConfigError, TrialConfig
from kd_ray.tables import TIMES, check_selection_metric

# A trial's Ray Tune config is its whole flat TrialConfig (what Ray Tune's params.json, Result.config and
# ExperimentAnalysis show), plus, in an Optuna search, the number of its Optuna trial under OPTUNA_NUMBER_KEY.
# Studies stored before held an explicit arm as one dict-valued parameter under ARM_KEY: ``flatten_arm`` reads them.
ARM_KEY = "arm"
OPTUNA_NUMBER_KEY = "optuna_trial_number"
# A pack (kd_ray.packs.run) travels as one parameter: {"pack_id", "size", "students": [config, ...], "labels":
# [the fields that tell its students apart], and in a search "optuna_trial_numbers": [one a student]}. Its
# reports hold each student's metrics under "students/<index>" (the final one its labels and trial_id too), and
# the means over its students under "pack_mean", never under a metric's own name.
PACK_KEY = "pack"
STUDENTS_KEY = "students"
LABELS_KEY = "labels"
OPTUNA_NUMBERS_KEY = "optuna_trial_numbers"
PACK_MEAN_KEY = "pack_mean"
# In a trial's reports, UTC seconds: when it began (every report), when it ended (its final report), and when
# each report was made; the trials table's started_at and ended_at, and the epochs table's timestamp.
STARTED_AT, ENDED_AT = TIMES
REPORTED_KEY = "reported_at"
# What ASHA stops a grid study's trials on; a search names its own metrics. Either is a validation metric
# (kd_ray.tables.SELECTION_METRICS): trials are selected on the validation split, test metrics only reported.
GRID_METRICS = ("val_agreement",)
GRID_MODES = ("max",)
# In a stored spec: the seeds each growth of the study added (``--resume --seeds`` with more seeds), in order,
# each with the folder of the study directory its own Ray Tune experiment lives in: a saved Tuner cannot
# take trials it did not begin with.
GROWTHS_KEY = "growths"
# (folder, seeds): a Ray Tune experiment of a study; "" is the study directory itself, the first one.
Experiment = tuple[str, tuple[int, ...]]


def flatten_arm(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's Tune parameter with its arm's fields (under ``ARM_KEY``) set beside the others."""
    config = dict(config)
    arm = config.pop(ARM_KEY, None) or {}  # pop first: {**config, **config.pop(...)} keeps the key
    return {**config, **arm}


def trial_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The TrialConfig fields of a trial's Ray Tune config (a stored arm's set beside the others)."""
    names = set(TrialConfig.field_names())
    return {name: value for name, value in flatten_arm(config).items() if name in names}


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
    experiments: tuple[Experiment, ...]  # the first one, then one per growth of its seeds (``experiments``)

    @property
    def label_fields(self) -> list[str]:
        """The fields that tell the study's trials apart: its axes and its arms' fields, or its search's
        dimensions; and the seed."""
        if self.search_space is not None:
            names = list(self.search_space)
        else:
            names = [*self.axes, *(name for arm in self.arms for name in arm)]
        return list(dict.fromkeys([*names, "seed"]))

    @classmethod
    def from_study(cls, study: Any) -> RunPlan:
        """The plan of ``study``, a validated ``kd_ray.study.spec.Study`` (which sits above this module and
        is not imported): every field above shares its name with one of the study's, except those made
        here from its search, trackers and spec."""
        search = study.search
        if search is not None or study.scheduler == "asha":
            check_selection(study)
        made = {
            "trackers": tuple(dict.fromkeys(study.trackers)),
            "search_space": dict(search.space) if search else None,
            "metrics": search.metrics if search else GRID_METRICS,
            "modes": search.modes if search else GRID_MODES,
            "num_samples": search.num_samples if search else 1,
            "search_seed": search.seed if search else 0,
            "spec": study.spec(),
            "experiments": (("", tuple(study.seeds)),),
        }
        # Copies: the plan stays as it was made if the study changes afterwards.
        same_name = {f.name: copy.copy(getattr(study, f.name)) for f in fields(cls) if f.name not in made}
        return cls(**same_name, **made)


def experiments(spec: dict[str, Any]) -> tuple[Experiment, ...]:
    """A stored spec's Ray Tune experiments: the first, in the study directory, holds the seeds no growth
    added; then each growth's, in its folder."""
    growths = spec.get(GROWTHS_KEY) or []
    grown = {seed for growth in growths for seed in growth["seeds"]}
    first = ("", tuple(seed for seed in spec["seeds"] if seed not in grown))
    return (first, *((growth["folder"], tuple(growth["seeds"])) for growth in growths))


def grown_spec(stored: dict[str, Any], requested: dict[str, Any], folder: str) -> dict[str, Any]:
    """The spec to store for ``requested``, a resume of the study ``stored`` whose seeds are the stored
    ones, maybe in another order, maybe with more: the stored seeds in their order, then the new ones,
    which a growth runs in ``folder``; the growths stored before are kept."""
    added = [seed for seed in requested["seeds"] if seed not in stored["seeds"]]
    growths = list(stored.get(GROWTHS_KEY) or [])
    if added:
        growths.append({"folder": folder, "seeds": added})
    spec = {**requested, "seeds": [*stored["seeds"], *added]}
    return {**spec, GROWTHS_KEY: growths} if growths else spec


def check_selection(study: Any) -> None:
    """Refuse a search or ASHA that would select trials on anything but the validation split: a metric
    that is not a validation one, a config without validation examples (``val_fraction`` 0, whose val_*
    metrics are NaN), or a search over ``val_fraction`` (its trials would be compared on different
    validation sets). ``study`` is a ``kd_ray.study.spec.Study``, as in ``RunPlan.from_study``."""
    search = study.search
    for metric in search.metrics if search else GRID_METRICS:
        check_selection_metric("search metric" if search else "ASHA metric", metric)
    if search is not None and "val_fraction" in search.space:
        raise ConfigError(f"search space val_fraction={search.space['val_fraction']!r} is not allowed: a search "
                          "compares its trials on one validation split; allowed: val_fraction fixed in the base")
    selector = "a search" if search else "scheduler='asha'"
    for cfg in study.configs():
        if cfg.val_fraction == 0:
            raise ConfigError(f"val_fraction={cfg.val_fraction!r} with {selector} leaves no validation data to "
                              f"select trials on; allowed: 0 < val_fraction <= {MAX_VAL_FRACTION:g}")


@dataclass
class StudyResult:
    """A study's tables as it left them: ``partial`` when fewer than ``expected`` trials finished."""

    study_dir: str
    trials: Any  # pandas.DataFrame
    epochs: Any  # pandas.DataFrame
    partial: bool
    finished: int
    expected: int
