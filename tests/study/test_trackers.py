"""``--log tensorboard|mlflow|wandb``: every trial logged through Ray Tune's own logger callbacks, read back
from each tracker's files without a network: MLflow from a local file store with MLflow's client, W&B in
offline mode from its run directory, TensorBoard from the event files. A tracker whose package is
missing is one clear error before any compute."""

from __future__ import annotations

import math
import sys

import pytest
from tracker_files import run_logged_study, tensorboard_run, wandb_run

STUDY = "ensemble_size"  # its axis (the teacher's ensemble size) decides the teacher: no two trials share a pack


def test_a_missing_tracker_package_is_one_error_before_compute(monkeypatch, capsys):
    import ray

    from kd_ray.study.cli import study_main

    monkeypatch.setitem(sys.modules, "mlflow", None)  # what an environment without mlflow looks like
    code = study_main(STUDY, argv=["--log", "mlflow", "--storage", "/nonexistent/never-written"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"{STUDY}: error: --log mlflow needs the mlflow package, which is not installed: "
                   "pip install 'kd-ray[mlflow]'"]
    assert not ray.is_initialized()


def test_an_unknown_tracker_is_refused_by_the_parser(capsys):
    from kd_ray.study.cli import study_main

    with pytest.raises(SystemExit) as exit_:
        study_main(STUDY, argv=["--log", "neptune"])
    assert exit_.value.code == 2
    assert "argument --log: invalid choice: 'neptune' (choose from 'tensorboard', 'mlflow', 'wandb')" in (
        capsys.readouterr().err)


@pytest.fixture(scope="module")
def logged_study(tmp_path_factory) -> dict:
    """The study's trials (seeds 0 and 1), each trained alone, logged to all three trackers."""
    root = tmp_path_factory.mktemp("trackers")
    logged = run_logged_study(root, STUDY, ["--seeds", "2", "--set", "teacher_members=1", "--set", "teacher_epochs=2",
                                            "--set", "epochs=3", "--set", "eval_every=1"])
    assert set(logged["trials"]["pack_size"]) == {1}  # lone trials: each its own pack of one
    return logged


def evaluations(logged_study: dict, trial_id: str):
    epochs = logged_study["epochs"]
    return epochs[epochs["trial_id"] == trial_id].sort_values("epoch")


def test_mlflow_has_a_run_per_trial_under_the_studys_run(logged_study, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=logged_study["tracking_uri"])
    experiment = client.get_experiment_by_name(STUDY)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    parent = next(run for run in runs if "mlflow.parentRunId" not in run.data.tags)
    children = [run for run in runs if run is not parent]
    trials = logged_study["trials"]
    assert parent.info.run_name == STUDY and parent.info.status == "FINISHED"
    assert len(children) == len(trials) > 1
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["kd_ray_study"] == STUDY
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        row = trials[trials["trial_id"] == run.data.tags["kd_ray_trial_id"]].iloc[0]
        assert run.data.tags["pack_id"] == row["pack_id"]
        assert int(run.data.params["seed"]) == row["seed"]
        assert int(run.data.params["teacher_members"]) == row["teacher_members"]
        for metric in ("test_agreement", "test_acc", "teacher_test_acc"):
            assert run.data.metrics[metric] == pytest.approx(row[metric], abs=1e-6)
        history = client.get_metric_history(run.info.run_id, "test_agreement")
        # Each evaluation at its epoch; the final report is no step of its own.
        assert sorted(m.step for m in history) == list(evaluations(logged_study, row["trial_id"])["epoch"])
        assert not {"pid", "node_id", "time_total_s", "training_iteration"} & set(run.data.metrics)


def test_wandb_offline_has_a_run_per_trial_with_its_history(logged_study):
    runs = [wandb_run(path) for path in sorted((logged_study["study_dir"] / "wandb").glob("offline-run-*/run-*.wandb"))]
    trials = logged_study["trials"]
    assert sorted(run["run"].run_id for run in runs) == sorted(trials["trial_id"])
    for run in runs:
        assert run["run"].project == "kd_ray" and run["run"].run_group == STUDY
        row = trials[trials["trial_id"] == run["run"].run_id].iloc[0]
        assert run["config"]["seed"] == row["seed"] and run["config"]["pack_id"] == row["pack_id"]
        evaluated = evaluations(logged_study, row["trial_id"])
        assert [h["epoch"] for h in run["history"]] == list(evaluated["epoch"])
        assert [h["test_agreement"] for h in run["history"]] == pytest.approx(list(evaluated["test_agreement"]))
        assert run["summary"]["test_acc"] == pytest.approx(row["test_acc"])


def test_tensorboard_has_a_run_per_trial_under_the_study(logged_study):
    trials = logged_study["trials"]
    logdir = logged_study["study_dir"] / "tensorboard"
    runs = {path.name: tensorboard_run(list(path.glob("events.out.tfevents.*"))) for path in logdir.iterdir()}
    assert len(runs) == len(trials)
    for label, run in runs.items():
        row = trials[trials["seed"] == run["hparams"]["seed"]].iloc[0]
        assert label.endswith(f"seed={row['seed']}")  # named by what tells the trials apart: here the seed
        steps = [step for step, _ in run["scalars"]["test_agreement"]]
        assert steps == list(evaluations(logged_study, row["trial_id"])["epoch"])
        assert run["scalars"]["test_agreement"][-1][1] == pytest.approx(row["test_agreement"], abs=1e-6)
        assert not any(math.isnan(value) for points in run["scalars"].values() for _, value in points)
    assert f"tensorboard --logdir {logdir}" in logged_study["output"]
