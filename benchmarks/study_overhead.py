"""Study overhead: a local preset's study against the ideal schedule, packed and unpacked, in one run.

Ideal wall time = the sum of the trials' own training time (``train_time_s``, measured inside each
trial; a pack's time split among its students) divided by the number of Ray Tune trials running at
once. Overhead = wall / ideal - 1: Ray Tune's scheduling, actor start-up, reporting, checkpointing
and the table writes. Ray is started and the teacher trained before the clock starts, so the number
is the per-study cost a user pays on top of training. The study is the temperature sweep at its local
preset (24 students: 3 ensemble sizes x 4 temperatures x 2 seeds; mnist1d MLPs, 60 epochs). It runs
``--repeats`` times with ``--pack auto`` (the default: 2 packs of 12 students) and ``--pack off`` (24
trials), interleaved (auto, off, off, auto, ...); each prints its median and spread. The last line is
``overhead: <median fraction with packs>``.

    python benchmarks/study_overhead.py            # about 10 minutes on a 2-core CPU
    python benchmarks/study_overhead.py --tiny     # 4 students of 2 epochs: CI checks it runs end to end
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import ray

from kd_ray.config import TrialConfig
from kd_ray.provenance import versions
from kd_ray.study import Study
from kd_ray.study.guards import local_ray_settings
from kd_ray.study.presets import STUDIES
from kd_ray.study.runner import prepare_teachers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="4 trials of 2 epochs, to check the benchmark runs")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs per trial (default: the preset's)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each pack mode, interleaved (default 3)")
    args = parser.parse_args(argv)
    preset = STUDIES["temperature_sweep"].presets["local"]
    if args.tiny:
        base = TrialConfig(teacher_members=1, teacher_epochs=2, epochs=args.epochs or 2, eval_every=2)
        axes: dict = {"temperature": [1.0, 4.0]}
    else:
        base = TrialConfig.from_dict({**preset.base, **({"epochs": args.epochs} if args.epochs else {})})
        axes = dict(preset.axes)
    epochs = base.epochs
    overheads: dict[str, list[float]] = {"auto": [], "off": []}
    walls: dict[str, list[float]] = {"auto": [], "off": []}
    repeats = 1 if args.tiny else args.repeats
    with tempfile.TemporaryDirectory() as storage:
        # As a study's own Ray: on the loopback only, with a token made for the run.
        with local_ray_settings():
            ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
            try:
                for repeat in range(repeats):
                    for pack in ("auto", "off") if repeat % 2 == 0 else ("off", "auto"):
                        study = Study(f"overhead_{pack}_{repeat}", base=base, axes=axes, seeds=[0, 1],
                                      storage=storage, cpus_per_trial=1, verbose=0, pack=pack)
                        configs = study.validate()
                        prepare_teachers(study.plan(), configs)
                        started = time.perf_counter()
                        result = study.run()
                        wall = time.perf_counter() - started
                        trials = result.trials["pack_id"].nunique()
                        concurrency = min(args.cpus, trials)
                        ideal = float(result.trials["train_time_s"].sum()) / concurrency
                        overheads[pack].append(wall / ideal - 1)
                        walls[pack].append(wall)
                        print(f"pack {pack}: {len(configs)} students in {trials} Ray Tune trials of {epochs} "
                              f"epochs, {concurrency} at once: wall {wall:.1f} s, ideal {ideal:.1f} s, "
                              f"overhead {wall / ideal - 1:.3f}")
            finally:
                ray.shutdown()
    print(f"versions: {versions()}")
    for pack, values in overheads.items():
        print(f"pack {pack}: overhead median {statistics.median(values):.3f} (min {min(values):.3f}, max "
              f"{max(values):.3f}); wall median {statistics.median(walls[pack]):.1f} s, {len(values)} runs")
    print(f"overhead: {statistics.median(overheads['auto']):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
