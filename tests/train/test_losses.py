"""The distillation loss: value, gradient, temperature scaling, label term, mixup label term."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_ray.models.ensembles import ensemble_log_probs
from kd_ray.train.losses import kd_loss

N, C = 12, 6


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    shifted = z - z.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def np_kd_loss(
    z_s: np.ndarray, teacher_log_probs: np.ndarray, labels: np.ndarray | None, tau: float, alpha: float
) -> float:
    """alpha * CE(z_s, y) + (1 - alpha) * tau^2 * CE(softmax(z_t/tau), softmax(z_s/tau)), in float64."""
    p_t = np.exp(np_log_softmax(teacher_log_probs / tau))
    soft = -np.mean(np.sum(p_t * np_log_softmax(z_s / tau), axis=-1)) * tau**2
    if alpha == 0.0:
        return float(soft)
    assert labels is not None
    hard = -np.mean(np_log_softmax(z_s)[np.arange(len(labels)), labels])
    return float(alpha * hard + (1 - alpha) * soft)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(N, C, generator=g) * 2.0
    teacher_log_probs = torch.log_softmax(torch.randn(N, C, generator=g) * 3.0, -1)
    labels = torch.randint(0, C, (N,), generator=g)
    return student, teacher_log_probs, labels


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 4.0, 10.0])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9])
def test_value_matches_formula(tau: float, alpha: float) -> None:
    student, teacher, labels = batch(seed=int(tau * 10) + int(alpha * 100))
    loss = kd_loss(student, teacher, labels, temperature=tau, alpha=alpha)
    expected = np_kd_loss(student.numpy(), teacher.numpy(), labels.numpy(), tau, alpha)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_default_alpha_is_pure_distillation() -> None:
    student, teacher, labels = batch(seed=1)
    pure = kd_loss(student, teacher, temperature=3.0)
    assert pure.item() == pytest.approx(np_kd_loss(student.numpy(), teacher.numpy(), None, 3.0, 0.0), rel=1e-5)
    # Labels are ignored when alpha is 0.
    assert kd_loss(student, teacher, labels, temperature=3.0).item() == pytest.approx(pure.item(), rel=1e-6)


def test_gradient_at_tau_one_equals_gradient_of_kl() -> None:
    student, teacher, _ = batch(seed=2)
    z = student.clone().requires_grad_(True)
    kd_loss(z, teacher, temperature=1.0).backward()
    p_t = teacher.exp()
    expected = (torch.softmax(student, -1) - p_t) / N
    torch.testing.assert_close(z.grad, expected, rtol=1e-5, atol=1e-7)

    # The same as autograd through KL(p_t || p_s), averaged over the batch.
    z_kl = student.clone().requires_grad_(True)
    F.kl_div(torch.log_softmax(z_kl, -1), teacher, log_target=True, reduction="batchmean").backward()
    torch.testing.assert_close(z.grad, z_kl.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tau", [0.5, 2.0, 5.0, 20.0])
def test_loss_is_tau_squared_times_soft_cross_entropy(tau: float) -> None:
    student, teacher, _ = batch(seed=3)
    p_t = torch.softmax(teacher / tau, -1)
    soft_ce = -(p_t * torch.log_softmax(student / tau, -1)).sum(-1).mean()
    loss = kd_loss(student, teacher, temperature=tau)
    assert loss.item() == pytest.approx(tau**2 * soft_ce.item(), rel=1e-5)


def test_gradient_magnitude_stays_of_the_same_order_as_tau_grows() -> None:
    # With the tau^2 factor, for large tau the gradient tends to (z_s - z_t_centred)/(C * N):
    # it neither vanishes like 1/tau^2 nor explodes.
    student, teacher, _ = batch(seed=4)
    grads = []
    for tau in (1.0, 10.0, 100.0, 1000.0):
        z = student.clone().requires_grad_(True)
        kd_loss(z, teacher, temperature=tau).backward()
        grads.append(z.grad.norm().item())
    assert max(grads) / min(grads) < 10.0

    z = student.clone().requires_grad_(True)
    kd_loss(z, teacher, temperature=1000.0).backward()
    centred = lambda x: x - x.mean(-1, keepdim=True)  # noqa: E731
    limit = (centred(student) - centred(teacher)) / (C * N)
    torch.testing.assert_close(z.grad, limit, rtol=1e-2, atol=1e-4)


def test_alpha_one_is_plain_cross_entropy() -> None:
    student, teacher, labels = batch(seed=5)
    loss = kd_loss(student, teacher, labels, temperature=4.0, alpha=1.0)
    assert loss.item() == pytest.approx(F.cross_entropy(student, labels).item(), rel=1e-6)

    # The teacher does not enter the loss at all (also through the gradient).
    z = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    kd_loss(z, t, labels, temperature=4.0, alpha=1.0).backward()
    assert t.grad is None or torch.count_nonzero(t.grad) == 0


def test_alpha_without_labels_raises() -> None:
    student, teacher, _ = batch(seed=6)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(student, teacher, temperature=2.0, alpha=0.5)


def test_mixup_label_term() -> None:
    student, teacher, labels = batch(seed=7)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(8))
    lam, alpha, tau = 0.3, 0.6, 2.0
    loss = kd_loss(student, teacher, labels, temperature=tau, alpha=alpha, mix_index=perm, lam=lam)
    hard = lam * F.cross_entropy(student, labels) + (1 - lam) * F.cross_entropy(student, labels[perm])
    soft = np_kd_loss(student.numpy(), teacher.numpy(), None, tau, 0.0)
    expected = alpha * hard.item() + (1 - alpha) * soft
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # The mixed term really differs from the unmixed one for this case.
    plain = kd_loss(student, teacher, labels, temperature=tau, alpha=alpha)
    assert abs(loss.item() - plain.item()) > 1e-3


def test_mixup_with_lam_one_uses_only_the_original_labels() -> None:
    student, teacher, labels = batch(seed=9)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(10))
    mixed = kd_loss(student, teacher, labels, temperature=2.0, alpha=1.0, mix_index=perm, lam=1.0)
    assert mixed.item() == pytest.approx(F.cross_entropy(student, labels).item(), rel=1e-6)


def test_mixup_with_lam_zero_uses_only_the_permuted_labels() -> None:
    student, teacher, labels = batch(seed=11)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(12))
    mixed = kd_loss(student, teacher, labels, temperature=2.0, alpha=1.0, mix_index=perm, lam=0.0)
    assert mixed.item() == pytest.approx(F.cross_entropy(student, labels[perm]).item(), rel=1e-6)


def test_ensemble_teacher_is_tempered_after_averaging() -> None:
    g = torch.Generator().manual_seed(13)
    members = torch.randn(4, N, C, generator=g) * 3.0
    student = torch.randn(N, C, generator=g)
    tau = 3.0
    teacher = ensemble_log_probs(members)
    # log(mean softmax) then divide by tau, as the definition says.
    p_mean = torch.softmax(members.double(), -1).mean(0)
    p_t = torch.softmax(torch.log(p_mean) / tau, -1)
    expected = -(p_t * torch.log_softmax(student.double() / tau, -1)).sum(-1).mean() * tau**2
    loss = kd_loss(student, teacher, temperature=tau)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_is_float32_for_low_precision_inputs() -> None:
    student, teacher, labels = batch(seed=14)
    loss = kd_loss(student.bfloat16(), teacher.bfloat16(), labels, temperature=2.0, alpha=0.5)
    assert loss.dtype == torch.float32
    reference = kd_loss(student.bfloat16().float(), teacher.bfloat16().float(), labels, temperature=2.0, alpha=0.5)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_loss_is_minimised_when_student_matches_teacher() -> None:
    student, teacher, _ = batch(seed=15)
    tau = 2.0
    at_teacher = kd_loss(teacher.clone(), teacher, temperature=tau).item()
    elsewhere = kd_loss(student, teacher, temperature=tau).item()
    # At the optimum the soft CE equals tau^2 * entropy of the tempered teacher.
    p_t = torch.softmax(teacher / tau, -1)
    entropy = -(p_t * torch.log(p_t)).sum(-1).mean().item()
    assert at_teacher == pytest.approx(tau**2 * entropy, rel=1e-5)
    assert elsewhere > at_teacher
