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
from kd_ray.packs.run import PackTeacher, Student, WidePack, build_students, run_pack, sub_ensemble, train_wide_pack
from kd_ray.provenance import versions
from kd_ray.study.presets import STUDIES
from kd_ray.train.setup import TrialData, student_recipe
from kd_ray.train.teachers import TeacherStore, ensure_members, load_ensemble
from kd_ray.train.trial import run_trial

MATMUL = 1024  # the side of the square fp32 matmul whose rate is the peak


def sweep_configs(epochs: int | None, teacher_epochs: int | None = None) -> list[TrialConfig]:
    preset = STUDIES["temperature_sweep"].presets["local"]
    configs = []
    for members in preset.axes["teacher_members"]:
        for temperature in preset.axes["temperature"]:
            values = {**preset.base, "teacher_members": members, "temperature": temperature, "seed": 0,
                      "device": "cpu"}
            if epochs is not None:
                values["epochs"] = epochs
            if teacher_epochs is not None:
                values["teacher_epochs"] = teacher_epochs
            configs.append(TrialConfig.from_dict(values))
    return configs


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


def step_rate(configs: list[TrialConfig], store: TeacherStore) -> tuple[float, float]:
    """(useful FLOP/s, seconds per step) of the pack's training step, over one epoch without evaluation."""
    base = configs[0]
    data = TrialData(base, torch.device("cpu"), None)
    largest = base.replace(teacher_members=max(c.teacher_members for c in configs))
    full = load_ensemble(largest, store, torch.device("cpu"))
    ensembles = [sub_ensemble(full, cfg) for cfg in configs]
    students = [Student(cfg.replace(epochs=1), _one_epoch(cfg, data)) for cfg in configs]
    models = build_students(configs, ensembles, data, torch.device("cpu"), "student")
    pack = WidePack(students, models, list(range(len(configs))),
                    PackTeacher(full, [c.teacher_members for c in configs]), torch.device("cpu"), base.seed, "student")
    started = time.perf_counter()
    train_wide_pack(pack, data)
    seconds = time.perf_counter() - started
    steps = students[0].plan.total_steps
    info = DATASET_INFO[base.dataset]
    teacher = forward_flops(build_model(base.teacher_arch, info.input_shape, info.num_classes, base.norm),
                            info.input_shape, base.batch_size) * largest.teacher_members
    student = forward_flops(build_model(base.student_arch, info.input_shape, info.num_classes, base.norm),
                            info.input_shape, base.batch_size)
    useful = steps * (teacher + 3 * student * len(configs))
    return useful / seconds, seconds / steps


def _one_epoch(cfg: TrialConfig, data: TrialData):
    from kd_ray.train.distill import schedule

    return schedule(student_recipe(cfg.replace(epochs=1)), data.x.shape[0])


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

    return interleaved({"alone": alone, "pack": lambda _repeat: run_pack(configs, store=store)}, repeats)


def timed_studies(configs: list[TrialConfig], store: TeacherStore, root: str, repeats: int) -> dict:
    import ray

    from kd_ray.study import Study
    from kd_ray.study.guards import local_ray_settings

    axes = {"teacher_members": sorted({c.teacher_members for c in configs}),
            "temperature": sorted({c.temperature for c in configs})}
    base = configs[0].replace(teacher_members=1, temperature=1.0)

    def study(pack: str):
        def run(repeat: int) -> None:
            result = Study(f"{pack}_{repeat}", base=base, axes=axes, seeds=[0], storage=root, cpus_per_trial=1,
                           max_concurrent_trials=1, verbose=0, pack=pack).run()
            assert not result.partial and len(result.trials) == len(configs)
        return run

    with local_ray_settings():
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        try:
            return interleaved({"alone": study("off"), "pack": study("auto")}, repeats)
        finally:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="2 epochs (teachers too) and 1 repeat, to check the benchmark runs")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default: the preset's 60)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (default 3, tiny 1)")
    parser.add_argument("--no-ray", action="store_true", help="students in this process, without Ray Tune trials")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    configs = sweep_configs(2, teacher_epochs=2) if args.tiny else sweep_configs(args.epochs)
    repeats = 1 if args.tiny else args.repeats
    with tempfile.TemporaryDirectory() as root:
        store = TeacherStore(f"{root}/teachers")
        largest = max(configs, key=lambda c: c.teacher_members)
        ensure_members(largest, store, TrialData(largest, torch.device("cpu"), None).arrays, torch.device("cpu"))
        times = (timed_in_process if args.no_ray else timed_studies)(configs, store, root, repeats)
        peak = matmul_peak()
        rate, per_step = step_rate(configs, store)
    print(f"versions: {versions()}")
    print(f"{len(configs)} students of {configs[0].epochs} epochs (temperature_sweep, local preset, seed 0), "
          f"1 thread, {repeats} interleaved repeats, "
          f"{'in this process' if args.no_ray else 'Ray Tune studies on one CPU'}")
    for what, values in times.items():
        print(f"{what}: median {statistics.median(values):.1f} s (min {min(values):.1f}, max {max(values):.1f})")
    print(f"fused step: {per_step * 1e3:.2f} ms, {rate / 1e9:.1f} GFLOP/s useful; fp32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"speedup: {statistics.median(times['alone']) / statistics.median(times['pack']):.2f}")
    print(f"fraction_of_peak: {rate / peak:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
