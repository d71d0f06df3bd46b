"""The distillation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float,
    alpha: float = 0.0,
    mix_index: torch.Tensor | None = None,
    lam: float = 1.0,
) -> torch.Tensor:
    """``alpha * CE(z_s, y) + (1 - alpha) * tau^2 * CE(softmax(z_t / tau), softmax(z_s / tau))``.

    ``teacher_log_probs`` are the (ensemble) teacher's log-probabilities at temperature 1; dividing
    them by tau is the tempered teacher, since a log-softmax shift cancels in the softmax.
    For mixed batches (mixup, cutmix) the label term is ``lam * CE(y) + (1 - lam) * CE(y[mix_index])``.
    """
    tau = float(temperature)
    log_q = F.log_softmax(student_logits.float() / tau, dim=-1)
    p_teacher = F.softmax(teacher_log_probs.float() / tau, dim=-1)
    soft = -(p_teacher * log_q).sum(-1).mean() * tau**2
    if alpha == 0.0:
        return soft
    if labels is None:
        raise ValueError("kd_loss: alpha > 0 needs labels")
    hard = F.cross_entropy(student_logits.float(), labels)
    if mix_index is not None and lam < 1.0:
        hard = lam * hard + (1.0 - lam) * F.cross_entropy(student_logits.float(), labels[mix_index])
    return alpha * hard + (1.0 - alpha) * soft
