"""Students of one pack that differ in their divergence: each student's loss and gradient are those of the
lone ``kd_loss``, the kl path is unchanged, and a pack of mixed divergences trains as its students alone."""

from __future__ import annotations

import pytest
import torch

from kd_ray.config import LOSSES, TrialConfig
from kd_ray.models.archs import build_model
from kd_ray.packs.optim import pack_kd_loss
from kd_ray.packs.plan import plan_packs
from kd_ray.packs.run import run_pack
from kd_ray.packs.wide import student_state, widen
from kd_ray.train.losses import kd_loss
from kd_ray.train.trial import run_trial

K, C, B = 8, 10, 32
# Every divergence, two of them twice (with another temperature or beta), in an order that interleaves them.
MIXED = ["jsd", "kl", "mse_logits", "reverse_kl", "symmetric_kl", "jsd", "soft_ce", "reverse_kl"]
TINY = dict(dataset="mnist1d", teacher_arch="mlp", student_arch="mlp", teacher_epochs=2, teacher_members=2,
            epochs=3, eval_every=1, batch_size=256, device="cpu", precision="fp32")


def stack(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits, teacher log-probabilities (``[K, batch, classes]``) and labels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(K, B, C, generator=g) * 2.0
    teacher = torch.log_softmax(torch.randn(K, B, C, generator=g) * 3.0, -1)
    return logits, teacher, torch.randint(0, C, (B,), generator=g)


def test_each_student_of_a_mixed_pack_has_its_lone_loss_and_gradient():
    logits, teacher, labels = stack(seed=0)
    tau = torch.tensor([1.0, 4.0, 2.0, 0.5, 3.0, 2.0, 4.0, 1.5])
    alpha = torch.tensor([0.0, 0.0, 0.3, 0.0, 0.5, 0.0, 0.0, 0.2])
    beta = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.2, 0.5, 0.5])
    mix = torch.randperm(B, generator=torch.Generator().manual_seed(1))
    packed = logits.transpose(1, 2).contiguous().requires_grad_(True)  # class-major, as a wide network gives them
    losses = pack_kd_loss(packed, teacher.transpose(1, 2), labels, tau, alpha, mix, 0.7, MIXED, beta)
    losses.sum().backward()
    assert losses.shape == (K,)
    for k, name in enumerate(MIXED):
        alone = logits[k].clone().requires_grad_(True)
        expected = kd_loss(alone, teacher[k], labels, temperature=float(tau[k]), alpha=float(alpha[k]), mix_index=mix,
                           lam=0.7, loss=name, jsd_beta=float(beta[k]))
        expected.backward()
        torch.testing.assert_close(losses[k], expected.detach(), rtol=1e-6, atol=0, msg=f"student {k}: {name}")
        # Relative to the gradient's scale: an element near 0 is a difference of nearly equal probabilities.
        scale = alone.grad.abs().max().item()
        torch.testing.assert_close(packed.grad[k].T, alone.grad, rtol=1e-6, atol=1e-6 * scale,
                                   msg=f"student {k}: {name}")


def test_a_pack_of_kl_students_computes_as_before_divergences_varied():
    logits, teacher, labels = stack(seed=2)
    logits, teacher = logits.transpose(1, 2), teacher.transpose(1, 2)
    tau, alpha = torch.linspace(1.0, 8.0, K), torch.zeros(K)
    # The one expression every pack ran before: one call over the whole stack, bit for bit.
    view = tau.view(-1, 1, 1)
    before = -(torch.softmax(teacher / view, 1) * torch.log_softmax(logits / view, 1)).sum(1).mean(-1) * tau**2
    assert torch.equal(pack_kd_loss(logits, teacher, labels, tau, alpha), before)
    assert torch.equal(pack_kd_loss(logits, teacher, labels, tau, alpha, losses=["kl"] * K), before)
    # One divergence other than kl is one call too, and equals the grouped computation of a mixed pack.
    uniform = pack_kd_loss(logits, teacher, labels, tau, alpha, losses=["reverse_kl"] * K)
    mixed = pack_kd_loss(logits, teacher, labels, tau, alpha, losses=["reverse_kl"] * (K - 1) + ["kl"])
    torch.testing.assert_close(mixed[:-1], uniform[:-1], rtol=1e-6, atol=0)
    torch.testing.assert_close(mixed[-1], before[-1], rtol=1e-6, atol=0)


def test_a_loss_per_student_is_required():
    logits, teacher, labels = stack(seed=3)
    with pytest.raises(ValueError, match="3 losses for 8 students"):
        pack_kd_loss(logits, teacher, labels, torch.ones(K), torch.zeros(K), losses=["kl", "jsd", "kl"])


def test_students_that_differ_in_divergence_share_a_pack():
    configs = [TrialConfig(**TINY, loss=name) for name in LOSSES] + [TrialConfig(**TINY, loss="jsd", jsd_beta=0.2)]
    assert [pack.trial_indices for pack in plan_packs(configs)] == [tuple(range(len(configs)))]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("pack_divergence_teachers"))


def test_over_the_first_steps_a_mixed_pack_is_its_students_trained_alone(store):
    # Three optimizer steps, the tolerance of tests/packs/test_packs.py: float32 rounding has not yet grown.
    changes = [dict(loss=name) for name in LOSSES] + [dict(loss="jsd", jsd_beta=0.2, temperature=4.0)]
    configs = [TrialConfig(**{**TINY, "steps": 3, **change}) for change in changes]
    checkpoints: dict[int, dict] = {}
    run_pack(configs, lambda epoch, _metrics, state: checkpoints.update({epoch: state}), store=store)
    template = build_model("mlp", (40,), 10, "batch")
    wide = widen([template] * len(configs))
    wide.load_state_dict(checkpoints[1]["pack"]["wide"])
    first_layers = []
    for k, cfg in enumerate(configs):
        packed = student_state(wide, template, k)
        lone: dict[int, dict] = {}
        run_trial(cfg, lambda metrics, state, saved=lone: saved.update({metrics["epoch"]: state}), store=store)
        for name, value in lone[1]["train_state"]["model"].items():
            torch.testing.assert_close(packed[name], value, rtol=1e-4, atol=1e-5, msg=f"{k}, {cfg.loss}: {name}")
        first_layers.append(lone[1]["train_state"]["model"]["1.weight"])
    # The divergences trained different students (kl and soft_ce the same one): the comparison is not vacuous.
    kl, soft_ce = LOSSES.index("kl"), LOSSES.index("soft_ce")
    assert torch.equal(first_layers[kl], first_layers[soft_ce])
    for i in range(len(configs)):
        for j in range(i):
            if {i, j} != {kl, soft_ce}:
                assert (first_layers[i] - first_layers[j]).abs().max() > 1e-4, (configs[i].loss, configs[j].loss)
