"""Analysis at scale: `kd-ray analyze` on trial tables of 1,000, 10,000 and 100,000 trials, in one run.

The tables are a small real study (the augmentation ablation's local preset at 2 epochs, run here),
replicated: each copy of a trial gets a new trial_id and replicate seed, and its metrics a small
jitter, shared by the trial's row and its epoch rows, so that the copies are distinct trials of the
same arms with the real schema. Each size is analysed by the real command line (`python -m
kd_ray.cli analyze DIR`, the report and the figures included) in a fresh process, timed from start to
exit. The growth exponent is the least-squares slope of log(time) against log(trials); 1 means the
cost grows like the data. Each size is analysed ``--repeats`` times, the sizes interleaved (small to
large, then large to small, ...); the median and the spread (min to max) are printed, and the exponent
and the last line use the medians. The last line is ``seconds_10k: <seconds>``.

    python benchmarks/analysis_scale.py           # a few minutes on a 2-core CPU
    python benchmarks/analysis_scale.py --tiny    # 1,000 and 10,000 trials of a 12-trial study
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from kd_ray import tables
from kd_ray.provenance import versions

ROOT = Path(__file__).resolve().parent.parent
STUDY = "augmentation_ablation"
# Metric jitter of a copy: fractions move by about a point, KL and NLL by about 5%.
FRACTION_JITTER = 0.01
NATS_JITTER = 0.05


def run_base_study(storage: Path, seeds: int) -> Path:
    """Run the small real study whose tables are replicated; returns its study directory."""
    command = [sys.executable, str(ROOT / "studies" / f"{STUDY}.py"), "--storage", str(storage),
               "--seeds", str(seeds), "--set", "epochs=2", "--set", "eval_every=1", "--quiet"]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"the base study failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return storage / STUDY


def replicate(trials: pd.DataFrame, epochs: pd.DataFrame, n_trials: int, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """``n_trials`` trials made of copies of ``trials`` (and their epoch rows), as tables of the schemas.

    Copy k of a trial is ``<trial_id>-r<k>`` with replicate seed ``seed + k * (max seed + 1)``; its
    metrics move by one draw per trial and metric, the same in its row and its epoch rows.
    """
    rng = np.random.default_rng(seed)
    copies = math.ceil(n_trials / len(trials))
    copy_of = np.repeat(np.arange(copies), len(trials))[:n_trials]
    base_row = np.tile(np.arange(len(trials)), copies)[:n_trials]
    out = trials.iloc[base_row].reset_index(drop=True)
    new_ids = out["trial_id"].astype(str) + "-r" + pd.Series(copy_of).astype(str)
    seed_step = int(trials["seed"].max()) + 1
    out["seed"] = out["seed"].to_numpy() + copy_of * seed_step
    out["config_json"] = [_with_seed(text, s) for text, s in zip(out["config_json"], out["seed"])]

    metrics = [m for m in tables.METRICS if m in out.columns]
    shift = {m: rng.normal(0.0, FRACTION_JITTER, n_trials) for m in metrics if m in tables.FRACTION_METRICS}
    scale = {m: np.exp(rng.normal(0.0, NATS_JITTER, n_trials)) for m in metrics if m not in tables.FRACTION_METRICS}
    _jitter(out, np.arange(n_trials), shift, scale)

    # The epoch rows of each copy, jittered by the draws of their trial.
    position = {trial_id: i for i, trial_id in enumerate(trials["trial_id"])}
    epoch_base = epochs["trial_id"].map(position).to_numpy()
    per_base = [np.flatnonzero(epoch_base == b) for b in range(len(trials))]
    rows = np.concatenate([per_base[b] for b in base_row])
    owner = np.concatenate([np.full(len(per_base[b]), i) for i, b in enumerate(base_row)])
    out_epochs = epochs.iloc[rows].reset_index(drop=True)
    out_epochs["trial_id"] = new_ids.to_numpy()[owner]
    _jitter(out_epochs, owner, shift, scale)
    out["trial_id"] = new_ids
    return (pa.Table.from_pandas(out, schema=tables.TRIALS_SCHEMA, preserve_index=False),
            pa.Table.from_pandas(out_epochs, schema=tables.EPOCHS_SCHEMA, preserve_index=False))


def _with_seed(config_json: str, seed: int) -> str:
    config = json.loads(config_json)
    config["seed"] = int(seed)
    return json.dumps(config, sort_keys=True)


def _jitter(frame: pd.DataFrame, trial: np.ndarray, shift: dict, scale: dict) -> None:
    for metric, draws in shift.items():
        if metric in frame.columns:
            frame[metric] = np.clip(frame[metric].to_numpy() + draws[trial], 0.0, 1.0)
    for metric, draws in scale.items():
        if metric in frame.columns:
            frame[metric] = frame[metric].to_numpy() * draws[trial]


def time_analyze(study_dir: Path) -> tuple[float, float]:
    """Wall and CPU seconds of `kd-ray analyze study_dir` in a fresh process. On a machine shared with
    other work the wall time grows with the load; the CPU time much less."""
    cpu_before = _children_cpu()
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kd_ray.cli", "analyze", str(study_dir)], capture_output=True,
                          text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"kd-ray analyze failed on {study_dir} (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, _children_cpu() - cpu_before


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def growth_exponent(sizes: list[int], seconds: list[float]) -> float:
    """The least-squares slope of log(seconds) against log(size)."""
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 12-trial base study, 1,000 and 10,000 trials")
    parser.add_argument("--repeats", type=int, default=3, help="timed analyses of each size (default 3, tiny 1)")
    args = parser.parse_args(argv)
    repeats = 1 if args.tiny else args.repeats
    sizes = [1_000, 10_000] if args.tiny else [1_000, 10_000, 100_000]
    with tempfile.TemporaryDirectory() as scratch:
        base_dir = run_base_study(Path(scratch) / "base", seeds=1 if args.tiny else 2)
        base_trials = tables.read_table(str(base_dir / tables.TRIALS_FILE)).to_pandas()
        base_epochs = tables.read_table(str(base_dir / tables.EPOCHS_FILE)).to_pandas()
        print(f"versions: {versions()}")
        # The fixed part of every analysis (interpreter, imports, drawing the figures), for reference.
        wall, cpu = time_analyze(base_dir)
        print(f"base study: {len(base_trials)} trials, {len(base_epochs)} epoch rows: kd-ray analyze {wall:.1f} s "
              f"(cpu {cpu:.1f} s)")
        study_dirs = {}
        for size in sizes:
            study_dirs[size] = Path(scratch) / f"scale_{size}"
            trials, epochs = replicate(base_trials, base_epochs, size)
            tables.write_table(trials, str(study_dirs[size] / tables.TRIALS_FILE))
            tables.write_table(epochs, str(study_dirs[size] / tables.EPOCHS_FILE))
        walls: dict[int, list[float]] = {size: [] for size in sizes}
        cpus: dict[int, list[float]] = {size: [] for size in sizes}
        for repeat in range(repeats):
            for size in sizes if repeat % 2 == 0 else sizes[::-1]:
                wall, cpu = time_analyze(study_dirs[size])
                walls[size].append(wall)
                cpus[size].append(cpu)
        seconds = [statistics.median(walls[size]) for size in sizes]
        for size, median in zip(sizes, seconds):
            print(f"{size:>7} trials: kd-ray analyze median {median:.1f} s (min {min(walls[size]):.1f}, max "
                  f"{max(walls[size]):.1f}, {repeats} runs; cpu median {statistics.median(cpus[size]):.1f} s)")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"growth exponent: {growth_exponent(sizes, seconds):.2f}")
    print(f"seconds_10k: {seconds[sizes.index(10_000)]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
