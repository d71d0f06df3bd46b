"""Teacher members: every member trained alone against the members trained as fused groups, in one run.

The members are the local preset's teacher (``kd_ray.study.presets.LOCAL_BASE``: mnist1d MLPs, 30 epochs)
for 10 seeds x 5 members, as a local study of 10 seeds needs them. "alone" trains them one after another
with ``kd_ray.train.teachers.train_member``, as one Ray task per member did; "fused" trains them as
``kd_ray.packs.members.member_groups`` groups them (at most 16 to a group), one group after another
with ``train_members_fused``. Both run in this process, one after another, on the same ``--threads``
torch threads (default 1: a teacher task's allotment of one CPU, ``cpus_per_trial=1``): the two arms then
have exactly the same cores, and neither pays Ray's cost per task, so the ratio is that of the training
alone. (Two lone members at a time on two cores would race the fused arm's one thread, or leave a core
idle in it, on a machine whose cores other work shares.) The two are interleaved (alone, fused, fused, alone, ...)
and each is timed ``--repeats`` times; the median and the spread (min to max) are printed.

``fraction_of_peak`` is the useful FLOP/s of the fused training (each member's forward and backward
counted as three forwards per step) over the fp32 matmul peak measured in the same run, on the same threads.

    python benchmarks/teachers.py               # 30 epochs, 3 repeats: about 12 minutes on one core
    python benchmarks/teachers.py --epochs 5    # shorter
    python benchmarks/teachers.py --tiny        # 1 epoch, 2 seeds x 2 members, 1 repeat: CI checks it runs
"""

from __future__ import annotations

import argparse
import statistics

import torch

from kd_ray.config import TrialConfig
from kd_ray.data.datasets import DATASET_INFO, load_arrays
from kd_ray.models.archs import build_model
from kd_ray.packs.members import member_groups, train_members_fused
from kd_ray.provenance import versions
from kd_ray.study.presets import LOCAL_BASE
from kd_ray.train.distill import schedule
from kd_ray.train.teachers import NeededMember, teacher_indices, teacher_recipe, train_member
from packing import forward_flops, interleaved, matmul_peak  # benchmarks/ is this script's own folder

CPU = torch.device("cpu")


def teacher_members(seeds: int, members: int, epochs: int | None) -> list[NeededMember]:
    values = {**LOCAL_BASE, "teacher_members": members, "device": "cpu"}
    if epochs is not None:
        values["teacher_epochs"] = epochs
    base = TrialConfig.from_dict(values)
    return [NeededMember(base.replace(seed=seed), member, "reference") for seed in range(seeds)
            for member in range(members)]


def useful_flops(members: list[NeededMember], y_train) -> float:
    """FLOPs of the members' training steps: forward and backward as three forwards of each member's batch."""
    cfg = members[0].cfg
    info = DATASET_INFO[cfg.dataset]
    plan = schedule(teacher_recipe(cfg), len(teacher_indices(cfg, y_train)))
    model = build_model(cfg.teacher_arch, info.input_shape, info.num_classes, cfg.norm)
    return 3.0 * forward_flops(model, info.input_shape, cfg.teacher_batch_size) * plan.total_steps * len(members)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="1 epoch, 2 seeds x 2 members, 1 repeat")
    parser.add_argument("--epochs", type=int, default=None, help="teacher epochs (default: the preset's 30)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (default 3, tiny 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both arms (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    members = teacher_members(2, 2, 1) if args.tiny else teacher_members(10, 5, args.epochs)
    repeats = 1 if args.tiny else args.repeats
    arrays = load_arrays(members[0].cfg.dataset)
    groups, _ = member_groups(members)

    def alone(_repeat: int) -> None:
        for needed in members:
            train_member(needed.cfg, needed.member, arrays, CPU, needed.role)

    def fused(_repeat: int) -> None:
        for group in groups:
            train_members_fused(group, arrays, CPU)

    train_member(members[0].cfg, members[0].member, arrays, CPU)  # warm-up: allocator, kernels, threads
    times = interleaved({"alone": alone, "fused": fused}, repeats)
    peak = matmul_peak()
    rate = useful_flops(members, arrays.y_train) / statistics.median(times["fused"])
    cfg = members[0].cfg
    print(f"versions: {versions()}")
    print(f"{len(members)} teacher members ({cfg.dataset} {cfg.teacher_arch}, {cfg.teacher_epochs} epochs, "
          f"{len({m.cfg.seed for m in members})} seeds), {args.threads} threads, {repeats} interleaved repeats; "
          f"fused as {len(groups)} groups of {max(len(g) for g in groups)} at most")
    for what, values in times.items():
        print(f"{what}: median {statistics.median(values):.1f} s (min {min(values):.1f}, max {max(values):.1f})")
    print(f"fused training: {rate / 1e9:.1f} GFLOP/s useful; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"speedup_teachers: {statistics.median(times['alone']) / statistics.median(times['fused']):.2f}")
    print(f"fraction_of_peak: {rate / peak:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
