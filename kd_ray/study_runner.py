"""Runs a validated Study on Ray: teacher members as Ray tasks, trials through a Ray Tune Tuner.

Only this module imports Ray. The trainable is a plain function around ``trial.run_trial``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any

import ray
from ray import tune

from kd_ray.config import ConfigError, TrialConfig
from kd_ray.data import DataError
from kd_ray.study import OPTUNA_JOURNAL, STATE_FILE, StudyResult, needed_members
from kd_ray.teachers import TeacherStoreError

if TYPE_CHECKING:
    from kd_ray.study import Study


def _log(message: str) -> None:
    print(f"[kd_ray {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _set_threads() -> None:
    """Use as many torch threads as CPUs Ray gave this worker (Ray's default would be wrong)."""
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))


# --- teachers as Ray tasks ----------------------------------------------------------------------


@ray.remote
def _train_member(cfg_dict: dict, member: int, seed_offset: int, store_uri: str, data_dir: str | None) -> str:
    from kd_ray.data import DATASET_INFO, load_arrays, split_indices
    from kd_ray.teachers import TeacherStore, ensure_members
    from kd_ray.trial import resolve_device

    import torch

    _set_threads()
    cfg = TrialConfig.from_dict(cfg_dict)
    arrays = load_arrays(cfg.dataset, data_dir)
    teacher_idx, _ = split_indices(
        arrays.y_train, teacher_split=cfg.teacher_split, distill_split="train", distill_fraction=1.0,
        data_seed=cfg.data_seed, seed=0, teacher_fraction=cfg.teacher_fraction,
    )
    keys = ensure_members(
        cfg, TeacherStore(store_uri), arrays, torch.as_tensor(teacher_idx), DATASET_INFO[cfg.dataset],
        resolve_device(cfg.device), seed_offset=seed_offset, members=[member],
    )
    return keys[0]


def check_teacher_store(study: "Study", configs: list[TrialConfig]) -> None:
    """Before Ray starts: every stored member the study needs must match its checksums, else
    TeacherStoreError names the file and the fix. With ``retrain_teachers`` those members are
    deleted instead, so ``prepare_teachers`` trains them again (once, before any trial)."""
    from kd_ray.teachers import TeacherStore

    store = TeacherStore(study.teacher_store)
    for key in needed_members(configs):
        if not store.has(key):
            continue
        if study.retrain_teachers:
            with store.lock(key):
                store.delete(key)
            continue
        problems = store.check(key)
        if problems:
            raise TeacherStoreError(problems[0])
    if study.retrain_teachers:
        _log(f"teachers: --retrain-teachers: the study's members are trained again in {store.uri}")


def prepare_teachers(study: "Study", configs: list[TrialConfig]) -> None:
    """Train every missing teacher member the study needs, one Ray task per member, in parallel."""
    from kd_ray.teachers import TeacherStore

    store = TeacherStore(study.teacher_store)
    members = needed_members(configs)
    missing = {key: spec for key, spec in members.items() if not store.has(key)}
    _log(f"teachers: {len(members)} members needed, {len(members) - len(missing)} in the store {store.uri}")
    if not missing:
        return
    task = _train_member.options(num_cpus=study.cpus_per_trial, num_gpus=study.gpus_per_trial)
    pending = [
        task.remote(cfg.to_dict(), member, offset, study.teacher_store, study.data_dir)
        for cfg, member, offset in missing.values()
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
        _log(f"teachers: member {key} ready ({done}/{len(missing)})")


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

    def report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        metrics = {**metrics, **where}
        if state is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            torch.save(state, os.path.join(directory, STATE_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

    result = run_trial(cfg, report, resume, store=store_uri, data_dir=data_dir)
    # The last report carries the trial's final status and provenance for the trials table.
    tune.report({**result, "epoch": result["epochs_completed"], "final": True, **where})


# --- the tuner ----------------------------------------------------------------------------------


def _optuna_search(study: "Study"):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from ray.tune.search.optuna import OptunaSearch

    search = study.search
    assert search is not None
    space = {}
    for name, dim in search.space.items():
        kind = dim[0]
        if kind == "choice":
            space[name] = optuna.distributions.CategoricalDistribution(list(dim[1]))
        elif kind == "int":
            space[name] = optuna.distributions.IntDistribution(int(dim[1]), int(dim[2]))
        else:
            space[name] = optuna.distributions.FloatDistribution(float(dim[1]), float(dim[2]), log=kind == "logfloat")
    multi = len(search.metrics) > 1
    sampler = optuna.samplers.NSGAIISampler(seed=search.seed) if multi else optuna.samplers.TPESampler(seed=search.seed)
    journal = os.path.join(study.study_dir, OPTUNA_JOURNAL)
    os.makedirs(study.study_dir, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(journal))
    metric = list(search.metrics) if multi else search.metrics[0]
    mode = list(search.modes) if multi else search.modes[0]
    optuna_name = f"{study.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    _log(f"optuna: study '{optuna_name}' in {journal} (optuna.load_study(study_name=..., storage=JournalStorage(...)))")
    return OptunaSearch(space=space, metric=metric, mode=mode, sampler=sampler, storage=storage, study_name=optuna_name)


def _scheduler(study: "Study"):
    if study.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    metric = study.search.metrics[0] if study.search else "test_agreement"
    mode = study.search.modes[0] if study.search else "max"
    # The scheduler gets its own metric/mode: the searcher already holds the search's.
    # stop_last_trials=False: a trial that reaches max_t must run on to its final report (status and
    # provenance); with the default, ASHA would stop it at its last eval and it would read STOPPED.
    return ASHAScheduler(
        time_attr="epoch", metric=metric, mode=mode, max_t=study.base.epochs,
        grace_period=min(study.asha_grace_epochs, study.base.epochs), stop_last_trials=False,
    )


def _param_space(study: "Study") -> dict[str, Any]:
    base = study.base.to_dict()
    if study.search is not None:
        for name in study.search.space:
            base.pop(name)
        return base
    for axis, values in study.axes.items():
        base[axis] = tune.grid_search(list(values))
    if study.arms:
        base[ARM_KEY] = tune.grid_search(list(study.arms))
    base["seed"] = tune.grid_search(list(study.seeds))
    return base


def _check_cluster(study: "Study") -> None:
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    autoscaling = study.address is not None
    if study.gpus_per_trial > gpus and not autoscaling:
        raise ConfigError(f"gpus_per_trial={study.gpus_per_trial} but the Ray cluster has {gpus:g} GPUs")
    if study.cpus_per_trial > cpus and not autoscaling:
        raise ConfigError(f"cpus_per_trial={study.cpus_per_trial} but the Ray cluster has {cpus:g} CPUs")
    if autoscaling and (study.gpus_per_trial > gpus or study.cpus_per_trial > cpus):
        _log(f"cluster has {cpus:g} CPUs / {gpus:g} GPUs now; waiting for the autoscaler to add nodes")


def _build_tuner(study: "Study", expected: int):
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, store_uri=study.teacher_store, data_dir=study.data_dir),
        {"cpu": study.cpus_per_trial, "gpu": study.gpus_per_trial},
    )
    if study.resume and tune.Tuner.can_restore(study.study_dir):
        _log(f"resuming {study.study_dir}")
        return tune.Tuner.restore(study.study_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    max_concurrent = study.max_concurrent_trials or max(1, int(ray.cluster_resources().get("CPU", 1) // study.cpus_per_trial))
    tune_config = tune.TuneConfig(
        search_alg=_optuna_search(study) if study.search else None,
        scheduler=_scheduler(study),
        num_samples=study.search.num_samples if study.search else 1,
        max_concurrent_trials=max_concurrent,
        reuse_actors=study.gpus_per_trial == 0,
    )
    run_config = tune.RunConfig(
        name=study.name,
        storage_path=study.storage_path,
        failure_config=tune.FailureConfig(max_failures=study.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        verbose=study.verbose,
    )
    return tune.Tuner(trainable, param_space=_param_space(study), tune_config=tune_config, run_config=run_config)


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
            row.update(status="ERROR", error=f"{type(result.error).__name__}: {result.error}"[:2000])
        elif metrics.get("final"):
            row.update({k: _nan_to_none(v) for k, v in metrics.items() if k not in config})
        else:
            row.update(status="STOPPED", error="stopped early by the scheduler")
        history = result.metrics_dataframe
        if history is not None and len(history):
            reports = history[history["final"] != True] if "final" in history else history  # noqa: E712
            if "epoch" in reports:
                # A retried trial reports again the epochs after its last checkpoint: one row per
                # epoch, the last report of it (the one the trial's state continued from).
                reports = reports.drop_duplicates(subset="epoch", keep="last").sort_values("epoch", kind="stable")
            for record in reports.to_dict("records"):
                epochs.append({"study": study_name, "trial_id": trial_id, **{k: _nan_to_none(v) for k, v in record.items()}})
            if row["status"] == "STOPPED" and len(reports):
                last = reports.iloc[-1].to_dict()
                row.update({k: _nan_to_none(v) for k, v in last.items() if k in row or k.startswith(("test_", "train_", "aug_", "teacher_"))})
                row["epochs_completed"] = int(last.get("epoch", 0))
        trials.append(row)
    return trials, epochs


def run(study: "Study", configs: list[TrialConfig]) -> StudyResult:
    from kd_ray import tables

    if study.address is None:
        # A local instance of our own; a cluster (--address) keeps whatever authentication it uses.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if os.path.exists(study.study_dir) and not study.resume and "://" not in study.study_dir:
        raise ConfigError(
            f"study directory {study.study_dir} already exists: pass --resume to continue or rewrite "
            f"it, or choose another --name or --storage"
        )
    check_teacher_store(study, configs if study.search is None else [study.base])
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=study.address or "local", include_dashboard=False, log_to_driver=True)
    try:
        _check_cluster(study)
        expected = study.search.num_samples if study.search else len(configs)
        _log(f"study {study.name}: {expected} trials, {study.cpus_per_trial:g} CPU / {study.gpus_per_trial:g} GPU each, storage {study.study_dir}")
        prepare_teachers(study, configs if study.search is None else [study.base])
        tuner_started = time.perf_counter()
        results = _build_tuner(study, expected).fit()
        _log(f"Ray Tune finished in {time.perf_counter() - tuner_started:.1f} s")
    finally:
        if started_ray:
            ray.shutdown()
    trials, epochs = collect_rows(study.name, results)
    # After an interrupt Tuner.fit() returns normally; unfinished trials are neither terminated
    # nor errored, and an interrupted search may not have created all its trials yet.
    finished = results.num_terminated + results.num_errors
    partial = finished < expected or len(trials) < expected
    import pandas as pd

    if partial:
        _log(f"study {study.name} is PARTIAL: {finished} of {expected} trials finished; tables not written. "
             f"Rerun the same command with --resume to finish it.")
        return StudyResult(study.study_dir, pd.DataFrame(trials), pd.DataFrame(epochs), True, finished, expected)
    trials_path, epochs_path = tables.write_study_tables(study.study_dir, trials, epochs)
    _log(f"wrote {trials_path} ({len(trials)} trials) and {epochs_path} ({len(epochs)} rows)")
    return StudyResult(
        study.study_dir, tables.read_table(trials_path).to_pandas(), tables.read_table(epochs_path).to_pandas(),
        False, finished, expected,
    )
