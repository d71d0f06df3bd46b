"""Runs a validated study on Ray: teacher members as Ray tasks, trials through a Ray Tune Tuner.

Only this module imports Ray. It takes the study as a ``RunPlan`` of plain values, owns the files
it writes beside the tables (``state.pt`` checkpoints, ``optuna.journal``) and its ``StudyResult``,
and never imports ``kd_ray.study``. The trainable is a plain function around ``trial.run_trial``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import tune

from kd_ray.config import ConfigError, TrialConfig
from kd_ray.data import DataError
from kd_ray.progress import printer
from kd_ray.tables import ERROR, STOPPED
from kd_ray.teachers import TeacherStoreError

STATE_FILE = "state.pt"  # the trial's checkpoint inside each Ray Tune checkpoint directory
OPTUNA_JOURNAL = "optuna.journal"  # the Optuna study of a search, in <storage>/<name>/

log = printer("kd_ray")


@dataclass(frozen=True)
class RunPlan:
    """What the runner needs of a validated study, as plain values.

    A grid study has ``search_space=None`` and ``num_samples=1``; ``metrics`` and ``modes`` are then
    the ones ASHA stops trials on. An Optuna search samples ``num_samples`` trials from
    ``search_space`` (TPE for one metric, NSGA-II for several)."""

    name: str
    study_dir: str
    storage_path: str
    teacher_store: str
    base: TrialConfig
    axes: dict[str, list[Any]] = field(default_factory=dict)
    arms: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    search_space: dict[str, tuple] | None = None
    metrics: tuple[str, ...] = ("test_agreement",)
    modes: tuple[str, ...] = ("max",)
    num_samples: int = 1
    search_seed: int = 0
    scheduler: str = "fifo"
    asha_grace_epochs: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int | None = None
    max_failures: int = 2
    resume: bool = False
    address: str | None = None
    data_dir: str | None = None
    retrain_teachers: bool = False
    verbose: int = 1


@dataclass
class StudyResult:
    study_dir: str
    trials: Any  # pandas.DataFrame
    epochs: Any  # pandas.DataFrame
    partial: bool
    finished: int
    expected: int


def _set_threads() -> None:
    """Use as many torch threads as CPUs Ray gave this worker (Ray's default would be wrong)."""
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))


# --- teachers as Ray tasks ----------------------------------------------------------------------


@ray.remote
def _train_member(cfg_dict: dict, member: int, seed_offset: int, store_uri: str, data_dir: str | None) -> str:
    from kd_ray.data import load_arrays
    from kd_ray.teachers import TeacherStore, ensure_members
    from kd_ray.trial import resolve_device

    _set_threads()
    cfg = TrialConfig.from_dict(cfg_dict)
    keys = ensure_members(
        cfg, TeacherStore(store_uri), load_arrays(cfg.dataset, data_dir), resolve_device(cfg.device),
        seed_offset=seed_offset, members=[member],
    )
    return keys[0]


def check_teacher_store(plan: RunPlan, configs: list[TrialConfig]) -> None:
    """Before Ray starts: every stored member the study needs must match its checksums, else
    TeacherStoreError names the file and the fix. With ``retrain_teachers`` those members are
    deleted instead, so ``prepare_teachers`` trains them again (once, before any trial)."""
    from kd_ray.teachers import TeacherStore, check_stored_members, delete_members, needed_members

    store = TeacherStore(plan.teacher_store)
    keys = list(needed_members(configs))
    if plan.retrain_teachers:
        delete_members(store, keys)
        log(f"teachers: --retrain-teachers: the study's members are trained again in {store.uri}")
    else:
        check_stored_members(store, keys)


def prepare_teachers(plan: RunPlan, configs: list[TrialConfig]) -> None:
    """Train every missing teacher member the study needs, one Ray task per member, in parallel."""
    from kd_ray.teachers import TeacherStore, needed_members

    store = TeacherStore(plan.teacher_store)
    members = needed_members(configs)
    missing = [needed for key, needed in members.items() if not store.has(key)]
    log(f"teachers: {len(members)} members needed, {len(members) - len(missing)} in the store {store.uri}")
    if not missing:
        return
    task = _train_member.options(num_cpus=plan.cpus_per_trial, num_gpus=plan.gpus_per_trial)
    pending = [
        task.remote(needed.cfg.to_dict(), needed.member, needed.seed_offset, plan.teacher_store, plan.data_dir)
        for needed in missing
    ]
    done = 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            key = ray.get(ready[0])
        except ray.exceptions.RayTaskError as exc:
            # Missing data or a bad store is the user's to fix: raise the task's own error, whose
            # message says how, rather than a remote traceback.
            if isinstance(exc.cause, (DataError, TeacherStoreError, ConfigError)):
                raise exc.cause from None
            raise
        done += 1
        log(f"teachers: member {key} ready ({done}/{len(missing)})")


# --- the trainable ------------------------------------------------------------------------------

ARM_KEY = "arm"  # an explicit arm travels through Tune's grid as one dict-valued parameter


def flatten_arm(config: dict[str, Any]) -> dict[str, Any]:
    config = dict(config)
    arm = config.pop(ARM_KEY, None) or {}  # pop first: {**config, **config.pop(...)} keeps the key
    return {**config, **arm}


def _trainable(config: dict[str, Any], store_uri: str, data_dir: str | None) -> None:
    import torch

    from kd_ray.trial import run_trial

    _set_threads()
    cfg = TrialConfig.from_dict(flatten_arm(config))
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    # Which process and node produced each report (result.json, progress.csv): a retried trial's
    # reports show where it died and where it went on.
    where = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def report_to_tune(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        metrics = {**metrics, **where}
        if state is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            torch.save(state, os.path.join(directory, STATE_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

    result = run_trial(cfg, report_to_tune, resume, store=store_uri, data_dir=data_dir)
    # The last report carries the trial's final status and provenance for the trials table.
    tune.report({**result, "epoch": result["epochs_completed"], "final": True, **where})


# --- the tuner ----------------------------------------------------------------------------------


def _optuna_search(plan: RunPlan):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from ray.tune.search.optuna import OptunaSearch

    assert plan.search_space is not None
    space = {}
    for name, dim in plan.search_space.items():
        kind = dim[0]
        if kind == "choice":
            space[name] = optuna.distributions.CategoricalDistribution(list(dim[1]))
        elif kind == "int":
            space[name] = optuna.distributions.IntDistribution(int(dim[1]), int(dim[2]))
        else:
            space[name] = optuna.distributions.FloatDistribution(float(dim[1]), float(dim[2]), log=kind == "logfloat")
    multi = len(plan.metrics) > 1
    if multi:
        sampler = optuna.samplers.NSGAIISampler(seed=plan.search_seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=plan.search_seed)
    journal = os.path.join(plan.study_dir, OPTUNA_JOURNAL)
    os.makedirs(plan.study_dir, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(journal))
    metric = list(plan.metrics) if multi else plan.metrics[0]
    mode = list(plan.modes) if multi else plan.modes[0]
    optuna_name = f"{plan.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    log(f"optuna: study '{optuna_name}' in {journal} "
        f"(optuna.load_study(study_name=..., storage=JournalStorage(...)))")
    return OptunaSearch(space=space, metric=metric, mode=mode, sampler=sampler, storage=storage, study_name=optuna_name)


def _scheduler(plan: RunPlan):
    if plan.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # The scheduler gets its own metric/mode: the searcher already holds the search's.
    # stop_last_trials=False: a trial that reaches max_t must run on to its final report (status and
    # provenance); with the default, ASHA would stop it at its last eval and it would read STOPPED.
    return ASHAScheduler(
        time_attr="epoch", metric=plan.metrics[0], mode=plan.modes[0], max_t=plan.base.epochs,
        grace_period=min(plan.asha_grace_epochs, plan.base.epochs), stop_last_trials=False,
    )


def _param_space(plan: RunPlan) -> dict[str, Any]:
    base = plan.base.to_dict()
    if plan.search_space is not None:
        for name in plan.search_space:
            base.pop(name)
        return base
    for axis, values in plan.axes.items():
        base[axis] = tune.grid_search(list(values))
    if plan.arms:
        base[ARM_KEY] = tune.grid_search(list(plan.arms))
    base["seed"] = tune.grid_search(list(plan.seeds))
    return base


def _check_cluster(plan: RunPlan) -> None:
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    autoscaling = plan.address is not None
    if plan.gpus_per_trial > gpus and not autoscaling:
        raise ConfigError(f"gpus_per_trial={plan.gpus_per_trial} but the Ray cluster has {gpus:g} GPUs")
    if plan.cpus_per_trial > cpus and not autoscaling:
        raise ConfigError(f"cpus_per_trial={plan.cpus_per_trial} but the Ray cluster has {cpus:g} CPUs")
    if autoscaling and (plan.gpus_per_trial > gpus or plan.cpus_per_trial > cpus):
        log(f"cluster has {cpus:g} CPUs / {gpus:g} GPUs now; waiting for the autoscaler to add nodes")


def _build_tuner(plan: RunPlan):
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, store_uri=plan.teacher_store, data_dir=plan.data_dir),
        {"cpu": plan.cpus_per_trial, "gpu": plan.gpus_per_trial},
    )
    if plan.resume and tune.Tuner.can_restore(plan.study_dir):
        log(f"resuming {plan.study_dir}")
        return tune.Tuner.restore(plan.study_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    cpus = ray.cluster_resources().get("CPU", 1)
    max_concurrent = plan.max_concurrent_trials or max(1, int(cpus // plan.cpus_per_trial))
    tune_config = tune.TuneConfig(
        search_alg=_optuna_search(plan) if plan.search_space is not None else None,
        scheduler=_scheduler(plan),
        num_samples=plan.num_samples,
        max_concurrent_trials=max_concurrent,
        reuse_actors=plan.gpus_per_trial == 0,
    )
    run_config = tune.RunConfig(
        name=plan.name,
        storage_path=plan.storage_path,
        failure_config=tune.FailureConfig(max_failures=plan.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        verbose=plan.verbose,
    )
    return tune.Tuner(trainable, param_space=_param_space(plan), tune_config=tune_config, run_config=run_config)


# --- results to tables --------------------------------------------------------------------------


def _nan_to_none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def collect_rows(study_name: str, results) -> tuple[list[dict], list[dict]]:
    """Trial rows and epoch rows from a ResultGrid."""
    trials, epochs = [], []
    for result in results:
        metrics = result.metrics or {}
        trial_id = str(metrics.get("trial_id") or os.path.basename(result.path))
        config = {k: v for k, v in flatten_arm(result.config or {}).items() if k in TrialConfig.field_names()}
        row = {"study": study_name, "trial_id": trial_id, **config}
        if result.error is not None:
            row.update(status=ERROR, error=f"{type(result.error).__name__}: {result.error}"[:2000])
        elif metrics.get("final"):
            row.update({k: _nan_to_none(v) for k, v in metrics.items() if k not in config})
        else:
            row.update(status=STOPPED, error="stopped early by the scheduler")
        history = result.metrics_dataframe
        if history is not None and len(history):
            reports = history[history["final"] != True] if "final" in history else history  # noqa: E712
            if "epoch" in reports:
                # A retried trial reports again the epochs after its last checkpoint: one row per
                # epoch, the last report of it (the one the trial's state continued from).
                reports = reports.drop_duplicates(subset="epoch", keep="last").sort_values("epoch", kind="stable")
            for record in reports.to_dict("records"):
                values = {k: _nan_to_none(v) for k, v in record.items()}
                epochs.append({"study": study_name, "trial_id": trial_id, **values})
            if row["status"] == STOPPED and len(reports):
                last = reports.iloc[-1].to_dict()
                row.update({
                    k: _nan_to_none(v) for k, v in last.items()
                    if k in row or k.startswith(("test_", "train_", "aug_", "teacher_"))
                })
                row["epochs_completed"] = int(last.get("epoch", 0))
        trials.append(row)
    return trials, epochs


def run_study(plan: RunPlan, configs: list[TrialConfig]) -> StudyResult:
    """Run the validated ``configs`` of ``plan`` (for a search, ``[plan.base]``) and write the tables."""
    import pandas as pd

    from kd_ray import tables

    if plan.address is None:
        # A local instance of our own; a cluster (--address) keeps whatever authentication it uses.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.path.exists(plan.study_dir) and not plan.resume and "://" not in plan.study_dir:
        raise ConfigError(
            f"study directory {plan.study_dir} already exists: pass --resume to continue or rewrite "
            f"it, or choose another --name or --storage"
        )
    check_teacher_store(plan, configs)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=plan.address or "local", include_dashboard=False, log_to_driver=True)
    try:
        _check_cluster(plan)
        expected = plan.num_samples if plan.search_space is not None else len(configs)
        log(f"study {plan.name}: {expected} trials, {plan.cpus_per_trial:g} CPU / {plan.gpus_per_trial:g} GPU "
            f"each, storage {plan.study_dir}")
        prepare_teachers(plan, configs)
        tuner_started = time.perf_counter()
        results = _build_tuner(plan).fit()
        log(f"Ray Tune finished in {time.perf_counter() - tuner_started:.1f} s")
    finally:
        if started_ray:
            ray.shutdown()
    trials, epochs = collect_rows(plan.name, results)
    # After an interrupt Tuner.fit() returns normally; unfinished trials are neither terminated
    # nor errored, and an interrupted search may not have created all its trials yet.
    finished = results.num_terminated + results.num_errors
    partial = finished < expected or len(trials) < expected
    if partial:
        log(f"study {plan.name} is PARTIAL: {finished} of {expected} trials finished; tables not written. "
            f"Rerun the same command with --resume to finish it.")
        return StudyResult(plan.study_dir, pd.DataFrame(trials), pd.DataFrame(epochs), True, finished, expected)
    trials_path, epochs_path = tables.write_study_tables(plan.study_dir, trials, epochs)
    log(f"wrote {trials_path} ({len(trials)} trials) and {epochs_path} ({len(epochs)} rows)")
    return StudyResult(
        plan.study_dir, tables.read_table(trials_path).to_pandas(), tables.read_table(epochs_path).to_pandas(),
        False, finished, expected,
    )
