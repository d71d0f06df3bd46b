"""The distillation loss: a label term and a divergence of the student from the (ensemble) teacher.

``teacher_log_probs`` are the teacher's log-probabilities at temperature 1; dividing them by tau is the
tempered teacher, since a log-softmax shift cancels in the softmax. With ``p_t = softmax(z_t / tau)``
and ``p_s = softmax(z_s / tau)``, the divergences (``TrialConfig.loss``, one of ``config.LOSSES``), each
averaged over the batch and multiplied by tau^2 so that its gradient keeps its size as tau grows:

- ``kl`` (the default): forward KL(p_t || p_s), the teacher's distribution first, mass-covering: the
  student pays for every class the teacher gives mass to. It is computed, as it always has been, in its
  cross-entropy form ``-sum p_t log p_s``, which is KL(p_t || p_s) plus the teacher's entropy H(p_t), a
  constant the student cannot change: the gradient is the KL's, the value is the cross-entropy's, so
  results and tests from before the divergence became an axis are unchanged to the bit.
- ``soft_ce``: the soft cross-entropy ``-sum p_t log p_s``, teacher first. The same objective as ``kl``,
  value and gradient (its minimum, at p_s = p_t, is tau^2 H(p_t), not 0); it names what the value is. A
  ``kl`` and a ``soft_ce`` trial of one seed train the same student, a null pair in a divergence study.
- ``reverse_kl``: KL(p_s || p_t), the student's distribution first, mode-seeking: the student pays for
  mass where the teacher has little, not for the teacher's modes it leaves out.
- ``symmetric_kl``: the mean ``(KL(p_t || p_s) + KL(p_s || p_t)) / 2`` (half Jeffreys' divergence), so
  that near p_s = p_t it has the curvature of ``kl`` and a learning rate tuned for one suits the other.
- ``jsd``: the generalised Jensen-Shannon divergence with weight ``jsd_beta`` = beta on the teacher,
  ``[beta KL(p_t || M) + (1 - beta) KL(p_s || M)] / (beta (1 - beta))`` with ``M = beta p_t + (1 - beta) p_s``.
  The division by ``beta (1 - beta)`` gives it the curvature of ``kl`` near p_s = p_t for every beta
  (the plain weighted sum is bounded by log 2 and its gradient shrinks as beta (1 - beta)); as beta -> 0
  it tends to forward KL(p_t || p_s), as beta -> 1 to reverse KL(p_s || p_t).
- ``mse_logits``: ``mean over classes of (c(z_s) - c(log p_t))^2 / 2`` with ``c(v) = v - mean(v)``, the
  student's logits against the teacher's log-probabilities, each centred per example (log-probabilities
  are logits up to a per-example shift; centring cancels it). No temperature and no tau^2: it is the
  limit of tau^2 * ``kl`` as tau -> infinity (Hinton et al. 2015), and its gradient is the one that
  limit tends to, ``(c(z_s) - c(z_t)) / (classes * batch)``; ``temperature`` does not enter it.

With ``alpha > 0`` the loss is ``alpha * CE(z_s, y) + (1 - alpha) * divergence``; for mixed batches
(mixup, cutmix) the label term is ``lam * CE(y) + (1 - lam) * CE(y[mix_index])``. Every loss is
computed in float32 (float64 inputs stay float64), from log-softmaxes: no log of 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_ray.config import LOSSES


def loss_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for low-precision inputs (bf16 autocast), float64 kept."""
    return torch.promote_types(x.dtype, torch.float32)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor, dim: int) -> torch.Tensor:
    """KL(a || b) over ``dim`` from log-probabilities; a class where ``a`` underflows adds 0, not NaN."""
    return (log_a.exp() * (log_a - log_b)).sum(dim)


def divergence(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    loss: str = "kl",
    temperature: float | torch.Tensor = 1.0,
    jsd_beta: float | torch.Tensor = 0.5,
    dim: int = -1,
) -> torch.Tensor:
    """The divergence ``loss`` of each example, over the class dimension ``dim``, before the mean over
    the batch and the tau^2 factor (see the module's docstring for each loss and its direction).

    ``temperature`` and ``jsd_beta`` are numbers, or tensors that broadcast against the logits (a pack's
    ``[K, 1, 1]``, one per student)."""
    if loss not in LOSSES:
        raise ValueError(f"loss: got {loss!r}; expected one of {', '.join(LOSSES)}")
    dtype = loss_dtype(student_logits)
    student, teacher = student_logits.to(dtype), teacher_log_probs.to(dtype)
    if loss == "mse_logits":
        gap = (student - student.mean(dim, keepdim=True)) - (teacher - teacher.mean(dim, keepdim=True))
        return gap.square().mean(dim) / 2
    log_q = F.log_softmax(student / temperature, dim=dim)
    if loss in ("kl", "soft_ce"):
        # The cross-entropy form, term for term the loss of every trial run before the divergence was an axis.
        p_teacher = F.softmax(teacher / temperature, dim=dim)
        return -(p_teacher * log_q).sum(dim)
    log_p = F.log_softmax(teacher / temperature, dim=dim)
    if loss == "reverse_kl":
        return _kl(log_q, log_p, dim)
    if loss == "symmetric_kl":
        return (_kl(log_p, log_q, dim) + _kl(log_q, log_p, dim)) / 2
    # jsd. beta stays inside the sum over classes so that a [K, 1, 1] beta broadcasts per student.
    beta = torch.as_tensor(jsd_beta, dtype=dtype, device=student.device)
    log_m = torch.logaddexp(torch.log(beta) + log_p, torch.log1p(-beta) + log_q)
    terms = log_p.exp() * (log_p - log_m) / (1 - beta) + log_q.exp() * (log_q - log_m) / beta
    return terms.sum(dim)


def divergence_scale(loss: str, temperature: float | torch.Tensor) -> float | torch.Tensor:
    """What the batch mean of ``divergence`` is multiplied by: tau^2, and 1 for ``mse_logits`` (no temperature)."""
    return 1.0 if loss == "mse_logits" else temperature**2


def kd_loss(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float,
    alpha: float = 0.0,
    mix_index: torch.Tensor | None = None,
    lam: float = 1.0,
    loss: str = "kl",
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """``alpha * CE(z_s, y) + (1 - alpha) * scale * mean(divergence)``, scale tau^2 (1 for ``mse_logits``).

    The default (``loss='kl'``, ``alpha=0``) is ``tau^2 * CE(softmax(z_t / tau), softmax(z_s / tau))``.
    """
    tau = float(temperature)
    soft = divergence(student_logits, teacher_log_probs, loss, tau, jsd_beta).mean() * divergence_scale(loss, tau)
    if alpha == 0.0:
        return soft
    if labels is None:
        raise ValueError("kd_loss: alpha > 0 needs labels")
    logits = student_logits.to(loss_dtype(student_logits))
    hard = F.cross_entropy(logits, labels)
    if mix_index is not None and lam < 1.0:
        hard = lam * hard + (1.0 - lam) * F.cross_entropy(logits, labels[mix_index])
    return alpha * hard + (1.0 - alpha) * soft
