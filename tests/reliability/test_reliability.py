"""Fault tolerance on a real local Ray: a trial's worker process killed mid-run, a report lost with its
process, a diverging trial, a corrupted teacher store trained again, corrupt data found by a Ray task.

See docs/reliability.md for what is guaranteed. The driver-level interrupts are in
test_reliability_driver.py, the lost node in test_reliability_cluster.py and the refusals of bad input
(no Ray at all) in test_reliability_input.py.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch
from ray_results import acting_on_a_report, epoch_reports, reports

from kd_ray import analysis
from kd_ray.config import TrialConfig
from kd_ray.study import Study
from kd_ray.train.setup import FINAL_METRICS
from kd_ray.train.teachers import WEIGHTS, TeacherStore
from kd_ray.train.trial import run_trial

REPO = Path(__file__).resolve().parents[2]
TINY = dict(dataset="mnist1d", teacher_arch="mlp", student_arch="mlp", teacher_epochs=2, teacher_members=1,
            epochs=2, eval_every=1, batch_size=256, device="cpu")
# A one-trial temperature_sweep: one teacher member, a 2-epoch student evaluated every epoch.
SCRIPT_ARGS = ["--set", "teacher_members=1", "--set", "teacher_epochs=2", "--set", "epochs=2", "--set", "eval_every=1",
               "--set", "batch_size=256", "--set", "temperature=4", "--seeds", "1", "--quiet"]


def tiny(**changes) -> TrialConfig:
    return TrialConfig(**{**TINY, **changes})


def trial_dirs(study_dir: Path, prefix: str = "_trainable") -> list[Path]:
    if not study_dir.is_dir():
        return []
    return sorted(p for p in study_dir.iterdir() if p.is_dir() and p.name.startswith(prefix))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"kd_ray_reliability_{name}", REPO / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- no Ray: the resume path a retried trial takes -------------------------------------------------


def test_a_trial_resumed_from_its_last_epoch_checkpoint_keeps_its_final_metrics(
    base_cfg, session_store, shared_teacher
):
    """A process that dies after the last epoch's checkpoint but before the final report is retried
    from that checkpoint: nothing is left to train, and the final metrics must still be the student's."""
    cfg = base_cfg.replace(epochs=2, eval_every=1)
    saved: list[tuple[dict, bytes]] = []

    def on_eval(metrics, state):
        buffer = io.BytesIO()
        torch.save(state, buffer)  # what the trainable writes into its Ray Tune checkpoint
        saved.append((metrics, buffer.getvalue()))

    first = run_trial(cfg, on_eval, store=session_store)
    assert [m["epoch"] for m, _ in saved] == [1, 2]
    last = torch.load(io.BytesIO(saved[-1][1]), map_location="cpu", weights_only=True)

    def no_more_epochs(metrics, state):
        raise AssertionError(f"epoch {metrics['epoch']} was trained again")

    again = run_trial(cfg, no_more_epochs, resume=last, store=session_store)
    assert again["status"] == "TERMINATED" and again["error"] is None
    assert again["epochs_completed"] == 2
    for key in FINAL_METRICS:
        assert math.isfinite(again[key]), key
        assert again[key] == pytest.approx(first[key], abs=1e-6), key
    assert again["train_time_s"] >= saved[-1][0]["train_time_s"]


# --- on a real local Ray ----------------------------------------------------------------------------




def test_epochs_reported_twice_after_a_lost_process_are_one_row(ray_local, tmp_path):
    from ray import tune

    from kd_ray.study.live_tables import collect_rows

    def flaky(config):  # defined here so that Ray ships it by value to its workers
        """Reports epoch 1 with a checkpoint, epoch 2 without one, then its process dies; the retry
        resumes from epoch 1's checkpoint and reports epoch 2 again with a different loss."""
        import os
        import tempfile
        from pathlib import Path

        from ray import tune

        if tune.get_checkpoint() is None:
            with tempfile.TemporaryDirectory() as directory:
                Path(directory, "state").write_text("1")
                tune.report({"epoch": 1, "train_loss": 1.0}, checkpoint=tune.Checkpoint.from_directory(directory))
            tune.report({"epoch": 2, "train_loss": 2.0})  # logged by the driver; no checkpoint of it survives
            os._exit(1)
        tune.report({"epoch": 2, "train_loss": 0.5})
        tune.report({"epoch": 2, "final": True, "status": "TERMINATED", "epochs_completed": 2})

    tuner = tune.Tuner(
        flaky,
        run_config=tune.RunConfig(name="flaky", storage_path=str(tmp_path), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    results = tuner.fit()
    assert results.num_errors == 0 and results.num_terminated == 1
    logged = epoch_reports(trial_dirs(tmp_path / "flaky", "flaky")[0])
    assert [r["epoch"] for r in logged] == [1, 2, 2]  # epoch 2 really was reported twice
    assert len({r["pid"] for r in logged}) == 2  # by two processes
    trials, epochs = collect_rows("flaky", results)
    assert len(trials) == 1 and trials[0]["status"] == "TERMINATED"
    assert [(e["epoch"], e["train_loss"]) for e in epochs] == [(1, 1.0), (2, 0.5)]  # the report that stands


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    """One storage for the module's studies, so that they share its teacher store."""
    return tmp_path_factory.mktemp("reliability_storage")


def test_a_killed_trial_worker_is_retried_from_its_last_checkpoint(ray_local, storage):
    """SIGKILL a trial's worker process (its pid, from the trial's own reports) mid-run: Ray Tune retries
    the trial from its last checkpoint in a new process; the study completes with complete tables."""
    # result.json reaches the study's directory in bursts of several reports, later under load: the
    # window (a checkpoint behind, the end well ahead) must span more epochs than a burst.
    epochs, every = 200, 10
    study = Study(name="worker_kill", base=tiny(epochs=epochs, eval_every=every), axes={"temperature": [1.0, 4.0]},
                  storage=str(storage), max_failures=2, verbose=0)
    study_dir = storage / "worker_kill"
    mid_run = acting_on_a_report(lambda: trial_dirs(study_dir), lambda report: 30 <= report["epoch"] <= 160,
                                 lambda report: os.kill(report["pid"], signal.SIGKILL), join_s=10)
    with mid_run as killed:
        result = study.run()
    assert killed, "no trial was caught between epochs 30 and 160"

    assert (result.partial, result.finished, result.expected) == (False, 2, 2)
    trials = pd.read_parquet(study_dir / "trials.parquet")
    table = pd.read_parquet(study_dir / "epochs.parquet")
    assert len(trials) == 2 and trials["trial_id"].is_unique
    assert (trials["status"] == "TERMINATED").all(), trials[["status", "error"]]
    assert (trials["epochs_completed"] == epochs).all()
    expected = list(range(every, epochs + 1, every))
    assert len(table) == 2 * len(expected)  # exactly one row per trial-epoch
    for trial_id, rows in table.groupby("trial_id"):
        assert sorted(rows["epoch"]) == expected, trial_id
    for column in ("test_acc", "test_agreement", "train_agreement"):
        assert trials[column].between(0, 1).all() and table[column].between(0, 1).all(), column

    # The killed trial: epochs up to its last checkpoint came from the killed process, the rest from
    # one new process that started right after that checkpoint, so no epoch before it was run again.
    logged = epoch_reports(study_dir / killed["trial"])
    before = [r["epoch"] for r in logged if r["pid"] == killed["pid"]]
    after = [r["epoch"] for r in logged if r["pid"] != killed["pid"]]
    assert before == list(range(every, max(before) + 1, every))
    assert max(before) >= killed["epoch"] - every >= 20
    # The new process first reports its checkpoint's epoch again (the killed process's last report, or
    # a later checkpoint whose report Tune never took, whose row this recovers), then goes on.
    again = after[0]
    assert again in (max(before), max(before) + every)
    assert after[1:] == list(range(again + every, epochs + 1, every))
    assert len({r["pid"] for r in logged if r["pid"] != killed["pid"]}) == 1
    final = reports(study_dir / killed["trial"])[-1]
    assert final["final"] and final["pid"] != killed["pid"]
    # The table's row of the killed trial is its final report; its training time spans both processes.
    row = trials.set_index("trial_id").loc[final["trial_id"]]
    assert row["test_agreement"] == pytest.approx(final["test_agreement"])
    assert row["train_time_s"] >= logged[-1]["train_time_s"] > 0
    other = next(d for d in trial_dirs(study_dir) if d.name != killed["trial"])
    assert len({r["pid"] for r in reports(other)}) == 1  # the other trial was not disturbed


def test_a_diverging_trial_is_diverged_and_the_analysis_leaves_it_out(ray_local, storage, capsys):
    arms = [{"lr": 1e6, "lr_schedule": "constant"}, {"lr": 0.05, "lr_schedule": "cosine"}]
    result = Study(name="diverge", base=tiny(epochs=3), arms=arms, storage=str(storage), verbose=0).run()
    assert (result.partial, result.finished, result.expected) == (False, 2, 2)
    study_dir = storage / "diverge"
    trials = pd.read_parquet(study_dir / "trials.parquet").set_index("lr")
    assert trials.loc[1e6, "status"] == "DIVERGED"
    assert "non-finite" in trials.loc[1e6, "error"] and "epoch 1" in trials.loc[1e6, "error"]
    assert trials.loc[1e6, "epochs_completed"] == 0
    assert trials.loc[0.05, "status"] == "TERMINATED" and pd.isna(trials.loc[0.05, "error"])
    assert trials.loc[0.05, "epochs_completed"] == 3  # the other trial went on to the end
    assert 0 <= trials.loc[0.05, "test_agreement"] <= 1
    table = pd.read_parquet(study_dir / "epochs.parquet")
    assert sorted(table["epoch"]) == [1, 2, 3] and set(table["trial_id"]) == {trials.loc[0.05, "trial_id"]}

    capsys.readouterr()
    df = analysis.load_trials(study_dir)
    summary = analysis.summarize(df, by=["lr"], metrics=["test_agreement"])
    assert "excluded 1 trial (DIVERGED: 1)" in capsys.readouterr().out
    by_lr = summary.set_index("lr")
    assert (by_lr.loc[1e6, "n_trials"], by_lr.loc[1e6, "n_excluded"], by_lr.loc[1e6, "n"]) == (0, 1, 0)
    assert (by_lr.loc[0.05, "n_trials"], by_lr.loc[0.05, "n_excluded"], by_lr.loc[0.05, "n"]) == (1, 0, 1)
    assert by_lr.loc[0.05, "mean"] == pytest.approx(trials.loc[0.05, "test_agreement"])
    kept = analysis.summarize(df, by=["lr"], metrics=["test_acc"], include_failed=True, verbose=False)
    assert kept.set_index("lr").loc[1e6, "n_trials"] == 1  # kept only when asked


def train_member(cfg: TrialConfig, store: TeacherStore) -> str:
    """Train member 0 of ``cfg``'s teacher into ``store`` in this process (no Ray)."""
    from kd_ray.data.datasets import load_arrays
    from kd_ray.train.teachers import ensure_members

    [key] = ensure_members(cfg, store, load_arrays(cfg.dataset), torch.device("cpu"), members=[0])
    return key


def test_retrain_teachers_replaces_a_corrupted_member_once(ray_local, tmp_path, capsys):
    script = load_script("temperature_sweep")
    argv = [*SCRIPT_ARGS, "--storage", str(tmp_path)]
    store = TeacherStore(tmp_path / "teachers")
    key = train_member(tiny(temperature=4.0), store)  # the member the script's study needs
    weights = Path(store.member_path(key)) / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated, as by a full disk
    capsys.readouterr()

    assert script.main([*argv, "--name", "second"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and str(weights) in err[0] and "--retrain-teachers" in err[0], err
    assert not (tmp_path / "second").exists()

    assert script.main([*argv, "--name", "second", "--retrain-teachers"]) == 0
    out = capsys.readouterr().out
    assert "1 members needed, 0 in the store" in out  # deleted, then trained once before the trials
    assert f"member {key} ready (1/1)" in out
    assert store.keys() == [key] and store.verify(key) == []
    trials = pd.read_parquet(tmp_path / "second" / "trials.parquet")
    assert len(trials) == 1 and (trials["status"] == "TERMINATED").all()
    assert trials["teacher_key"].item() == tiny(temperature=4.0).teacher_key()


def test_corrupt_data_found_by_a_ray_task_is_one_line_and_exit_2(ray_local, tmp_path, capsys):
    """The teacher tasks meet a CIFAR-10 archive whose checksum is wrong: the study stops with the data
    error itself (where the file belongs, what checksum it needs), not a remote traceback, and the bad
    file is never used."""
    from kd_ray.data.datasets import CIFAR_ARCHIVES

    data = tmp_path / "data"
    data.mkdir()
    archive = data / CIFAR_ARCHIVES["cifar10"].filename
    archive.write_bytes(b"not the CIFAR-10 archive" * 100)
    code = load_script("temperature_sweep").main(
        [*SCRIPT_ARGS, "--dataset", "cifar10", "--data-dir", str(data), "--storage", str(tmp_path / "s")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("temperature_sweep: error:") and str(archive) in err[0]
    assert "md5" in err[0] and CIFAR_ARCHIVES["cifar10"].md5 in err[0]
    assert sorted(p.name for p in data.iterdir()) == [archive.name]  # nothing was built from it
    assert not trial_dirs(tmp_path / "s" / "temperature_sweep")
    assert TeacherStore(tmp_path / "s" / "teachers").keys() == []

