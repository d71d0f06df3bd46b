"""Packing: the temperature-sweep grid of one replicate as one pack against the same students one
trial each, in one run.

The grid is the local preset's (mnist1d MLPs, teacher ensembles of 1, 3 and 5 members, temperatures
1, 4, 8 and 16: 12 students). By default both are real studies on a local Ray of one CPU: "alone"
with ``--pack off`` (twelve Ray Tune trials, one after another, actors reused), "pack" with
``--pack auto`` (one Ray Tune trial of twelve students); the wall time of ``Study.run()`` is timed,
teachers already in the store. ``--no-ray`` times ``kd_ray.train.trial.run_trial`` for each student
in turn against ``kd_ray.packs.run.run_pack`` on all twelve, in this process: the same comparison
without Ray's cost per trial. Both use one thread (a trial's allotment of one CPU). The two are
interleaved (alone, pack, pack, alone, ...) and each is timed ``--repeats`` times; the median and
the spread (min to max) are printed.

``fraction_of_peak`` is the useful FLOP/s of the pack's training step (the teacher's forward
counted once, each student's forward and backward as three forwards) over the fp32 matmul peak
measured in the same run, on the same thread.

    python benchmarks/packing.py            # the preset's 60 epochs: about 12 minutes on one core
    python benchmarks/packing.py --no-ray   # the same students without Ray, in this process
    python benchmarks/packing.py --tiny     # 2 epochs (teachers too), 1 repeat: CI checks it runs end to end
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch
from torch import nn

from kd_ray.config import TrialConfig
from kd_ray.data.datasets import DATASET_INFO
from kd_ray.models.archs import build_model
from kd_ray.packs.plan import plan_packs
from kd_ray.packs.run import (
    Student,
    WidePack,
    build_students,
    load_streams,
    run_pack,
    stream_numbers,
    sub_ensemble,
    train_wide_pack,
)
from kd_ray.packs.streams import PackTeacher, StreamBatches, across_shape
from kd_ray.provenance import versions
from kd_ray.study.presets import STUDIES
from kd_ray.study.spec import Study
from kd_ray.train.distill import schedule
from kd_ray.train.setup import TrialData, student_recipe
from kd_ray.train.teachers import TeacherStore, ensure_members
from kd_ray.train.trial import run_trial

MATMUL = 1024  # the side of the square fp32 matmul whose rate is the peak


def local_grid(name: str, seeds: list[int], epochs: int | None, teacher_epochs: int | None) -> list[TrialConfig]:
    """Study ``name``'s local grid (its preset adapted to its dataset) for ``seeds``, on the CPU."""
    study = STUDIES[name]
    preset = study.adapt(study.presets["local"], None) if study.adapt else study.presets["local"]
    configs = Study(name, base=TrialConfig.from_dict({**preset.base, "device": "cpu"}), axes=preset.axes,
                    arms=preset.arms, seeds=seeds).configs()
    changes = {"epochs": epochs, "teacher_epochs": teacher_epochs}
    return [cfg.replace(**{k: v for k, v in changes.items() if v is not None}) for cfg in configs]


def sweep_configs(epochs: int | None, teacher_epochs: int | None = None) -> list[TrialConfig]:
    """The temperature sweep's 12 students of seed 0."""
    return local_grid("temperature_sweep", [0], epochs, teacher_epochs)


def matmul_peak() -> float:
    """FLOP/s of a square fp32 matmul: the best of a few timed runs."""
    a, b = torch.randn(MATMUL, MATMUL), torch.randn(MATMUL, MATMUL)
    a @ b
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(5):
            a @ b
        best = min(best, (time.perf_counter() - started) / 5)
    return 2 * MATMUL**3 / best


def forward_flops(model: nn.Module, input_shape: tuple[int, ...], batch: int) -> int:
    """Multiply-adds x 2 of the linear and convolution layers of one forward pass on ``batch`` inputs."""
    flops = []

    def count(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            flops.append(2 * output.numel() * module.in_features)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            per_output = module.in_channels // module.groups * int(torch.tensor(module.kernel_size).prod())
            flops.append(2 * output.numel() * per_output)

    layers = (nn.Linear, nn.Conv1d, nn.Conv2d)
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, layers)]
    with torch.no_grad():
        model.eval()(torch.zeros(batch, *input_shape))
    for hook in hooks:
        hook.remove()
    return sum(flops)


def ablation_configs(epochs: int | None, teacher_epochs: int | None = None) -> list[TrialConfig]:
    """The augmentation ablation's local grid: every policy arm mnist1d takes (and the OOD arm) x seeds 0, 1, 2."""
    return local_grid("augmentation_ablation", [0, 1, 2], epochs, teacher_epochs)


def step_rate(configs: list[TrialConfig], store: TeacherStore) -> tuple[float, float]:
    """(useful FLOP/s, seconds per step) of the largest pack's training step (as ``plan_packs`` groups
    ``configs`` across streams), over one epoch without evaluation. Useful: each stream's teacher forward once,
    each student's forward and backward as three forwards."""
    device = torch.device("cpu")
    indices = max(plan_packs(configs, across=across_shape), key=lambda p: p.size).trial_indices
    configs = [configs[i].replace(epochs=1) for i in indices]
    streams = load_streams(configs, device, None, store, None)
    stream_of = stream_numbers(streams)
    ensembles = [sub_ensemble(streams[stream_of[i]].full, cfg) for i, cfg in enumerate(configs)]
    students = [Student(cfg, schedule(student_recipe(cfg), streams[0].data.x.shape[0])) for cfg in configs]
    models = build_students(configs, ensembles, streams[0].data, device, "student")
    batches = [StreamBatches(configs[stream.students[0]], stream.data, "student", device) for stream in streams]
    teacher = PackTeacher([stream.full for stream in streams], [c.teacher_members for c in configs], stream_of)
    pack = WidePack(students, models, list(range(len(configs))), teacher, batches, stream_of)
    started = time.perf_counter()
    train_wide_pack(pack)
    seconds = time.perf_counter() - started
    steps = students[0].plan.total_steps
    base = configs[0]
    info = DATASET_INFO[base.dataset]
    teacher_flops = forward_flops(build_model(base.teacher_arch, info.input_shape, info.num_classes, base.norm),
                                  info.input_shape, base.batch_size)
    student_flops = forward_flops(build_model(base.student_arch, info.input_shape, info.num_classes, base.norm),
                                  info.input_shape, base.batch_size)
    members = sum(stream.largest.teacher_members for stream in streams)
    useful = steps * (teacher_flops * members + 3 * student_flops * len(configs))
    return useful / seconds, seconds / steps


def interleaved(runs: dict[str, Any], repeats: int) -> dict[str, list[float]]:
    """Seconds of each run, ``repeats`` times, in an order that alternates round by round (ABBA...)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            runs[name](repeat)
            times[name].append(time.perf_counter() - started)
    return times


def timed_in_process(configs: list[TrialConfig], store: TeacherStore, root: str, repeats: int) -> dict:
    def alone(_repeat: int) -> None:
        for cfg in configs:
            run_trial(cfg, store=store)

    def packed(_repeat: int) -> None:
        for pack in plan_packs(configs, across=across_shape):  # one slot: packs as large as the grid allows
            run_pack([configs[i] for i in pack.trial_indices], store=store)

    return interleaved({"alone": alone, "pack": packed}, repeats)


def timed_studies(configs: list[TrialConfig], store: TeacherStore, root: str, repeats: int) -> dict:
    """Both as real studies on a local Ray of one CPU: every config one Ray Tune trial, then ``--pack auto``."""
    import ray

    from kd_ray.study.guards import local_ray_settings

    base = configs[0]
    varied = [name for name in sorted(base.to_dict())
              if name != "seed" and len({getattr(c, name) for c in configs}) > 1]
    arms = list({tuple((name, getattr(c, name)) for name in varied): None for c in configs})
    seeds = sorted({c.seed for c in configs})

    def study(pack: str):
        def run(repeat: int) -> None:
            result = Study(f"{pack}_{repeat}", base=base, arms=[dict(arm) for arm in arms], seeds=seeds, storage=root,
                           cpus_per_trial=1, max_concurrent_trials=1, verbose=0, pack=pack).run()
            assert not result.partial and len(result.trials) == len(configs)
        return run

    with local_ray_settings():
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        try:
            return interleaved({"alone": study("off"), "pack": study("auto")}, repeats)
        finally:
            ray.shutdown()


def ensure_teachers(configs: list[TrialConfig], store: TeacherStore) -> None:
    """Every seed's teacher in the store before anything is timed."""
    for seed in sorted({c.seed for c in configs}):
        largest = max((c for c in configs if c.seed == seed), key=lambda c: c.teacher_members)
        ensure_members(largest, store, TrialData(largest, torch.device("cpu"), None).arrays, torch.device("cpu"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="2 epochs (teachers too) and 1 repeat, to check the benchmark runs")
    parser.add_argument("--across", action="store_true",
                        help="the augmentation ablation's grid (every policy x 3 seeds): packs across streams")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (default 3, tiny 1)")
    parser.add_argument("--no-ray", action="store_true", help="students in this process, without Ray Tune trials")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    grid, study = (ablation_configs, "augmentation_ablation") if args.across else (sweep_configs, "temperature_sweep")
    configs = grid(2, teacher_epochs=2) if args.tiny else grid(args.epochs)
    repeats = 1 if args.tiny else args.repeats
    with tempfile.TemporaryDirectory() as root:
        store = TeacherStore(f"{root}/teachers")
        ensure_teachers(configs, store)
        times = (timed_in_process if args.no_ray else timed_studies)(configs, store, root, repeats)
        peak = matmul_peak()
        rate, per_step = step_rate(configs, store)
    print(f"versions: {versions()}")
    seeds = ", ".join(str(seed) for seed in sorted({c.seed for c in configs}))
    print(f"{len(configs)} students of {configs[0].epochs} epochs ({study}, local preset, seeds {seeds}), "
          f"1 thread, {repeats} interleaved repeats, "
          f"{'in this process' if args.no_ray else 'Ray Tune studies on one CPU'}")
    for what, values in times.items():
        print(f"{what}: median {statistics.median(values):.1f} s (min {min(values):.1f}, max {max(values):.1f})")
    print(f"fused step (largest pack): {per_step * 1e3:.2f} ms, {rate / 1e9:.1f} GFLOP/s useful; fp32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s")
    speedup = statistics.median(times["alone"]) / statistics.median(times["pack"])
    print(f"{'speedup_across' if args.across else 'speedup'}: {speedup:.2f}")
    print(f"fraction_of_peak: {rate / peak:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
