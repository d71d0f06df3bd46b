"""Runs a validated study on Ray: teacher members as Ray tasks, trials through a Ray Tune Tuner.

It takes the study as a ``RunPlan`` of plain values and gives back a ``StudyResult`` (both
``kd_ray.study.plan``), owns the ``state.pt`` checkpoints it writes beside the tables, and never
imports ``kd_ray.study.spec``, which sits above it. The trainable is a plain function around
``kd_ray.train.trial.run_trial``. Every module of ``kd_ray/study`` may import Ray; nothing outside it does.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pyarrow.fs as pafs
import ray
from ray import tune

from kd_ray import tables
from kd_ray.atomic import atomic_local_filesystem, filesystem, is_uri
from kd_ray.config import EXIT_RAY, ConfigError, TrialConfig
from kd_ray.data.datasets import DataError
from kd_ray.progress import log
from kd_ray.study.console import TrialsDone, arm_columns, progress_table, tracker_callbacks
from kd_ray.study.guards import (
    StorageWatch,
    check_saved_state,
    local_ray_settings,
    restore_tuner,
    signals_as_interrupt,
    storage_error,
    write_spec,
)
from kd_ray.study.live_tables import LiveTables, record_finished_trials
from kd_ray.study.pack_trials import choose_packs, pack_dirname, search_pack_size, train_pack
from kd_ray.study.plan import (
    ENDED_AT,
    PACK_KEY,
    REPORTED_KEY,
    STARTED_AT,
    Experiment,
    RunPlan,
    StudyResult,
    trial_fields,
)
from kd_ray.study.storage import BEGUN, clear_not_begun, rerun_hint, study_state
from kd_ray.train.teachers import TeacherStoreError

STATE_FILE = "state.pt"  # the trial's checkpoint inside each Ray Tune checkpoint directory
REPORT_KEY = "report"  # in a checkpoint: the report it came with, made again by a trial restored from it


def _set_threads() -> None:
    """Use as many torch threads as CPUs Ray gave this worker (Ray's default would be wrong)."""
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))


# --- teachers as Ray tasks ----------------------------------------------------------------------


@ray.remote
def _train_members(members: list[tuple[dict, int, str]], store_uri: str, data_dir: str | None) -> list[str]:
    """Train the members ``(config, member, role)`` of one group (one dataset) into the store: fused where
    they fuse, one by one otherwise (``kd_ray.packs.members.ensure_members_fused``). Their keys, in order."""
    from kd_ray.data.datasets import load_arrays
    from kd_ray.packs.members import ensure_members_fused
    from kd_ray.train.setup import resolve_device
    from kd_ray.train.teachers import TeacherStore

    _set_threads()
    needed = [(TrialConfig.from_dict(cfg_dict), member, role) for cfg_dict, member, role in members]
    cfg = needed[0][0]
    return ensure_members_fused(needed, TeacherStore(store_uri), load_arrays(cfg.dataset, data_dir),
                                resolve_device(cfg.device))


def check_teacher_store(plan: RunPlan, configs: list[TrialConfig]) -> None:
    """Before Ray starts: every stored member the study needs must match its checksums, else
    TeacherStoreError names the file and the fix. With ``retrain_teachers`` those members are
    deleted instead, so ``prepare_teachers`` trains them again (once, before any trial)."""
    from kd_ray.train.teachers import TeacherStore, check_stored_members, delete_members, needed_members

    store = TeacherStore(plan.teacher_store)
    keys = list(needed_members(configs))
    if plan.retrain_teachers:
        delete_members(store, keys)
        log(f"teachers: --retrain-teachers: the study's members are trained again in {store.uri}")
    else:
        check_stored_members(store, keys)


def prepare_teachers(plan: RunPlan, configs: list[TrialConfig], fused: bool = True) -> None:
    """Train every missing teacher member the study needs, in parallel Ray tasks: members that fuse
    (``kd_ray.packs.members``) as groups trained as one wide network each, in at least as many groups as
    the cluster has trial slots; the others, or every member with ``fused=False``, one task per member."""
    from kd_ray.packs.members import member_groups
    from kd_ray.train.teachers import TeacherStore, needed_members

    store = TeacherStore(plan.teacher_store)
    members = needed_members(configs)
    missing = [needed for key, needed in members.items() if not store.has(key)]
    log(f"teachers: {len(members)} members needed, {len(members) - len(missing)} in the store {store.uri}")
    if not missing:
        return
    if fused:
        groups, refused = member_groups(missing, tasks_at_least=slots(plan))
        for reason in refused.values():
            log(f"teachers: trained one by one, not fused: {reason}")
    else:
        groups = [[needed] for needed in missing]
    task = _train_members.options(num_cpus=plan.cpus_per_trial, num_gpus=plan.gpus_per_trial)
    pending = [
        task.remote([(needed.cfg.to_dict(), needed.member, needed.role) for needed in group], plan.teacher_store,
                    plan.data_dir)
        for group in groups
    ]
    done = 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            keys = ray.get(ready[0])
        except ray.exceptions.RayTaskError as exc:
            # Missing data or a bad store is the user's to fix: raise the task's own error, whose
            # message says how, rather than a remote traceback.
            if isinstance(exc.cause, (DataError, TeacherStoreError, ConfigError)):
                raise exc.cause from None
            problem = storage_error(exc, plan.teacher_store)  # the store full, read-only or gone
            if problem is not None:
                raise problem from None
            raise
        for key in keys:
            done += 1
            log(f"teachers: member {key} ready ({done}/{len(missing)})")


# --- the trainable ------------------------------------------------------------------------------


def _trainable(config: dict[str, Any], store_uri: str | None, data_dir: str | None,
               predictions_dir: str | None = None) -> None:
    import torch

    from kd_ray.train.trial import run_trial

    _set_threads()
    # Ray logs every persisted checkpoint at INFO from the worker, a line per evaluation on the console.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    resume = None
    started_at = time.time()
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
        # The report that came with this checkpoint, again: a process lost after its checkpoint reached
        # storage but before Tune's driver took the report would otherwise leave that epoch without a row
        # (trial_rows keeps one row per epoch, so a report the driver did take is not doubled). It holds
        # when the trial first began, which a retried trial keeps.
        if REPORT_KEY in resume:
            report = resume.pop(REPORT_KEY)
            started_at = float(report.get(STARTED_AT, started_at))
            tune.report(report)
    # Which process and node produced each report (result.json, progress.csv): a retried trial's
    # reports show where it died and where it went on. And when the trial began, in UTC seconds.
    where = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), STARTED_AT: started_at}

    def report_to_tune(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        metrics = {**metrics, **where, REPORTED_KEY: time.time()}
        if state is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            torch.save({**state, REPORT_KEY: metrics}, os.path.join(directory, STATE_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

    if PACK_KEY in config:
        train_pack(config[PACK_KEY], report_to_tune, resume, store_uri, data_dir, where, predictions_dir)
        return
    cfg = TrialConfig.from_dict(trial_fields(config))
    result = run_trial(cfg, report_to_tune, resume, store=store_uri, data_dir=data_dir, predictions_dir=predictions_dir,
                       trial_id=tune.get_context().get_trial_id())
    # The last report carries the trial's final status, provenance and end for the trials table.
    tune.report({**result, "epoch": result["epochs_completed"], "final": True, **where, ENDED_AT: time.time()})


def distillation_trainable(store_uri: str | None = None, data_dir: str | None = None, cpus_per_trial: float = 1,
                           gpus_per_trial: float = 0, predictions_dir: str | None = None):
    """The trainable every study runs, as Ray Tune takes it (with its resources), for
    ``tune.Tuner.restore(study_dir, trainable=distillation_trainable(...))``: the teacher store
    (``<storage>/teachers``; None: ``$KD_RAY_TEACHERS``), the data directory (None: ``$KD_RAY_DATA``), and the
    CPUs and GPUs of each trial, and where trials with ``save_predictions`` write theirs. A restored Tuner's
    ``get_results()`` reads the stored trials without it running."""
    return tune.with_resources(
        tune.with_parameters(_trainable, store_uri=store_uri, data_dir=data_dir,
                             predictions_dir=predictions_dir),
        {"cpu": cpus_per_trial, "gpu": gpus_per_trial},
    )


# --- the tuner ----------------------------------------------------------------------------------


def _searcher(plan: RunPlan, pack_size: int):
    """The Optuna searcher of a search (``pack_size`` points to a trial), None for a grid study."""
    if plan.search_space is None:
        return None
    # Deferred and downward: Optuna loads only for a study that searches.
    from kd_ray.study.search import optuna_searcher

    return optuna_searcher(plan, pack_size)


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


def _search_space(plan: RunPlan) -> dict[str, Any]:
    """A search's Ray Tune param space: the base's fields but the searched ones, which the searcher adds."""
    base = plan.base.to_dict()
    for name in plan.search_space or {}:
        base.pop(name)
    return base


def _grid_points(configs: list[TrialConfig]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A grid's trials as Ray Tune takes them: each config whole and flat as a point to evaluate, in the study's
    order, and a param space that holds every point (a field that varies is a choice among its values)."""
    points = [cfg.to_dict() for cfg in configs]
    space = dict(points[0])
    for name in space:
        values = list(dict.fromkeys(point[name] for point in points))
        if len(values) > 1:
            space[name] = tune.choice(values)
    return space, points


MAX_DIRNAME = 130  # characters of a trial directory's name, as Ray Tune's own names are cut


def labelled_dirname(labels: tuple[str, ...], trial) -> str:
    """A grid trial's directory: the trainable's name, the trial's id and the values of the fields that tell the
    study's trials apart (Ray Tune's own name would hold no values: each trial is a point, nothing is sampled)."""
    values = ",".join(f"{name}={trial.config.get(name)}" for name in labels)
    name = f"{_trainable.__name__}_{trial.trial_id}_{values}"[:MAX_DIRNAME]
    return re.sub(r'[/()<>:"\\|?*\s]', "_", name)


# Ray Tune snapshots the experiment state whenever a trial has written num_to_keep checkpoints since the
# last snapshot, so that the saved state never names a deleted checkpoint. A trial checkpoints at each
# evaluation, every second or so at laptop scale: keeping 2, the snapshots came seconds apart and Ray
# warned of each. Keeping 10, a trial of up to 10 evaluations forces none (Ray snapshots every 10 s or
# more by itself) and a longer one one per 10 checkpoints; a trial's directory holds at most 10 states.
CHECKPOINTS_KEPT = 10


def slots(plan: RunPlan, count_gpus: bool = True) -> int:
    """How many trials the cluster runs at once: ``max_concurrent_trials`` if set, else as many as its
    CPUs hold and, with ``count_gpus``, as many as its GPUs hold."""
    if plan.max_concurrent_trials:
        return plan.max_concurrent_trials
    resources = ray.cluster_resources()
    count = int(resources.get("CPU", 1) // plan.cpus_per_trial)
    if count_gpus and plan.gpus_per_trial > 0:
        count = min(count, int(resources.get("GPU", 0) // plan.gpus_per_trial))
    return max(1, count)


def _check_cluster(plan: RunPlan) -> None:
    """Refuse a trial larger than the cluster, unless an autoscaler (``--address``) may add the nodes it needs."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    autoscaling = plan.address is not None
    if plan.gpus_per_trial > gpus and not autoscaling:
        raise ConfigError(f"gpus_per_trial={plan.gpus_per_trial} but the Ray cluster has {gpus:g} GPUs")
    if plan.cpus_per_trial > cpus and not autoscaling:
        raise ConfigError(f"cpus_per_trial={plan.cpus_per_trial} but the Ray cluster has {cpus:g} CPUs")
    if autoscaling and (plan.gpus_per_trial > gpus or plan.cpus_per_trial > cpus):
        log(f"cluster has {cpus:g} CPUs / {gpus:g} GPUs now; waiting for the autoscaler to add nodes")


def _build_tuner(plan: RunPlan, experiment: Experiment, configs: list[TrialConfig],
                 live_tables: LiveTables) -> tune.Tuner:
    """The Tuner of one of the study's experiments (``configs`` are its trials): restored from its saved
    state on a resume, else a new one, its trials packed where they can be."""
    # Ray Tune's newer console ignores a progress reporter; the classic one prints CLIReporter's table.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trainable = distillation_trainable(plan.teacher_store, plan.data_dir, plan.cpus_per_trial, plan.gpus_per_trial,
                                       f"{plan.study_dir}/{tables.PREDICTIONS_DIR}")
    # A local study's files are written through a filesystem whose failed writes leave the old file.
    storage = atomic_local_filesystem(plan.study_dir) if not is_uri(plan.study_dir) else None
    folder, seeds = experiment
    where = experiment_dir(plan, folder)
    if folder and plan.resume and study_state(where) != BEGUN:
        clear_not_begun(where)  # a growth that ended before Ray Tune saved its state begins again
    if plan.resume and tune.Tuner.can_restore(where, storage_filesystem=storage):
        log(f"resuming {where}")
        # A resumed study keeps the packs its saved Tuner holds.
        return restore_tuner(where, trainable, storage)
    if folder:
        log(f"growth: seeds {list(seeds)}, {len(configs)} trials, as an experiment of their own in {where}")
    packs, search_pack = _packs(plan, configs, experiment)
    packed = packs is not None or search_pack > 1
    space, tune_config = _trials(plan, configs, packs, search_pack)
    run_config = _run_config(plan, folder, storage, live_tables, _progress_columns(plan, packed), packed)
    return tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)


def _trials(plan: RunPlan, configs: list[TrialConfig], packs: list[dict[str, Any]] | None,
            search_pack: int) -> tuple[dict[str, Any], tune.TuneConfig]:
    """What Ray Tune runs: a grid's packs (one trial each), a grid's configs (a trial each, its config whole), or
    a search's points (``search_pack`` to a trial); as the Tuner's param space and TuneConfig."""
    from ray.tune.search import BasicVariantGenerator

    trial_slots = slots(plan, count_gpus=False)  # CPUs only: each trial's GPU request holds them to the GPUs
    if packs is not None:
        space = {PACK_KEY: tune.grid_search(packs)}
        return space, _tune_config(plan, None, 1, trial_slots, pack_dirname)
    if plan.search_space is not None:
        # A packed search's searcher gives each trial its whole parameter: every student's config.
        space = _search_space(plan) if search_pack == 1 else {}
        searcher = _searcher(plan, search_pack)
        samples = -(-plan.num_samples // search_pack)  # a search's points, search_pack to a trial
        return space, _tune_config(plan, searcher, samples, trial_slots, pack_dirname if search_pack > 1 else None)
    space, points = _grid_points(configs)
    # The generator holds the trials to the slots itself: Ray Tune would ignore max_concurrent_trials for it.
    points_first = BasicVariantGenerator(points_to_evaluate=points, max_concurrent=trial_slots)
    dirname = functools.partial(labelled_dirname, tuple(plan.label_fields))
    return space, _tune_config(plan, points_first, len(points), None, dirname)


def experiment_dir(plan: RunPlan, folder: str) -> str:
    """Where an experiment of the study lives: the study directory, or a growth's folder in it."""
    return f"{plan.study_dir}/{folder}" if folder else plan.study_dir


def _packs(plan: RunPlan, configs: list[TrialConfig],
           experiment: Experiment) -> tuple[list[dict[str, Any]] | None, int]:
    """A grid study's packs as Ray Tune parameters (None: a trial per config), listed in the experiment's
    directory, and how many Optuna points each trial of a search asks for (1: a point per trial)."""
    trial_slots = slots(plan)
    folder, _ = experiment
    packs = choose_packs(plan.pack, plan.search_space is not None, plan.scheduler, trial_slots, plan.gpus_per_trial,
                         experiment_dir(plan, folder), configs, folder=folder, labels=plan.label_fields)
    if plan.search_space is None:
        return packs, 1
    search_pack = search_pack_size(plan.pack, plan.scheduler, list(plan.search_space), plan.base, plan.num_samples,
                                   trial_slots, plan.gpus_per_trial)
    return packs, search_pack


def _progress_columns(plan: RunPlan, packed: bool) -> dict[str, str]:
    """The Tune config keys that tell the trials apart on the console, and their labels."""
    if packed:
        return {f"{PACK_KEY}/pack_id": "pack", f"{PACK_KEY}/size": "students"}
    return arm_columns(plan.search_space, plan.axes, plan.arms, plan.seeds)


def _tune_config(plan: RunPlan, search_alg, num_samples: int, max_concurrent: int | None,
                 dirname) -> tune.TuneConfig:
    return tune.TuneConfig(
        trial_dirname_creator=dirname,
        search_alg=search_alg,
        scheduler=_scheduler(plan),
        num_samples=num_samples,
        max_concurrent_trials=max_concurrent,
        reuse_actors=plan.gpus_per_trial == 0,
    )


def _run_config(plan: RunPlan, folder: str, storage, live_tables: LiveTables, columns: dict[str, str],
                packed: bool) -> tune.RunConfig:
    return tune.RunConfig(
        # Ray Tune's experiment directory is <storage_path>/<name>: the study's, or a growth's folder in it.
        name=folder or plan.name,
        storage_path=plan.study_dir if folder else plan.storage_path,
        storage_filesystem=storage,
        failure_config=tune.FailureConfig(max_failures=plan.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        callbacks=[StorageWatch(local=storage is not None), live_tables,
                   *tracker_callbacks(plan.trackers, plan.name, plan.study_dir,
                                      list(arm_columns(plan.search_space, plan.axes, plan.arms, plan.seeds).values())),
                   TrialsDone(list(columns.values()))],
        progress_reporter=progress_table(columns, packed),
        verbose=plan.verbose,
    )


# --- the study ----------------------------------------------------------------------------------


def run_study(plan: RunPlan, configs: list[TrialConfig]) -> StudyResult:
    """Run the validated ``configs`` of ``plan`` (for a search, ``[plan.base]``) and write the tables."""
    check_teacher_store(plan, configs)
    if plan.resume:
        for folder, _ in plan.experiments:  # Ray Tune's saved states must be whole, before any compute
            check_saved_state(experiment_dir(plan, folder))
    expected = plan.num_samples if plan.search_space is not None else len(configs)
    try:
        _run_on_ray(plan, configs, expected)
    except (ConfigError, DataError, TeacherStoreError, RayUnavailable):
        raise
    except Exception as exc:
        # A storage that filled up, turned read-only or went away: one line, not Ray's traceback.
        problem = storage_error(exc, plan.study_dir)
        if problem is None:
            raise
        raise problem from None
    return _study_result(plan, expected)


def _study_result(plan: RunPlan, expected: int) -> StudyResult:
    """The tables as the run left them, and a line saying so: a PARTIAL study's says how to finish it."""
    completeness = tables.read_completeness(plan.study_dir)
    finished = completeness.finished if completeness else 0
    trials_path, epochs_path = f"{plan.study_dir}/{tables.TRIALS_FILE}", f"{plan.study_dir}/{tables.EPOCHS_FILE}"
    if completeness is None:
        trials, epochs = pd.DataFrame(), pd.DataFrame()
    else:
        trials, epochs = tables.read_table(trials_path).to_pandas(), tables.read_table(epochs_path).to_pandas()
    if finished < expected:
        log(f"study {plan.name} is PARTIAL: {finished} of {expected} trials finished"
            + (f", their rows in {trials_path} and {epochs_path}" if finished else "")
            + ". Rerun the same command with --resume to finish it.")
        return StudyResult(plan.study_dir, trials, epochs, True, finished, expected)
    log(f"wrote {trials_path} ({len(trials)} trials) and {epochs_path} ({len(epochs)} rows)")
    return StudyResult(plan.study_dir, trials, epochs, False, finished, expected)


class RayUnavailable(RuntimeError):
    """The study's Ray could not be started or reached: one line for the user, exit code EXIT_RAY."""


def _run_on_ray(plan: RunPlan, configs: list[TrialConfig], expected: int) -> None:
    """The study on a Ray this starts (and stops), unless one runs in this process already."""
    started_ray = not ray.is_initialized()
    with contextlib.ExitStack() as stack:
        if started_ray:
            _start_ray(plan, stack)
            stack.enter_context(head_watch(plan))
        # After ray.init: Ray's core worker sets a SIGTERM handler of its own that ends the process.
        stack.enter_context(signals_as_interrupt())
        _teachers_trials_tables(plan, configs, expected)


def _start_ray(plan: RunPlan, stack: contextlib.ExitStack) -> None:
    """Start (or join, with ``--address``) the study's Ray, to be shut down when ``stack`` closes. A Ray of
    our own on this machine is closed to others; a cluster keeps its own settings."""
    where = f"the Ray cluster at {plan.address}" if plan.address else "a local Ray"
    try:
        if plan.address is None:
            stack.enter_context(local_ray_settings())
        ray.init(address=plan.address or "local", include_dashboard=False, log_to_driver=True)
    except Exception as exc:  # Ray raises plain Exceptions here (its raylet's 30 s start-up wait, say)
        detail = " ".join(str(exc).split())[:300]
        raise RayUnavailable(
            f"{where} did not start or could not be reached ({type(exc).__name__}: {detail}); nothing of the "
            f"study ran. Check the machine's load and `ray status`, then {rerun_hint(plan.study_dir)}"
        ) from None
    stack.callback(ray.shutdown)


# Ray's core worker ends a driver whose GCS has not answered for 60 s (gcs_rpc_server_reconnect_timeout_s)
# with a log line of its own; the study ends first, with a line that says how to go on.
GCS_SILENCE_LIMIT_S = 30.0
GCS_PROBE_EVERY_S = 2.0


@contextlib.contextmanager
def head_watch(plan: RunPlan) -> Iterator[None]:
    """While the body runs, a thread opens a TCP connection to the GCS every GCS_PROBE_EVERY_S seconds.
    When none has succeeded for GCS_SILENCE_LIMIT_S, the head is lost: the driver prints one line and
    ends with EXIT_RAY at once. Its saved Ray Tune state and the tables are as after a killed driver, so
    ``--resume`` goes on from them."""
    host, port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
    stop = threading.Event()

    def watch() -> None:
        silent_since = None
        while not stop.wait(GCS_PROBE_EVERY_S):
            try:
                socket.create_connection((host, int(port)), timeout=GCS_PROBE_EVERY_S).close()
                silent_since = None
            except OSError:
                silent_since = silent_since or time.monotonic()
            if silent_since and time.monotonic() - silent_since >= GCS_SILENCE_LIMIT_S and not stop.is_set():
                print(f"{plan.name}: error: lost Ray's head: its GCS at {host}:{port} has not answered for "
                      f"{GCS_SILENCE_LIMIT_S:.0f} s (killed, or its node lost); the study stopped, finished trials "
                      f"are in {plan.study_dir}. Restart Ray (or the cluster), then {rerun_hint(plan.study_dir)}",
                      file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(EXIT_RAY)  # Ray's own calls would hang on the lost GCS, then end the process

    thread = threading.Thread(target=watch, name="kd_ray-head-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def _teachers_trials_tables(plan: RunPlan, configs: list[TrialConfig], expected: int) -> None:
    _check_cluster(plan)
    log(f"study {plan.name}: {expected} trials, {plan.cpus_per_trial:g} CPU / {plan.gpus_per_trial:g} GPU "
        f"each, storage {plan.study_dir}")
    prepare_teachers(plan, configs)
    # The study directory begins here: a study refused before (bad data, say) leaves none. A growth of the
    # study's seeds is recorded here too, before it runs: a crash mid-growth leaves a study whose stored spec
    # holds every seed and whose tables are partial, which --resume finishes, the growth's own experiment
    # resumed in its folder.
    write_spec(plan.study_dir, plan.spec)
    # Trials that a killed driver left as parts go into the tables before the study goes on.
    tables.compact_trial_parts(plan.study_dir, expected)
    for index, experiment in enumerate(plan.experiments):
        # The experiments run one after another, each only once every trial before it is in the tables:
        # after an interrupt (Tuner.fit() returns normally) the study stops partial, as it would alone.
        seeds_before = {seed for _, seeds in plan.experiments[:index] for seed in seeds}
        if seeds_before and _rows_of_seeds(plan.study_dir, seeds_before) < len(_trials_of(plan, configs, seeds_before)):
            return
        _run_experiment(plan, experiment, configs, expected)


def _trials_of(plan: RunPlan, configs: list[TrialConfig], seeds: set[int]) -> list[TrialConfig]:
    """The configs of a grid study's ``seeds`` (a search's are its base)."""
    return configs if plan.search_space is not None else [cfg for cfg in configs if cfg.seed in seeds]


def _rows_of_seeds(study_dir: str, seeds: set[int]) -> int:
    """How many rows the trials table holds of ``seeds`` (none without a table)."""
    path = f"{study_dir}/{tables.TRIALS_FILE}"
    fs, resolved = filesystem(path)
    if fs.get_file_info(resolved).type != pafs.FileType.File:
        return 0
    return sum(seed in seeds for seed in tables.read_table(path).column("seed").to_pylist())


def _run_experiment(plan: RunPlan, experiment: Experiment, configs: list[TrialConfig], expected: int) -> None:
    """One Ray Tune experiment of the study, its trials into the study's tables (``expected`` of them in all)."""
    folder, seeds = experiment
    tuner_started = time.perf_counter()
    # Tuner.fit() returns normally after an interrupt too; the tables then hold the trials that
    # finished, and the ResultGrid it returns counts the interrupted ones as terminated.
    mine = _trials_of(plan, configs, set(seeds))
    _build_tuner(plan, experiment, mine, LiveTables(plan.name, plan.study_dir, expected)).fit()
    log(f"Ray Tune finished in {time.perf_counter() - tuner_started:.1f} s")
    record_finished_trials(plan.name, plan.study_dir, expected, experiment_dir(plan, folder))
    tables.compact_trial_parts(plan.study_dir, expected)
