"""What one trial and a pack of students share: the data, the checks, the fast path, the student's recipe,
the convergence rule and the result row. No Ray in here.

``run_trial`` (``kd_ray.train.trial``) and ``run_pack`` (``kd_ray.packs.run``) both build their data with
``TrialData``, refuse what ``check_runnable`` refuses, draw extra batches and the augmented evaluation
pass from the same streams, and write each student's row with ``result_row``.

Convergence: ``convergence_delta`` is the student's train agreement at the end minus its train
agreement at the last epoch boundary at or before the start of the second half of its optimizer
steps (``CONVERGENCE_WINDOW``; the untrained student when that boundary is step 0); ``converged``
is ``|convergence_delta| < CONVERGED_WITHIN`` (2 percentage points), null when the trial did not
finish. The window is half the schedule because a cosine schedule's last quarter runs at under 15%
of the peak learning rate and is flat by construction: measured on the local mnist1d MLP, a student
of 20 epochs (0.67x the teacher's steps) still gains 3 pp over its second half and reads as not
converged; one of 90 epochs (3x) gains about 1.5 pp and one of 180 about 0.5 pp. ``student_steps`` and
``teacher_steps`` are the optimizer steps of the student's schedule and of one teacher member's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from kd_ray.config import ConfigError, TrialConfig, is_user_function, seed_stream
from kd_ray.data.augment import augment, check_policy
from kd_ray.data.datasets import DatasetInfo, check_distill_dataset, dataset_info, load_arrays
from kd_ray.data.extra_inputs import check_extra_inputs, extra_inputs
from kd_ray.data.splits import split_indices, val_indices, val_size
from kd_ray.models.archs import build_model, check_arch, check_user_model
from kd_ray.models.ensembles import LoopEnsemble, StackedEnsemble, ensemble_log_probs
from kd_ray.tables import AFTER_TRAINING_METRICS, CKA_METRICS, METRICS, TERMINATED
from kd_ray.train import fastpath
from kd_ray.train.cka import CKA_TEST_INPUTS, stage_cka
from kd_ray.train.distill import AugmentSpec, ExtraBatches, Recipe, Schedule
from kd_ray.train.fastpath import FastPath
from kd_ray.train.metrics import teacher_metrics
from kd_ray.train.teachers import Ensemble

# The metrics every evaluation measures (the control's agreement and CKA are measured once, after training).
FINAL_METRICS = tuple(m for m in METRICS if m not in AFTER_TRAINING_METRICS)
CONVERGED_WITHIN = 0.02  # a converged student's train agreement moved less than this over the window
CONVERGENCE_WINDOW = 0.5  # the last fraction of the optimizer steps that convergence_delta spans
# The networks that draw extra batches, in the order that keys their extra_batches streams.
NETWORKS_WITH_EXTRA_BATCHES = ("student", "control_student")


def extra_batches_seed(network: str, seed: int) -> int:
    """The seed of the stream that picks the extra inputs of each batch of ``network`` (student or
    control_student) in replicate ``seed``, alone or in a pack."""
    return seed_stream("extra_batches", seed, NETWORKS_WITH_EXTRA_BATCHES.index(network))


def convergence_epoch(plan: Schedule) -> int:
    """The last epoch boundary at or before the start of the convergence window (0: before training)."""
    start = math.floor((1.0 - CONVERGENCE_WINDOW) * plan.total_steps)
    return start // plan.steps_per_epoch


def convergence(final: float | None, reference: float | None) -> tuple[float, bool | None]:
    """``(convergence_delta, converged)`` from the final train agreement and the one at the start of the
    convergence window (``convergence_epoch``)."""
    if final is None or reference is None or not (math.isfinite(final) and math.isfinite(reference)):
        return float("nan"), None
    # Agreements are float32 fractions of a count: rounding puts a delta of exactly the threshold
    # (say 10 of 1000 samples) on the side the counts say, whatever the float32 error.
    delta = round(final - reference, 6)
    return delta, abs(delta) < CONVERGED_WITHIN


MIN_DISTILL_EXAMPLES = 2  # a training batch of one sample cannot train batch norm; one example is no data set


def _subset_size(fraction: float, n: int) -> int:
    """How many of ``n`` examples a stratified ``fraction`` keeps: ``splits.split_indices``' rule."""
    return n if float(fraction) == 1.0 else min(n, max(1, int(round(float(fraction) * n))))


@dataclass(frozen=True)
class DataSizes:
    """How many examples each part of a trial's data holds, from each dataset's ``train_size`` and the split fields
    alone (``splits.split_indices`` draws exactly these many)."""

    val: int  # the validation examples held out of the train split (val_fraction), seen by no network
    pool: int  # the train examples left beside them, which every other part is drawn from
    teacher_base: int  # the teacher's split (the whole pool, or the half D0) before teacher_fraction
    teacher: int  # the examples a teacher member trains on, batched by teacher_batch_size
    distill_base: int  # the split distill_fraction draws from
    distill_subset: int  # what distill_fraction keeps of it
    distill: int  # the set the student batches: the subset, and any extra inputs that join it
    distill_most: int  # the most a distillation set of this dataset (and joined extras) can hold


def data_sizes(cfg: TrialConfig) -> DataSizes:
    """The sizes of ``cfg``'s validation, teacher and distillation sets, as ``TrialData`` and the teachers draw them."""
    train_size = dataset_info(cfg.dataset).train_size
    val = val_size(cfg.val_fraction, train_size)
    n = train_size - val  # the pool every other part is drawn from
    if cfg.teacher_split == "full":
        teacher_base, distill_base = n, n
    else:
        d0 = n // 2  # the stratified half D0; D1 is the rest
        teacher_base, distill_base = d0, {"train": d0, "holdout": n - d0, "both": n}[cfg.distill_split]
    teacher = _subset_size(cfg.teacher_fraction, teacher_base)
    if cfg.teacher_fraction < 1.0 and cfg.distill_split == "train":
        distill_base = teacher  # 'train' is then exactly the teacher's own subset
    if cfg.distill_dataset:
        distill_base = dataset_info(cfg.distill_dataset).train_size  # the other dataset's whole train split
    subset = _subset_size(cfg.distill_fraction, distill_base)
    joined = cfg.extra_data if cfg.extra_ratio == 0 else 0  # with extra_ratio > 0 extras ride along instead
    most = (dataset_info(cfg.distill_dataset).train_size if cfg.distill_dataset else n) + joined
    return DataSizes(val, n, teacher_base, teacher, distill_base, subset, subset + joined, most)


def extra_per_batch(cfg: TrialConfig) -> int:
    """How many extra inputs ride along in each of ``cfg``'s training batches (0: none, or they join the set)."""
    if cfg.extra_data > 0 and cfg.extra_ratio > 0:
        return max(1, round(cfg.extra_ratio * cfg.batch_size))
    return 0


def _has_batch_norm(arch: str, info: DatasetInfo, norm: str, args: str = "") -> bool:
    """Whether ``arch`` under ``norm`` has batch norm layers (lenet5 and vgg16 ignore ``norm``, a user's factory
    builds what it builds). Built on the meta device: no weights are allocated and no random number is drawn."""
    if is_user_function(arch):  # a user's factory may compute with real tensors while it builds
        with torch.random.fork_rng(devices=[]):
            model = build_model(arch, info.input_shape, info.num_classes, norm, args)
    else:
        with torch.device("meta"):
            model = build_model(arch, info.input_shape, info.num_classes, norm)
    return any(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for m in model.modules())


def _minimum_fraction(n: int) -> str:
    """The smallest fraction of ``n`` examples that keeps ``MIN_DISTILL_EXAMPLES``, rounded up to 3
    significant digits so that the printed value itself is allowed."""
    exact = MIN_DISTILL_EXAMPLES / n
    digits = 2 - math.floor(math.log10(exact))
    return f"{math.ceil(exact * 10**digits) / 10**digits:g}"


def check_data_sizes(cfg: TrialConfig, info: DatasetInfo) -> None:
    """Refuse batch sizes and fractions that the trial's data cannot meet, from ``data_sizes`` alone: a
    teacher or distillation set of fewer than 2 examples, a batch of one sample under batch norm (which
    needs more than one sample per channel in training), and a batch size larger than every training
    example of the dataset left beside the validation split. A batch size between the set a trial batches
    and that is one batch of the whole set per epoch (``full_batch_notes``): one ``--set batch_size`` then
    serves a study's arms of every distillation fraction. The remainder of an epoch never leaves a batch
    of one (``distill.batches_per_epoch``)."""
    sizes = data_sizes(cfg)
    # The validation examples are named wherever they shrink the train split a size is judged against.
    held_out = f" less the {sizes.val} validation examples of val_fraction={cfg.val_fraction!r}" if sizes.val else ""
    own = f"dataset={cfg.dataset!r}{held_out}"
    teacher_source = f"{own}, teacher_split={cfg.teacher_split!r}"
    distill_source = (f"distill_dataset={cfg.distill_dataset!r}" if cfg.distill_dataset
                      else f"{teacher_source}, distill_split={cfg.distill_split!r}")
    if sizes.teacher < MIN_DISTILL_EXAMPLES:
        raise ConfigError(
            f"teacher_fraction={cfg.teacher_fraction!r} leaves the teacher {sizes.teacher} of the "
            f"{sizes.teacher_base} training examples of its split ({teacher_source}); allowed: teacher_fraction >= "
            f"{_minimum_fraction(sizes.teacher_base)} (at least {MIN_DISTILL_EXAMPLES} examples)"
        )
    if sizes.distill_subset < MIN_DISTILL_EXAMPLES:
        raise ConfigError(
            f"distill_fraction={cfg.distill_fraction!r} leaves {sizes.distill_subset} of the {sizes.distill_base} "
            f"examples of the distillation split ({distill_source}) to distil on; allowed: distill_fraction >= "
            f"{_minimum_fraction(sizes.distill_base)} (at least {MIN_DISTILL_EXAMPLES} examples)"
        )
    extras = f" and extra_data={cfg.extra_data}" if sizes.distill > sizes.distill_subset else ""
    batched = (
        ("teacher_batch_size", "teacher_arch", sizes.teacher, sizes.pool, "a teacher member trains on", own),
        ("batch_size", "student_arch", sizes.distill, sizes.distill_most, "the student distils on",
         f"{'distill_dataset=' + repr(cfg.distill_dataset) if cfg.distill_dataset else own}{extras}"),
    )
    for field, arch_field, n, most, what, source in batched:
        value, arch = getattr(cfg, field), getattr(cfg, arch_field)
        if 1 < value <= most:
            continue
        # Only a batch size of 1 or one above every example builds the network, to ask whether it has batch norm.
        smallest = 2 if _has_batch_norm(arch, info, cfg.norm, getattr(cfg, f"{arch_field}_args")) else 1
        allowed = f"allowed: {smallest} <= {field} <= {most}"
        if value < smallest:
            raise ConfigError(
                f"{field}={value} with {arch_field}={arch!r} and norm={cfg.norm!r}: batch norm needs more than one "
                f"sample per channel in training; {allowed}, or norm='group' or 'none'"
            )
        if value > most:
            whole = f" (from {n + 1} on, the {n} examples {what} are one batch per epoch)" if n < most else ""
            raise ConfigError(f"{field}={value} is larger than all {most} training examples of {source}; "
                              f"{allowed}{whole}")


def full_batch_notes(cfg: TrialConfig) -> list[str]:
    """A line for each batch size above the set it batches: each epoch is then one batch of the whole set."""
    sizes = data_sizes(cfg)
    notes = []
    for field, n, what in (("teacher_batch_size", sizes.teacher, "a teacher member trains on"),
                           ("batch_size", sizes.distill, "the student distils on")):
        value = getattr(cfg, field)
        if value > n:
            notes.append(f"{field}={value} is more than the {n} examples {what}: each epoch is one batch of all {n}")
    return notes


def check_runnable(cfg: TrialConfig, check_device: bool = True) -> None:
    """Refuse combinations that only the model, data and augmentation registries can judge, and sizes
    that the data cannot meet (``check_data_sizes``).

    ``check_device=False`` skips the CUDA check, for a driver that schedules GPU trials elsewhere."""
    info = dataset_info(cfg.dataset)
    for field in ("teacher_arch", "student_arch"):
        arch = getattr(cfg, field)
        if is_user_function(arch):  # imported, built with its arguments and run on zeros of the dataset's shape
            check_user_model(arch, info.input_shape, info.num_classes, getattr(cfg, f"{field}_args"), field)
            continue
        try:
            check_arch(arch, info.input_shape, cfg.norm)
        except ValueError as exc:
            raise ConfigError(f"{field}={arch!r} with dataset={cfg.dataset!r}: {exc}") from None
    try:
        check_policy(cfg.augmentation, info.kind)
    except ValueError as exc:
        raise ConfigError(f"augmentation={cfg.augmentation!r} with dataset={cfg.dataset!r}: {exc}") from None
    check_extra_inputs(cfg)
    check_distill_dataset(cfg.dataset, cfg.distill_dataset)
    check_data_sizes(cfg, info)
    if check_device and cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} but no CUDA device is visible; use device=cpu or auto")


def resolve_device(name: str) -> torch.device:
    """The device ``name`` names; ``auto``: the GPU when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def probe_batch_size(cfg: TrialConfig) -> int:
    """The batch the fast path is timed on: the trial's, never more than the set it batches."""
    return min(cfg.batch_size, data_sizes(cfg).distill)


def fast_path(cfg: TrialConfig, info: DatasetInfo, device: torch.device) -> FastPath:
    """The measured fastest bf16 / layout / teacher-execution choice for this trial's shapes."""
    return fastpath.choose(
        cfg.student_arch, cfg.teacher_arch, info.input_shape, info.num_classes, cfg.norm, cfg.teacher_members,
        probe_batch_size(cfg), str(device), cfg.precision,
        student_args=cfg.student_arch_args, teacher_args=cfg.teacher_arch_args,
    )


def student_recipe(cfg: TrialConfig, path: FastPath | None = None) -> Recipe:
    """The student's optimizer, schedule and loss from ``cfg``, run as ``path`` says (float32 without one)."""
    path = path or FastPath()
    return Recipe(
        epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=float(cfg.lr),
        weight_decay=cfg.weight_decay, lr_schedule=cfg.lr_schedule, augmentation=cfg.augmentation,
        mixup_alpha=cfg.mixup_alpha, temperature=cfg.temperature, alpha=cfg.alpha, loss=cfg.loss,
        jsd_beta=cfg.jsd_beta, nesterov=True,
        final_lr=1e-6 if cfg.lr_schedule == "cosine" else float(cfg.lr),
        bf16=path.bf16, channels_last=path.channels_last, steps=cfg.steps,
    )


def training_teacher(ensemble: Ensemble, path: FastPath) -> StackedEnsemble | LoopEnsemble:
    """The ensemble that labels training batches, run as ``path`` says; metrics use the float32 one."""
    if path.stacked_teacher:
        runner = ensemble.stacked
    else:
        layout = torch.channels_last if path.channels_last else torch.contiguous_format
        runner = LoopEnsemble([m.to(memory_format=layout) for m in ensemble.models])
    return runner.cast(torch.bfloat16) if path.bf16 else runner


class TrialData:
    """The trial's tensors on its device: distillation set, validation set, test set, and the teacher's cached
    logits. The validation examples (``splits.val_indices``) are in neither the teacher's nor the distillation
    indices, nor among the inputs extras are drawn from."""

    def __init__(self, cfg: TrialConfig, device: torch.device, data_dir: str | None) -> None:
        self.info: DatasetInfo = dataset_info(cfg.dataset)
        self.arrays = load_arrays(cfg.dataset, data_dir)
        teacher_idx, distill_idx = split_indices(
            self.arrays.y_train, teacher_split=cfg.teacher_split, distill_split=cfg.distill_split,
            distill_fraction=cfg.distill_fraction, data_seed=cfg.data_seed, seed=cfg.seed,
            val_fraction=cfg.val_fraction, teacher_fraction=cfg.teacher_fraction,
        )
        self.teacher_idx = torch.as_tensor(teacher_idx, device=device)
        self.distill_idx = torch.as_tensor(distill_idx, device=device)
        self.val_idx = torch.as_tensor(val_indices(self.arrays.y_train, val_fraction=cfg.val_fraction,
                                                   data_seed=cfg.data_seed), device=device)
        x_train = torch.as_tensor(self.arrays.x_train, device=device)
        y_train = torch.as_tensor(self.arrays.y_train, device=device)
        self.x = x_train[self.distill_idx]
        self.y = y_train[self.distill_idx]
        self.x_val = x_train[self.val_idx]
        self.y_val = y_train[self.val_idx]
        self.has_val = len(self.val_idx) > 0  # without validation examples the val_* metrics are NaN
        self.y_teacher = y_train[self.teacher_idx]
        self.distill_elsewhere = bool(cfg.distill_dataset)
        if self.distill_elsewhere:
            # Another dataset's train inputs (a stratified distill_fraction of them) replace the teacher's. None of
            # them is a validation example of the teacher's dataset, so none is held out of the other one.
            other = load_arrays(cfg.distill_dataset, data_dir)
            _, other_idx = split_indices(other.y_train, teacher_split="full", distill_split="train",
                                         distill_fraction=cfg.distill_fraction, data_seed=cfg.data_seed, seed=cfg.seed,
                                         val_fraction=0.0)
            self.x = torch.as_tensor(other.x_train[other_idx], device=device)
            self.y = torch.as_tensor(other.y_train[other_idx], device=device)
        # Extra inputs either join the distillation set (its last n_extra rows) or, with extra_ratio,
        # are mixed into every batch, leaving the distillation set and its step count as they are.
        self.n_extra = 0
        self.extra: ExtraBatches | None = None
        if cfg.extra_data > 0:
            x_extra, y_extra = (torch.as_tensor(a, device=device)
                                for a in extra_inputs(cfg, self.arrays, teacher_idx, data_dir))
            if cfg.extra_ratio > 0:
                self.extra = ExtraBatches(x_extra, y_extra, extra_per_batch(cfg))
            else:
                self.n_extra = cfg.extra_data
                self.x = torch.cat([self.x, x_extra])
                self.y = torch.cat([self.y, y_extra])
        self.x_test = torch.as_tensor(self.arrays.x_test, device=device)
        self.y_test = torch.as_tensor(self.arrays.y_test, device=device)
        self.augment_spec = AugmentSpec(self.info.kind, self.info.crop_pad, self.info.hflip)

    def sizes(self) -> dict[str, int]:
        """The ``DATA_SIZES`` columns: the inputs a teacher member trained on, and the inputs the student
        distils on (its distillation set and every extra input, joined or mixed into batches)."""
        mixed = len(self.extra.x) if self.extra is not None else 0
        return {"teacher_train_size": len(self.teacher_idx), "distill_size": len(self.x) + mixed}

    def teacher_val_log_probs(self, ensemble: Ensemble) -> torch.Tensor:
        """Teacher log-probabilities on the validation set, from the cached logits on the whole train set."""
        return ensemble_log_probs(ensemble.train_logits[:, self.val_idx])

    def teacher_summary(self, ensemble: Ensemble, test_log_probs: torch.Tensor) -> dict[str, float]:
        """The teacher's metrics of every row (``metrics.teacher_metrics``): on the test set (``test_log_probs``)
        and on its own training examples, from the cached logits."""
        own = ensemble_log_probs(ensemble.train_logits[:, self.teacher_idx])
        return teacher_metrics(test_log_probs, self.y_test, own, self.y_teacher)

    def teacher_log_probs(self, ensemble: Ensemble) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher log-probabilities on (test set, clean distillation set), from the cached logits."""
        test = ensemble_log_probs(ensemble.test_logits)
        if self.distill_elsewhere:
            # Another dataset's inputs (and any extras) are not in the store's cache: labelled live.
            return test, torch.cat([ensemble.log_probs(self.x[i : i + 1024]) for i in range(0, len(self.x), 1024)])
        distill = ensemble_log_probs(ensemble.train_logits[:, self.distill_idx])
        if self.n_extra:
            # Extra in-domain samples are not in the store's cache; they vary with extra_data.
            extra = self.x[-self.n_extra :]
            extra_lp = torch.cat([ensemble.log_probs(extra[i : i + 1024]) for i in range(0, self.n_extra, 1024)])
            distill = torch.cat([distill, extra_lp])
        return test, distill


def augmented_pass(data: TrialData, cfg: TrialConfig) -> list[torch.Tensor]:
    """One augmented pass over the distillation set with the trial's policy, in chunks of 1,024: the
    same pass (the eval_augment stream of the replicate) at every evaluation, alone or in a pack."""
    generator = torch.Generator(device=data.x.device).manual_seed(seed_stream("eval_augment", cfg.seed))
    spec = data.augment_spec
    return [augment(cfg.augmentation, data.x[i : i + 1024], generator, kind=spec.kind, crop_pad=spec.crop_pad,
                    hflip=spec.hflip, mixup_alpha=cfg.mixup_alpha).x for i in range(0, data.x.shape[0], 1024)]


class TrainClock:
    """Seconds of training so far: those before the checkpoint resumed from, and this process's since it began."""

    def __init__(self, resume: dict[str, Any] | None) -> None:
        self.started = time.perf_counter()
        self.elapsed_before = float(resume["train_time_s"]) if resume else 0.0

    def seconds(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def device_name(device: torch.device) -> str:
    """The GPU's name, or cpu: the device column of a result row."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def precision_used(bf16: bool) -> str:
    """The precision column of a result row."""
    return "bf16" if bf16 else "fp32"


def result_row(
    *, status: str, error: str | None, ensemble: Ensemble, teacher_summary: dict[str, float],
    last_metrics: dict[str, Any], epochs_completed: int, plan: Schedule, teacher_steps: int,
    reference: float | None, student: torch.nn.Module | None, data: TrialData,
) -> dict[str, Any]:
    """A student's result row up to how it ran (precision, device, time, versions, config): its status, the
    teacher's metrics, its last evaluation's (nan where it has none), its steps, its convergence and, once it
    finished, how alike its representations and teacher member 0's are (``kd_ray.train.cka``). The row of
    ``run_trial`` and of each student of ``run_pack``.

    ``reference``: its train agreement at the start of the convergence window; ``student``: its final network."""
    row: dict[str, Any] = {"status": status, "error": error, "teacher_key": ensemble.key}
    row.update(teacher_summary)
    row.update({k: last_metrics.get(k, float("nan")) for k in FINAL_METRICS if k not in teacher_summary})
    row["epochs_completed"] = epochs_completed
    row["student_steps"] = plan.total_steps
    row["teacher_steps"] = teacher_steps
    row.update(data.sizes())
    finished = status == TERMINATED
    row["convergence_delta"], row["converged"] = convergence(
        last_metrics.get("train_agreement") if finished else None, reference
    )
    cka_inputs = data.x_test[:CKA_TEST_INPUTS]
    row.update(stage_cka(student, ensemble.models[0], cka_inputs) if finished and student is not None
               else dict.fromkeys(CKA_METRICS, float("nan")))
    return row
