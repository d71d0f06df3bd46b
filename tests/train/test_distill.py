"""Tests for kd_ray.train.distill: schedule, student initialisation, the training loop, resuming, divergence."""

from __future__ import annotations

import io
import math

import pytest
import torch

from kd_ray.data.datasets import DATASET_INFO
from kd_ray.models.archs import build_model
from kd_ray.train.distill import (
    AugmentSpec,
    Diverged,
    Recipe,
    TrainState,
    build_seeded,
    fit,
    initialize_student,
    lr_at,
    make_optimizer,
    predict,
    schedule,
)
from kd_ray.train.metrics import accuracy, agreement, predictive_kl

SIGNAL = AugmentSpec("signal", 4, False)
SHAPE = DATASET_INFO["mnist1d"].input_shape


def _recipe(**changes) -> Recipe:
    values = dict(
        epochs=4, batch_size=64, optimizer="sgd", lr=0.05, weight_decay=1e-4, lr_schedule="cosine",
        augmentation="baseline",
    )
    values.update(changes)
    return Recipe(**values)


def _state(recipe: Recipe, seed: int = 0, norm: str = "batch") -> TrainState:
    model = build_seeded("conv1d", SHAPE, 10, norm, seed)
    return TrainState(
        model, make_optimizer(model, recipe), torch.Generator().manual_seed(seed),
        augment_generator=torch.Generator().manual_seed(seed + 1),
    )


@pytest.fixture(scope="module")
def small(mnist1d_arrays) -> tuple[torch.Tensor, torch.Tensor]:
    """512 mnist1d training samples."""
    return torch.as_tensor(mnist1d_arrays.x_train[:512]), torch.as_tensor(mnist1d_arrays.y_train[:512])


# --- schedule ----------------------------------------------------------------------------------


def test_cosine_schedule_runs_from_lr_to_final_lr() -> None:
    recipe = _recipe(lr=0.1, final_lr=0.001)
    total = 200
    values = [lr_at(recipe, step, total) for step in range(total + 1)]
    assert values[0] == pytest.approx(0.1)
    assert values[-1] == pytest.approx(0.001)
    assert values[total // 2] == pytest.approx((0.1 + 0.001) / 2)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_at(recipe, 10 * total, total) == pytest.approx(0.001)  # clamped past the end


def test_constant_schedule_is_constant() -> None:
    recipe = _recipe(lr=0.03, lr_schedule="constant", final_lr=0.0)
    assert {lr_at(recipe, step, 50) for step in range(51)} == {0.03}


@pytest.mark.parametrize(("n", "batch_size", "epochs", "steps", "expected"), [
    (512, 64, 3, 0, (8, 24, 3)),  # epochs decide
    (500, 64, 3, 0, (8, 24, 3)),  # a last short batch is a step
    (512, 64, 3, 20, (8, 20, 3)),  # steps decide: the third epoch is cut to 4 steps
    (100, 64, 3, 20, (2, 20, 10)),
    (512, 64, 3, 8, (8, 8, 1)),
])
def test_schedule(n: int, batch_size: int, epochs: int, steps: int, expected: tuple[int, int, int]) -> None:
    plan = schedule(_recipe(epochs=epochs, batch_size=batch_size, steps=steps), n)
    assert (plan.steps_per_epoch, plan.total_steps, plan.epochs) == expected
    assert sum(plan.steps_in(e) for e in range(plan.epochs)) == plan.total_steps
    assert all(plan.steps_in(e) >= 1 for e in range(plan.epochs))


# --- initialisation ----------------------------------------------------------------------------


def test_build_seeded_weights_follow_the_seed_alone() -> None:
    torch.manual_seed(99)
    before = torch.random.get_rng_state()
    a, b, c = (build_seeded("mlp", SHAPE, 10, "batch", seed) for seed in (5, 5, 6))
    assert torch.equal(torch.random.get_rng_state(), before)  # the global generator did not move
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.state_dict()["1.weight"], c.state_dict()["1.weight"])


def _model(seed: int, norm: str = "group") -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("conv1d", SHAPE, 10, norm)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_random_init_keeps_the_student() -> None:
    student = _model(2)
    before = _weights(student)
    initialize_student(student, "random", 0.0, _weights(_model(1)), _weights(_model(3)))
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k])


def test_teacher_init_copies_the_initial_weights() -> None:
    teacher_initial, teacher_final = _weights(_model(1, "batch")), _weights(_model(3, "batch"))
    student = _model(2, "batch")
    assert not torch.equal(student.state_dict()["0.weight"], teacher_initial["0.weight"])
    initialize_student(student, "teacher_init", 0.0, teacher_initial, teacher_final)
    state = student.state_dict()
    assert state.keys() == teacher_initial.keys()
    for k, v in teacher_initial.items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_interpolate(lam: float) -> None:
    teacher_final = _weights(_model(1))
    student = _model(2)
    random_weights = _weights(student)
    initialize_student(student, "interpolate", lam, None, teacher_final)
    state = student.state_dict()
    for k, v in state.items():
        if lam == 0.0:
            assert torch.equal(v, random_weights[k]), k
        elif lam == 1.0:
            assert torch.equal(v, teacher_final[k]), k
        else:
            torch.testing.assert_close(v, (random_weights[k] + teacher_final[k]) / 2)
    if lam == 0.5:
        assert not torch.equal(state["0.weight"], random_weights["0.weight"])
        assert not torch.equal(state["0.weight"], teacher_final["0.weight"])


# --- the loop ----------------------------------------------------------------------------------


def test_fit_lowers_the_loss(small) -> None:
    x, y = small
    recipe = _recipe(epochs=4)
    state = _state(recipe)
    acc_before = accuracy(predict(state.model, x), y)
    history: list[tuple[int, float, float]] = []
    fit(state, x, y, recipe, SIGNAL, on_epoch=lambda e, loss, lr: history.append((e, loss, lr)))
    assert [e for e, _, _ in history] == [1, 2, 3, 4]
    assert state.epoch == 4
    losses = [loss for _, loss, _ in history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0]
    assert history[-1][2] < history[0][2]  # cosine: the last lr is below the first
    assert accuracy(predict(state.model, x), y) > max(0.3, acc_before + 0.1)


def test_fit_with_a_teacher_moves_towards_it(small) -> None:
    x, y = small
    teacher_recipe = _recipe(epochs=6)
    teacher = _state(teacher_recipe, seed=5)
    fit(teacher, x, y, teacher_recipe, SIGNAL)
    teacher.model.eval()
    teacher_logits = predict(teacher.model, x)

    def teacher_fn(batch: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(teacher.model(batch), -1)

    recipe = _recipe(epochs=6, temperature=4.0)
    student = _state(recipe, seed=6)
    agreement_before = agreement(teacher_logits, predict(student.model, x))
    kl_before = predictive_kl(teacher_logits, predict(student.model, x))
    losses: list[float] = []
    fit(student, x, y, recipe, SIGNAL, teacher=teacher_fn, on_epoch=lambda e, loss, lr: losses.append(loss))
    assert losses[-1] < losses[0]
    assert agreement(teacher_logits, predict(student.model, x)) > agreement_before + 0.3
    assert predictive_kl(teacher_logits, predict(student.model, x)) < 0.5 * kl_before


@pytest.mark.parametrize("augmentation", ["baseline", "mixup"])
def test_resume_is_bit_identical(small, augmentation: str) -> None:
    x, y = small
    recipe = _recipe(epochs=4, augmentation=augmentation)
    full = _state(recipe)
    snapshots: dict[int, dict] = {}
    fit(full, x, y, recipe, SIGNAL, on_epoch=lambda e, loss, lr: snapshots.setdefault(e, full.state_dict()))
    snapshot = snapshots[2]
    assert snapshot["epoch"] == 2
    # A checkpoint goes through torch.save / torch.load(weights_only=True) on its way to disk.
    buffer = io.BytesIO()
    torch.save(snapshot, buffer)
    restored = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    for checkpoint in (snapshot, restored):
        resumed = _state(recipe, seed=123)  # different weights and generator until loaded
        resumed.load_state_dict(checkpoint)
        epochs_run: list[int] = []
        fit(resumed, x, y, recipe, SIGNAL, on_epoch=lambda e, loss, lr, run=epochs_run: run.append(e))
        assert epochs_run == [3, 4]
        final, got = full.model.state_dict(), resumed.model.state_dict()
        for k in final:
            assert torch.equal(final[k], got[k]), k
    # The snapshot kept the weights of epoch 2, not the live ones.
    assert not torch.equal(snapshot["model"]["0.weight"], full.model.state_dict()["0.weight"])


@pytest.mark.parametrize("n", [512, 100])
def test_steps_gives_exactly_that_many_optimizer_steps(small, n: int) -> None:
    x, y = small
    recipe = _recipe(epochs=2, steps=30, final_lr=1e-3)
    state = _state(recipe)
    lrs: list[float] = []
    state.optimizer.register_step_post_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    epochs: list[int] = []
    fit(state, x[:n], y[:n], recipe, SIGNAL, on_epoch=lambda e, loss, lr: epochs.append(e))
    plan = schedule(recipe, n)
    assert len(lrs) == 30 == plan.total_steps
    assert epochs == list(range(1, plan.epochs + 1)) and state.epoch == plan.epochs
    # The cosine schedule spans the 30 steps, whatever the data size.
    assert lrs[0] == pytest.approx(recipe.lr) and lrs[-1] == pytest.approx(lr_at(recipe, 29, 30))
    assert lrs[-1] < 0.05 * recipe.lr  # near final_lr: the schedule ended with the last step


def test_batch_order_and_augmentation_draw_from_their_own_generators(small) -> None:
    x, y = small
    recipe = _recipe(epochs=1, augmentation="mixup")
    runs = []
    for augment_seed in (1, 1, 2):
        model = build_seeded("conv1d", SHAPE, 10, "batch", 0)
        state = TrainState(model, make_optimizer(model, recipe), torch.Generator().manual_seed(0),
                           augment_generator=torch.Generator().manual_seed(augment_seed))
        fit(state, x, y, recipe, SIGNAL)
        runs.append((state.generator.get_state(), state.model.state_dict()["0.weight"]))
    # The augmentation stream moves the weights, never the batch generator's position.
    assert torch.equal(runs[0][0], runs[2][0])
    assert torch.equal(runs[0][1], runs[1][1]) and not torch.equal(runs[0][1], runs[2][1])


def test_absurd_learning_rate_diverges(small) -> None:
    x, y = small
    recipe = _recipe(epochs=3, lr=1e6, lr_schedule="constant")
    state = _state(recipe)
    seen: list[int] = []
    with pytest.raises(Diverged) as info:
        fit(state, x, y, recipe, SIGNAL, on_epoch=lambda e, loss, lr: seen.append(e))
    assert info.value.epoch == 1
    assert "non-finite" in str(info.value)
    assert seen == [] and state.epoch == 0


def test_scaled_inputs_diverge(small) -> None:
    x, y = small
    recipe = _recipe(epochs=2, lr=10.0, lr_schedule="constant")
    state = _state(recipe, norm="none")
    with pytest.raises(Diverged):
        fit(state, x * 1e6, y, recipe, SIGNAL)
