"""Optuna on Ray Tune: the searcher a study's Optuna search runs with (``optuna_searcher``), its
sampler, and the journal that holds the Optuna study.

A search optimises validation metrics only (``val_agreement``, ``val_acc``, ...: measured on the split
held out of the train data), so that the test metrics of the trials it chose stay unbiased; a plan
that names a test metric is refused before Ray starts (``kd_ray.study.plan.check_selection``).

A search samples its trials as it goes: TPE for one metric, NSGA-II for several (made picklable,
``PicklableNSGAIISampler``). When every dimension of the search space is a student field
(``kd_ray.packs.plan.STUDENT_FIELDS``: temperature, alpha, learning rate, ...), its Ray Tune trials
are packs (``PackedOptunaSearch``): each asks Optuna for several points at once, points that share
the base's teacher, data and batch stream. TPE asks them with a constant liar (a point asked but not
yet told counts as a poor one), so the points of a pack spread out rather than repeat; NSGA-II asks
them from its current generation. Each student's values are told to its own Optuna trial when the
pack completes; a student without a finite value is told as failed. The journal holds the Optuna
study, packed or not.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import warnings
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from kd_ray.progress import log
from kd_ray.study.pack_trials import pack_name
from kd_ray.study.plan import LABELS_KEY, OPTUNA_NUMBER_KEY, OPTUNA_NUMBERS_KEY, PACK_KEY, STUDENTS_KEY, RunPlan
from kd_ray.study.storage import OPTUNA_JOURNAL
from kd_ray.tables import packed_trial_id

# On each Optuna trial: the trial_id of its row in trials.parquet, the Ray Tune trial that ran it and, packed,
# the pack's id; the row's optuna_trial_number is the Optuna trial's number.
ROW_ATTR, RAY_TRIAL_ATTR, PACK_ATTR = "kd_ray_trial_id", "ray_trial_id", "pack_id"


def link_trial(trial: optuna.trial.Trial, row_trial_id: str, ray_trial_id: str, pack_id: str | None = None) -> None:
    """Record on an Optuna trial which row of the tables and which Ray Tune trial (and pack) it is."""
    trial.set_user_attr(ROW_ATTR, row_trial_id)
    trial.set_user_attr(RAY_TRIAL_ATTR, ray_trial_id)
    if pack_id is not None:
        trial.set_user_attr(PACK_ATTR, pack_id)


def name_metrics(study: optuna.Study, metrics: list[str]) -> None:
    """Name the study's objectives after the metrics it optimises (what Optuna's plots and dashboard show)."""
    with warnings.catch_warnings():  # experimental in Optuna since 3.2, and still so in 5.1
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(metrics))


class LinkedOptunaSearch(OptunaSearch):
    """Ray Tune's ``OptunaSearch``, each of its points linked to its row: the trial's config carries the
    number of its Optuna trial (``optuna_trial_number``), and the Optuna trial the row's trial_id and Ray Tune
    trial id (user attributes); the Optuna study names its objectives after the metrics."""

    def __init__(self, metric_names: list[str], **options: Any) -> None:
        super().__init__(**options)
        name_metrics(self._ot_study, metric_names)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = super().suggest(trial_id)
        trial = self._ot_trials.get(trial_id)
        if config is None or trial is None:
            return config
        link_trial(trial, trial_id, trial_id)
        return {**config, OPTUNA_NUMBER_KEY: trial.number}


class PackedOptunaSearch(Searcher):
    """``num_points`` Optuna points in packs of ``pack_size`` (the last may be smaller)."""

    def __init__(self, study, distributions: dict[str, Any], base: dict[str, Any], metrics: list[str],
                 num_points: int, pack_size: int) -> None:
        # No metric for Ray Tune to require at the top of a pack's report: the values told to Optuna are each
        # student's own (students/<index>/<metric>), and the top holds only the pack's means (pack_mean/…).
        super().__init__(metric=None, mode=None)
        self.study, self.distributions, self.base = study, distributions, base
        self.metrics, self.num_points, self.pack_size = metrics, num_points, pack_size
        self.asked = 0
        self.packs = 0  # packs asked for so far: the next one's pack_id is pack_name(self.packs)
        self.pending: dict[str, list[int]] = {}  # Tune trial id -> its students' Optuna trial numbers

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the metrics and directions are the Optuna study's own

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.asked >= self.num_points:
            return Searcher.FINISHED
        size = min(self.pack_size, self.num_points - self.asked)
        pack_id = pack_name(self.packs)
        asked = [self.study.ask(self.distributions) for _ in range(size)]
        for index, trial in enumerate(asked):
            link_trial(trial, packed_trial_id(trial_id, index), trial_id, pack_id)
        self.asked += size
        self.packs += 1
        self.pending[trial_id] = [t.number for t in asked]
        students = [{**self.base, **t.params} for t in asked]
        labels = [*self.distributions, "seed"]
        return {PACK_KEY: {"pack_id": pack_id, "size": size, LABELS_KEY: labels, STUDENTS_KEY: students,
                           OPTUNA_NUMBERS_KEY: self.pending[trial_id]}}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        numbers = self.pending.pop(trial_id, [])
        result = result or {}
        for index, number in enumerate(numbers):
            # Ray Tune hands a searcher the result flattened: students/<index>/<metric>.
            values = [result.get(f"{STUDENTS_KEY}/{index}/{metric}") for metric in self.metrics]
            finite = not error and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
            if finite:
                self.study.tell(number, values if len(values) > 1 else values[0])
            else:
                self.study.tell(number, state=optuna.trial.TrialState.FAIL)

    def save(self, checkpoint_path: str) -> None:
        # Plain JSON: the Optuna study itself lives in its journal, and a saved state is never unpickled.
        with open(checkpoint_path, "w") as handle:
            json.dump({"asked": self.asked, "packs": self.packs, "pending": self.pending}, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as handle:
            state = json.load(handle)
        self.asked, self.pending = int(state["asked"]), {k: list(v) for k, v in state["pending"].items()}
        # A state saved before packs were counted: as many as it had asked points for, at most.
        self.packs = int(state.get("packs", -(-self.asked // self.pack_size)))


# Each lock type, and how to make a new one.
_LOCK_TYPES = {type(threading.Lock()): threading.Lock, type(threading.RLock()): threading.RLock}


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler, made picklable: Ray Tune pickles its searcher (with the sampler) into
    the experiment state, and Optuna 5.1's genetic samplers hold a thread lock that cannot be pickled.
    A pickled copy leaves its locks out and makes new ones when it is read back."""

    def __getstate__(self) -> dict[str, Any]:
        return {name: value for name, value in self.__dict__.items() if type(value) not in _LOCK_TYPES}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # The locks a new sampler has: whichever attributes this Optuna version keeps them in.
        for name, value in vars(optuna.samplers.NSGAIISampler(seed=0)).items():
            if type(value) in _LOCK_TYPES:
                setattr(self, name, _LOCK_TYPES[type(value)]())


def optuna_searcher(plan: RunPlan, pack_size: int = 1) -> Searcher:
    """The Ray Tune searcher of ``plan``'s Optuna search, its Optuna study kept in a journal beside the
    tables (``optuna.journal``), its objectives named after the metrics: Ray Tune's own ``OptunaSearch``
    (``LinkedOptunaSearch``), or a ``PackedOptunaSearch`` when each trial is a pack of ``pack_size`` points."""
    assert plan.search_space is not None
    distributions = _distributions(plan.search_space)
    sampler = _sampler(plan, pack_size)
    journal = os.path.join(plan.study_dir, OPTUNA_JOURNAL)
    os.makedirs(plan.study_dir, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(journal))
    optuna_name = f"{plan.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    log(f"optuna: study '{optuna_name}' in {journal} (optuna-dashboard {journal}, or "
        f"optuna.load_study(study_name='{optuna_name}', storage=JournalStorage(JournalFileBackend('{journal}'))))")
    if pack_size > 1:
        directions = ["maximize" if mode == "max" else "minimize" for mode in plan.modes]
        study = optuna.create_study(storage=storage, sampler=sampler, study_name=optuna_name, directions=directions)
        name_metrics(study, list(plan.metrics))
        return PackedOptunaSearch(study, distributions, plan.base.to_dict(), list(plan.metrics), plan.num_samples,
                                  pack_size)
    multi = len(plan.metrics) > 1
    metric = list(plan.metrics) if multi else plan.metrics[0]
    mode = list(plan.modes) if multi else plan.modes[0]
    return LinkedOptunaSearch(list(plan.metrics), space=distributions, metric=metric, mode=mode, sampler=sampler,
                              storage=storage, study_name=optuna_name)


def _distributions(search_space: dict[str, tuple]) -> dict[str, optuna.distributions.BaseDistribution]:
    """A study's search space (``kd_ray.study.spec.OptunaSpec.space``) as Optuna distributions."""
    distributions = {}
    for name, dim in search_space.items():
        kind = dim[0]
        if kind == "choice":
            distributions[name] = optuna.distributions.CategoricalDistribution(list(dim[1]))
        elif kind == "int":
            distributions[name] = optuna.distributions.IntDistribution(int(dim[1]), int(dim[2]))
        else:
            distributions[name] = optuna.distributions.FloatDistribution(float(dim[1]), float(dim[2]),
                                                                         log=kind == "logfloat")
    return distributions


def _sampler(plan: RunPlan, pack_size: int) -> optuna.samplers.BaseSampler:
    """NSGA-II for several metrics, TPE for one."""
    if len(plan.metrics) > 1:
        return PicklableNSGAIISampler(seed=plan.search_seed)
    # A pack asks for several points before any is told: a constant liar keeps them apart.
    return optuna.samplers.TPESampler(seed=plan.search_seed, constant_liar=pack_size > 1)
