"""Packs on Ray Tune: which packs a grid study runs (``choose_packs``) and the trainable's pack path.

A pack (``kd_ray.packs.run``, grouped by ``kd_ray.packs.plan``) is one Ray Tune trial whose parameter is
``{"pack_id", "size", "labels", "students": [config, ...]}`` (``kd_ray.study.plan.PACK_KEY``); its
``pack_id`` (pack0000, ...: its name in packs.json) names its trial directory and is its students'
``pack_id`` in the tables. Each report holds every evaluated student's metrics under ``students/<index>``
(``live_tables.student_rows`` turns them into one row per student), the final one each student's labels
too (the fields that tell the study's trials apart, and its ``trial_id`` in trials.parquet); the pack's mean
test agreement and accuracy, for the progress table, are under ``pack_mean/``, never under a metric's own
name, so that nothing ranks packs by a mean over students of different configurations.

``--pack auto`` (the default) packs a grid study run by the FIFO scheduler (plain-MLP students across
streams, ``kd_ray.packs.streams.across_shape``; other students by stream), and an Optuna search
whose every dimension is a student field (``kd_ray.study.search``: a pack asks for several points at
once). ASHA stops students one by one, so a study under it runs unpacked (logged); so does a search
over a dimension that decides the teacher, data or batch stream.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from ray import tune

from kd_ray.config import TrialConfig
from kd_ray.progress import log
from kd_ray.study.console import CONSOLE_METRICS
from kd_ray.study.plan import (
    ENDED_AT,
    LABELS_KEY,
    OPTUNA_NUMBER_KEY,
    OPTUNA_NUMBERS_KEY,
    PACK_KEY,
    PACK_MEAN_KEY,
    STARTED_AT,
    STUDENTS_KEY,
)
from kd_ray.tables import packed_trial_id

PACKS_FILE = "packs.json"  # which students each pack of a packed study trains, in <storage>/<name>/

Report = Callable[[dict[str, Any], dict[str, Any] | None], None]  # (metrics, checkpoint) to Ray Tune


def pack_dirname(trial) -> str:
    """A pack's trial directory: its ``pack_id`` (its parameter, every student's config, is too long for a name)."""
    return str(trial.config[PACK_KEY]["pack_id"])


def pack_name(number: int, folder: str = "") -> str:
    """The ``pack_id`` of a study's pack ``number``: pack0000, ...; in a growth's experiment, its folder after
    (pack0000-grown-1), so that no two packs of a study share one."""
    return f"pack{number:04d}-{folder}" if folder else f"pack{number:04d}"


def choose_packs(mode: str, search: bool, scheduler: str, slots: int, gpus_per_trial: float, study_dir: str,
                 configs: list[TrialConfig], folder: str = "", labels: list[str] | tuple[str, ...] = ("seed",),
                 ) -> list[dict[str, Any]] | None:
    """The packs of a study's experiment (its ``folder``, "" for the first) as Ray Tune parameters, or None to
    run one trial per config; logged, and listed in packs.json in ``study_dir``. ``labels``: the fields that
    tell the study's trials apart, reported with each student. No pack is smaller than needed to keep ``slots``
    busy."""
    from kd_ray.atomic import is_uri, write_text
    from kd_ray.packs.memory import max_pack_size, memory_budget
    from kd_ray.packs.plan import describe_packs, plan_packs
    from kd_ray.packs.streams import across_shape

    if mode == "off" or search:
        return None
    if scheduler == "asha":
        log("packs: off under ASHA, which stops students one by one (use --scheduler fifo to pack)")
        return None
    limit = min(max_pack_size(cfg, memory_budget(gpus_per_trial, slots))
                for cfg in {cfg.student_arch: cfg for cfg in configs}.values())
    packs = plan_packs(configs, max_size=limit, min_packs=slots, across=across_shape)
    if all(pack.size == 1 for pack in packs):
        log("packs: none: no two trials share a student network and a step shape")
        return None
    space = [{"pack_id": pack_name(number, folder), "size": pack.size, LABELS_KEY: list(labels),
              STUDENTS_KEY: [configs[i].to_dict() for i in pack.trial_indices]} for number, pack in enumerate(packs)]
    if not is_uri(study_dir):
        os.makedirs(study_dir, exist_ok=True)
        write_text(os.path.join(study_dir, PACKS_FILE), json.dumps(space, indent=1, sort_keys=True))
    log(f"packs: {describe_packs(packs)}, at most {limit} students each; listed in {study_dir}/{PACKS_FILE}")
    return space


def search_pack_size(mode: str, scheduler: str, space: list[str], base: TrialConfig, num_samples: int, slots: int,
                     gpus_per_trial: float) -> int:
    """How many Optuna points each trial of a search asks for (1: a point per trial, unpacked)."""
    from kd_ray.packs.memory import max_pack_size, memory_budget
    from kd_ray.packs.plan import STUDENT_FIELDS, share_key
    from kd_ray.packs.wide import unwidened_students

    if mode == "off":
        return 1
    if scheduler == "asha":
        log("packs: off under ASHA, which stops students one by one (use --scheduler fifo to pack)")
        return 1
    shared = [name for name in space if name not in STUDENT_FIELDS]
    if shared or share_key(base) is None:
        log(f"packs: off for this search: {', '.join(shared) or 'compile'} decides the teacher, data or batch "
            "stream, so each trial is one point")
        return 1
    for reason in unwidened_students([base]).values():
        log(f"packs: off for this search: student_arch={base.student_arch!r}: {reason}")
        return 1
    size = min(max_pack_size(base, memory_budget(gpus_per_trial, slots)), -(-num_samples // slots))
    if size > 1:
        log(f"packs: {num_samples} points in packs of up to {size}, each pack asking Optuna for its points at once")
    return max(1, size)


def pack_means(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The pack's mean of each console metric over its students, for Ray Tune's progress table, under
    ``pack_mean``: a mean over students of different configurations ranks nothing."""
    means = {}
    for metric in CONSOLE_METRICS:
        values = [r[metric] for r in rows if isinstance(r.get(metric), (int, float)) and r[metric] == r[metric]]
        if values:
            means[metric] = sum(values) / len(values)
    return {PACK_MEAN_KEY: means}


def student_labels(pack: dict[str, Any], index: int, ray_trial_id: str) -> dict[str, Any]:
    """What says which configuration student ``index`` of ``pack`` is: its values of the pack's label fields,
    its ``trial_id`` in trials.parquet and, in a search, the number of its Optuna trial."""
    config = pack[STUDENTS_KEY][index]
    labels = {name: config[name] for name in pack.get(LABELS_KEY, ()) if name in config}
    labels["trial_id"] = packed_trial_id(ray_trial_id, index)
    if OPTUNA_NUMBERS_KEY in pack:
        labels[OPTUNA_NUMBER_KEY] = pack[OPTUNA_NUMBERS_KEY][index]
    return labels


def train_pack(pack: dict[str, Any], report_to_tune: Report, resume: dict | None, store_uri: str | None,
               data_dir: str | None, where: dict[str, Any], predictions_dir: str | None = None) -> None:
    """The trainable's body for a pack: its students, each reported under students/<index>; a pack
    of one runs as ``run_trial`` runs it alone. ``where``: what every report carries (process, node, start);
    ``predictions_dir``: where students with ``save_predictions`` write theirs."""
    from kd_ray.train.trial import run_trial

    configs = [TrialConfig.from_dict(c) for c in pack[STUDENTS_KEY]]
    pack_id = str(pack["pack_id"])
    ray_trial_id = tune.get_context().get_trial_id()
    trial_ids = [packed_trial_id(ray_trial_id, index) for index in range(len(configs))]  # the rows' ids
    if len(configs) == 1:
        def one(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
            report_to_tune({"epoch": metrics["epoch"], STUDENTS_KEY: {"0": metrics}, **pack_means([metrics])}, state)

        result = run_trial(configs[0], one, resume, store=store_uri, data_dir=data_dir,
                           predictions_dir=predictions_dir, trial_id=trial_ids[0])
        result.update(pack_id=pack_id, pack_size=1, pack_time_share=1.0)
        results = [result]
    else:
        from kd_ray.packs.run import run_pack

        def evaluated(epoch: int, by_student: dict[int, dict[str, Any]], state: dict[str, Any]) -> None:
            students = {str(index): metrics for index, metrics in by_student.items()}
            report_to_tune({"epoch": epoch, STUDENTS_KEY: students, **pack_means(list(by_student.values()))}, state)

        results = run_pack(configs, evaluated, resume, pack_id=pack_id, store=store_uri, data_dir=data_dir,
                           predictions_dir=predictions_dir, trial_ids=trial_ids)
    # The last report carries every student's final status, provenance, labels and times for the trials table.
    ended_at = time.time()
    students = {str(i): {**r, **student_labels(pack, i, ray_trial_id), STARTED_AT: where[STARTED_AT],
                         ENDED_AT: ended_at} for i, r in enumerate(results)}
    tune.report({"final": True, "epoch": max(r["epochs_completed"] for r in results), STUDENTS_KEY: students,
                 **pack_means(results), **where, ENDED_AT: ended_at})
