"""Metrics against hand and numpy computations: accuracy, NLL, ECE, agreement, predictive KL, top-5 overlap,
Jensen-Shannon divergence, agreement where the teacher is right and where it is wrong."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd_ray.models.ensembles import ensemble_log_probs
from kd_ray.train.metrics import (
    accuracy,
    agreement,
    ece,
    nll,
    prediction_metrics,
    predictive_kl,
    teacher_metrics,
)

# --- numpy references ---------------------------------------------------------------------------

def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    shifted = z - z.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(z))


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over rows of KL(p || q) for probability rows p, q."""
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))


def logits_with_confidence(confidence: float, predicted: int, num_classes: int) -> list[float]:
    """Logits whose softmax puts ``confidence`` on ``predicted`` and spreads the rest evenly."""
    rest = (1.0 - confidence) / (num_classes - 1)
    assert confidence > rest, "the predicted class must be the argmax"
    return [math.log(confidence if c == predicted else rest) for c in range(num_classes)]


def make_batch(rows: list[tuple[float, bool]], num_classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, correct) per example -> logits and labels; predictions cycle over classes."""
    logits, labels = [], []
    for i, (conf, correct) in enumerate(rows):
        pred = i % num_classes
        logits.append(logits_with_confidence(conf, pred, num_classes))
        labels.append(pred if correct else (pred + 1) % num_classes)
    return torch.tensor(logits, dtype=torch.float32), torch.tensor(labels, dtype=torch.long)


def random_logits(n: int, c: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale


# --- accuracy and NLL ---------------------------------------------------------------------------

def test_accuracy_four_examples() -> None:
    logits = torch.tensor(
        [
            [2.0, 1.0, 0.0],  # argmax 0
            [0.0, 3.0, 1.0],  # argmax 1
            [0.5, 0.2, 0.9],  # argmax 2
            [1.0, 4.0, 2.0],  # argmax 1
        ]
    )
    labels = torch.tensor([0, 1, 0, 2])  # right, right, wrong, wrong
    assert accuracy(logits, labels) == pytest.approx(0.5)
    assert accuracy(logits, torch.tensor([0, 1, 2, 1])) == pytest.approx(1.0)
    assert accuracy(logits, torch.tensor([1, 0, 0, 0])) == pytest.approx(0.0)


def test_accuracy_returns_python_float() -> None:
    value = accuracy(torch.zeros(2, 3), torch.tensor([0, 1]))
    assert isinstance(value, float)


def test_nll_is_mean_cross_entropy_of_true_label() -> None:
    logits = random_logits(16, 5, seed=0)
    labels = torch.arange(16) % 5
    log_p = np_log_softmax(logits.numpy())
    expected = -np.mean(log_p[np.arange(16), labels.numpy()])
    assert nll(logits, labels) == pytest.approx(expected, rel=1e-5)


def test_nll_by_hand_uniform_prediction() -> None:
    # Uniform over C classes: the true label's cross-entropy is log C whatever the label.
    logits = torch.zeros(3, 7)
    assert nll(logits, torch.tensor([0, 3, 6])) == pytest.approx(math.log(7), rel=1e-6)


def test_nll_accepts_log_probs_as_well_as_logits() -> None:
    logits = random_logits(8, 4, seed=1)
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    assert nll(torch.log_softmax(logits, -1), labels) == pytest.approx(nll(logits, labels), rel=1e-6)


# --- ECE ----------------------------------------------------------------------------------------

def test_ece_perfectly_calibrated_is_zero() -> None:
    # Bin (0.7, 0.8]: four examples at confidence 0.75, three right.
    # Bin (0.5, 0.6]: twenty examples at confidence 0.55, eleven right.
    rows = [(0.75, True)] * 3 + [(0.75, False)] + [(0.55, True)] * 11 + [(0.55, False)] * 9
    logits, labels = make_batch(rows)
    assert ece(logits, labels) == pytest.approx(0.0, abs=1e-6)


def test_ece_confident_and_wrong() -> None:
    logits, labels = make_batch([(0.99, False)] * 6)
    assert ece(logits, labels) == pytest.approx(0.99, abs=1e-5)


def test_ece_confident_and_right() -> None:
    logits, labels = make_batch([(0.97, True)] * 5)
    assert ece(logits, labels) == pytest.approx(0.03, abs=1e-5)


def test_ece_by_hand_over_several_bins() -> None:
    # bin (0.9, 1.0]: 0.95 x4, 2 right   -> n=4,  acc 0.5,  conf 0.95, gap 0.45
    # bin (0.6, 0.7]: 0.65 x2, 2 right   -> n=2,  acc 1.0,  conf 0.65, gap 0.35
    # bin (0.3, 0.4]: 0.35 x3 and 0.38 x1, 1 right -> n=4, acc 0.25, conf 0.3575, gap 0.1075
    rows = (
        [(0.95, True)] * 2 + [(0.95, False)] * 2
        + [(0.65, True)] * 2
        + [(0.35, True), (0.35, False), (0.35, False), (0.38, False)]
    )
    logits, labels = make_batch(rows, num_classes=4)
    n = len(rows)
    expected = 4 / n * 0.45 + 2 / n * 0.35 + 4 / n * abs(0.25 - (0.35 * 3 + 0.38) / 4)
    assert ece(logits, labels) == pytest.approx(expected, abs=1e-5)


def test_ece_bins_do_not_pool_across_bins() -> None:
    # Overconfident in one bin and underconfident in another: pooling would cancel, binning must not.
    # (0.8, 0.9]: 0.85 x4, all wrong -> gap 0.85; (0.5, 0.6]: 0.55 x4, all right -> gap 0.45.
    rows = [(0.85, False)] * 4 + [(0.55, True)] * 4
    logits, labels = make_batch(rows, num_classes=3)
    assert ece(logits, labels) == pytest.approx(0.5 * 0.85 + 0.5 * 0.45, abs=1e-5)


def test_ece_matches_numpy_reference_on_random_logits() -> None:
    logits = random_logits(200, 10, seed=3, scale=3.0)
    labels = torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(4))
    probs = np_softmax(logits.numpy())
    conf = probs.max(-1)
    correct = probs.argmax(-1) == labels.numpy()
    edges = np.linspace(0.0, 1.0, 11)
    expected = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            expected += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    assert ece(logits, labels) == pytest.approx(expected, abs=1e-5)
    assert 0.0 <= ece(logits, labels) <= 1.0


# --- agreement and predictive KL ----------------------------------------------------------------

def test_agreement_of_argmaxes() -> None:
    teacher = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 2.0, 0.0]])
    student = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.1, 9.0], [0.2, 0.1, 0.3], [4.0, 0.0, 0.0]])
    # argmax teacher 0,1,2,1 ; student 0,2,2,0 -> agree on 2 of 4
    assert agreement(teacher, student) == pytest.approx(0.5)
    assert agreement(teacher, teacher) == pytest.approx(1.0)


def test_agreement_ignores_calibration() -> None:
    teacher = random_logits(30, 6, seed=5)
    # Scaling and shifting logits changes probabilities but not the argmax.
    assert agreement(teacher, teacher * 0.1 + 7.0) == pytest.approx(1.0)


def test_predictive_kl_matches_numpy() -> None:
    teacher = random_logits(25, 6, seed=6)
    student = random_logits(25, 6, seed=7)
    expected = np_kl(np_softmax(teacher.numpy()), np_softmax(student.numpy()))
    assert predictive_kl(teacher, student) == pytest.approx(expected, rel=1e-5)


def test_predictive_kl_direction_is_teacher_to_student() -> None:
    teacher = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    student = torch.tensor([[0.5, 0.3, 0.0], [1.0, 0.0, 0.2]])
    p, q = np_softmax(teacher.numpy()), np_softmax(student.numpy())
    forward, reverse = np_kl(p, q), np_kl(q, p)
    assert abs(forward - reverse) > 1e-2  # the case distinguishes the two directions
    assert predictive_kl(teacher, student) == pytest.approx(forward, rel=1e-5)


def test_predictive_kl_zero_for_identical_and_nonnegative() -> None:
    logits = random_logits(40, 8, seed=8)
    assert predictive_kl(logits, logits) == pytest.approx(0.0, abs=1e-6)
    # A constant shift per row is the same distribution.
    assert predictive_kl(logits, logits + 3.0) == pytest.approx(0.0, abs=1e-5)
    for seed in range(5):
        other = random_logits(40, 8, seed=100 + seed, scale=0.5 + seed)
        assert predictive_kl(logits, other) >= 0.0


def test_predictive_kl_accepts_logits_or_log_probs() -> None:
    teacher = random_logits(12, 5, seed=9)
    student = random_logits(12, 5, seed=10)
    reference = predictive_kl(teacher, student)
    log_t = torch.log_softmax(teacher, -1)
    log_s = torch.log_softmax(student, -1)
    assert predictive_kl(log_t, student) == pytest.approx(reference, rel=1e-5)
    assert predictive_kl(teacher, log_s) == pytest.approx(reference, rel=1e-5)
    assert predictive_kl(log_t, log_s) == pytest.approx(reference, rel=1e-5)


def test_predictive_kl_zero_probability_teacher_class_contributes_nothing() -> None:
    # 0 * log 0 = 0: a class the teacher rules out must not turn the KL into NaN.
    teacher = torch.tensor([[0.0, -math.inf, 0.0], [1.0, 0.0, -math.inf]])
    student = torch.tensor([[0.2, 0.1, 0.0], [0.0, 0.5, 0.3]])
    p = np.array([[0.5, 0.0, 0.5], np_softmax(np.array([[1.0, 0.0]]))[0].tolist() + [0.0]])
    q = np_softmax(student.numpy())
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    expected = float(terms.sum(-1).mean())
    value = predictive_kl(teacher, student)
    assert math.isfinite(value)
    assert value == pytest.approx(expected, rel=1e-5)


# --- ensemble teacher ---------------------------------------------------------------------------

def test_ensemble_teacher_agreement_and_kl_use_mean_of_member_probabilities() -> None:
    g = torch.Generator().manual_seed(11)
    members = torch.randn(3, 50, 7, generator=g) * 2.5
    student = torch.randn(50, 7, generator=g) * 2.0
    teacher_log_probs = ensemble_log_probs(members)

    p_mean = np_softmax(members.numpy()).mean(0)  # [N, C]
    q = np_softmax(student.numpy())
    np.testing.assert_allclose(teacher_log_probs.exp().numpy(), p_mean, rtol=1e-5, atol=1e-7)

    expected_agreement = float(np.mean(p_mean.argmax(-1) == q.argmax(-1)))
    assert agreement(teacher_log_probs, student) == pytest.approx(expected_agreement)
    assert predictive_kl(teacher_log_probs, student) == pytest.approx(np_kl(p_mean, q), rel=1e-5)

    # The ensemble is not the mean of member logits: the case must tell the two apart.
    p_logit_mean = np_softmax(members.numpy().mean(0))
    assert abs(np_kl(p_logit_mean, q) - np_kl(p_mean, q)) > 1e-3


def test_ensemble_of_one_is_the_member() -> None:
    member = random_logits(10, 4, seed=12)
    teacher_log_probs = ensemble_log_probs(member.unsqueeze(0))
    assert predictive_kl(teacher_log_probs, member) == pytest.approx(0.0, abs=1e-6)
    assert agreement(teacher_log_probs, member) == pytest.approx(1.0)


# --- dtypes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_metrics_compute_in_float32_for_any_input_dtype(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(13)
    student = (torch.randn(64, 10, generator=g) * 3).to(dtype)
    teacher = (torch.randn(64, 10, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 10, (64,), generator=g)
    # Reference: the same (already rounded) values, upcast to float32 first.
    s32, t32 = student.float(), teacher.float()
    cases = [
        (accuracy(student, labels), accuracy(s32, labels)),
        (nll(student, labels), nll(s32, labels)),
        (ece(student, labels), ece(s32, labels)),
        (agreement(teacher, student), agreement(t32, s32)),
        (predictive_kl(teacher, student), predictive_kl(t32, s32)),
    ]
    for got, want in cases:
        assert isinstance(got, float)
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_bfloat16_result_differs_from_bfloat16_arithmetic() -> None:
    # A sanity check that the float32 reference above is meaningful: computing the KL in bfloat16
    # itself would land visibly away from the float32 value for these inputs.
    g = torch.Generator().manual_seed(14)
    teacher = (torch.randn(256, 10, generator=g) * 3).bfloat16()
    student = (torch.randn(256, 10, generator=g) * 3).bfloat16()
    log_p = torch.log_softmax(teacher, -1)
    log_q = torch.log_softmax(student, -1)
    in_bf16 = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    value = predictive_kl(teacher, student)
    expected = np_kl(np_softmax(teacher.float().numpy()), np_softmax(student.float().numpy()))
    assert value == pytest.approx(expected, rel=1e-5)
    assert abs(in_bf16 - expected) > abs(value - expected)


# --- metric sets --------------------------------------------------------------------------------

def test_prediction_metrics_without_labels() -> None:
    student = random_logits(20, 5, seed=15)
    teacher = torch.log_softmax(random_logits(20, 5, seed=16), -1)
    out = prediction_metrics(student, teacher)
    assert set(out) == {"agreement", "kl"}
    assert out["agreement"] == pytest.approx(agreement(teacher, student))
    assert out["kl"] == pytest.approx(predictive_kl(teacher, student))


def test_prediction_metrics_with_labels() -> None:
    student = random_logits(20, 5, seed=17)
    teacher = torch.log_softmax(random_logits(20, 5, seed=18), -1)
    labels = torch.arange(20) % 5
    out = prediction_metrics(student, teacher, labels)
    assert set(out) == {"agreement", "kl", "acc", "nll", "ece"}
    assert out["acc"] == pytest.approx(accuracy(student, labels))
    assert out["nll"] == pytest.approx(nll(student, labels))
    assert out["ece"] == pytest.approx(ece(student, labels))
    assert all(isinstance(v, float) for v in out.values())


def test_teacher_metrics_keys_and_values() -> None:
    from kd_ray.tables import TEACHER_METRICS

    teacher = ensemble_log_probs(torch.randn(2, 30, 4, generator=torch.Generator().manual_seed(19)))
    labels = torch.arange(30) % 4
    own = ensemble_log_probs(torch.randn(2, 12, 4, generator=torch.Generator().manual_seed(20)))
    own_labels = own.argmax(-1)
    own_labels[:3] = (own_labels[:3] + 1) % 4  # 9 of its 12 training examples right
    out = teacher_metrics(teacher, labels, own, own_labels)
    assert tuple(out) == TEACHER_METRICS
    p = teacher.exp().numpy()
    assert out["teacher_test_acc"] == pytest.approx(float(np.mean(p.argmax(-1) == labels.numpy())))
    assert out["teacher_test_nll"] == pytest.approx(
        float(-np.mean(np.log(p[np.arange(30), labels.numpy()]))), rel=1e-5
    )
    assert out["teacher_test_ece"] == pytest.approx(ece(teacher, labels))
    assert out["teacher_train_acc"] == pytest.approx(0.75)
    assert out["teacher_test_confidence"] == pytest.approx(float(p.max(-1).mean()), rel=1e-6)


def test_validation_metrics_are_the_test_ones_on_the_validation_set_and_nan_without_one() -> None:
    from kd_ray.tables import VALIDATION_METRICS
    from kd_ray.train.metrics import validation_metrics

    student = random_logits(25, 5, seed=21)
    teacher = torch.log_softmax(random_logits(25, 5, seed=22), -1)
    labels = torch.arange(25) % 5
    out = validation_metrics(student, teacher, labels)
    assert set(out) == set(VALIDATION_METRICS)
    for name, value in prediction_metrics(student, teacher, labels).items():
        assert out[f"val_{name}"] == value
    none = validation_metrics(None, teacher[:0], labels[:0])
    assert set(none) == set(VALIDATION_METRICS) and all(math.isnan(v) for v in none.values())


def test_student_metrics_name_the_table_columns_and_match_the_parts():
    from kd_ray.tables import METRICS
    from kd_ray.train.metrics import agreement, predictive_kl, student_metrics

    torch.manual_seed(0)
    student_test, teacher_test = torch.randn(50, 5), torch.randn(50, 5).log_softmax(-1)
    student_train, teacher_train = torch.randn(30, 5), torch.randn(30, 5).log_softmax(-1)
    labels = torch.randint(0, 5, (50,))
    out = student_metrics(student_test, teacher_test, labels, student_train, teacher_train)
    assert list(out) == ["test_acc", "test_nll", "test_ece", "test_agreement", "test_kl", "test_top5_overlap",
                         "test_jsd", "test_agreement_teacher_right", "test_agreement_teacher_wrong",
                         "train_agreement", "train_kl"]
    assert set(out) <= set(METRICS)
    assert out["test_agreement"] == agreement(teacher_test, student_test)
    assert out["train_kl"] == predictive_kl(teacher_train, student_train)


# --- top-k overlap, JSD, agreement by the teacher's correctness: a 3-class example by hand ------------

# Four examples, three classes, probabilities with no ties (labels 0, 1, 0, 2):
#   example  teacher p          label  teacher right?   student q          agree?  top-2 overlap
#   0        (.5, .3, .2)       0      yes (0)          (.5, .3, .2)       yes     {0,1} & {0,1} -> 2/2
#   1        (.2, .5, .3)       1      yes (1)          (.5, .2, .3)       no      {1,2} & {0,2} -> 1/2
#   2        (.3, .2, .5)       0      no  (2)          (.3, .2, .5)       yes     {2,0} & {2,0} -> 2/2
#   3        (.5, .2, .3)       2      no  (0)          (.5, .3, .2)       yes     {0,2} & {0,1} -> 1/2
HAND_TEACHER = [[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.3, 0.2, 0.5], [0.5, 0.2, 0.3]]
HAND_STUDENT = [[0.5, 0.3, 0.2], [0.5, 0.2, 0.3], [0.3, 0.2, 0.5], [0.5, 0.3, 0.2]]
HAND_LABELS = [0, 1, 0, 2]
# JSD(p, q) = (KL(p||m) + KL(q||m)) / 2, m = (p + q) / 2; zero where p = q (examples 0 and 2).
#   example 1: m = (.35, .35, .3); KL(p||m) = .2 ln(.2/.35) + .5 ln(.5/.35) + 0 = KL(q||m)
#              -> JSD = .2 ln(4/7) + .5 ln(10/7) = 0.066414
#   example 3: m = (.5, .25, .25); KL(p||m) = 0 + .2 ln(.8) + .3 ln(1.2) = KL(q||m)
#              -> JSD = .2 ln(.8) + .3 ln(1.2) = 0.010068
HAND_JSD = (0.2 * math.log(4 / 7) + 0.5 * math.log(10 / 7) + 0.2 * math.log(0.8) + 0.3 * math.log(1.2)) / 4


def _hand_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.tensor(HAND_TEACHER).log(), torch.tensor(HAND_STUDENT).log(), torch.tensor(HAND_LABELS))


def test_top_k_overlap_by_hand() -> None:
    from kd_ray.train.metrics import top_k_overlap

    teacher, student, _ = _hand_tensors()
    assert top_k_overlap(teacher, student, k=2) == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)
    assert top_k_overlap(teacher, student, k=1) == pytest.approx(agreement(teacher, student)) == pytest.approx(0.75)
    # k = min(5, classes): with three classes the top 5 is every class, shared by both.
    assert top_k_overlap(teacher, student) == 1.0
    # Logits and log-probabilities rank alike.
    assert top_k_overlap(teacher + 3.0, student * 2.0, k=2) == pytest.approx(0.75)


def test_top5_overlap_counts_shared_classes_not_their_order() -> None:
    from kd_ray.train.metrics import top_k_overlap

    # 7 classes: the teacher ranks 0..6 in order; the student's top 5 is 4,3,2,1,6 (shares 1,2,3,4) -> 4/5.
    teacher = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1]])
    student = torch.tensor([[0.0, 6, 7, 8, 9, 1, 5]])
    assert top_k_overlap(teacher, student) == pytest.approx(4 / 5)
    assert top_k_overlap(teacher, teacher) == 1.0


def test_js_divergence_by_hand() -> None:
    from kd_ray.train.metrics import js_divergence

    teacher, student, _ = _hand_tensors()
    assert HAND_JSD == pytest.approx((0.066414 + 0.010068) / 4, abs=1e-6)
    assert js_divergence(teacher, student) == pytest.approx(HAND_JSD, rel=1e-5)
    assert js_divergence(student, teacher) == pytest.approx(HAND_JSD, rel=1e-5)  # symmetric
    assert js_divergence(teacher, teacher) == pytest.approx(0.0, abs=1e-7)


def test_js_divergence_of_disjoint_predictions_is_ln2_and_finite_with_zeros() -> None:
    from kd_ray.train.metrics import js_divergence

    # p = (1, 0, 0), q = (0, 1, 0): m = (1/2, 1/2, 0); KL(p||m) = ln 2 = KL(q||m); 0 log 0 = 0 elsewhere.
    teacher = torch.tensor([[0.0, -math.inf, -math.inf]])
    student = torch.tensor([[-math.inf, 0.0, -math.inf]])
    assert js_divergence(teacher, student) == pytest.approx(math.log(2), rel=1e-6)
    assert math.isinf(predictive_kl(teacher, student))  # KL is unbounded here; JSD is not


def test_agreement_where_the_teacher_is_right_and_where_it_is_wrong_by_hand() -> None:
    from kd_ray.train.metrics import agreement_by_teacher_correctness, fidelity_detail

    teacher, student, labels = _hand_tensors()
    # Teacher right on examples 0 and 1 (the student agrees on 0): 1/2; wrong on 2 and 3 (agrees on both): 1.
    assert agreement_by_teacher_correctness(teacher, student, labels) == (0.5, 1.0)
    detail = fidelity_detail(student, teacher, labels)
    assert detail == pytest.approx({"top5_overlap": 1.0, "jsd": HAND_JSD, "agreement_teacher_right": 0.5,
                                    "agreement_teacher_wrong": 1.0}, rel=1e-5)
    # A group without examples is NaN: here the teacher is right everywhere.
    right, wrong = agreement_by_teacher_correctness(teacher, student, teacher.argmax(-1))
    assert right == 0.75 and math.isnan(wrong)


def test_the_new_metrics_reach_the_test_and_validation_columns() -> None:
    from kd_ray.tables import FIDELITY_METRICS, FRACTION_METRICS, VALIDATION_METRICS
    from kd_ray.train.metrics import student_metrics, validation_metrics

    teacher, student, labels = _hand_tensors()
    test = student_metrics(student, teacher, labels, student, teacher)
    val = validation_metrics(student, teacher, labels)
    for name, value in (("top5_overlap", 1.0), ("jsd", HAND_JSD), ("agreement_teacher_right", 0.5),
                        ("agreement_teacher_wrong", 1.0)):
        assert f"test_{name}" in FIDELITY_METRICS and f"val_{name}" in VALIDATION_METRICS
        assert test[f"test_{name}"] == pytest.approx(value, rel=1e-5)
        assert val[f"val_{name}"] == test[f"test_{name}"]
        assert (f"test_{name}" in FRACTION_METRICS) == (name != "jsd")  # JSD is in nats, the others fractions
