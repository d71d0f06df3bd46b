"""Losing a node: a two-node Ray cluster made on this machine with Ray's own
``ray.cluster_utils.Cluster`` (a head and a second node, one CPU each, one storage directory that both
see, as a shared filesystem or bucket would be). The second node is removed, its raylet and workers
killed, while one of its trials is mid-run: the trial is rescheduled on the head, goes on from its
last checkpoint, and the study completes with complete tables. Teacher members are trained as Ray
tasks on both nodes into the one teacher store and read back by trials on both nodes.

The cluster uses Ray's token authentication (RAY_AUTH_MODE=token, the token in RAY_AUTH_TOKEN), as a
cluster reachable from a network should; the study joins it with the same two variables.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pandas as pd
import pytest
from ray_results import acting_on_a_report, epoch_reports

from kd_ray.config import TrialConfig
from kd_ray.study import Study
from kd_ray.train.teachers import TeacherStore, needed_members

# 120 epochs, evaluated every 10: result.json reaches the storage in bursts under load, and the node may be
# lost at any of the ten evaluations from epoch 10 to 100 (at 60 epochs the four of its window were once all missed).
EPOCHS, EVERY = 120, 10
BASE = TrialConfig(dataset="mnist1d", teacher_arch="mlp", student_arch="mlp", teacher_epochs=2, teacher_members=2,
                   epochs=EPOCHS, eval_every=EVERY, batch_size=128, device="cpu")


def trial_dirs(study_dir: Path) -> list[Path]:
    if not study_dir.is_dir():
        return []
    return sorted(p for p in study_dir.iterdir() if p.is_dir() and p.name.startswith("_trainable"))


@pytest.fixture
def two_nodes():
    from ray._private.authentication_test_utils import reset_auth_token_state
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))  # never written to ~/.ray/auth_token
        mp.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        mp.delenv("RAY_ADDRESS", raising=False)
        reset_auth_token_state()  # this process may have used Ray without a token before
        # The GCS declares a node dead after this many failed health checks this far apart (Ray's
        # defaults: 5 x 3 s); a little faster here so that the test does not wait 15 s for it.
        health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "num_gpus": 0, "include_dashboard": False, "_system_config": health})
        try:
            worker = cluster.add_node(num_cpus=1, num_gpus=0)
            cluster.wait_for_nodes()
            yield cluster, cluster.head_node, worker
        finally:
            cluster.shutdown()
    reset_auth_token_state()  # back to the environment as it was


def test_a_lost_node_s_trials_finish_on_the_surviving_node(two_nodes, tmp_path):
    import ray

    cluster, head, worker = two_nodes
    study = Study(name="two_nodes", base=BASE, axes={"temperature": [1.0, 4.0, 8.0]}, storage=str(tmp_path),
                  address=cluster.address, max_failures=2, verbose=0, pack="off")  # a Ray Tune trial per config
    study_dir = tmp_path / "two_nodes"

    def on_the_second_node_before_its_last_evaluations(report: dict) -> bool:
        return report["node_id"] == worker.node_id and EVERY <= report["epoch"] < EPOCHS - EVERY

    mid_trial = acting_on_a_report(lambda: trial_dirs(study_dir), on_the_second_node_before_its_last_evaluations,
                                   lambda report: cluster.remove_node(worker, allow_graceful=False))
    with mid_trial as lost:
        result = study.run()
    assert not ray.is_initialized()  # the study connected to the cluster and disconnected again
    assert lost, "no trial on the second node was caught before its last evaluations"
    assert not worker.any_processes_alive()

    assert (result.partial, result.finished, result.expected) == (False, 3, 3)
    trials = pd.read_parquet(study_dir / "trials.parquet")
    table = pd.read_parquet(study_dir / "epochs.parquet")
    assert len(trials) == 3 and trials["trial_id"].is_unique
    assert (trials["status"] == "TERMINATED").all(), trials[["status", "error"]]
    assert sorted(trials["temperature"]) == [1.0, 4.0, 8.0]
    assert (trials["epochs_completed"] == EPOCHS).all()
    expected = list(range(EVERY, EPOCHS + 1, EVERY))
    assert len(table) == 3 * len(expected)
    for trial_id, rows in table.groupby("trial_id"):
        assert sorted(rows["epoch"]) == expected, trial_id
    for column in ("test_acc", "test_agreement", "train_agreement"):
        assert trials[column].between(0, 1).all(), column

    # The lost trial: its epochs up to the last checkpoint ran on the second node, the rest on the
    # head, right after that checkpoint (nothing before it ran again).
    logged = epoch_reports(study_dir / lost["trial"])
    # The restored trial first reports its checkpoint's epoch again, with the lost node's report.
    on_lost = sorted({r["epoch"] for r in logged if r["node_id"] == worker.node_id})
    on_head = [r["epoch"] for r in logged if r["node_id"] == head.node_id]
    assert {r["node_id"] for r in logged} == {worker.node_id, head.node_id}
    assert on_lost == list(range(EVERY, max(on_lost) + 1, EVERY)) and max(on_lost) >= lost["epoch"] - EVERY
    assert on_head == list(range(max(on_lost) + EVERY, EPOCHS + 1, EVERY))
    # Trials ran on both nodes before the loss, and on the head only after it.
    nodes = {r["node_id"] for d in trial_dirs(study_dir) for r in epoch_reports(d)}
    assert nodes == {head.node_id, worker.node_id}

    # One teacher store for both nodes: the two members, sound, and one teacher for every trial.
    store = TeacherStore(tmp_path / "teachers")
    assert set(store.keys()) == set(needed_members([BASE]))
    assert all(store.verify(key) == [] for key in store.keys())
    assert (trials["teacher_key"] == BASE.teacher_key()).all()
    assert trials["teacher_test_acc"].nunique() == 1
