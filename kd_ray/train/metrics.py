"""Fidelity and generalization metrics, exactly as defined in docs/architecture.md.

Every function takes logits or log-probabilities as tensors and returns a Python float; all
arithmetic is done in float32 whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _log_probs(logits_or_log_probs: torch.Tensor) -> torch.Tensor:
    # log_softmax is idempotent on log-probabilities, so either input form is accepted.
    x = logits_or_log_probs.float()
    if x.dim() == 2:  # [N, C]: torch's CPU log_softmax over a short last dimension is ~8x slower
        return F.log_softmax(x.t().contiguous(), dim=0).t()
    return F.log_softmax(x, dim=-1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of inputs whose argmax equals the label."""
    return (logits.float().argmax(-1) == labels).float().mean().item()


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy of the true label, in nats."""
    return F.nll_loss(_log_probs(logits), labels).item()


def ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """Expected calibration error over equal-width bins of the max softmax probability, a fraction."""
    probs = _log_probs(logits).exp()
    confidence, prediction = probs.max(-1)
    correct = (prediction == labels).float()
    # Bin b holds confidences in (b/n, (b+1)/n]; confidence is never 0, so bin 0 starts open.
    bins = (confidence * n_bins).ceil().long().clamp(1, n_bins) - 1
    conf_sum = torch.zeros(n_bins).index_add_(0, bins.cpu(), confidence.cpu())
    acc_sum = torch.zeros(n_bins).index_add_(0, bins.cpu(), correct.cpu())
    gap = (conf_sum - acc_sum).abs()  # per bin: n_b * |mean confidence - accuracy|
    return (gap.sum() / confidence.numel()).item()


def agreement(teacher: torch.Tensor, student: torch.Tensor) -> float:
    """Fraction of inputs where the teacher's and the student's top-1 predictions agree."""
    return (teacher.float().argmax(-1) == student.float().argmax(-1)).float().mean().item()


def predictive_kl(teacher: torch.Tensor, student: torch.Tensor) -> float:
    """Mean over inputs of KL(p_teacher || p_student) at temperature 1, in nats."""
    log_p = _log_probs(teacher)
    log_q = _log_probs(student)
    p = log_p.exp()
    # 0 * log 0 = 0: classes the teacher rules out (log-prob -inf) contribute nothing, not NaN.
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1).mean().item()


TOP_K = 5  # top5_overlap compares the teacher's and the student's top min(TOP_K, classes) classes


def top_k_overlap(teacher: torch.Tensor, student: torch.Tensor, k: int = TOP_K) -> float:
    """Mean over inputs of |top-k(teacher) & top-k(student)| / k, with k = min(``k``, classes), a fraction.
    Among tied scores torch.topk picks either; the share counts classes, not their order."""
    k = min(k, teacher.shape[-1])
    top_teacher = teacher.float().topk(k, dim=-1).indices
    top_student = student.float().topk(k, dim=-1).indices
    shared = (top_teacher.unsqueeze(-1) == top_student.unsqueeze(-2)).any(-1).sum(-1)
    return (shared.float() / k).mean().item()


def js_divergence(teacher: torch.Tensor, student: torch.Tensor) -> float:
    """Mean over inputs of the Jensen-Shannon divergence between p_teacher and p_student at temperature 1,
    ``(KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2``, in nats (natural log): in [0, ln 2]."""
    log_p = _log_probs(teacher)
    log_q = _log_probs(student)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    p, q = log_p.exp(), log_q.exp()
    # 0 * log 0 = 0, as in predictive_kl; m > 0 wherever p or q is.
    to_p = torch.where(p > 0, p * (log_p - log_m), torch.zeros_like(p))
    to_q = torch.where(q > 0, q * (log_q - log_m), torch.zeros_like(q))
    return (0.5 * (to_p + to_q).sum(-1)).mean().item()


def agreement_by_teacher_correctness(
    teacher: torch.Tensor, student: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float]:
    """Top-1 agreement on the inputs the teacher classifies correctly, and on those it gets wrong; NaN
    for a group without inputs. Does the student copy the teacher's mistakes, or only its right answers?"""
    teacher_top1 = teacher.float().argmax(-1)
    agree = (teacher_top1 == student.float().argmax(-1)).float()
    right = teacher_top1 == labels

    def mean_over(group: torch.Tensor) -> float:
        return agree[group].mean().item() if group.any() else float("nan")

    return mean_over(right), mean_over(~right)


def fidelity_detail(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The fidelity beyond top-1 agreement and KL of one labelled split (``top5_overlap``, ``jsd``,
    ``agreement_teacher_right``, ``agreement_teacher_wrong``), without the split's prefix."""
    right, wrong = agreement_by_teacher_correctness(teacher, student, labels)
    return {"top5_overlap": top_k_overlap(teacher, student), "jsd": js_divergence(teacher, student),
            "agreement_teacher_right": right, "agreement_teacher_wrong": wrong}


# One labelled split's metrics: prediction_metrics' and fidelity_detail's, in the tables' order.
SPLIT_METRICS = ("acc", "nll", "ece", "agreement", "kl", "top5_overlap", "jsd", "agreement_teacher_right",
                 "agreement_teacher_wrong")


def prediction_metrics(
    student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, labels: torch.Tensor | None = None
) -> dict[str, float]:
    """The metric set of one evaluation split: agreement and KL, plus accuracy/NLL/ECE with labels."""
    out = {}
    if labels is not None:
        out["acc"] = accuracy(student_logits, labels)
        out["nll"] = nll(student_logits, labels)
        out["ece"] = ece(student_logits, labels)
    out["agreement"] = agreement(teacher_log_probs, student_logits)
    out["kl"] = predictive_kl(teacher_log_probs, student_logits)
    return out


def confidence(logits: torch.Tensor) -> float:
    """Mean over inputs of the max predicted probability, a fraction."""
    return _log_probs(logits).exp().max(-1).values.mean().item()


def teacher_metrics(
    teacher_test: torch.Tensor, test_labels: torch.Tensor, teacher_own: torch.Tensor, own_labels: torch.Tensor
) -> dict[str, float]:
    """The teacher's own metrics, named as in the trial tables: on the test set (``teacher_test_acc``, ...,
    ``teacher_test_confidence``) and on its own training examples (``teacher_train_acc``, clean inputs),
    so that a teacher that overfits or is confident can be told apart."""
    return {
        "teacher_test_acc": accuracy(teacher_test, test_labels),
        "teacher_test_nll": nll(teacher_test, test_labels),
        "teacher_test_ece": ece(teacher_test, test_labels),
        "teacher_train_acc": accuracy(teacher_own, own_labels),
        "teacher_test_confidence": confidence(teacher_test),
    }


def validation_metrics(
    student_val: torch.Tensor | None, teacher_val: torch.Tensor, val_labels: torch.Tensor
) -> dict[str, float]:
    """A student's metrics on the validation set, named as in the trial tables (``val_acc``, ``val_agreement``,
    ...) and defined as the ``test_*`` ones. ``student_val`` None: no validation examples were held out
    (``val_fraction`` 0), and every one is NaN."""
    if student_val is None:
        return {f"val_{k}": float("nan") for k in SPLIT_METRICS}
    val = {**prediction_metrics(student_val, teacher_val, val_labels),
           **fidelity_detail(student_val, teacher_val, val_labels)}
    return {f"val_{k}": val[k] for k in SPLIT_METRICS}


def student_metrics(
    student_test: torch.Tensor,
    teacher_test: torch.Tensor,
    test_labels: torch.Tensor,
    student_train: torch.Tensor,
    teacher_train: torch.Tensor,
) -> dict[str, float]:
    """A student's metric set, named as in the trial tables: generalization and fidelity on the test
    set (``test_*``, the detail of ``fidelity_detail`` included), fidelity on the clean distillation set
    (``train_agreement``, ``train_kl``). ``aug_train_agreement`` needs the augmentation and is computed by
    the trial."""
    test = prediction_metrics(student_test, teacher_test, test_labels)
    test.update(fidelity_detail(student_test, teacher_test, test_labels))
    train = prediction_metrics(student_train, teacher_train)
    return {**{f"test_{k}": v for k, v in test.items()}, **{f"train_{k}": v for k, v in train.items()}}
