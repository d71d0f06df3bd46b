"""The divergences of the student from the teacher: each gradient against its hand-derived closed form (in
float64), each value against its definition, the direction of each (teacher first or student first), the
minimum at the teacher, and the limits the normalisations promise."""

from __future__ import annotations

import pytest
import torch

from kd_ray.config import LOSSES, ConfigError, TrialConfig
from kd_ray.train.losses import divergence, kd_loss

N, C = 16, 7
TAUS = [0.5, 1.0, 4.0]


def batch(seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Student logits and teacher log-probabilities that differ everywhere."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(N, C, generator=g, dtype=dtype) * 2.0
    teacher = torch.log_softmax(torch.randn(N, C, generator=g, dtype=dtype) * 3.0, -1)
    return student, teacher


def gradient(loss: str, student: torch.Tensor, teacher: torch.Tensor, tau: float, **kwargs) -> torch.Tensor:
    z = student.clone().requires_grad_(True)
    kd_loss(z, teacher, temperature=tau, loss=loss, **kwargs).backward()
    return z.grad


def softmax_jacobian_times(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d/da of a function of q = softmax(a) whose gradient in q is g: q * (g - <q, g>)."""
    return q * (g - (q * g).sum(-1, keepdim=True))


def centred(v: torch.Tensor) -> torch.Tensor:
    return v - v.mean(-1, keepdim=True)


def reference_gradient(loss: str, student: torch.Tensor, teacher: torch.Tensor, tau: float,
                       beta: float = 0.5) -> torch.Tensor:
    """The gradient of tau^2 * mean_n D(p_t, p_s) in the student's logits, derived by hand: the chain rule
    through a = z / tau gives tau^2 / tau / N times the gradient in a."""
    q = torch.softmax(student / tau, -1)
    p = torch.softmax(teacher / tau, -1)
    scale = tau / N
    if loss in ("kl", "soft_ce"):  # d/dq of -sum p log q is -p / q; through the softmax: q - p
        return scale * (q - p)
    reverse = softmax_jacobian_times(q, torch.log(q) - torch.log(p))  # d/dq KL(q || p) = log q - log p + 1
    if loss == "reverse_kl":
        return scale * reverse
    if loss == "symmetric_kl":
        return scale * ((q - p) + reverse) / 2
    if loss == "jsd":  # d/dq of the weighted sum is (1 - beta) log(q / m); divided by beta (1 - beta)
        m = beta * p + (1 - beta) * q
        return scale * softmax_jacobian_times(q, torch.log(q / m)) / beta
    assert loss == "mse_logits"  # d/dz of mean_c (c(z) - c(t))^2 / 2, then the batch mean; no temperature
    return (centred(student) - centred(teacher)) / (C * N)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of each row, from probabilities."""
    return (p * torch.log(p / q)).sum(-1)


def reference_value(loss: str, student: torch.Tensor, teacher: torch.Tensor, tau: float,
                    beta: float = 0.5) -> float:
    """Each loss from its definition on probabilities (not log-softmaxes), in float64."""
    q = torch.softmax(student / tau, -1)
    p = torch.softmax(teacher / tau, -1)
    if loss in ("kl", "soft_ce"):
        per_example = -(p * torch.log(q)).sum(-1)
    elif loss == "reverse_kl":
        per_example = kl(q, p)
    elif loss == "symmetric_kl":
        per_example = (kl(p, q) + kl(q, p)) / 2
    elif loss == "jsd":
        m = beta * p + (1 - beta) * q
        per_example = (beta * kl(p, m) + (1 - beta) * kl(q, m)) / (beta * (1 - beta))
    else:
        return float(((centred(student) - centred(teacher)) ** 2).mean(-1).mean() / 2)
    return float(per_example.mean() * tau**2)


# --- gradients and values against their closed forms ---------------------------------------------


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("loss", LOSSES)
def test_gradient_is_the_hand_derived_one(loss, tau):
    student, teacher = batch(seed=LOSSES.index(loss))
    torch.testing.assert_close(gradient(loss, student, teacher, tau),
                               reference_gradient(loss, student, teacher, tau), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_gradient_follows_beta(beta):
    student, teacher = batch(seed=20)
    torch.testing.assert_close(gradient("jsd", student, teacher, 2.0, jsd_beta=beta),
                               reference_gradient("jsd", student, teacher, 2.0, beta), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("loss", LOSSES)
def test_value_is_the_definition(loss, tau):
    student, teacher = batch(seed=30 + LOSSES.index(loss))
    value = kd_loss(student, teacher, temperature=tau, loss=loss, jsd_beta=0.3)
    assert value.dtype == torch.float64 and value.dim() == 0
    assert value.item() == pytest.approx(reference_value(loss, student, teacher, tau, beta=0.3), rel=1e-10)


def test_kl_is_the_cross_entropy_form_to_the_bit():
    """The default loss is computed as before the divergence became an axis: tau^2 * CE, term for term."""
    student, teacher = batch(seed=40, dtype=torch.float32)
    tau = 3.0
    before = -(torch.softmax(teacher / tau, -1) * torch.log_softmax(student / tau, -1)).sum(-1).mean() * tau**2
    assert torch.equal(kd_loss(student, teacher, temperature=tau), before)
    assert torch.equal(kd_loss(student, teacher, temperature=tau, loss="kl"), before)
    # soft_ce is the same objective: value and gradient.
    assert torch.equal(kd_loss(student, teacher, temperature=tau, loss="soft_ce"), before)
    torch.testing.assert_close(gradient("soft_ce", student, teacher, tau), gradient("kl", student, teacher, tau),
                               rtol=0, atol=0)


# --- direction: teacher first or student first ---------------------------------------------------


def test_forward_and_reverse_gradients_differ_where_the_distributions_do():
    student, teacher = batch(seed=50)
    forward, reverse = gradient("kl", student, teacher, 1.0), gradient("reverse_kl", student, teacher, 1.0)
    differs = (forward - reverse).abs().amax(-1)
    assert (differs > 1e-3).all()  # every example's p_s differs from its p_t, so every row's gradient does
    # On an example where the student is the teacher, both vanish.
    student[0] = teacher[0]
    assert gradient("kl", student, teacher, 1.0)[0].abs().max() < 1e-15
    assert gradient("reverse_kl", student, teacher, 1.0)[0].abs().max() < 1e-15


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_swapping_teacher_and_student_turns_reverse_into_forward(tau):
    a, b = batch(seed=60)
    log_a, log_b = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    # reverse_kl(student a, teacher b) = KL(p_a || p_b) = kl(student b, teacher a) minus a's entropy.
    reverse = kd_loss(a, log_b, temperature=tau, loss="reverse_kl")
    p_a = torch.softmax(log_a / tau, -1)
    entropy = -(p_a * torch.log(p_a)).sum(-1).mean() * tau**2
    forward_swapped = kd_loss(b, log_a, temperature=tau, loss="kl") - entropy
    assert reverse.item() == pytest.approx(forward_swapped.item(), rel=1e-10)
    # Not the same number unswapped: the direction is held.
    forward = kd_loss(a, log_b, temperature=tau, loss="kl") - kd_loss(log_b, log_b, temperature=tau, loss="kl")
    assert abs(forward.item() - reverse.item()) > 1e-2


def best_one_mode(loss: str, teacher: torch.Tensor) -> tuple[float, float]:
    """The (centre, width) of a one-mode student over ordered classes, logits -(c - mu)^2 / (2 sigma^2), that
    minimises ``loss`` against ``teacher`` (log-probabilities), searched on a grid: the global optimum."""
    classes = torch.arange(teacher.shape[-1], dtype=torch.float64)
    mus = torch.arange(0.0, classes[-1].item() + 0.125, 0.125, dtype=torch.float64)
    sigmas = torch.exp(torch.linspace(-1.0, 2.5, 71, dtype=torch.float64))
    mu, sigma = (grid.reshape(-1, 1) for grid in torch.meshgrid(mus, sigmas, indexing="ij"))
    students = -((classes - mu) ** 2) / (2 * sigma**2)
    values = divergence(students, teacher.expand_as(students), loss)
    best = int(values.argmin())
    return mu[best].item(), sigma[best].item()


def test_reverse_kl_seeks_a_mode_where_forward_kl_covers_both():
    # A teacher with two equal modes, at classes 5 and 15 of 21.
    classes = torch.arange(21, dtype=torch.float64)
    modes = torch.stack([-((classes - 5) ** 2) / 2, -((classes - 15) ** 2) / 2])
    teacher = torch.log_softmax(torch.logsumexp(modes, 0), -1)
    forward_mu, forward_sigma = best_one_mode("kl", teacher)
    reverse_mu, reverse_sigma = best_one_mode("reverse_kl", teacher)
    assert abs(forward_mu - 10.0) < 0.5 and forward_sigma > 3.0  # mass-covering: between the modes, wide
    assert min(abs(reverse_mu - 5.0), abs(reverse_mu - 15.0)) < 0.5 and reverse_sigma < 1.5  # on one mode, narrow


# --- the minimum at the teacher ------------------------------------------------------------------


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("loss", LOSSES)
def test_a_student_equal_to_its_teacher_is_at_the_minimum_with_zero_gradient(loss, tau):
    _, teacher = batch(seed=70)
    # Logits equal to the teacher's log-probabilities up to a per-example shift are the teacher.
    student = teacher + torch.arange(N, dtype=torch.float64)[:, None]
    value = kd_loss(student, teacher, temperature=tau, loss=loss).item()
    if loss in ("kl", "soft_ce"):  # the cross-entropy form: its minimum is tau^2 H(p_t)
        p = torch.softmax(teacher / tau, -1)
        assert value == pytest.approx((-(p * torch.log(p)).sum(-1).mean() * tau**2).item(), rel=1e-12)
    else:
        assert abs(value) < 1e-12
    assert gradient(loss, student, teacher, tau).abs().max() < 1e-12
    # Anywhere else the loss is larger.
    elsewhere, _ = batch(seed=71)
    assert kd_loss(elsewhere, teacher, temperature=tau, loss=loss).item() > value + 1e-3


# --- the normalisations --------------------------------------------------------------------------


def test_jsd_tends_to_forward_kl_as_beta_vanishes_and_to_reverse_kl_as_it_nears_one():
    student, teacher = batch(seed=80)
    tau = 2.0
    forward = kd_loss(student, teacher, temperature=tau, loss="kl") - kd_loss(teacher, teacher, temperature=tau)
    reverse = kd_loss(student, teacher, temperature=tau, loss="reverse_kl")
    assert kd_loss(student, teacher, temperature=tau, loss="jsd", jsd_beta=1e-5).item() == pytest.approx(
        forward.item(), rel=1e-3)
    assert kd_loss(student, teacher, temperature=tau, loss="jsd", jsd_beta=1 - 1e-5).item() == pytest.approx(
        reverse.item(), rel=1e-3)


@pytest.mark.parametrize("loss", ["reverse_kl", "symmetric_kl", "jsd"])
def test_near_the_teacher_every_kl_like_loss_has_kl_s_curvature(loss):
    """A learning rate tuned for kl suits the others: close to p_s = p_t they agree to first order."""
    _, teacher = batch(seed=90)
    nudge = 1e-3 * torch.randn(N, C, generator=torch.Generator().manual_seed(91), dtype=torch.float64)
    student = teacher + nudge
    forward = kd_loss(student, teacher, temperature=1.0) - kd_loss(teacher, teacher, temperature=1.0)
    for beta in (0.2, 0.5, 0.8):
        value = kd_loss(student, teacher, temperature=1.0, loss=loss, jsd_beta=beta)
        assert value.item() == pytest.approx(forward.item(), rel=1e-2)


def test_mse_logits_is_kl_s_large_temperature_limit_and_ignores_temperature():
    student, teacher = batch(seed=100)
    mse = gradient("mse_logits", student, teacher, 1.0)
    torch.testing.assert_close(gradient("mse_logits", student, teacher, 8.0), mse, rtol=0, atol=0)
    torch.testing.assert_close(gradient("kl", student, teacher, 1e6), mse, rtol=1e-3, atol=1e-7)


# --- the label term, precision, stability, bad names ---------------------------------------------


@pytest.mark.parametrize("loss", LOSSES)
def test_the_label_term_is_added_as_for_kl(loss):
    student, teacher = batch(seed=110)
    labels = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(111))
    alpha, tau = 0.3, 2.0
    total = kd_loss(student, teacher, labels, temperature=tau, alpha=alpha, loss=loss)
    soft = kd_loss(student, teacher, temperature=tau, loss=loss)
    hard = torch.nn.functional.cross_entropy(student, labels)
    assert total.item() == pytest.approx((alpha * hard + (1 - alpha) * soft).item(), rel=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_low_precision_inputs_are_computed_in_float32(loss):
    student, teacher = batch(seed=120, dtype=torch.float32)
    value = kd_loss(student.bfloat16(), teacher.bfloat16(), temperature=2.0, loss=loss)
    assert value.dtype == torch.float32
    reference = kd_loss(student.bfloat16().float(), teacher.bfloat16().float(), temperature=2.0, loss=loss)
    assert value.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize("loss", LOSSES)
def test_extreme_logits_give_finite_losses_and_gradients(loss):
    # A one-hot teacher (log-probabilities near -1e4) and a saturated student, in float32.
    student = torch.tensor([[80.0, -80.0, 0.0], [-1e4, 1e4, 0.0]])
    teacher = torch.log_softmax(torch.tensor([[1e4, 0.0, -1e4], [0.0, 0.0, 1e4]]), -1)
    z = student.clone().requires_grad_(True)
    value = kd_loss(z, teacher, temperature=1.0, loss=loss)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()


def test_an_unknown_loss_is_named():
    student, teacher = batch(seed=130)
    with pytest.raises(ValueError, match="loss: got 'kl2'; expected one of kl, reverse_kl"):
        divergence(student, teacher, "kl2")
    with pytest.raises(ConfigError, match="loss"):
        TrialConfig(loss="kl2")
