"""The ensemble rule: log(mean_i softmax(z_i)) against a hand computation, its properties, stability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_ray.models.ensembles import ensemble_log_probs


def test_ensemble_log_probs_matches_hand_computation() -> None:
    logits = np.array(
        [[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]],
         [[3.0, 1.0, -1.0], [5.0, -2.0, 0.5]]]
    )  # [m=2, N=2, C=3]
    softmax = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    expected = np.log(softmax.mean(axis=0))
    got = ensemble_log_probs(torch.tensor(logits))
    assert got.shape == (2, 3)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_ensemble_log_probs_properties() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 8, 10) * 3
    out = ensemble_log_probs(logits)
    torch.testing.assert_close(out.exp().sum(dim=-1), torch.ones(8))

    single = torch.randn(1, 8, 10)
    torch.testing.assert_close(ensemble_log_probs(single), torch.log_softmax(single[0], dim=-1))

    assert ensemble_log_probs(logits.half()).dtype == torch.float32
    assert ensemble_log_probs(logits.double()).dtype == torch.float32

    # Classes before the samples ([m, C, N]): the same numbers, transposed.
    class_major = ensemble_log_probs(logits.transpose(1, 2).contiguous(), class_dim=1)
    torch.testing.assert_close(class_major, out.t())


def test_ensemble_log_probs_is_stable() -> None:
    # Every member gives class 1 a probability of about e^-1000: the log stays finite (~ -1000)
    # where log(mean(softmax)) would underflow to -inf.
    logits = torch.tensor([[[0.0, -1000.0]], [[0.0, -1001.0]]])
    out = ensemble_log_probs(logits)
    assert torch.isfinite(out).all()
    expected = -1000.0 + np.log((1 + np.exp(-1.0)) / 2)
    assert out[0, 1].item() == pytest.approx(expected, abs=1e-3)

    with pytest.raises(ValueError, match=r"\[m, N, C\]"):
        ensemble_log_probs(torch.zeros(4, 10))
