"""One readable training loop, used for teacher members (labels) and students (a teacher).

Data is one tensor on the device; a batch is an index slice of a per-epoch permutation; the batch is
augmented on the device and, when distilling, the teacher labels that very augmented batch. The
permutations and the augmentation draws come from two generators, each seeded from its own stream.
A recipe trains for a number of epochs, or for an exact number of optimizer steps (``steps``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from kd_ray.data.augment import AugmentedBatch, augment
from kd_ray.models.archs import build_model
from kd_ray.train.losses import kd_loss

TeacherFn = Callable[[torch.Tensor], torch.Tensor]  # inputs -> ensemble log-probabilities
EpochCallback = Callable[[int, float, float], None]  # (epoch, mean train loss, last lr)


@dataclass(frozen=True)
class Recipe:
    epochs: int  # unused when steps > 0
    batch_size: int
    optimizer: str  # sgd (momentum 0.9, Nesterov for students) | adam
    lr: float
    weight_decay: float
    lr_schedule: str  # cosine | constant
    augmentation: str
    mixup_alpha: float = 1.0
    temperature: float = 1.0
    alpha: float = 0.0
    loss: str = "kl"  # the divergence from the teacher (kd_ray.train.losses)
    jsd_beta: float = 0.5
    nesterov: bool = True
    final_lr: float = 0.0
    bf16: bool = False  # bf16 autocast for the forward passes; losses and metrics stay float32
    channels_last: bool = False  # image batches in channels_last layout
    steps: int = 0  # > 0: exactly this many optimizer steps, the last epoch cut short


@dataclass(frozen=True)
class Schedule:
    """How long a recipe trains on ``n`` samples: epochs of ``steps_per_epoch`` steps, ``total_steps``
    in all (the last epoch may be shorter); the learning-rate schedule runs over ``total_steps``."""

    steps_per_epoch: int
    total_steps: int
    epochs: int

    def steps_in(self, epoch: int) -> int:
        """Optimizer steps of epoch ``epoch`` (0-based)."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Batches of ``batch_size`` in an epoch over ``n`` samples: ``ceil(n / batch_size)``, except that a
    last batch of fewer than half ``batch_size`` samples joins the batch before it. Batch norm trains on
    a batch's own statistics: a last batch of a few samples (4 of 900 at batch 128) is one step in eight
    of a small set, each normalised by a handful of samples, and measured to cost such a student 10 pp of
    agreement; dropping them would leave samples out of the epoch."""
    batches = math.ceil(n / batch_size)
    left_over = n % batch_size
    return batches - 1 if batches > 1 and 0 < left_over < batch_size / 2 else batches


def schedule(recipe: Recipe, n: int) -> Schedule:
    steps_per_epoch = batches_per_epoch(n, recipe.batch_size)
    total = recipe.steps if recipe.steps > 0 else steps_per_epoch * recipe.epochs
    return Schedule(steps_per_epoch, total, math.ceil(total / steps_per_epoch))


@dataclass(frozen=True)
class AugmentSpec:
    """What the augmentation policies need to know about the data."""

    kind: str
    crop_pad: int
    hflip: bool


@dataclass(frozen=True)
class ExtraBatches:
    """Extra inputs mixed into every batch: ``per_batch`` of them, drawn uniformly from ``x`` (with
    ``y``, -1 where unlabelled) by the state's ``extra_generator``, after the batch's own inputs."""

    x: torch.Tensor
    y: torch.Tensor
    per_batch: int


class Diverged(RuntimeError):
    """Training produced a non-finite loss."""

    def __init__(self, epoch: int, loss: float):
        super().__init__(f"non-finite mean training loss ({loss}) in epoch {epoch}")
        self.epoch = epoch


def lr_at(recipe: Recipe, step: int, total_steps: int) -> float:
    if recipe.lr_schedule == "constant":
        return recipe.lr
    progress = min(step / max(total_steps, 1), 1.0)
    return recipe.final_lr + 0.5 * (recipe.lr - recipe.final_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=0.9, nesterov=recipe.nesterov,
        weight_decay=recipe.weight_decay,
    )


def build_seeded(
    arch: str, input_shape: tuple[int, ...], num_classes: int, norm: str, seed: int, args: str = ""
) -> torch.nn.Module:
    """``build_model`` (``args``: a user factory's keyword arguments) with initial weights drawn from ``seed``
    alone; torch's global generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(arch, input_shape, num_classes, norm, args)


@dataclass
class TrainState:
    """Everything needed to resume the loop at an epoch boundary (all tensors: weights_only safe)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # batch order
    epoch: int = 0  # epochs completed
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None  # e.g. torch.compile(model)
    augment_generator: torch.Generator | None = None  # augmentation draws; None: ``generator`` draws them
    extra_generator: torch.Generator | None = None  # which extra inputs join each batch (ExtraBatches)

    def state_dict(self) -> dict:
        # A snapshot: model and optimizer state dicts hold the live tensors, which later steps
        # update in place, so a checkpoint kept in memory would silently move on with training.
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
        }
        if self.augment_generator is not None:
            state["augment_generator"] = self.augment_generator.get_state()
        if self.extra_generator is not None:
            state["extra_generator"] = self.extra_generator.get_state()
        return copy.deepcopy(state)

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        if self.augment_generator is not None:
            self.augment_generator.set_state(state["augment_generator"])
        if self.extra_generator is not None:
            self.extra_generator.set_state(state["extra_generator"])
        self.epoch = int(state["epoch"])


def training_batch(
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, step_in_epoch: int, recipe: Recipe,
    augment_spec: AugmentSpec, augment_generator: torch.Generator, extra: ExtraBatches | None = None,
    extra_generator: torch.Generator | None = None,
):
    """Batch ``step_in_epoch`` of the epoch's permutation ``order``, with its extra inputs (``extra``,
    drawn by ``extra_generator``) after the batch's own, augmented by the recipe's policy. Returns the
    augmented batch (``augment.AugmentedBatch``) and its labels. The epoch's last batch runs to the end of
    ``order``: with a single sample left over, that sample joins it (``batches_per_epoch``)."""
    n = len(order)
    start = step_in_epoch * recipe.batch_size
    last = step_in_epoch == batches_per_epoch(n, recipe.batch_size) - 1
    idx = order[start : n if last else start + recipe.batch_size]
    x_batch, y_batch = x[idx], y[idx]
    if extra is not None:
        assert extra_generator is not None, "extra batches need an extra_generator"
        pick = torch.randint(len(extra.x), (extra.per_batch,), device=x.device, generator=extra_generator)
        x_batch, y_batch = torch.cat([x_batch, extra.x[pick]]), torch.cat([y_batch, extra.y[pick]])
    batch = augment(recipe.augmentation, x_batch, augment_generator, kind=augment_spec.kind,
                    crop_pad=augment_spec.crop_pad, hflip=augment_spec.hflip, mixup_alpha=recipe.mixup_alpha)
    return batch, y_batch


def epoch_batches(
    x: torch.Tensor, y: torch.Tensor, steps: int, recipe: Recipe, augment_spec: AugmentSpec,
    generator: torch.Generator, augment_generator: torch.Generator, extra: ExtraBatches | None = None,
    extra_generator: torch.Generator | None = None,
) -> Iterator[tuple[AugmentedBatch, torch.Tensor]]:
    """The first ``steps`` training batches of one epoch, as ``fit`` draws them: the epoch's permutation
    from ``generator``, then each batch (``training_batch``) with its augmentation from ``augment_generator``.
    Lazy: each batch is drawn when asked for, so draws interleave with training exactly as in ``fit``.
    A network trained alone and one trained beside others (``kd_ray.packs.members``) draw through this."""
    order = torch.randperm(x.shape[0], device=x.device, generator=generator)
    for i in range(steps):
        yield training_batch(x, y, order, i, recipe, augment_spec, augment_generator, extra, extra_generator)


def fit(
    state: TrainState,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    augment_spec: AugmentSpec,
    teacher: TeacherFn | None = None,
    on_epoch: EpochCallback | None = None,
    extra: ExtraBatches | None = None,
) -> None:
    """Train ``state.model`` from ``state.epoch`` to the end of ``schedule(recipe, len(x))``.

    With ``teacher=None`` the loss is cross-entropy on the labels (teacher training); otherwise the
    distillation loss against the teacher's log-probabilities on the same augmented batch. ``extra``
    adds inputs to every batch; the schedule (steps per epoch) is set by ``x`` alone.
    """
    model, optimizer, generator = state.model, state.optimizer, state.generator
    augment_generator = state.augment_generator or generator
    n = x.shape[0]
    plan = schedule(recipe, n)
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=recipe.bf16)
    channels_last = recipe.channels_last and x.dim() == 4
    for epoch in range(state.epoch, plan.epochs):
        model.train()
        loss_sum = torch.zeros((), device=x.device)
        lr = recipe.lr
        steps = plan.steps_in(epoch)
        batches = epoch_batches(x, y, steps, recipe, augment_spec, generator, augment_generator, extra,
                                state.extra_generator)
        for i, (batch, y_batch) in enumerate(batches):
            step = epoch * plan.steps_per_epoch + i
            lr = lr_at(recipe, step, plan.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs = batch.x.contiguous(memory_format=torch.channels_last) if channels_last else batch.x
            with autocast:
                logits = (state.forward or model)(inputs)
            teacher_log_probs = None if teacher is None else teacher(inputs)
            if teacher is None:
                loss = F.cross_entropy(logits, y_batch)
                if batch.mix_index is not None:
                    loss = batch.lam * loss + (1 - batch.lam) * F.cross_entropy(logits, y_batch[batch.mix_index])
            else:
                loss = kd_loss(
                    logits, teacher_log_probs, y_batch, temperature=recipe.temperature,
                    alpha=recipe.alpha, mix_index=batch.mix_index, lam=batch.lam, loss=recipe.loss,
                    jsd_beta=recipe.jsd_beta,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
        # One host sync per epoch, not per step: the loss check waits for the epoch's end.
        mean_loss = (loss_sum / steps).item()
        if not math.isfinite(mean_loss):
            raise Diverged(epoch + 1, mean_loss)
        state.epoch = epoch + 1
        if on_epoch is not None:
            on_epoch(epoch + 1, mean_loss, lr)


@torch.inference_mode()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``model`` (eval mode) on ``x``, float32."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]).float() for i in range(0, x.shape[0], batch_size)])
    model.train(was_training)
    return out


def initialize_student(
    student: torch.nn.Module,
    init: str,
    init_lambda: float,
    teacher_initial: dict[str, torch.Tensor] | None,
    teacher_final: dict[str, torch.Tensor] | None,
) -> None:
    """Apply the init mode: random (as built), teacher_init (a member's initial weights), or
    interpolate (lambda * teacher final + (1 - lambda) * the student's own random weights)."""
    if init == "random":
        return
    if init == "teacher_init":
        assert teacher_initial is not None
        student.load_state_dict(teacher_initial)
        return
    assert init == "interpolate" and teacher_final is not None
    random_weights = student.state_dict()
    mixed = {}
    for name, value in random_weights.items():
        target = teacher_final[name].to(value.device)
        if value.is_floating_point():
            mixed[name] = init_lambda * target + (1.0 - init_lambda) * value
        else:
            mixed[name] = target  # integer buffers (counters) are not interpolated
    student.load_state_dict(mixed)
