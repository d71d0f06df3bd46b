"""Extra distillation inputs (kd_ray.data.extra_inputs): the Gaussian-mixture generator, the out-of-domain
pool, a user's .npz, their validation, and mixing extras into every batch at a fixed ratio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kd_ray.config import ConfigError, TrialConfig
from kd_ray.data.datasets import DATASET_INFO, load_arrays
from kd_ray.data.extra_inputs import UNLABELLED, gmm_samples, ood_pool, read_extra_npz
from kd_ray.models.archs import build_model
from kd_ray.train.distill import AugmentSpec, ExtraBatches, Recipe, TrainState, fit, schedule
from kd_ray.train.setup import check_runnable
from kd_ray.train.trial import run_trial

SIGNALS = DATASET_INFO["mnist1d"]


@pytest.fixture(scope="module")
def mnist1d():
    return load_arrays("mnist1d")


def test_gmm_samples_follow_the_classes_of_the_data_they_are_fitted_to(mnist1d):
    x, y = gmm_samples(mnist1d.x_train, mnist1d.y_train, 3000, SIGNALS, seed=7)
    assert x.shape == (3000, 1, 40) and x.dtype == np.float32 and y.dtype == np.int64
    # Classes in the data's proportions (mnist1d is balanced): each near 300.
    assert np.all(np.abs(np.bincount(y, minlength=10) - 300) < 60)
    # Class-conditional: each class's samples sit near that class's mean signal, nearer than to any other's.
    means = np.stack([mnist1d.x_train[mnist1d.y_train == c].mean(0).ravel() for c in range(10)])
    for c in range(10):
        sample_mean = x[y == c].mean(0).ravel()
        distances = np.linalg.norm(means - sample_mean, axis=1)
        assert distances.argmin() == c, (c, distances)
    # Samples, not copies of the training signals.
    assert not np.isin(x[:50].ravel(), mnist1d.x_train.ravel()).all()


def test_gmm_samples_are_a_draw_of_their_seed(mnist1d):
    first = gmm_samples(mnist1d.x_train[:800], mnist1d.y_train[:800], 100, SIGNALS, seed=1)
    again = gmm_samples(mnist1d.x_train[:800], mnist1d.y_train[:800], 100, SIGNALS, seed=1)
    other = gmm_samples(mnist1d.x_train[:800], mnist1d.y_train[:800], 100, SIGNALS, seed=2)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.allclose(first[0], other[0])


def test_gmm_samples_of_images_stay_in_the_unit_interval():
    digits = load_arrays("digits")
    x, _ = gmm_samples(digits.x_train, digits.y_train, 200, DATASET_INFO["digits"], seed=3)
    assert x.shape == (200, 1, 8, 8) and x.min() >= 0.0 and x.max() <= 1.0


def test_the_out_of_domain_pool_is_signals_of_mnist1d_s_shape_and_scale(mnist1d):
    pool = ood_pool(SIGNALS)
    assert pool.shape == (1797, 1, 40) and pool.dtype == np.float32
    assert abs(float(pool.mean())) < 1e-4 and abs(float(pool.std()) - 1.0) < 1e-4
    assert abs(float(mnist1d.x_train.std()) - 1.0) < 0.05  # the same scale as mnist1d's own signals


def write_npz(path: Path, **arrays) -> str:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return str(path)


def test_a_users_npz_is_read_and_checked(tmp_path):
    x = np.random.default_rng(0).random((30, 1, 8, 8), dtype=np.float32)
    good = write_npz(tmp_path / "good.npz", x=x, y=np.arange(30) % 10)
    got_x, got_y = read_extra_npz(good, 20, DATASET_INFO["digits"])
    assert np.array_equal(got_x, x[:20]) and np.array_equal(got_y, np.arange(20) % 10)
    unlabelled = write_npz(tmp_path / "unlabelled.npz", x=x)
    assert (read_extra_npz(unlabelled, 5, DATASET_INFO["digits"])[1] == UNLABELLED).all()

    cases = {
        "no_x.npz": ({"images": x}, "has no array 'x'"),
        "shape.npz": ({"x": x.reshape(30, 64)}, "x has shape (30, 64)"),
        "labels.npz": ({"x": x, "y": np.full(30, 10)}, "integer labels in [0, 10)"),
    }
    for name, (arrays, message) in cases.items():
        with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            read_extra_npz(write_npz(tmp_path / name, **arrays), 5, DATASET_INFO["digits"])
    with pytest.raises(RuntimeError, match="holds 30 inputs, fewer than extra_data=31"):
        read_extra_npz(good, 31, DATASET_INFO["digits"])
    (tmp_path / "broken.npz").write_bytes(b"not a zip file")
    with pytest.raises(RuntimeError, match="cannot be read"):
        read_extra_npz(tmp_path / "broken.npz", 5, DATASET_INFO["digits"])


def test_extra_inputs_that_cannot_be_had_are_refused_before_any_compute(tmp_path):
    def refused(**fields) -> str:
        with pytest.raises(ConfigError) as info:
            check_runnable(TrialConfig.from_dict(fields), check_device=False)
        return str(info.value)

    digits = dict(dataset="digits", teacher_arch="smallcnn", student_arch="smallcnn")
    assert "extra_path" in refused(extra_source="npz", extra_data=10)
    assert "extra_path='x.npz' is read only with extra_source='npz'" in refused(extra_path="x.npz")
    assert "extra_source='ood'" in refused(**digits, extra_source="ood", extra_data=10)
    assert "alpha=0.5 needs labels" in refused(extra_source="ood", extra_data=10, alpha=0.5)
    assert "more than the 1797 out-of-domain inputs" in refused(extra_source="ood", extra_data=2000)
    assert "extra_ratio=5" in refused(extra_ratio=5)
    assert "extra_source='vae'" in refused(extra_source="vae")
    missing = str(tmp_path / "missing.npz")
    assert f"extra_path={missing!r} cannot be read" in refused(**digits, extra_source="npz", extra_path=missing,
                                                               extra_data=10)
    unlabelled = write_npz(tmp_path / "u.npz", x=np.zeros((10, 1, 8, 8), np.float32))
    assert "has no 'y'" in refused(**digits, extra_source="npz", extra_path=unlabelled, extra_data=10, alpha=0.3)
    check_runnable(TrialConfig(**digits, extra_source="npz", extra_path=unlabelled, extra_data=10), check_device=False)
    check_runnable(TrialConfig(extra_source="gmm", extra_data=10, extra_ratio=0.25), check_device=False)


def test_extras_ride_along_in_every_batch_without_changing_the_schedule(mnist1d):
    x = torch.as_tensor(mnist1d.x_train[:300])
    y = torch.as_tensor(mnist1d.y_train[:300])
    extra = ExtraBatches(torch.as_tensor(ood_pool(SIGNALS)[:50]), torch.full((50,), UNLABELLED), per_batch=16)
    recipe = Recipe(epochs=2, batch_size=64, optimizer="sgd", lr=0.05, weight_decay=0.0, lr_schedule="constant",
                    augmentation="none")

    def trained(extra_batches: ExtraBatches | None) -> tuple[list[torch.Tensor], TrainState]:
        seen: list[torch.Tensor] = []

        def teacher(inputs: torch.Tensor) -> torch.Tensor:
            seen.append(inputs.clone())
            return torch.log_softmax(torch.zeros(len(inputs), 10), dim=1)

        torch.manual_seed(0)
        model = build_model("mlp", (1, 40), 10, "batch")
        state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.05), torch.Generator().manual_seed(1),
                           extra_generator=torch.Generator().manual_seed(2))
        fit(state, x, y, recipe, AugmentSpec("signal", 4, False), teacher=teacher, extra=extra_batches)
        return seen, state

    plain, _ = trained(None)
    mixed, state = trained(extra)
    plan = schedule(recipe, len(x))
    assert len(plain) == len(mixed) == plan.total_steps  # the same optimizer steps
    for without, with_extra in zip(plain, mixed):
        # The distillation inputs of each batch are the same, in the same order; the extras follow them.
        assert torch.equal(with_extra[: len(without)], without)
        assert len(with_extra) == len(without) + 16
        tail = with_extra[len(without):]
        assert all((tail[i] == extra.x).flatten(1).all(1).any() for i in range(len(tail)))
    assert "extra_generator" in state.state_dict()  # a checkpoint resumes the extras' draws too


def test_a_trial_mixes_synthetic_inputs_at_a_ratio_with_the_same_step_budget(base_cfg):
    cfg = base_cfg.replace(teacher_members=1, epochs=2, eval_every=2)
    mixed = run_trial(cfg.replace(extra_source="gmm", extra_data=400, extra_ratio=0.25))
    joined = run_trial(cfg.replace(extra_source="gmm", extra_data=400))
    plain = run_trial(cfg)
    for result in (mixed, joined, plain):
        assert result["status"] == "TERMINATED", result["error"]
    assert mixed["student_steps"] == plain["student_steps"] < joined["student_steps"]
    assert mixed["test_agreement"] != plain["test_agreement"]  # the extras were trained on
