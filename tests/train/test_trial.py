"""Tests for kd_ray.train.trial and kd_ray.train.setup: one distillation trial end to end, resuming, control,
divergence, refusals."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

import kd_ray
from kd_ray.config import ConfigError, TrialConfig
from kd_ray.data.datasets import DATASET_INFO, load_arrays
from kd_ray.data.splits import split_indices, val_indices
from kd_ray.models.archs import build_model
from kd_ray.packs.run import run_pack
from kd_ray.tables import EPOCHS_SCHEMA, METRICS, TEACHER_METRICS, VALIDATION_METRICS
from kd_ray.train import setup
from kd_ray.train import trial as trial_module
from kd_ray.train.distill import AugmentSpec, Recipe, TrainState, batches_per_epoch, fit, make_optimizer, training_batch
from kd_ray.train.setup import (
    FINAL_METRICS,
    TrialData,
    check_runnable,
    data_sizes,
    fast_path,
    full_batch_notes,
    probe_batch_size,
)
from kd_ray.train.teachers import member_key, member_steps, teacher_indices
from kd_ray.train.trial import run_trial

PROVENANCE = ("teacher_key", "kd_ray_version", "git_sha", "torch_version", "ray_version", "config_json")
STUDENT_METRICS = tuple(k for k in FINAL_METRICS if not k.startswith("teacher_"))


def test_final_metrics_are_the_tables_epoch_metrics() -> None:
    assert FINAL_METRICS == tuple(m for m in METRICS if m in EPOCHS_SCHEMA.names)
    assert "test_agreement" in FINAL_METRICS and "control_test_agreement" not in FINAL_METRICS


def assert_metrics_in_range(m: dict) -> None:
    for key in ("test_acc", "test_agreement", "train_agreement", "aug_train_agreement", "teacher_test_acc",
                "val_acc", "val_agreement", "teacher_train_acc", "teacher_test_confidence"):
        assert 0.0 <= m[key] <= 1.0, key
    for key in ("test_kl", "train_kl", "val_kl"):
        assert m[key] >= 0.0, key
    for key in ("test_nll", "teacher_test_nll", "val_nll"):
        assert m[key] > 0.0 and math.isfinite(m[key]), key
    for key in ("test_ece", "teacher_test_ece", "val_ece"):
        assert 0.0 <= m[key] <= 1.0, key


@pytest.fixture(scope="module")
def full_run(base_cfg, shared_teacher):
    """A default-shaped mnist1d trial (conv1d teacher ensemble and student, baseline augmentation,
    temperature 4, cosine SGD), small: 6 student epochs, evaluated every 2."""
    cfg = base_cfg.replace(epochs=6, eval_every=2)
    reports: list[tuple[dict, dict | None]] = []
    result = run_trial(cfg, on_eval=lambda metrics, checkpoint: reports.append((metrics, checkpoint)))
    return cfg, result, reports


def test_full_trial_metrics(full_run, kd_dirs) -> None:
    cfg, result, _ = full_run
    assert result["status"] == "TERMINATED" and result["error"] is None
    assert result["epochs_completed"] == cfg.epochs
    assert result["teacher_test_acc"] > 0.5  # chance is 0.1
    assert_metrics_in_range(result)
    assert result["test_agreement"] > 0.5
    assert result["train_time_s"] > 0
    # Data and teachers came from the session's directories (KD_RAY_DATA, KD_RAY_TEACHERS).
    assert any(kd_dirs["data"].glob("mnist1d*.npz"))
    assert (kd_dirs["teachers"] / "members" / member_key(cfg, 0)).is_dir()


def test_step_counts_and_convergence_are_recorded(full_run, mnist1d_arrays) -> None:
    cfg, result, reports = full_run
    n = data_sizes(cfg).pool  # the train examples left beside the validation split
    assert n == len(mnist1d_arrays.y_train) - round(cfg.val_fraction * len(mnist1d_arrays.y_train))
    assert result["student_steps"] == cfg.epochs * batches_per_epoch(n, cfg.batch_size)
    assert result["teacher_steps"] == cfg.teacher_epochs * batches_per_epoch(n, cfg.teacher_batch_size)
    assert result["teacher_steps"] == member_steps(cfg, mnist1d_arrays.y_train)
    assert result["teacher_train_size"] == data_sizes(cfg).teacher == n
    assert result["distill_size"] == data_sizes(cfg).distill == n
    # 6 epochs: the half-way point is the end of epoch 3, measured then (no evaluation there) and
    # carried in every later checkpoint.
    references = [c["convergence_reference"] for m, c in reports if m["epoch"] > 3]
    assert references and all(r == pytest.approx(references[0]) for r in references)
    assert all("convergence_reference" not in c or c["convergence_reference"] is None
               for m, c in reports if m["epoch"] < 3)
    assert result["convergence_delta"] == pytest.approx(result["train_agreement"] - references[0], abs=1e-6)
    assert result["converged"] == (abs(result["convergence_delta"]) < setup.CONVERGED_WITHIN)


def test_every_report_and_the_row_carry_the_validation_and_teacher_metrics(full_run) -> None:
    cfg, result, reports = full_run
    assert cfg.val_fraction > 0
    for metrics in [m for m, _ in reports] + [result]:
        for key in (*VALIDATION_METRICS, *TEACHER_METRICS):
            assert math.isfinite(metrics[key]), key
    assert {m[key] for m, _ in reports for key in ("teacher_train_acc", "teacher_test_confidence")} == {
        result["teacher_train_acc"], result["teacher_test_confidence"]}  # measured once per teacher


def test_validation_metrics_are_the_test_ones_on_the_validation_examples(base_cfg, session_store,
                                                                          shared_teacher) -> None:
    from kd_ray.train.distill import predict, schedule
    from kd_ray.train.fastpath import FastPath
    from kd_ray.train.metrics import prediction_metrics
    from kd_ray.train.teachers import load_ensemble

    cpu = torch.device("cpu")
    data = TrialData(base_cfg, cpu, None)
    assert len(data.val_idx) == round(base_cfg.val_fraction * len(data.arrays.y_train))
    ensemble = load_ensemble(base_cfg, session_store, cpu)
    recipe = setup.student_recipe(base_cfg)
    state = trial_module.build_student_state(base_cfg, recipe, ensemble, data, cpu, None)
    evaluations = trial_module.StudentEvaluations(
        base_cfg, state, schedule(recipe, data.x.shape[0]), data, trial_module.TrialTeacher(ensemble, FastPath(), data),
        setup.TrainClock(None), None, None, None,
    )
    x_val = torch.as_tensor(data.arrays.x_train)[data.val_idx]
    y_val = torch.as_tensor(data.arrays.y_train)[data.val_idx]
    expected = prediction_metrics(predict(state.model, x_val), ensemble.log_probs(x_val), y_val)
    measured = evaluations.measure()
    for name, value in expected.items():
        assert measured[f"val_{name}"] == pytest.approx(value, abs=1e-5), name


def test_without_a_validation_split_the_validation_metrics_are_nan() -> None:
    cfg = TrialConfig(val_fraction=0.0, teacher_arch="mlp", student_arch="mlp", teacher_members=1, teacher_epochs=1,
                      epochs=1, device="cpu", precision="fp32")
    result = run_trial(cfg)
    assert result["status"] == "TERMINATED", result["error"]
    assert all(math.isnan(result[key]) for key in VALIDATION_METRICS)
    assert math.isfinite(result["test_agreement"]) and math.isfinite(result["teacher_train_acc"])
    assert result["teacher_key"] != cfg.replace(val_fraction=0.1).teacher_key()


def test_an_overfit_teacher_is_more_accurate_on_its_own_training_examples() -> None:
    # 180 training examples (teacher_fraction 0.05 of the 3,600 left beside the validation split), 60 epochs.
    cfg = TrialConfig(teacher_fraction=0.05, teacher_arch="mlp", student_arch="mlp", teacher_members=1,
                      teacher_epochs=60, epochs=1, device="cpu", precision="fp32")
    result = run_trial(cfg)
    assert 0.0 <= result["teacher_test_acc"] <= result["teacher_train_acc"] <= 1.0
    assert result["teacher_train_acc"] > result["teacher_test_acc"] + 0.2  # well above: it overfits
    assert 1 / 10 <= result["teacher_test_confidence"] <= 1.0  # the mean max probability is at least chance


def test_convergence_rule() -> None:
    # A delta of exactly the threshold (20 of 1000 samples, in float32) is not converged; within it is.
    assert setup.CONVERGED_WITHIN == 0.02
    assert setup.convergence(0.8909999847412109, 0.8709999918937683) == (0.02, False)
    assert setup.convergence(0.871, 0.8909999847412109) == (-0.02, False)
    assert setup.convergence(0.9, 0.885) == (0.015, True)
    for final, reference in ((float("nan"), 0.5), (None, 0.5), (0.5, None)):
        delta, converged = setup.convergence(final, reference)
        assert math.isnan(delta) and converged is None


def test_provenance(full_run) -> None:
    cfg, result, _ = full_run
    for key in PROVENANCE:
        assert result.get(key), key
    assert result["teacher_key"] == cfg.teacher_key()
    assert result["kd_ray_version"] == kd_ray.__version__
    assert result["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert TrialConfig.from_dict(json.loads(result["config_json"])) == cfg
    assert result["device_name"] == "cpu"


def test_on_eval_at_each_eval_epoch(full_run) -> None:
    cfg, result, reports = full_run
    assert [m["epoch"] for m, _ in reports] == [2, 4, 6]
    for metrics, checkpoint in reports:
        assert checkpoint is not None
        assert checkpoint["train_state"]["epoch"] == metrics["epoch"]
        for key in ("lr", "train_loss", "train_time_s", *FINAL_METRICS):
            assert key in metrics, key
        assert_metrics_in_range(metrics)
        # Checkpoints survive the trip to disk with a weights-only loader.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    # Checkpoints are snapshots of their epoch, not views of the live student.
    first, last = reports[0][1]["train_state"]["model"], reports[-1][1]["train_state"]["model"]
    name = next(k for k, v in first.items() if v.is_floating_point() and v.dim() > 1)
    assert not torch.equal(first[name], last[name])
    assert reports[0][0]["lr"] > reports[-1][0]["lr"]
    final = reports[-1][0]
    for key in FINAL_METRICS:
        assert final[key] == result[key], key


def test_resume_from_a_mid_run_checkpoint(full_run) -> None:
    cfg, result, reports = full_run
    checkpoint = reports[0][1]
    assert checkpoint["train_state"]["epoch"] == 2
    resumed_reports: list[dict] = []
    resumed = run_trial(cfg, on_eval=lambda m, c: resumed_reports.append(m), resume=checkpoint)
    assert [m["epoch"] for m in resumed_reports] == [4, 6]
    assert resumed["status"] == "TERMINATED"
    assert resumed["epochs_completed"] == cfg.epochs
    for key in (*FINAL_METRICS, "convergence_delta", "converged"):
        assert resumed[key] == result[key], key
    assert resumed["train_time_s"] >= checkpoint["train_time_s"]


def test_resume_past_the_three_quarter_point_keeps_the_convergence_reference(full_run) -> None:
    cfg, result, reports = full_run
    checkpoint = reports[1][1]  # epoch 4: the three-quarter point of 6 epochs
    assert checkpoint["train_state"]["epoch"] == 4 and checkpoint["convergence_reference"] is not None
    resumed = run_trial(cfg, resume=checkpoint)
    assert resumed["convergence_delta"] == result["convergence_delta"]
    assert resumed["converged"] == result["converged"]


def test_digits_mixup_with_label_loss() -> None:
    cfg = TrialConfig(
        dataset="digits", teacher_arch="smallcnn", student_arch="smallcnn", teacher_members=1,
        teacher_epochs=3, augmentation="mixup", alpha=0.3, mixup_alpha=0.4, epochs=2, eval_every=2,
        device="cpu",
    )
    result = run_trial(cfg)
    assert result["status"] == "TERMINATED", result["error"]
    assert result["epochs_completed"] == 2
    assert_metrics_in_range(result)
    assert "control_test_agreement" not in result


def test_control(base_cfg, session_store, shared_teacher) -> None:
    cfg = base_cfg.replace(teacher_members=1, control=True, epochs=2, eval_every=2)
    result = run_trial(cfg, store=session_store)
    assert result["status"] == "TERMINATED"
    assert 0.0 <= result["control_test_agreement"] <= 1.0
    control_key = member_key(cfg, 0, "control")
    assert session_store.has(control_key) and control_key not in shared_teacher
    spec = session_store.manifest(control_key)["spec"]
    assert spec["role"] == "control" and spec["teacher_seed"] == cfg.teacher_seed and spec["member"] == 0


def test_diverging_trial_reports_instead_of_raising(base_cfg, shared_teacher) -> None:
    cfg = base_cfg.replace(lr=1e6, lr_schedule="constant", epochs=2)
    reports: list[dict] = []
    result = run_trial(cfg, on_eval=lambda m, c: reports.append(m))
    assert result["status"] == "DIVERGED"
    assert "non-finite" in result["error"]
    assert result["epochs_completed"] == 0 and reports == []
    assert all(math.isnan(result[k]) for k in STUDENT_METRICS)
    assert math.isnan(result["convergence_delta"]) and result["converged"] is None
    assert result["teacher_test_acc"] > 0.5
    assert TrialConfig.from_dict(json.loads(result["config_json"])) == cfg


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"teacher_arch": "conv1d", "student_arch": "conv1d", "augmentation": "colorjitter"}, "augmentation"),
        ({"dataset": "digits", "teacher_arch": "smallcnn", "student_arch": "smallcnn",
          "augmentation": "colorjitter"}, "augmentation"),
        ({"dataset": "digits", "teacher_arch": "conv1d", "student_arch": "smallcnn"}, "teacher_arch"),
        ({"dataset": "digits", "teacher_arch": "smallcnn", "student_arch": "conv1d"}, "student_arch"),
        ({"teacher_arch": "conv1d", "student_arch": "preresnet20"}, "student_arch"),
        ({"teacher_arch": "preresnet20", "student_arch": "preresnet20"}, "teacher_arch"),
    ],
)
def test_check_runnable_refuses(changes: dict, field: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrialConfig(device="cpu", **changes)
    with pytest.raises(ConfigError) as info:
        check_runnable(cfg)
    message = str(info.value)
    assert message.startswith(f"{field}=")
    assert cfg.dataset in message

    def no_compute(*args, **kwargs):
        raise AssertionError("run_trial loaded data for a config it should refuse")

    monkeypatch.setattr(trial_module, "TrialData", no_compute)
    with pytest.raises(ConfigError, match=f"^{field}="):
        run_trial(cfg)


@pytest.mark.parametrize(
    "changes",
    [{}, {"dataset": "digits", "teacher_arch": "smallcnn", "student_arch": "smallcnn", "augmentation": "combaug"},
     {"teacher_arch": "conv1d", "student_arch": "mlp", "augmentation": "mixup"}],
)
def test_check_runnable_accepts(changes: dict) -> None:
    check_runnable(TrialConfig(device="cpu", **changes))


def test_holdout_distillation_with_extra_data(base_cfg, kd_dirs: dict[str, Path]) -> None:
    cfg = base_cfg.replace(
        teacher_split="half", distill_split="holdout", extra_data=200, teacher_epochs=3, teacher_members=1,
        epochs=2, eval_every=2,
    )
    data = TrialData(cfg, torch.device("cpu"), None)
    pool = len(data.arrays.y_train) - len(data.val_idx)
    teacher_idx = teacher_indices(cfg, data.arrays.y_train)
    assert len(teacher_idx) == pool // 2 and torch.equal(data.teacher_idx, torch.as_tensor(teacher_idx))
    assert set(teacher_idx.tolist()).isdisjoint(data.distill_idx.tolist())
    assert set(data.val_idx.tolist()).isdisjoint(teacher_idx.tolist() + data.distill_idx.tolist())
    assert data.x.shape[0] == data.y.shape[0] == pool - pool // 2 + 200

    result = run_trial(cfg)
    assert result["status"] == "TERMINATED", result["error"]
    assert result["teacher_key"] == cfg.teacher_key() != base_cfg.teacher_key()
    assert (result["teacher_train_size"], result["distill_size"]) == (pool // 2, pool - pool // 2 + 200)
    assert_metrics_in_range(result)
    assert any(kd_dirs["data"].glob("mnist1d_extra*_n200_*.npz"))


# --- sizes judged against the data, before any compute --------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["mnist1d", "digits", "mnist"])
def test_train_sizes_are_the_offline_datasets_own(dataset: str) -> None:
    assert DATASET_INFO[dataset].train_size == len(load_arrays(dataset).y_train)


@pytest.mark.parametrize("changes", [
    {}, {"distill_fraction": 0.013}, {"teacher_split": "half"}, {"teacher_split": "half", "distill_split": "holdout"},
    {"teacher_split": "half", "distill_split": "both", "distill_fraction": 0.3},
    {"teacher_fraction": 0.05}, {"teacher_fraction": 0.05, "distill_split": "both", "distill_fraction": 0.5},
    {"teacher_split": "half", "teacher_fraction": 0.2, "distill_fraction": 0.25},
    {"distill_fraction": 1e-9}, {"teacher_fraction": 1e-9},
    {"val_fraction": 0.0}, {"val_fraction": 0.5, "teacher_split": "half", "distill_split": "holdout"},
    {"val_fraction": 1e-9, "teacher_fraction": 0.3},
])
def test_data_sizes_are_what_the_splits_draw(changes: dict, mnist1d_arrays) -> None:
    cfg = TrialConfig(**changes)
    teacher_idx, distill_idx = split_indices(
        mnist1d_arrays.y_train, teacher_split=cfg.teacher_split, distill_split=cfg.distill_split,
        distill_fraction=cfg.distill_fraction, data_seed=cfg.data_seed, seed=cfg.seed,
        val_fraction=cfg.val_fraction, teacher_fraction=cfg.teacher_fraction,
    )
    val_idx = val_indices(mnist1d_arrays.y_train, val_fraction=cfg.val_fraction, data_seed=cfg.data_seed)
    sizes = data_sizes(cfg)
    assert (sizes.teacher, sizes.distill_subset, sizes.distill) == (len(teacher_idx), len(distill_idx),
                                                                     len(distill_idx))
    assert (sizes.val, sizes.pool) == (len(val_idx), len(mnist1d_arrays.y_train) - len(val_idx))
    joined = data_sizes(cfg.replace(extra_data=300))
    riding = data_sizes(cfg.replace(extra_data=300, extra_ratio=0.25))
    assert joined.distill == len(distill_idx) + 300 and riding.distill == len(distill_idx)


# (changes, the field the one line starts with, what else it must say)
# mnist1d's 4,000 training examples less its default validation split (val_fraction 0.1): 3,600; digits': 1,437 less
# 144, 1,293.
REFUSED_SIZES = [
    ({"batch_size": 1}, "batch_size=1", ["student_arch='mlp'", "norm='batch'", "allowed: 2 <= batch_size <= 3600"]),
    ({"teacher_batch_size": 1}, "teacher_batch_size=1", ["allowed: 2 <= teacher_batch_size <= 3600"]),
    ({"dataset": "digits", "teacher_arch": "smallcnn", "student_arch": "smallcnn", "batch_size": 1}, "batch_size=1",
     ["allowed: 2 <= batch_size <= 1293", "norm='group' or 'none'"]),
    ({"batch_size": 10**10, "precision": "auto"}, "batch_size=10000000000",
     ["all 3600 training examples of dataset='mnist1d' less the 400 validation examples of val_fraction=0.1",
      "allowed: 2 <= batch_size <= 3600"]),
    ({"batch_size": 4001, "val_fraction": 0.0}, "batch_size=4001",
     ["all 4000 training examples of dataset='mnist1d';", "allowed: 2 <= batch_size <= 4000"]),
    ({"distill_fraction": 0.01, "batch_size": 3601}, "batch_size=3601",
     ["allowed: 2 <= batch_size <= 3600", "the 36 examples the student distils on are one batch"]),
    ({"extra_data": 100, "batch_size": 3701}, "batch_size=3701", ["extra_data=100", "<= 3700"]),
    ({"teacher_batch_size": 3601}, "teacher_batch_size=3601", ["allowed: 2 <= teacher_batch_size <= 3600"]),
    ({"dataset": "mnist", "distill_dataset": "mnist_full", "batch_size": 60001}, "batch_size=60001",
     ["distill_dataset='mnist_full'", "<= 60000"]),
    ({"distill_fraction": 1e-9}, "distill_fraction=1e-09",
     ["leaves 1 of the 3600 examples", "allowed: distill_fraction >= 0.000556"]),
    ({"teacher_split": "half", "distill_split": "holdout", "distill_fraction": 0.0007}, "distill_fraction=0.0007",
     ["leaves 1 of the 1800 examples", "distill_split='holdout'", "allowed: distill_fraction >= 0.00112"]),
    ({"dataset": "digits", "teacher_arch": "smallcnn", "student_arch": "smallcnn", "distill_fraction": 0.001},
     "distill_fraction=0.001", ["of the 1293 examples", "allowed: distill_fraction >= 0.00155 "]),
    ({"teacher_fraction": 1e-9}, "teacher_fraction=1e-09", ["allowed: teacher_fraction >= 0.000556"]),
]


@pytest.mark.parametrize("changes, start, needles", REFUSED_SIZES, ids=[c[1] for c in REFUSED_SIZES])
def test_check_runnable_refuses_sizes_the_data_cannot_meet(changes: dict, start: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        check_runnable(TrialConfig(device="cpu", **changes))
    message = str(info.value)
    assert message.startswith(start) and "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_the_minimum_fraction_a_refusal_names_is_allowed() -> None:
    for changes in ({"distill_fraction": 1e-9}, {"dataset": "digits", "teacher_arch": "smallcnn",
                                                  "student_arch": "smallcnn", "distill_fraction": 1e-9}):
        with pytest.raises(ConfigError) as info:
            check_runnable(TrialConfig(device="cpu", **changes))
        minimum = float(str(info.value).split("distill_fraction >= ")[1].split()[0])
        cfg = TrialConfig(device="cpu", **{**changes, "distill_fraction": minimum})
        check_runnable(cfg)
        assert data_sizes(cfg).distill_subset == 2


@pytest.mark.parametrize("changes", [
    {"batch_size": 1, "norm": "group"},  # group norm trains on one sample
    {"batch_size": 1, "teacher_batch_size": 1, "norm": "none"},
    {"dataset": "mnist", "teacher_arch": "lenet5", "student_arch": "lenet5", "batch_size": 1},  # lenet5: no norm
    {"batch_size": 3600}, {"batch_size": 4000, "val_fraction": 0.0}, {"distill_fraction": 0.00056},
])
def test_check_runnable_accepts_sizes_the_data_can_meet(changes: dict) -> None:
    check_runnable(TrialConfig(device="cpu", **changes))


def test_a_batch_size_above_the_distillation_set_is_one_batch_of_all_of_it() -> None:
    cfg = TrialConfig(device="cpu", distill_fraction=0.01, batch_size=256, teacher_fraction=0.05,
                      teacher_batch_size=300)
    check_runnable(cfg)  # a study-wide batch size must serve its small-fraction arms too
    assert full_batch_notes(cfg) == [
        "teacher_batch_size=300 is more than the 180 examples a teacher member trains on: each epoch is one batch "
        "of all 180",
        "batch_size=256 is more than the 2 examples the student distils on: each epoch is one batch of all 2",
    ]
    assert full_batch_notes(TrialConfig()) == []


def test_the_fast_path_is_timed_on_at_most_the_data() -> None:
    assert probe_batch_size(TrialConfig(batch_size=10**10)) == 3600  # 4,000 less the validation split
    assert probe_batch_size(TrialConfig(batch_size=256, distill_fraction=0.01)) == 36
    assert probe_batch_size(TrialConfig(batch_size=64)) == 64
    # Uncapped, this would ask the allocator for 1.6 TB (10**10 x 40 floats).
    path = fast_path(TrialConfig(batch_size=10**10, precision="auto", teacher_members=1), DATASET_INFO["mnist1d"],
                     torch.device("cpu"))
    assert "teacher" in path.describe()


# --- an epoch that would leave a few samples over ---------------------------------------------------------------------


def _batches(n: int, batch_size: int) -> list[list[int]]:
    recipe = Recipe(epochs=1, batch_size=batch_size, optimizer="sgd", lr=0.1, weight_decay=0.0, lr_schedule="constant",
                    augmentation="none")
    order = torch.arange(n)
    x, y = torch.arange(n, dtype=torch.float32)[:, None, None], torch.zeros(n, dtype=torch.long)
    spec = AugmentSpec("signal", 0, False)
    return [training_batch(x, y, order, i, recipe, spec, torch.Generator())[0].x.flatten().long().tolist()
            for i in range(batches_per_epoch(n, batch_size))]


def test_a_last_batch_of_fewer_than_half_a_batch_joins_the_batch_before() -> None:
    assert _batches(9, 4) == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    assert _batches(4000, 3999) == [list(range(4000))]
    assert _batches(11, 8) == [list(range(11))]  # 3 left over, under half of 8
    # A last batch of half a batch or more stays its own, every other batch is batch_size.
    assert _batches(10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert _batches(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert _batches(3, 1) == [[0], [1], [2]]
    assert _batches(5, 8) == [[0, 1, 2, 3, 4]]
    # 900 = 7 x 128 + 4 (a quarter of the local both-halves set): 7 batches, the last of 132.
    assert [batches_per_epoch(n, 128) for n in (4000, 3969, 3970, 4032, 900, 129, 1)] == [31, 31, 31, 32, 7, 1, 1]


def test_batch_norm_trains_on_a_set_that_leaves_one_sample_over() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 40), 10, "batch")
    recipe = Recipe(epochs=2, batch_size=4, optimizer="sgd", lr=0.05, weight_decay=0.0, lr_schedule="constant",
                    augmentation="baseline")
    state = TrainState(model, make_optimizer(model, recipe), torch.Generator().manual_seed(0))
    losses: list[float] = []
    fit(state, torch.randn(9, 1, 40), torch.randint(0, 10, (9,)), recipe, AugmentSpec("signal", 4, False),
        on_epoch=lambda epoch, loss, lr: losses.append(loss))
    assert state.epoch == 2 and len(losses) == 2 and all(math.isfinite(loss) for loss in losses)


def test_a_pack_and_a_lone_trial_merge_the_last_sample_alike(base_cfg, shared_teacher) -> None:
    # 3,600 distillation inputs (4,000 less the validation split) at batch 3,599: one step of all 3,600 per epoch,
    # for a pack and alone.
    configs = [base_cfg.replace(batch_size=3599, epochs=2, precision="fp32", temperature=t) for t in (1.0, 4.0)]
    packed = run_pack(configs)
    alone = run_trial(configs[1])
    for result in (*packed, alone):
        assert result["status"] == "TERMINATED", result["error"]
        assert result["student_steps"] == 2 and result["epochs_completed"] == 2
        assert_metrics_in_range(result)
    assert abs(packed[1]["test_agreement"] - alone["test_agreement"]) <= 0.01
