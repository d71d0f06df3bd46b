"""A study's console: Ray Tune's progress table with each trial's arm and the student's metrics, one line
per finished trial with done/total and the time left, and no flood of Ray warnings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kd_ray.progress import format_duration, time_left_s, trial_done_line
from kd_ray.study.console import arm_columns
from kd_ray.study.presets import STUDIES
from kd_ray.study.runner import CHECKPOINTS_KEPT

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT_WARNING = "Experiment state snapshotting has been triggered multiple times"


def test_format_duration():
    assert [format_duration(s) for s in (0, 42.4, 59.6, 61, 3599, 3600, 7625)] == [
        "0s", "42s", "1m00s", "1m01s", "59m59s", "1h00m", "2h07m"]


def test_time_left_counts_whole_waves_of_the_free_slots():
    assert time_left_s(10.0, remaining=5, slots=2) == 30.0  # waves of 2, 2 and 1
    assert time_left_s(10.0, remaining=2, slots=4) == 10.0
    assert time_left_s(10.0, remaining=0, slots=2) == 0.0
    assert time_left_s(10.0, remaining=3, slots=0) == 30.0  # at least one slot


def test_trial_done_line():
    line = trial_done_line(3, 28, "done", {"augmentation": "mixup", "temperature": 4.0},
                           {"test_agreement": 0.91234, "test_acc": 0.8}, 72.0, 290.0)
    assert line == ("trial 3/28 done | augmentation=mixup temperature=4 | test_agreement 0.912 test_acc 0.800 | "
                    "1m12s elapsed, about 4m50s left")
    assert trial_done_line(1, 4, "ERROR", {"seed": 1}, {}, 5.0, None) == (
        "trial 1/4 ERROR | seed=1 | 5s elapsed, time left not known yet")
    assert trial_done_line(4, 4, "done", {}, {"test_acc": 0.5}, 3725.0, 0.0) == (
        "trial 4/4 done | test_acc 0.500 | 1h02m elapsed")


def test_arm_columns_name_what_tells_the_trials_apart():
    arms = [{"optimizer": "sgd", "lr": 0.05}, {"optimizer": "adam", "lr": 1e-3}]
    assert arm_columns(None, {"temperature": [1.0, 4.0]}, arms, [0, 1]) == {
        "temperature": "temperature", "optimizer": "optimizer", "lr": "lr", "seed": "seed"}
    assert arm_columns(None, {"teacher_members": [1, 3]}, [], [0]) == {"teacher_members": "teacher_members"}
    search = {"lr": ("logfloat", 0.01, 0.1), "alpha": ("float", 0.0, 1.0)}
    assert arm_columns(search, {}, [], [0]) == {"lr": "lr", "alpha": "alpha"}


# The default study at a tiny scale: one policy, two seeds, the preset's other axes (one value each).
STUDY = "augmentation_ablation"
SEEDS = 2
PARAMETERS = [axis for axis in STUDIES[STUDY].presets["local"].axes if axis != "augmentation"] + ["seed"]


@pytest.fixture(scope="module")
def default_study_console(tmp_path_factory) -> tuple[str, pd.DataFrame]:
    """The default study's console and trials table: a checkpoint at each of its 8 epochs, which with
    Ray Tune's num_to_keep=2 set off the snapshot warning several times."""
    storage = tmp_path_factory.mktemp("console")
    epochs = CHECKPOINTS_KEPT - 2
    argv = [sys.executable, str(REPO / "studies" / f"{STUDY}.py"), "--storage", str(storage),
            "--seeds", str(SEEDS), "--set", "augmentation=baseline", "--set", "extra_data=0",
            "--set", "extra_source=generator", "--set", "extra_ratio=0", "--set", "teacher_members=1",
            "--set", "teacher_epochs=2", "--set", f"epochs={epochs}", "--set", "eval_every=1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AIR_NEW_OUTPUT")}
    done = subprocess.run(argv, cwd=REPO, env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True,
                          text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output, pd.read_parquet(storage / STUDY / "trials.parquet")


def test_the_default_study_prints_no_repeated_snapshot_warning(default_study_console):
    output, _ = default_study_console
    assert output.count(SNAPSHOT_WARNING) == 0, output[-4000:]
    assert "Checkpoint successfully created" not in output  # Ray's INFO line per persisted checkpoint


def test_the_progress_table_shows_the_arm_and_the_students_metrics(default_study_console):
    output, trials = default_study_console
    final = output[output.rindex("== Status =="):]
    header = next(line for line in final.splitlines() if line.startswith("| Trial name"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[3:] == [*PARAMETERS, "epoch", "test_agreement", "test_acc"], header
    rows = [line for line in final.splitlines() if line.startswith("| _trainable")]
    assert len(rows) == len(trials) == SEEDS
    assert all("TERMINATED" in row for row in rows)
    shown = sorted(float(row.strip("|").split("|")[columns.index("test_agreement")]) for row in rows)
    assert shown == pytest.approx(sorted(trials["test_agreement"]), abs=1e-4)


def test_one_line_per_finished_trial_with_done_total_and_time_left(default_study_console):
    output, trials = default_study_console
    pattern = re.compile(r"\] trial (\d+)/(\d+) done \| (.+) \| test_agreement (\S+) test_acc (\S+) "
                         r"\| (\w+) elapsed(, about (\w+) left)?$")
    lines = [pattern.search(line) for line in output.splitlines() if "] trial " in line]
    assert len(lines) == len(trials) and all(lines), output[-4000:]
    assert [int(m.group(1)) for m in lines] == list(range(1, SEEDS + 1)) and {m.group(2) for m in lines} == {str(SEEDS)}
    assert all(m.group(8) for m in lines[:-1]) and lines[-1].group(7) is None  # time left, until the last one
    for match in lines:
        arm = dict(pair.split("=") for pair in match.group(3).split(" "))
        assert list(arm) == PARAMETERS
        row = trials[trials["seed"] == int(arm["seed"])].iloc[0]
        assert float(match.group(4)) == pytest.approx(row["test_agreement"], abs=5e-4)
        assert float(match.group(5)) == pytest.approx(row["test_acc"], abs=5e-4)
