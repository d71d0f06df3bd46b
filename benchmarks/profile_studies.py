"""Where a local study's time goes: teacher training, student steps, evaluation and table writes.

For each study of the reproduction at its local preset, one replicate (``--seed``, 0 by default), in this
process on one thread (a trial's allotment of one CPU), with a fresh teacher store:

1. **teachers**: the members the study needs, trained as ``prepare_teachers`` trains them (fused groups of
   ``kd_ray.packs.members``, the others one by one);
2. **students**: the packs a study plans on one slot (``kd_ray.packs.plan`` with packs across streams)
   through ``run_pack``, or one ``run_trial`` per config where no two share a pack; the time inside the
   evaluations (every ``measure`` and reference ``train_agreement`` of a pack or a trial, counted by
   wrapping them in this process) is **evaluation**, the rest **steps** (data, teacher labels, the
   students' steps);
3. **tables**: the rows written as a study writes them (a trial part per student, then the compaction).

What Ray adds (a process per trial, its imports, scheduling, checkpoints) is not in this process: the
reproduction's own run measures it (``studies/reproduce.py``; docs/performance.md). The last line is
machine-readable: ``largest: <study> <part> <share>``.

    python benchmarks/profile_studies.py                 # every study of the reproduction: ~15 min on one core
    python benchmarks/profile_studies.py --studies temperature_sweep augmentation_ablation
    python benchmarks/profile_studies.py --tiny          # 2 epochs, two studies: CI checks it runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from typing import Any, Callable

import torch

from kd_ray.config import TrialConfig
from kd_ray.packs.members import ensure_members_fused
from kd_ray.packs.plan import plan_packs
from kd_ray.packs.run import PackMeasures, run_pack
from kd_ray.packs.streams import across_shape
from kd_ray.provenance import versions
from kd_ray.study.presets import REPRODUCTION
from kd_ray.tables import compact_trial_parts, write_trial_part
from kd_ray.train.setup import TrialData
from kd_ray.train.teachers import TeacherStore, needed_members
from kd_ray.train.trial import StudentEvaluations, run_trial
from packing import local_grid  # this folder's: the local grid of a study, as the benchmarks build it

PARTS = ("teachers", "steps", "evaluation", "tables")


@contextlib.contextmanager
def evaluation_clock(seconds: list[float]):
    """Adds the time spent in every evaluation (a pack's or a trial's) to ``seconds[0]`` while open."""
    wrapped: list[tuple[type, str, Callable]] = []

    def timed(method: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                seconds[0] += time.perf_counter() - started
        return run

    for owner in (PackMeasures, StudentEvaluations):
        for name in ("measure", "train_agreement"):
            wrapped.append((owner, name, getattr(owner, name)))
            setattr(owner, name, timed(getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, method in wrapped:
            setattr(owner, name, method)


def profile(name: str, configs: list[TrialConfig], root: str) -> dict[str, float]:
    """Seconds of each part of ``PARTS`` for the study's ``configs``, in this process."""
    device = torch.device("cpu")
    store = TeacherStore(f"{root}/{name}/teachers")
    started = time.perf_counter()
    members = list(needed_members(configs).values())
    arrays = TrialData(configs[0], device, None).arrays
    for dataset in sorted({m.cfg.dataset for m in members}):
        mine = [(m.cfg, m.member, m.role) for m in members if m.cfg.dataset == dataset]
        ensure_members_fused(mine, store, arrays if dataset == configs[0].dataset
                             else TrialData(mine[0][0], device, None).arrays, device)
    teachers = time.perf_counter() - started

    evaluation = [0.0]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with evaluation_clock(evaluation):
        packs = plan_packs(configs, across=across_shape)
        for pack in packs:
            chosen = [configs[i] for i in pack.trial_indices]
            if all(p.size == 1 for p in packs):  # a study runs such a grid a trial per config
                rows += [run_trial(cfg, store=store) for cfg in chosen]
            else:
                rows += run_pack(chosen, store=store, pack_id=f"pack{len(rows):04d}")
    students = time.perf_counter() - started

    started = time.perf_counter()
    study_dir = f"{root}/{name}/study"
    for number, row in enumerate(rows):
        config = json.loads(row["config_json"])
        write_trial_part(study_dir, {**config, **row, "trial_id": f"t{number}"}, [])
    compact_trial_parts(study_dir, len(rows))
    tables = time.perf_counter() - started
    return {"teachers": teachers, "steps": students - evaluation[0], "evaluation": evaluation[0], "tables": tables}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", nargs="+", choices=REPRODUCTION, default=list(REPRODUCTION))
    parser.add_argument("--seed", type=int, default=0, help="the replicate profiled (default 0)")
    parser.add_argument("--tiny", action="store_true", help="2 epochs (teachers too) of two studies")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = ["temperature_sweep", "augmentation_ablation"] if args.tiny else args.studies
    print(f"versions: {versions()}")
    print(f"{'study':<22} {'trials':>6} " + " ".join(f"{part:>11}" for part in PARTS) + "      total")
    largest = ("", "", 0.0)
    with tempfile.TemporaryDirectory() as root:
        for name in names:
            configs = local_grid(name, [args.seed], *((2, 2) if args.tiny else (None, None)))
            seconds = profile(name, configs, root)
            total = sum(seconds.values())
            print(f"{name:<22} {len(configs):>6} " + " ".join(f"{seconds[part]:>10.1f}s" for part in PARTS)
                  + f" {total:>9.1f}s", flush=True)
            part = max(PARTS, key=seconds.get)
            if seconds[part] > largest[2]:
                largest = (name, part, seconds[part] / total)
    print(f"largest: {largest[0]} {largest[1]} {largest[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
