"""The wide network of a pack and its optimizer: each student's block computes what the student alone
computes, gradients and updates included, and no block touches another."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kd_ray.models.archs import build_model
from kd_ray.packs.optim import PackOptimizer, pack_kd_loss
from kd_ray.packs.wide import (
    NotFusable,
    fold_batch_norms,
    narrow,
    student_state,
    wide_forward,
    widen,
)
from kd_ray.train.losses import kd_loss

ARCHS = [
    ("mlp", (40,), "batch"), ("mlp", (40,), "group"), ("mlp", (40,), "none"), ("mlp4-w0.5", (1, 40), "batch"),
    ("conv1d", (1, 40), "batch"), ("smallcnn", (1, 8, 8), "group"), ("lenet5", (1, 28, 28), "none"),
    ("preresnet20", (3, 16, 16), "batch"), ("preresnet20", (3, 16, 16), "none"),
]


def students(arch: str, shape: tuple[int, ...], norm: str, k: int = 3) -> list[nn.Module]:
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(build_model(arch, shape, 10, norm))
    return models


@pytest.mark.parametrize("arch, shape, norm", ARCHS, ids=[f"{a}-{n}" for a, _, n in ARCHS])
def test_each_block_of_the_wide_network_is_its_student(arch, shape, norm):
    models = students(arch, shape, norm)
    wide = widen(models).train()
    alone = [copy.deepcopy(m).train() for m in models]
    x = torch.rand(16, *shape)
    out = wide_forward(wide, x)
    assert out.shape == (3, 16, 10)
    outs = [model(x) for model in alone]
    for k in range(3):
        torch.testing.assert_close(out[k], outs[k], rtol=1e-4, atol=1e-5)
    # Training-mode statistics moved the same way, and the gradients are each student's own.
    out.sum(dim=(1, 2)).mul(torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    for k, model in enumerate(alone):
        outs[k].sum().mul(k + 1.0).backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        for name, p in wide.named_parameters():
            torch.testing.assert_close(p.grad.reshape(3, *grads[name].shape)[k], grads[name], rtol=1e-4, atol=1e-5)
    for k, model in enumerate(alone):
        own = student_state(wide, models[0], k)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(own[name], value, rtol=1e-4, atol=1e-5)
    # Evaluation mode uses each student's running statistics.
    wide.eval()
    out = wide_forward(wide, x)
    for k, model in enumerate(alone):
        torch.testing.assert_close(out[k], model.eval()(x), rtol=1e-4, atol=1e-5)
    # The loss's layout holds the same logits, classes before the batch.
    class_major = wide_forward(wide, x, class_major=True)
    assert class_major.is_contiguous()
    torch.testing.assert_close(class_major, out.transpose(1, 2), rtol=0, atol=0)


def test_a_student_taken_out_is_the_same_network():
    models = students("mlp", (40,), "batch")
    wide = widen(models)
    for k, model in enumerate(models):
        out = narrow(wide, models[0], k)
        assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), model.state_dict().values()))
        assert out.stage_names == model.stage_names


def test_folding_the_batch_norms_keeps_each_student_s_evaluation():
    models = students("mlp", (40,), "batch")
    for model in models:  # running statistics of their own
        model.train()(torch.randn(32, 40) * 2 + 1)
    wide = widen(models).eval()
    folded = fold_batch_norms(wide)
    assert not any(isinstance(layer, nn.BatchNorm1d) for layer in folded)
    x = torch.rand(16, 40)
    out = wide_forward(folded, x)
    for k, model in enumerate(models):
        torch.testing.assert_close(out[k], model.eval()(x), rtol=1e-4, atol=1e-5)
    assert any(isinstance(layer, nn.BatchNorm1d) for layer in wide)  # the wide network itself is unchanged
    assert fold_batch_norms(wide.train()) is wide  # training uses the batch's statistics: nothing to fold
    channel_blocked = widen(students("conv1d", (1, 40), "batch"))
    assert fold_batch_norms(channel_blocked.eval()) is channel_blocked


def test_a_layer_that_cannot_be_widened_is_refused():
    models = [nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(2)]
    with pytest.raises(NotFusable, match="LayerNorm"):
        widen(models)


def test_pack_kd_loss_is_kd_loss_per_student():
    torch.manual_seed(0)
    logits, teacher = torch.randn(3, 32, 10), torch.log_softmax(torch.randn(3, 32, 10), -1)
    labels, mix = torch.randint(0, 10, (32,)), torch.randperm(32)
    tau, alpha = torch.tensor([1.0, 4.0, 8.0]), torch.tensor([0.0, 0.3, 1.0])
    losses = pack_kd_loss(logits.transpose(1, 2), teacher.transpose(1, 2), labels, tau, alpha, mix, 0.7)
    for k in range(3):
        expected = kd_loss(logits[k], teacher[k], labels, temperature=float(tau[k]), alpha=float(alpha[k]),
                           mix_index=mix, lam=0.7)
        torch.testing.assert_close(losses[k], expected)


@pytest.mark.parametrize("optimizers", [["sgd", "sgd"], ["adam", "adam"], ["sgd", "adam"]])
def test_the_pack_optimizer_follows_torch_s_optimizers(optimizers):
    """The same gradients into the pack's optimizer and into torch's, student by student: the same
    weights after every step (Adam's update divides by a root of the gradient's square, so a test
    through a network would compare the network's rounding, amplified, rather than the optimizer)."""
    models = students("mlp", (40,), "batch", k=2)
    wide = widen(models)
    alone = [copy.deepcopy(m) for m in models]
    lrs, decays = [0.05, 0.01], [1e-4, 5e-4]
    optimizer = PackOptimizer(list(wide.parameters()), 2, decays, [o == "adam" for o in optimizers])
    torch_optimizers = [
        torch.optim.Adam(m.parameters(), lr=lr, weight_decay=wd) if name == "adam"
        else torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
        for m, name, lr, wd in zip(alone, optimizers, lrs, decays)
    ]
    torch.manual_seed(1)
    names = [name for name, _ in models[0].named_parameters()]
    for _ in range(5):
        for name, p in wide.named_parameters():
            p.grad = torch.randn_like(p)
            for k, model in enumerate(alone):
                twin = model.get_parameter(name)
                twin.grad = p.grad.reshape(2, *twin.shape)[k].clone()
        optimizer.step(torch.tensor(lrs))
        for torch_optimizer in torch_optimizers:
            torch_optimizer.step()
        for k, model in enumerate(alone):
            own = student_state(wide, models[0], k)
            for name in names:
                torch.testing.assert_close(own[name], model.get_parameter(name).detach(), rtol=1e-5, atol=1e-6)


def test_the_pack_optimizer_keeps_the_state_of_the_students_that_stay():
    models = students("mlp", (40,), "none", k=3)
    wide = widen(models)
    optimizer = PackOptimizer(list(wide.parameters()), 3, [0.0, 1e-4, 2e-4], [False, True, False])
    wide_forward(wide, torch.rand(8, 40)).sum().backward()
    optimizer.step(torch.tensor([0.1, 0.01, 0.1]))
    kept_wide = widen([narrow(wide, models[0], k) for k in (0, 2)])
    kept = optimizer.keep([0, 2], list(kept_wide.parameters()))
    assert kept.k == 2 and kept.any_sgd and not kept.any_adam and set(kept.state[0]) == {"momentum"}
    for before, after in zip(optimizer.state, kept.state):
        torch.testing.assert_close(after["momentum"], before["momentum"][[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(kept.weight_decay.view(-1), torch.tensor([0.0, 2e-4]))
