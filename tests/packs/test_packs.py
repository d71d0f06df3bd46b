"""A pack against its students trained alone, with no Ray: the same trajectories up to float32 rounding,
the same rows, a diverging student that leaves the others untouched, and resumes that change nothing."""

from __future__ import annotations

import math

import pytest
import torch
from pack_runs import pack_weights, recorded, same, tiny

from kd_ray.packs.run import FUSED, run_pack
from kd_ray.tables import CKA_METRICS, TEACHER_METRICS, TRIALS_SCHEMA, VALIDATION_METRICS
from kd_ray.train.setup import FINAL_METRICS
from kd_ray.train.trial import run_trial

# Students that differ in everything a pack lets them differ in.
VARIED = [dict(temperature=1.0), dict(temperature=4.0, teacher_members=1), dict(alpha=0.5, lr=0.1),
          dict(optimizer="adam", weight_decay=0.0), dict(epochs=2, lr_schedule="constant")]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("pack_teachers"))


def test_over_the_first_steps_a_pack_is_its_students_trained_alone(store):
    # Three optimizer steps: float32 rounding has not yet grown (training is chaotic: by epoch 1, at
    # lr 0.1, a thread count alone moves a weight by 1e-3).
    configs = [tiny(steps=3, **changes) for changes in VARIED[:4]]
    _, pack_checkpoints = recorded(configs, store)
    weights = pack_weights(pack_checkpoints[1])
    for k, cfg in enumerate(configs):
        checkpoints: dict[int, dict] = {}
        run_trial(cfg, lambda metrics, state, c=checkpoints: c.update({metrics["epoch"]: state}), store=store)
        # Adam divides by the root of the squared-gradient average: a weight whose gradients are near zero
        # moves on float rounding alone by up to lr a step, so its weights are held to a tenth of lr.
        atol = 0.1 * cfg.lr if cfg.optimizer == "adam" else 1e-5
        for name, value in checkpoints[1]["train_state"]["model"].items():
            torch.testing.assert_close(weights[k][name], value, rtol=1e-4, atol=atol, msg=f"student {k}: {name}")


def test_a_pack_ends_where_its_students_trained_alone_end(store):
    configs = [tiny(**changes) for changes in VARIED]
    packed, pack_checkpoints = recorded(configs, store)
    alone = [(run_trial(cfg, store=store), None) for cfg in configs]
    for cfg, result, (lone, _) in zip(configs, packed, alone):
        assert result["status"] == lone["status"] == "TERMINATED"
        assert result["teacher_key"] == lone["teacher_key"] == cfg.teacher_key()
        for name in ("epochs_completed", "student_steps", "teacher_steps"):
            assert result[name] == lone[name], name
        for metric in TEACHER_METRICS:
            assert result[metric] == pytest.approx(lone[metric], abs=1e-6), metric
        for metric in ("test_acc", "test_agreement", "train_agreement", "aug_train_agreement", "val_acc",
                       "val_agreement"):
            assert result[metric] == pytest.approx(lone[metric], abs=0.02), metric  # run-to-run noise
        assert result["cka_stage1"] == pytest.approx(lone["cka_stage1"], abs=0.02)
        assert set(result) >= set(FINAL_METRICS) | set(CKA_METRICS) | {"pack_id", "pack_size", "pack_time_share"}
        assert all(math.isfinite(result[metric]) for metric in (*VALIDATION_METRICS, *TEACHER_METRICS))
        assert set(result) - {"error"} <= set(TRIALS_SCHEMA.names) | {"epoch"}
        assert result["fast_path"] == f"fp32, {FUSED} (feature-major)" and result["pack_size"] == len(configs)
    assert sum(r["pack_time_share"] for r in packed) == pytest.approx(1.0)
    # The student of two epochs left the pack after its second; it took a smaller share of the time.
    assert packed[4]["epochs_completed"] == 2 and packed[4]["pack_time_share"] < packed[0]["pack_time_share"]
    assert pack_checkpoints[3]["pack"]["active"] == [0, 1, 2, 3]


def test_a_diverging_student_leaves_its_pack_mates_bit_identical(store):
    healthy = [tiny(temperature=1.0), tiny(temperature=4.0)]
    diverging = tiny(lr=1e6, lr_schedule="constant")
    with_it = run_pack([healthy[0], diverging, healthy[1]], store=store)
    without = run_pack(healthy, store=store)
    assert with_it[1]["status"] == "DIVERGED" and "non-finite" in with_it[1]["error"]
    assert math.isnan(with_it[1]["cka_stage1"]) and with_it[1]["converged"] is None
    for mine, theirs in zip([with_it[0], with_it[2]], without):
        assert mine["status"] == "TERMINATED"
        for metric in (*FINAL_METRICS, *CKA_METRICS, "convergence_delta"):
            assert same(mine[metric], theirs[metric]), metric


@pytest.mark.parametrize("epoch", [1, 3])
def test_a_resumed_pack_ends_as_an_uninterrupted_one(store, epoch):
    configs = [tiny(temperature=1.0), tiny(temperature=4.0, epochs=2), tiny(alpha=0.3)]
    straight, checkpoints = recorded(configs, store)
    resumed = run_pack(configs, resume=checkpoints[epoch], store=store)
    for a, b in zip(straight, resumed):
        for metric in (*FINAL_METRICS, *CKA_METRICS, "epochs_completed", "convergence_delta"):
            assert same(a[metric], b[metric]), metric


def test_the_control_of_a_pack_is_distilled_from_the_independent_ensemble(store):
    configs = [tiny(control=True, alpha=0.0), tiny(control=True, alpha=0.5)]
    packed = run_pack(configs, store=store)
    alone = [run_trial(cfg, store=store) for cfg in configs]
    for mine, lone in zip(packed, alone):
        assert 0 < mine["control_test_agreement"] < 1
        assert mine["control_test_agreement"] == pytest.approx(lone["control_test_agreement"], abs=0.03)


def test_under_precision_auto_the_layout_is_measured_and_both_layouts_agree(store):
    configs = [tiny(precision="auto", temperature=1.0), tiny(precision="auto", temperature=4.0)]
    packed = run_pack(configs, store=store)
    precision = packed[0]["precision_used"]
    assert packed[0]["fast_path"] in (f"{precision}, {FUSED} (feature-major)", f"{precision}, {FUSED} (channel blocks)")
    fixed = run_pack([cfg.replace(precision="fp32") for cfg in configs], store=store)
    for a, b in zip(packed, fixed):
        assert a["test_agreement"] == pytest.approx(b["test_agreement"], abs=0.02)


def test_a_bf16_pack_runs_its_forward_passes_in_bf16(store):
    configs = [tiny(precision="bf16", temperature=1.0), tiny(precision="bf16", temperature=4.0)]
    packed = run_pack(configs, store=store)
    alone = run_trial(configs[1], store=store)
    assert {r["precision_used"] for r in packed} == {"bf16"} == {alone["precision_used"]}
    assert packed[1]["test_agreement"] == pytest.approx(alone["test_agreement"], abs=0.03)


def test_every_evaluation_of_a_pack_reports_the_validation_metrics_and_none_without_a_split(store):
    reports: list[dict] = []
    configs = [tiny(temperature=1.0, epochs=2), tiny(temperature=4.0, epochs=2)]
    run_pack(configs, lambda epoch, by_student, state: reports.extend(by_student.values()), store=store)
    assert len(reports) == 4
    for metrics in reports:
        assert all(0 <= metrics[m] <= 1 for m in ("val_acc", "val_agreement", "val_ece"))
        assert all(metrics[m] >= 0 for m in ("val_nll", "val_kl"))
    packed = run_pack([cfg.replace(val_fraction=0.0) for cfg in configs], store=store)
    for result in packed:
        assert result["status"] == "TERMINATED" and all(math.isnan(result[m]) for m in VALIDATION_METRICS)
        assert math.isfinite(result["test_agreement"])


def test_configs_that_differ_in_more_than_their_students_and_streams_are_refused(store):
    with pytest.raises(ValueError, match="share everything but their student fields"):
        run_pack([tiny(batch_size=256), tiny(batch_size=128)], store=store)
