"""Packs on Ray Tune: which packs a grid study runs (``choose_packs``) and the trainable's pack path.

A pack (``kd_ray.packs.run``, grouped by ``kd_ray.packs.plan``) is one Ray Tune trial whose parameter is
``{"pack_id", "size", "students": [config, ...]}``; each report holds every evaluated student's
metrics under ``students/<index>`` (``live_tables.student_rows`` turns them into one row per
student), and the pack's mean test agreement and accuracy for the progress table.

``--pack auto`` (the default) packs a grid study run by the FIFO scheduler, and an Optuna search
whose every dimension is a student field (``kd_ray.study.search``: a pack asks for several points at
once). ASHA stops students one by one, so a study under it runs unpacked (logged); so does a search
over a dimension that decides the teacher, data or batch stream.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from ray import tune

from kd_ray.config import TrialConfig
from kd_ray.progress import log
from kd_ray.study.console import CONSOLE_METRICS
from kd_ray.study.plan import STUDENTS_KEY

PACKS_FILE = "packs.json"  # which students each pack of a packed study trains, in <storage>/<name>/

Report = Callable[[dict[str, Any], dict[str, Any] | None], None]  # (metrics, checkpoint) to Ray Tune


def pack_dirname(trial) -> str:
    """A pack's trial directory: its parameter (every student's config) is too long for a name."""
    return f"pack_{trial.trial_id}"


def choose_packs(mode: str, search: bool, scheduler: str, slots: int, gpus_per_trial: float, study_dir: str,
                 configs: list[TrialConfig]) -> list[dict[str, Any]] | None:
    """The packs of a study as Ray Tune parameters, or None to run one trial per config; logged, and
    listed in packs.json beside the tables. No pack is smaller than needed to keep ``slots`` busy."""
    from kd_ray.atomic import is_uri, write_text
    from kd_ray.packs.memory import max_pack_size, memory_budget
    from kd_ray.packs.plan import describe_packs, plan_packs

    if mode == "off" or search:
        return None
    if scheduler == "asha":
        log("packs: off under ASHA, which stops students one by one (use --scheduler fifo to pack)")
        return None
    limit = min(max_pack_size(cfg, memory_budget(gpus_per_trial, slots))
                for cfg in {cfg.student_arch: cfg for cfg in configs}.values())
    packs = plan_packs(configs, max_size=limit, min_packs=slots)
    if all(pack.size == 1 for pack in packs):
        log("packs: none: no two trials share a teacher, distillation data and batch stream")
        return None
    space = [{"pack_id": pack.pack_id, "size": pack.size,
              STUDENTS_KEY: [configs[i].to_dict() for i in pack.trial_indices]} for pack in packs]
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
    size = min(max_pack_size(base, memory_budget(gpus_per_trial, slots)), -(-num_samples // slots))
    if size > 1:
        log(f"packs: {num_samples} points in packs of up to {size}, each pack asking Optuna for its points at once")
    return max(1, size)


def console_means(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The pack's mean of each console metric over its students, for Ray Tune's progress table."""
    means = {}
    for metric in CONSOLE_METRICS:
        values = [r[metric] for r in rows if isinstance(r.get(metric), (int, float)) and r[metric] == r[metric]]
        if values:
            means[metric] = sum(values) / len(values)
    return means


def train_pack(pack: dict[str, Any], report_to_tune: Report, resume: dict | None, store_uri: str,
               data_dir: str | None, where: dict[str, Any]) -> None:
    """The trainable's body for a pack: its students, each reported under students/<index>; a pack
    of one runs as ``run_trial`` runs it alone."""
    from kd_ray.train.trial import run_trial

    configs = [TrialConfig.from_dict(c) for c in pack[STUDENTS_KEY]]
    pack_id = tune.get_context().get_trial_id()
    if len(configs) == 1:
        def one(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
            report_to_tune({"epoch": metrics["epoch"], STUDENTS_KEY: {"0": metrics}, **console_means([metrics])}, state)

        result = run_trial(configs[0], one, resume, store=store_uri, data_dir=data_dir)
        result.update(pack_id=pack_id, pack_size=1, pack_time_share=1.0)
        results = [result]
    else:
        from kd_ray.packs.run import run_pack

        def evaluated(epoch: int, by_student: dict[int, dict[str, Any]], state: dict[str, Any]) -> None:
            students = {str(index): metrics for index, metrics in by_student.items()}
            report_to_tune({"epoch": epoch, STUDENTS_KEY: students, **console_means(list(by_student.values()))}, state)

        results = run_pack(configs, evaluated, resume, pack_id=pack_id, store=store_uri, data_dir=data_dir)
    # The last report carries every student's final status and provenance for the trials table.
    tune.report({"final": True, "epoch": max(r["epochs_completed"] for r in results),
                 STUDENTS_KEY: {str(i): r for i, r in enumerate(results)}, **console_means(results), **where})
