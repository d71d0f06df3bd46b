"""The example of examples/own_model_and_data end to end: its data, a `kd-ray trial` on its model, a small
study on a real local Ray, and the teacher keys that name its model."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kd_ray.config import TrialConfig

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "own_model_and_data"
MODEL = "examples/own_model_and_data/model.py:build"  # relative, as a user types it from the repository root


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("own_data") / "data.npz"
    subprocess.run([sys.executable, str(EXAMPLE / "make_data.py"), str(path)], check=True, capture_output=True)
    return str(path)


def sane(row: dict) -> None:
    for metric in ("test_acc", "test_agreement", "train_agreement", "teacher_test_acc"):
        assert 0.0 <= row[metric] <= 1.0, (metric, row[metric])
    assert math.isfinite(row["test_kl"]) and row["test_kl"] >= 0
    # Three classes: chance is a third; a few epochs on this problem give well over half.
    assert row["teacher_test_acc"] > 0.6 and row["test_acc"] > 0.5, row


def test_kd_ray_trial_runs_the_example(data_npz, tmp_path):
    command = [sys.executable, "-m", "kd_ray.cli", "trial", "--json", "--quiet", "--store", str(tmp_path / "store"),
               "--set", f"dataset={data_npz}", "--set", f"student_arch={MODEL}",
               "--set", 'student_arch_args={"hidden": 32}', "--set", f"teacher_arch={MODEL}",
               "--set", "teacher_members=1", "--set", "teacher_epochs=6", "--set", "epochs=6", "--set", "device=cpu"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["status"] == "TERMINATED"
    sane(row)
    # The model names two stages (embed, relu): two CKA columns, the third NaN.
    assert 0 <= row["cka_stage1"] <= 1 and 0 <= row["cka_stage2"] <= 1 and row["cka_stage3"] is None
    expected = TrialConfig(dataset=data_npz, teacher_arch=MODEL, teacher_members=1, teacher_epochs=6)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert row["teacher_key"] == expected.teacher_key()
    finally:
        os.chdir(cwd)


def test_bad_input_exits_2_naming_the_field(data_npz):
    command = [sys.executable, "-m", "kd_ray.cli", "trial", "--set", f"dataset={data_npz}",
               "--set", "student_arch=examples/own_model_and_data/model.py:missing"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "student_arch='examples/own_model_and_data/model.py:missing'" in done.stderr
    assert "no callable 'missing'" in done.stderr


def test_the_teacher_key_names_the_factory_its_args_its_source_and_the_data(data_npz, tmp_path, monkeypatch):
    model = tmp_path / "model.py"
    shutil.copy(EXAMPLE / "model.py", model)
    monkeypatch.chdir(tmp_path)
    base = TrialConfig(dataset=data_npz, teacher_arch="model.py:build", teacher_arch_args='{"hidden": 32}')
    key = base.teacher_key()
    assert base.replace(teacher_arch_args='{"hidden": 16}').teacher_key() != key
    assert base.replace(teacher_arch_args={"hidden": 32}).teacher_key() == key  # a mapping: the same JSON
    assert base.replace(student_arch="model.py:build").teacher_key() == key  # the student is not the teacher
    model.write_text(model.read_text() + "\n# edited\n")
    assert base.teacher_key() != key  # an edited model is a new teacher, trained again
    other = tmp_path / "other.npz"
    shutil.copy(data_npz, other)
    assert base.replace(dataset=str(other)).teacher_key() != base.teacher_key()  # the name is part of it
    # The built-in architectures and datasets keep the keys they had before user models existed.
    assert TrialConfig().teacher_key() == "2257731144abab9a"
    assert TrialConfig(dataset="digits", teacher_arch="smallcnn", teacher_members=5).teacher_key() == "137484db920b9566"


@pytest.mark.slow
def test_a_study_on_ray_trains_the_example_unpacked(ray_local, data_npz, tmp_path, monkeypatch):
    from kd_ray.study import Study
    from kd_ray.study.pack_trials import PACKS_FILE

    monkeypatch.chdir(REPO)  # the model's path is relative: Ray Tune's trials resolve it from here
    base = TrialConfig(dataset=data_npz, student_arch=MODEL, student_arch_args='{"hidden": 32}', teacher_members=1,
                       teacher_epochs=4, epochs=4, eval_every=2, device="cpu")
    result = Study(name="own", base=base, axes={"temperature": [1.0, 4.0]}, seeds=[0], storage=str(tmp_path),
                   verbose=0).run()
    assert (result.partial, result.finished) == (False, 2)
    trials = pd.read_parquet(Path(result.study_dir) / "trials.parquet")
    assert sorted(trials["temperature"]) == [1.0, 4.0]
    assert set(trials["student_arch"]) == {MODEL} and set(trials["student_arch_args"]) == {'{"hidden": 32}'}
    for row in trials.to_dict("records"):
        assert row["status"] == "TERMINATED"
        sane(row)
    # The residual block is a layer one wide network cannot hold: the two students ran unpacked, so no pack was
    # listed, though they share a teacher, data and batch stream.
    assert not (Path(result.study_dir) / PACKS_FILE).exists()
