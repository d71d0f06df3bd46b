"""Packed studies on a real local Ray: the same tables as a trial per config, a pack per Ray Tune trial,
a killed pack worker resumed from its checkpoint with no row lost or duplicated, and a resume that
runs nothing again."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
from ray_results import acting_on_a_report, epoch_reports, reports

from kd_ray.config import TrialConfig
from kd_ray.study import Study
from kd_ray.tables import EPOCHS_SCHEMA, TRIALS_SCHEMA

TINY = dict(dataset="mnist1d", teacher_arch="mlp", student_arch="mlp", teacher_epochs=2, teacher_members=2,
            epochs=2, eval_every=1, batch_size=256, device="cpu", precision="fp32")
GRID = dict(base=TrialConfig(**TINY), axes={"temperature": [1.0, 4.0], "teacher_members": [1, 2]}, seeds=[0, 1])
COMPARED = ["test_acc", "test_agreement", "train_agreement", "aug_train_agreement", "teacher_test_acc", "val_acc",
            "val_agreement", "teacher_train_acc", "teacher_test_confidence"]


def pack_dirs(study_dir: Path) -> list[Path]:
    return sorted(p for p in study_dir.iterdir() if p.is_dir() and p.name.startswith("pack"))


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("packed_storage")


@pytest.fixture(scope="module")
def packed_and_alone(ray_local, storage):
    packed = Study(name="packed", storage=str(storage), verbose=0, **GRID).run()
    alone = Study(name="alone", storage=str(storage), verbose=0, pack="off", **GRID).run()
    return packed, alone


def test_a_packed_grid_writes_the_tables_of_a_trial_per_config(packed_and_alone, storage):
    packed, alone = packed_and_alone
    assert (packed.partial, packed.finished, packed.expected) == (False, 8, 8)
    study_dir = storage / "packed"
    trials, epochs = pd.read_parquet(study_dir / "trials.parquet"), pd.read_parquet(study_dir / "epochs.parquet")
    assert list(trials.columns) == TRIALS_SCHEMA.names and list(epochs.columns) == EPOCHS_SCHEMA.names
    assert len(trials) == 8 and trials["trial_id"].is_unique and (trials["status"] == "TERMINATED").all()
    # A pack per replicate (2 CPUs, 2 seeds): its four students share the seed's teacher members.
    dirs = pack_dirs(study_dir)
    assert len(dirs) == 2 and trials["pack_id"].nunique() == 2 and (trials["pack_size"] == 4).all()
    assert (trials.groupby("pack_id")["seed"].nunique() == 1).all()
    assert trials.groupby("pack_id")["pack_time_share"].sum().round(6).eq(1.0).all()
    assert sorted(epochs.groupby("trial_id")["epoch"].apply(list).tolist()) == [[1, 2]] * 8
    listed = json.loads((study_dir / "packs.json").read_text())
    assert sorted(len(p["students"]) for p in listed) == [4, 4]

    by_arm = ["temperature", "teacher_members", "seed"]
    mine = trials.set_index(by_arm).sort_index()
    theirs = alone.trials.set_index(by_arm).sort_index()
    assert mine.index.equals(theirs.index)
    assert (mine["teacher_key"] == theirs["teacher_key"]).all()
    assert (alone.trials["pack_size"] == 1).all() and (alone.trials["pack_id"] == alone.trials["trial_id"]).all()
    for metric in COMPARED:
        gap = (mine[metric] - theirs[metric]).abs().max()
        assert gap < 0.03, (metric, gap)  # the same students, fused: float32 rounding grown over 16 steps


def test_resuming_a_finished_packed_study_runs_nothing_again(packed_and_alone, storage):
    study_dir = storage / "packed"
    before = {d.name: (d / "result.json").read_text() for d in pack_dirs(study_dir)}
    trials = pd.read_parquet(study_dir / "trials.parquet")
    again = Study(name="packed", storage=str(storage), verbose=0, resume=True, **GRID).run()
    assert (again.partial, again.finished) == (False, 8)
    assert {d.name: (d / "result.json").read_text() for d in pack_dirs(study_dir)} == before
    pd.testing.assert_frame_equal(pd.read_parquet(study_dir / "trials.parquet"), trials)


def test_a_killed_pack_worker_resumes_the_pack_from_its_checkpoint(ray_local, tmp_path):
    """SIGKILL the worker of a pack mid-run: Ray Tune retries the pack from its last checkpoint, and every
    student has exactly one row per evaluation, the killed process's and the new one's together."""
    # result.json reaches the study's directory in bursts under load: a wide window (20 to 110 of 150
    # epochs) is seen whatever the bursts, and leaves epochs to run after the kill.
    epochs, every = 150, 10
    study = Study(name="pack_kill", base=TrialConfig(**{**TINY, "epochs": epochs, "eval_every": every}),
                  axes={"temperature": [1.0, 4.0, 8.0]}, storage=str(tmp_path), max_failures=2,
                  max_concurrent_trials=1, verbose=0)
    study_dir = tmp_path / "pack_kill"
    mid_run = acting_on_a_report(lambda: pack_dirs(study_dir) if study_dir.is_dir() else [],
                                 lambda report: 20 <= report["epoch"] <= 110,
                                 lambda report: os.kill(report["pid"], signal.SIGKILL), join_s=10)
    with mid_run as killed:
        result = study.run()
    assert killed, "the pack was not caught between epochs 20 and 110"
    assert (result.partial, result.finished, result.expected) == (False, 3, 3)
    trials, table = result.trials, result.epochs
    assert (trials["status"] == "TERMINATED").all() and (trials["pack_size"] == 3).all()
    expected = list(range(every, epochs + 1, every))
    assert len(table) == 3 * len(expected)
    for trial_id, rows in table.groupby("trial_id"):
        assert sorted(rows["epoch"]) == expected, trial_id
    logged = epoch_reports(study_dir / killed["trial"])
    before = [r["epoch"] for r in logged if r["pid"] == killed["pid"]]
    after = [r["epoch"] for r in logged if r["pid"] != killed["pid"]]
    # Resumed at its last checkpoint, whose report the new process makes again first.
    assert before and after and after[0] in (max(before), max(before) + every)
    assert after[1:] == list(range(after[0] + every, epochs + 1, every))
    final = reports(study_dir / killed["trial"])[-1]
    assert final["final"] and final["pid"] != killed["pid"]


def test_an_optuna_search_over_student_fields_asks_each_pack_for_its_points(ray_local, tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from kd_ray.study import OptunaSpec

    search = OptunaSpec(space={"temperature": ("logfloat", 1.0, 8.0), "alpha": ("float", 0.0, 0.5)},
                        metrics=("val_agreement",), modes=("max",), num_samples=6, seed=3)
    result = Study(name="packed_search", base=TrialConfig(**TINY), search=search, storage=str(tmp_path),
                   verbose=0).run()
    assert (result.partial, result.finished, result.expected) == (False, 6, 6)
    study_dir = tmp_path / "packed_search"
    trials = result.trials
    assert len(pack_dirs(study_dir)) == 2 and (trials["pack_size"] == 3).all()  # 6 points, 2 CPUs
    assert trials["temperature"].nunique() == 6 and trials["temperature"].between(1, 8).all()
    storage = JournalStorage(JournalFileBackend(str(study_dir / "optuna.journal")))
    [name] = optuna.study.get_all_study_names(storage)
    told = optuna.load_study(study_name=name, storage=storage).get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(told) == 6
    by_temperature = trials.set_index("temperature")
    for trial in told:
        row = by_temperature.loc[trial.params["temperature"]]
        assert row["alpha"] == pytest.approx(trial.params["alpha"])
        assert trial.value == pytest.approx(row["val_agreement"])


def test_which_searches_and_schedulers_pack(capsys):
    from kd_ray.study.pack_trials import search_pack_size

    base = TrialConfig(**TINY)
    assert search_pack_size("auto", "fifo", ["temperature", "lr"], base, num_samples=16, slots=2, gpus_per_trial=0) == 8
    assert search_pack_size("auto", "fifo", ["temperature"], base, num_samples=64, slots=2, gpus_per_trial=0) == 32
    assert search_pack_size("off", "fifo", ["temperature"], base, num_samples=16, slots=2, gpus_per_trial=0) == 1
    assert search_pack_size("auto", "asha", ["temperature"], base, num_samples=16, slots=2, gpus_per_trial=0) == 1
    assert "off under ASHA" in capsys.readouterr().out
    assert search_pack_size("auto", "fifo", ["temperature", "augmentation"], base, num_samples=16, slots=2,
                            gpus_per_trial=0) == 1
    assert "augmentation decides the teacher, data or batch stream" in capsys.readouterr().out
    from kd_ray.study.pack_trials import choose_packs

    configs = [base.replace(temperature=t) for t in (1.0, 4.0, 8.0, 16.0)]
    for mode, scheduler in (("off", "fifo"), ("auto", "asha")):
        assert choose_packs(mode, False, scheduler, 2, 0.0, "/tmp/never-written", configs) is None
    assert choose_packs("auto", True, "fifo", 2, 0.0, "/tmp/never-written", configs) is None  # a search: above
