"""A packed study logged to TensorBoard, MLflow and W&B has one tracker run per student, read back from each
tracker's own files without a network: named by what tells the student apart, its parameters its own
config (its row of trials.parquet), its steps the evaluation epochs, no NaN and no extra final step."""

from __future__ import annotations

import json
import math

import pytest
from tracker_files import run_logged_study, tensorboard_run, wandb_run

from kd_ray.config import TrialConfig

STUDY = "temperature_sweep"  # axes teacher_members x temperature: the temperatures of a teacher share a pack
EPOCHS = 3

pytestmark = pytest.mark.slow


def label_of(row) -> str:
    """The label a student of this study is logged under: its axes and seed."""
    return f"teacher_members={row['teacher_members']},temperature={row['temperature']:g},seed={row['seed']}"


def eval_epochs(epochs, trial_id: str) -> list[int]:
    return sorted(int(e) for e in epochs.loc[epochs["trial_id"] == trial_id, "epoch"])


@pytest.fixture(scope="module")
def logged_study(tmp_path_factory) -> dict:
    """12 students (3 ensemble sizes x 4 temperatures, one seed) in packs, logged to all three trackers."""
    root = tmp_path_factory.mktemp("tracker_runs")
    return run_logged_study(root, STUDY, ["--seeds", "1", "--set", "teacher_epochs=2", "--set", f"epochs={EPOCHS}",
                                          "--set", "eval_every=1"])


def test_the_study_trained_its_students_in_packs(logged_study):
    packs = json.loads((logged_study["study_dir"] / "packs.json").read_text())
    assert max(pack["size"] for pack in packs) > 1
    trials = logged_study["trials"]
    assert len(trials) == 12 and set(trials["status"]) == {"TERMINATED"}
    assert trials["pack_size"].max() > 1


def test_tensorboard_has_a_run_per_student_stepped_by_epoch(logged_study):
    trials, epochs = logged_study["trials"], logged_study["epochs"]
    runs = {path.name: path for path in (logged_study["study_dir"] / "tensorboard").iterdir()}
    assert sorted(runs) == sorted(label_of(row) for _, row in trials.iterrows())
    for _, row in trials.iterrows():
        run = tensorboard_run(list(runs[label_of(row)].glob("events.out.tfevents.*")))
        evaluated = eval_epochs(epochs, row["trial_id"])
        assert evaluated == list(range(1, EPOCHS + 1))
        for tag in ("test_agreement", "test_acc", "train_loss", "lr"):
            assert [step for step, _ in run["scalars"][tag]] == evaluated, tag  # the final report adds no step
        assert not any(math.isnan(value) for points in run["scalars"].values() for _, value in points)
        assert not {"pid", "node_id", "time_this_iter_s", "training_iteration"} & set(run["scalars"])
        # The HParams tab: the student's config (its axes among it) and its final metrics.
        assert run["hparams"]["temperature"] == row["temperature"]
        assert run["hparams"]["teacher_members"] == row["teacher_members"]
        assert run["hparams"]["seed"] == row["seed"]
        assert "test_agreement" in run["metrics"] and "test_acc" in run["metrics"]
        assert run["scalars"]["test_agreement"][-1][1] == pytest.approx(row["test_agreement"], abs=1e-6)


def test_mlflow_has_a_parent_run_and_a_child_per_student(logged_study, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=logged_study["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name(STUDY).experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == STUDY
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    trials, epochs = logged_study["trials"], logged_study["epochs"]
    assert len(children) == len(runs) - 1 == len(trials)
    by_trial = {run.data.tags["kd_ray_trial_id"]: run for run in children}
    assert set(by_trial) == set(trials["trial_id"])
    for _, row in trials.iterrows():
        run = by_trial[row["trial_id"]]
        assert run.info.status == "FINISHED" and run.info.run_name == label_of(row)
        assert run.data.tags["pack_id"] == row["pack_id"]
        assert set(run.data.params) == set(TrialConfig.field_names())
        for field in TrialConfig.field_names():
            value = row[field]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert float(run.data.params[field]) == pytest.approx(float(value)), field
            elif isinstance(value, (str, bool)) or value is None:
                assert run.data.params[field] == str(value), field
        history = client.get_metric_history(run.info.run_id, "test_agreement")
        assert sorted(m.step for m in history) == eval_epochs(epochs, row["trial_id"])
        assert run.data.metrics["test_agreement"] == pytest.approx(row["test_agreement"], abs=1e-6)
        assert not {"pid", "node_id", "time_this_iter_s", "training_iteration", "epoch"} & set(run.data.metrics)


def test_wandb_has_a_run_per_student_in_the_studys_group(logged_study):
    trials, epochs = logged_study["trials"], logged_study["epochs"]
    runs = [wandb_run(path) for path in sorted((logged_study["study_dir"] / "wandb").glob("offline-run-*/run-*.wandb"))]
    assert sorted(run["run"].run_id for run in runs) == sorted(trials["trial_id"])
    for run in runs:
        row = trials[trials["trial_id"] == run["run"].run_id].iloc[0]
        assert run["run"].run_group == STUDY and run["run"].display_name == label_of(row)
        assert run["config"]["arm"] == label_of(row).rsplit(",seed=", 1)[0]
        assert run["config"]["temperature"] == row["temperature"]
        assert run["config"]["pack_id"] == row["pack_id"]
        assert [h["epoch"] for h in run["history"]] == eval_epochs(epochs, row["trial_id"])
        assert run["summary"]["test_acc"] == pytest.approx(row["test_acc"], abs=1e-6)
