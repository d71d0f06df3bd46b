"""Study overhead: an 8-trial local study against the ideal schedule, in one run.

Ideal wall time = the sum of the trials' own training time (``train_time_s``, measured inside each
trial) divided by the number of trials running at once. Overhead = wall / ideal - 1: Ray Tune's
scheduling, actor start-up, reporting, checkpointing and the table writes. Ray is started and the
teacher trained before the clock starts, so the number is the per-study cost a user pays on top of
training. The last line is ``overhead: <fraction>``.

    python benchmarks/study_overhead.py            # about a minute on a 2-core CPU
    python benchmarks/study_overhead.py --tiny     # seconds: CI checks it runs end to end
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import ray

from kd_ray.config import TrialConfig
from kd_ray.provenance import versions
from kd_ray.study import Study
from kd_ray.study_guards import local_ray_settings
from kd_ray.study_runner import prepare_teachers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="4 trials of 2 epochs, to check the benchmark runs")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs per trial (default 60, tiny 2)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs for the local Ray (default: all)")
    args = parser.parse_args(argv)
    epochs = args.epochs or (2 if args.tiny else 60)
    temperatures = [1.0, 4.0] if args.tiny else [1.0, 2.0, 4.0, 8.0]
    base = TrialConfig(teacher_members=1, teacher_epochs=2 if args.tiny else 20, epochs=epochs, eval_every=epochs)
    with tempfile.TemporaryDirectory() as storage:
        study = Study("overhead", base=base, axes={"temperature": temperatures}, seeds=[0, 1], storage=storage,
                      cpus_per_trial=1, verbose=0)
        configs = study.validate()
        # As a study's own Ray: on the loopback only, with a token made for the run.
        with local_ray_settings():
            ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
            try:
                prepare_teachers(study.plan(), configs)
                started = time.perf_counter()
                result = study.run()
                wall = time.perf_counter() - started
            finally:
                ray.shutdown()
    concurrency = min(args.cpus, len(configs))
    trial_time = float(result.trials["train_time_s"].sum())
    ideal = trial_time / concurrency
    overhead = wall / ideal - 1
    print(f"versions: {versions()}")
    print(f"{len(configs)} trials of {epochs} epochs, {concurrency} at once: wall {wall:.1f} s, sum of trial "
          f"time {trial_time:.1f} s, ideal {ideal:.1f} s")
    print(f"overhead: {overhead:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
