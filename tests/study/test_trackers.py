"""``--log tensorboard|mlflow|wandb``: every trial logged through Ray Tune's own logger callbacks, read back
from each tracker's files without a network: MLflow from a local file store with MLflow's client, W&B in
offline mode from its run directory, TensorBoard from the event files. A tracker whose package is
missing is one clear error before any compute."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
STUDY = "ensemble_size"


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


# --- reading each tracker's own files -------------------------------------------------------------


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic,
    version), then LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte header (CRC-32,
    length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left_in_block = 32768 - pos % 32768
        if left_in_block < 7:
            pos += left_in_block  # a block's tail too short for a header is padding
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def tensorboard_scalars(path: Path) -> dict[str, list[float]]:
    """Scalar values by tag from a TensorBoard event file (TFRecord framing: length, its CRC, data, CRC)."""
    from tensorboardX.proto import event_pb2

    data, pos, scalars = path.read_bytes(), 0, {}
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


@pytest.fixture(scope="module")
def logged_study(tmp_path_factory) -> dict:
    """Two trials (seeds 0 and 1) logged to all three trackers, with no network."""
    root = tmp_path_factory.mktemp("trackers")
    tracking_uri = f"file://{root / 'mlruns'}"
    argv = [sys.executable, str(REPO / "studies" / f"{STUDY}.py"), "--storage", str(root / "results"),
            "--seeds", "2", "--set", "teacher_members=1", "--set", "teacher_epochs=2", "--set", "epochs=3",
            "--set", "eval_every=1", "--log", "mlflow", "--log", "wandb", "--log", "tensorboard", "--quiet"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_", "WANDB_"))}
    env.update(RAY_AUTH_MODE="disabled", MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_ALLOW_FILE_STORE="true",
               WANDB_MODE="offline", WANDB_CONFIG_DIR=str(root / "wandb-config"), WANDB_CACHE_DIR=str(root / "cache"))
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    study_dir = root / "results" / STUDY
    return {"study_dir": study_dir, "tracking_uri": tracking_uri, "output": output,
            "trials": pd.read_parquet(study_dir / "trials.parquet"),
            "epochs": pd.read_parquet(study_dir / "epochs.parquet")}


def test_mlflow_has_a_run_per_trial_with_the_tables_metrics(logged_study, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=logged_study["tracking_uri"])
    experiment = client.get_experiment_by_name(STUDY)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    trials, epochs = logged_study["trials"], logged_study["epochs"]
    assert len(runs) == len(trials) == 2
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["kd_ray_study"] == STUDY
        trial_id = next(t for t in trials["trial_id"] if run.data.tags["trial_name"].endswith(t))
        row = trials[trials["trial_id"] == trial_id].iloc[0]
        assert int(run.data.params["seed"]) == row["seed"]
        for metric in ("test_agreement", "test_acc", "teacher_test_acc"):
            assert run.data.metrics[metric] == pytest.approx(row[metric], abs=1e-6)
        history = client.get_metric_history(run.info.run_id, "test_agreement")
        assert len(history) == (epochs["trial_id"] == trial_id).sum() + 1  # each evaluation, then the final report


def test_wandb_offline_has_a_run_per_trial_with_its_history(logged_study):
    runs = sorted((logged_study["study_dir"] / "wandb").glob("offline-run-*/run-*.wandb"))
    trials, epochs = logged_study["trials"], logged_study["epochs"]
    assert len(runs) == len(trials) == 2
    seen = set()
    for path in runs:
        records = wandb_records(path)
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.project == "kd_ray" and run.run_group == STUDY
        trial_id = next(t for t in trials["trial_id"] if run.run_id.endswith(t))
        seen.add(trial_id)
        # A history item names its metric by key or by nested_key (the path of a nested metric).
        history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        row = trials[trials["trial_id"] == trial_id].iloc[0]
        evaluations = epochs[epochs["trial_id"] == trial_id].sort_values("epoch")
        assert [h["epoch"] for h in history] == [*evaluations["epoch"], row["epochs_completed"]]
        assert [h["test_agreement"] for h in history[:-1]] == pytest.approx(list(evaluations["test_agreement"]))
        assert history[-1]["test_acc"] == pytest.approx(row["test_acc"])
    assert seen == set(trials["trial_id"])


def test_tensorboard_events_hold_each_trials_metrics(logged_study):
    trials = logged_study["trials"]
    files = sorted(logged_study["study_dir"].glob("*/events.out.tfevents.*"))
    assert len(files) == len(trials) == 2
    finals = sorted(tensorboard_scalars(path)["ray/tune/test_agreement"][-1] for path in files)
    assert finals == pytest.approx(sorted(trials["test_agreement"]), abs=1e-6)
    assert f"tensorboard --logdir {logged_study['study_dir']}" in logged_study["output"]
