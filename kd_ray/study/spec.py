"""Study: many distillation trials on Ray Tune, written to Parquet trial tables.

A Study is a base TrialConfig, the axes to grid over (or an Optuna search space), seeds, a
scheduler, resources per trial and a storage location: the specification, and its validation.
``Study.run()`` validates every config before any compute, then hands the study to the Ray runner
(``kd_ray.study.runner``), which prepares the teacher members as parallel Ray tasks, runs a
``ray.tune.Tuner`` around one function trainable, and writes ``trials.parquet`` and
``epochs.parquet`` into ``<storage>/<name>/``. A ``--resume`` must ask for the stored study, or for it
with more seeds: a growth, whose new trials run as a Ray Tune experiment of their own in a folder of the
study (``check_resume``). This module does not import Ray.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import sys
from dataclasses import dataclass, field, replace
from typing import Any

from kd_ray.atomic import is_uri
from kd_ray.config import ConfigError, TrialConfig
from kd_ray.packs.plan import PACK_MODES
from kd_ray.study.plan import GROWTHS_KEY, RunPlan, StudyResult, experiments, grown_spec
from kd_ray.study.storage import (
    ABSENT,
    BEGUN,
    SPEC_FILE,
    TEACHERS_DIR,
    check_storage,
    check_study_name,
    clear_not_begun,
    growth_folder,
    study_lock,
    study_state,
)

# The experiment trackers a study can log to besides its tables, each through Ray Tune's own logger
# callback: the package each needs and how to install it. TensorBoard event files are written always.
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboardX", "tensorboardX"),
    "mlflow": ("mlflow", "kd-ray[mlflow]"),
    "wandb": ("wandb", "kd-ray[wandb]"),
}


@dataclass(frozen=True)
class OptunaSpec:
    """An Optuna search: ``space`` maps a TrialConfig field to one of
    ``("float", low, high)``, ``("logfloat", low, high)``, ``("int", low, high)`` or
    ``("choice", [values])``; one metric (TPE) or several (multi-objective, NSGA-II)."""

    space: dict[str, tuple]
    metrics: tuple[str, ...] = ("val_agreement",)  # selected on validation data: test metrics are only reported
    modes: tuple[str, ...] = ("max",)
    num_samples: int = 8
    seed: int = 0


@dataclass
class Study:
    name: str
    base: TrialConfig = field(default_factory=TrialConfig)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    arms: list[dict[str, Any]] = field(default_factory=list)  # explicit arms, crossed with axes
    seeds: list[int] = field(default_factory=lambda: [0])
    search: OptunaSpec | None = None  # None: grid over axes x seeds
    scheduler: str = "fifo"  # fifo | asha (ASHA stops weak trials early; see docs/architecture.md)
    asha_grace_epochs: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int | None = None
    storage: str = "results"
    resume: bool = False
    address: str | None = None
    data_dir: str | None = None
    max_failures: int = 2  # Ray Tune retries a failed trial (lost worker or node) this often
    retrain_teachers: bool = False  # delete the needed teacher members first and train them again
    trackers: list[str] = field(default_factory=list)  # names of TRACKERS to log every trial to
    verbose: int = 1
    pack: str = "auto"  # auto: trials that share a student network and step shape train as one (kd_ray.packs.plan)

    # --- specification ------------------------------------------------------------------------
    @property
    def storage_path(self) -> str:
        return self.storage if is_uri(self.storage) else os.path.abspath(os.path.expanduser(self.storage))

    @property
    def study_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def teacher_store(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{TEACHERS_DIR}"

    def configs(self) -> list[TrialConfig]:
        """Every trial config of a grid study: arms x axes x seeds (for Optuna, the base per seed)."""
        names = list(self.axes)
        grid = list(itertools.product(*(self.axes[n] for n in names))) if names else [()]
        configs = []
        for arm in self.arms or [{}]:
            for values in grid:
                for seed in self.seeds:
                    values_dict = {**self.base.to_dict(), **arm, **dict(zip(names, values)), "seed": seed}
                    configs.append(TrialConfig.from_dict(values_dict))
        return configs

    def validate(self) -> list[TrialConfig]:
        """Refuse a bad specification before any Ray work: raises ConfigError."""
        from kd_ray.train.setup import check_runnable

        check_study_name(self.name)
        for axis, values in self.axes.items():
            if axis not in TrialConfig.field_names():
                TrialConfig.from_dict({axis: None})  # raises the did-you-mean error
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"axis {axis!r} needs a non-empty list of values, got {values!r}")
        for arm in self.arms:
            if not isinstance(arm, dict) or not arm:
                raise ConfigError(f"each arm must be a non-empty dict of TrialConfig fields, got {arm!r}")
            overlap = set(arm) & set(self.axes)
            if overlap:
                raise ConfigError(f"fields {sorted(overlap)} are set by both an arm and an axis")
        if not self.seeds:
            raise ConfigError("seeds must name at least one seed")
        repeated = sorted({seed for seed in self.seeds if self.seeds.count(seed) > 1})
        if repeated:
            # Two trials on one seed are one replicate run twice, not two replicates.
            raise ConfigError(f"seeds {list(self.seeds)} repeat {repeated}; allowed: distinct seeds, one "
                              f"replicate each")
        if self.scheduler not in ("fifo", "asha"):
            raise ConfigError(f"scheduler={self.scheduler!r} is not allowed; choose fifo or asha")
        if self.pack not in PACK_MODES:
            raise ConfigError(f"pack={self.pack!r} is not allowed; choose {' or '.join(PACK_MODES)}")
        steps_set = self.base.steps or "steps" in self.axes or any("steps" in arm for arm in self.arms)
        if self.scheduler == "asha" and steps_set:
            raise ConfigError(
                "scheduler='asha' stops trials by epoch, but steps is set (a fixed optimizer-step budget whose epochs "
                "depend on the data size); use scheduler=fifo with steps, or epochs with asha"
            )
        if self.cpus_per_trial <= 0:
            raise ConfigError(f"cpus_per_trial={self.cpus_per_trial} must be > 0")
        if self.gpus_per_trial < 0:
            raise ConfigError(f"gpus_per_trial={self.gpus_per_trial} must be >= 0")
        if self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial):
            raise ConfigError(f"gpus_per_trial={self.gpus_per_trial}: above 1 it must be a whole number")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ConfigError(f"max_concurrent_trials={self.max_concurrent_trials} must be >= 1 (or unset)")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures={self.max_failures} must be >= 0")
        self._validate_local_gpus()
        self._validate_trackers()
        if self.search is not None:
            self._validate_search()
        # When no axis, arm or search dimension touches what check_runnable judges, every config shares
        # the base's values there: judge the base first, so that a typo in an arch name is reported as
        # such rather than as some arm's cross-field rule (init='teacher_init' needs equal archs).
        varied = set(self.axes) | {k for arm in self.arms for k in arm} | set(self.search.space if self.search else ())
        if not varied & {"dataset", "teacher_arch", "student_arch", "norm", "augmentation"}:
            check_runnable(self.base, check_device=False)
        configs = self.configs()
        for cfg in configs:
            check_runnable(cfg, check_device=False)
        if self.gpus_per_trial == 0 and self.base.device.startswith("cuda"):
            raise ConfigError(f"device={self.base.device!r} needs gpus_per_trial > 0")
        return configs

    def _validate_local_gpus(self) -> None:
        """Without --address the study runs on a Ray started on this machine: refuse more GPUs per
        trial than this machine has before starting it. With an address (or a Ray the caller already
        started) the runner checks the cluster's GPUs once connected."""
        ray = sys.modules.get("ray")
        if self.address is not None or self.gpus_per_trial == 0 or (ray is not None and ray.is_initialized()):
            return
        import torch

        local = torch.cuda.device_count()
        if self.gpus_per_trial > local:
            raise ConfigError(
                f"gpus_per_trial={self.gpus_per_trial:g} but this machine has {local} GPUs; allowed: at most "
                f"{local} here, or pass --address of a Ray cluster that has GPUs"
            )

    def _validate_trackers(self) -> None:
        for tracker in self.trackers:
            if tracker not in TRACKERS:
                raise ConfigError(f"tracker {tracker!r} is not allowed; choose from {', '.join(TRACKERS)}")
            package, install = TRACKERS[tracker]
            # find_spec, not import: the package loads in the runner, and only if the study runs.
            if importlib.util.find_spec(package) is None:
                raise ConfigError(f"--log {tracker} needs the {package} package, which is not installed: "
                                  f"pip install '{install}'")

    def _validate_search(self) -> None:
        search = self.search
        assert search is not None
        if self.axes or self.arms:
            raise ConfigError(
                "an Optuna search takes its dimensions from the search space; axes and arms must be empty"
            )
        if len(search.metrics) != len(search.modes):
            raise ConfigError(f"search metrics {search.metrics} and modes {search.modes} differ in length")
        for mode in search.modes:
            if mode not in ("min", "max"):
                raise ConfigError(f"search mode {mode!r} is not allowed; choose min or max")
        from kd_ray.tables import METRICS

        for metric in search.metrics:
            if metric not in METRICS:
                raise ConfigError(
                    f"search metric {metric!r} is not a trial metric; choose from {', '.join(METRICS)}"
                )
        if len(search.metrics) > 1 and self.scheduler == "asha":
            raise ConfigError("scheduler='asha' stops trials on one metric; use it with a single-objective search")
        for name, dim in search.space.items():
            if name not in TrialConfig.field_names():
                TrialConfig.from_dict({name: None})
            if not dim or dim[0] not in ("float", "logfloat", "int", "choice"):
                raise ConfigError(f"search space {name}={dim!r}: kind must be float, logfloat, int or choice")
            samples = list(dim[1]) if dim[0] == "choice" else [dim[1], dim[2]]
            for value in samples:  # both ends (or every choice) must be a valid config
                TrialConfig.from_dict({**self.base.to_dict(), name: value})
        if search.num_samples < 1:
            raise ConfigError(f"search num_samples={search.num_samples} must be >= 1")

    # --- running --------------------------------------------------------------------------------
    def plan(self) -> RunPlan:
        """This study as the plain values the Ray runner takes."""
        return RunPlan.from_study(self)

    def spec(self) -> dict[str, Any]:
        """What decides this study's trials, as JSON values: stored beside the tables by its first run
        and held against every ``--resume``. Resources, storage, retries and trackers are not in it: a
        resumed study may run with others."""
        search = self.search
        spec = {
            "base": self.base.to_dict(),
            "axes": {axis: list(values) for axis, values in self.axes.items()},
            "arms": [dict(arm) for arm in self.arms],
            "seeds": list(self.seeds),
            "search": None if search is None else {
                "space": {name: list(dim) for name, dim in search.space.items()}, "metrics": list(search.metrics),
                "modes": list(search.modes), "num_samples": search.num_samples, "seed": search.seed,
            },
            "scheduler": self.scheduler,
            "asha_grace_epochs": self.asha_grace_epochs,
        }
        return json.loads(json.dumps(spec))  # as it reads back from the file: tuples become lists

    def check_resume(self) -> dict[str, Any] | None:
        """A resume must ask for the study that was stored: Ray Tune resumes the trials it saved, so a
        changed setting would be silently ignored. Raises ConfigError naming every difference. The one
        change allowed is more seeds, which grows the study (``_check_growth``); the stored seeds in
        another order are the same seeds. Returns the spec to store: the stored seeds first, then the
        new ones and the growth that runs them (``kd_ray.study.plan.grown_spec``); None for a study
        stored without a spec."""
        # Deferred and downward: guards imports Ray, and only a --resume reads the stored spec.
        from kd_ray.study.guards import read_spec

        stored = read_spec(self.study_dir)
        if stored is None:
            return None
        requested = self.spec()
        old = stored.get("seeds")
        seeds_as_requested = {**stored, "seeds": requested["seeds"]}
        if isinstance(old, list) and not spec_differences(seeds_as_requested, requested):
            if sorted(old) != sorted(requested["seeds"]):
                self._check_growth(old)
            return grown_spec(stored, requested, growth_folder(len(stored.get(GROWTHS_KEY) or []) + 1))
        same_seeds = isinstance(old, list) and sorted(old) == sorted(requested["seeds"])
        differences = spec_differences(seeds_as_requested if same_seeds else stored, requested)
        raise ConfigError(
            f"--resume asks for another study than the one stored in {self.study_dir}/{SPEC_FILE}: "
            + "; ".join(differences) + ". Drop the change to resume the stored study, or pass another "
            "--name to run the changed study beside it"
        )

    def _check_growth(self, stored_seeds: list[int]) -> None:
        """A resume whose seeds are not the stored ones may add seeds, never remove one, and only to a grid
        study whose trials do not depend on each other: ConfigError otherwise, one line."""
        where = f"{self.study_dir}/{SPEC_FILE}"
        missing = [seed for seed in stored_seeds if seed not in self.seeds]
        if missing:
            raise ConfigError(
                f"--resume: seeds {list(self.seeds)} lack the stored seeds {missing} ({where} holds seeds "
                f"{stored_seeds}); allowed: every stored seed, plus new ones to grow the study. A study's seeds "
                f"cannot be removed: pass them all, or another --name to run these seeds as a study of their own"
            )
        added = [seed for seed in self.seeds if seed not in stored_seeds]
        if self.search is not None:
            # A search's trials are the points it samples, each at the base's seed: seeds add none.
            raise ConfigError(
                f"--resume: seeds {list(self.seeds)} add {added} to the Optuna search stored in {where}, whose "
                f"trials are the points it samples, not a grid over seeds; allowed: the stored seeds "
                f"{stored_seeds}. Pass another --name to run another search beside it"
            )
        if self.scheduler == "asha":
            # ASHA stops a trial by comparing it with the trials that ran beside it: the new seeds, run
            # after the others, would be judged among themselves alone.
            raise ConfigError(
                f"--resume: seeds {list(self.seeds)} add {added} to a study under scheduler asha (stored in "
                f"{where}), which stops trials by comparing them with those run beside them; allowed: the "
                f"stored seeds {stored_seeds}. Pass another --name to run the new seeds as a study of their own"
            )

    def run(self) -> StudyResult:
        """Validate, take the study's lock (one driver per study, before any compute, teachers
        included), check its directory against ``resume``, then run it on Ray."""
        configs = self.validate()
        check_storage(self.storage_path)
        with study_lock(self.storage_path, self.name):
            begun, to_store = self._check_study_dir()
            # Deferred and downward: the runner imports Ray, which only a study that passed validation needs.
            from kd_ray.study.runner import run_study

            # A study that never began is run from the start, --resume or not.
            plan = replace(self.plan(), resume=self.resume and begun)
            if to_store is not None:
                # The stored study, maybe grown: its seeds in their stored order and a Ray Tune experiment
                # for each growth, so that the stored trials are resumed where they are, never run again.
                plan = replace(plan, spec=to_store, experiments=experiments(to_store))
            # A search samples its trials as it goes: the teachers are prepared for the base config.
            return run_study(plan, configs if self.search is None else [self.base])

    def _check_study_dir(self) -> tuple[bool, dict[str, Any] | None]:
        """Whether the study began (see ``kd_ray.study.storage``), and the spec to store for a resume of it
        (``check_resume``). A begun study needs ``--resume`` and must be the one stored, or that one with
        more seeds; ``--resume`` needs a study; what a run that never began left is cleared."""
        state = study_state(self.study_dir)
        if state == ABSENT and self.resume:
            raise ConfigError(f"--resume: there is no study {self.name} in {self.storage_path} to resume; drop "
                              f"--resume to start it, or check --name and --storage")
        if state == BEGUN and not self.resume:
            raise ConfigError(f"study directory {self.study_dir} already exists: pass --resume to continue "
                              f"it, or choose another --name or --storage")
        if state == BEGUN:
            return True, self.check_resume()
        if state != ABSENT:
            clear_not_begun(self.study_dir)
        return False, None


def _flat_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec as one level of named values: TrialConfig fields by their own names, then ``axis X``,
    ``search space X``, ``search X``, ``arms``, ``seeds``, ``scheduler``, ``asha_grace_epochs``."""
    flat = dict(spec.get("base") or {})
    flat.update({f"axis {axis}": values for axis, values in (spec.get("axes") or {}).items()})
    search = spec.get("search") or {}
    flat.update({f"search space {name}": dim for name, dim in (search.get("space") or {}).items()})
    flat.update({f"search {key}": value for key, value in search.items() if key != "space"})
    flat.update({key: spec[key] for key in ("arms", "seeds", "scheduler", "asha_grace_epochs") if key in spec})
    return flat


def spec_differences(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """``name: stored X, requested Y`` for every value that differs between two specs."""
    # A TrialConfig field added since the study was stored ran at its default there.
    defaults = json.loads(json.dumps(TrialConfig().to_dict()))
    old, new = {**defaults, **_flat_spec(stored)}, _flat_spec(requested)
    absent = object()

    def show(value: Any) -> str:
        return "(none)" if value is absent else json.dumps(value)

    return [
        f"{name}: stored {show(old.get(name, absent))}, requested {show(new.get(name, absent))}"
        for name in dict.fromkeys([*old, *new]) if old.get(name, absent) != new.get(name, absent)
    ]
