"""The benchmarks run end to end in their tiny mode and print their closing line."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, timeout: int, *flags: str) -> list[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", *flags], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


@pytest.mark.slow
def test_throughput_tiny():
    lines = _run("throughput.py", 600)
    assert re.fullmatch(r"speedup: \d+\.\d\d", lines[-1]), lines[-1]
    assert float(lines[-1].split()[1]) > 0
    workload_lines = [line for line in lines if "img/s" in line and "ratio" in line]
    assert len(workload_lines) == 2  # the CIFAR-shaped workload and the embedded default


@pytest.mark.slow
def test_study_overhead_tiny():
    lines = _run("study_overhead.py", 600)
    assert re.fullmatch(r"overhead: -?\d+\.\d{3}", lines[-1]), lines[-1]
    for pack in ("auto", "off"):  # packed and a trial per config, each with its median and spread
        assert any(line.startswith(f"pack {pack}: overhead median") for line in lines), pack


@pytest.mark.slow
def test_packing_tiny():
    lines = _run("packing.py", 900)
    assert re.fullmatch(r"fraction_of_peak: \d+\.\d\d", lines[-1]), lines[-1]
    assert re.fullmatch(r"speedup: \d+\.\d\d", lines[-2]), lines[-2]
    assert 0 < float(lines[-1].split()[1]) < 1 and float(lines[-2].split()[1]) > 0
    assert any(line.startswith("alone: median") for line in lines) and any(line.startswith("pack: median")
                                                                             for line in lines)


@pytest.mark.slow
def test_packing_across_streams_tiny():
    lines = _run("packing.py", 900, "--across", "--no-ray")
    assert re.fullmatch(r"fraction_of_peak: \d+\.\d\d", lines[-1]), lines[-1]
    assert re.fullmatch(r"speedup_across: \d+\.\d\d", lines[-2]), lines[-2]
    assert 0 < float(lines[-1].split()[1]) < 1 and float(lines[-2].split()[1]) > 0
    assert any("augmentation_ablation" in line and "seeds 0, 1, 2" in line for line in lines)


@pytest.mark.slow
def test_profile_studies_tiny():
    lines = _run("profile_studies.py", 600)
    assert re.fullmatch(r"largest: \w+ (teachers|steps|evaluation|tables) \d\.\d\d", lines[-1]), lines[-1]
    rows = [line.split() for line in lines if line.startswith(("temperature_sweep", "augmentation_ablation"))]
    assert len(rows) == 2
    for row in rows:  # trials, then the four parts and the total, each in seconds
        seconds = [float(value.rstrip("s")) for value in row[2:]]
        assert all(value >= 0 for value in seconds) and sum(seconds[:4]) == pytest.approx(seconds[4], abs=0.2)


@pytest.mark.slow
def test_teachers_tiny():
    lines = _run("teachers.py", 600)
    assert re.fullmatch(r"fraction_of_peak: \d+\.\d\d", lines[-1]), lines[-1]
    assert re.fullmatch(r"speedup_teachers: \d+\.\d\d", lines[-2]), lines[-2]
    assert 0 <= float(lines[-1].split()[1]) < 1 and float(lines[-2].split()[1]) > 0
    assert any(line.startswith("alone: median") for line in lines) and any(line.startswith("fused: median")
                                                                             for line in lines)


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_analysis_scale_replicates_a_study_into_tables_of_the_schema(tmp_path):
    from kd_ray import analysis, tables
    from kd_ray.config import TrialConfig

    scale = _benchmark("analysis_scale")
    trials, epochs = [], []
    for i, (augmentation, acc) in enumerate((("baseline", 0.8), ("mixup", 0.7))):
        cfg = TrialConfig(augmentation=augmentation, seed=i)
        trials.append({"study": "base", "trial_id": f"t{i}", "status": "TERMINATED", **cfg.to_dict(),
                       "test_acc": acc, "test_agreement": acc + 0.1, "test_kl": 0.3, "epochs_completed": 2,
                       "config_json": cfg.to_json()})
        epochs += [{"study": "base", "trial_id": f"t{i}", "epoch": e, "test_acc": acc - 0.1 * (2 - e),
                    "test_agreement": acc + 0.1, "test_kl": 0.3} for e in (1, 2)]
    base_trials = tables.to_table(trials, tables.TRIALS_SCHEMA).to_pandas()
    base_epochs = tables.to_table(epochs, tables.EPOCHS_SCHEMA).to_pandas()
    out_trials, out_epochs = scale.replicate(base_trials, base_epochs, 7)
    assert out_trials.schema.equals(tables.TRIALS_SCHEMA) and out_epochs.schema.equals(tables.EPOCHS_SCHEMA)
    assert (out_trials.num_rows, out_epochs.num_rows) == (7, 14)
    frame, epoch_frame = out_trials.to_pandas(), out_epochs.to_pandas()
    assert frame["trial_id"].is_unique and set(epoch_frame["trial_id"]) == set(frame["trial_id"])
    assert frame.groupby("augmentation")["seed"].nunique().to_dict() == {"baseline": 4, "mixup": 3}
    assert [json.loads(c)["seed"] for c in frame["config_json"]] == frame["seed"].tolist()
    moved = frame["test_acc"].to_numpy() - np.where(frame["augmentation"] == "baseline", 0.8, 0.7)
    assert 0 < np.abs(moved).max() < 0.1  # a jitter, not a copy and not noise
    # A trial's epoch rows move with it: its last epoch still equals its row.
    last = epoch_frame[epoch_frame["epoch"] == 2].set_index("trial_id")["test_acc"]
    np.testing.assert_allclose(last.loc[frame["trial_id"]].to_numpy(), frame["test_acc"].to_numpy())
    tables.write_table(out_trials, str(tmp_path / "scaled" / tables.TRIALS_FILE))
    assert analysis.arm_columns(analysis.load_trials(tmp_path / "scaled")) == ["augmentation"]
    assert scale.growth_exponent([10, 100, 1000], [1.0, 10.0, 100.0]) == pytest.approx(1.0)


@pytest.mark.slow
def test_analysis_scale_tiny():
    lines = _run("analysis_scale.py", 900)
    assert re.fullmatch(r"seconds_10k: \d+\.\d", lines[-1]), lines[-1]
    assert re.fullmatch(r"growth exponent: -?\d+\.\d\d", lines[-2]), lines[-2]
