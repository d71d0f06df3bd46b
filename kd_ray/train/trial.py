"""One distillation trial end to end: teacher -> student -> metrics. No Ray in here.

``run_trial`` is what ``kd-ray trial`` calls directly and what the Ray Tune trainable wraps. It reads
top to bottom: the data (``setup.TrialData``), the teacher (``TrialTeacher``), the student
(``build_student_state``), the fit and its evaluations (``StudentEvaluations``), the final student's
per-example predictions (``save_predictions``: ``kd_ray.train.predictions``), the result row
(``setup.result_row``), the control (``distil_control``) and how the trial ran.

Every random draw has its own stream (``config.seed_stream``): the student's initial weights, batch
order and augmentation draws are keyed by the replicate ``seed`` (so the arms of one replicate share
them, and no student starts where a teacher member started), the control student's by kinds of
its own, and the augmented evaluation pass by another. Convergence (``convergence_delta``,
``converged``) is defined in ``kd_ray.train.setup``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from kd_ray.config import TrialConfig, network_streams
from kd_ray.progress import Progress
from kd_ray.provenance import versions
from kd_ray.tables import DIVERGED, TERMINATED
from kd_ray.train.distill import (
    Diverged,
    EpochCallback,
    Recipe,
    Schedule,
    TeacherFn,
    TrainState,
    build_seeded,
    fit,
    initialize_student,
    make_optimizer,
    predict,
    schedule,
)
from kd_ray.train.fastpath import FastPath
from kd_ray.train.metrics import agreement, student_metrics, validation_metrics
from kd_ray.train.predictions import default_trial_id, write_predictions
from kd_ray.train.setup import (
    TrainClock,
    TrialData,
    augmented_pass,
    check_runnable,
    convergence_epoch,
    device_name,
    extra_batches_seed,
    fast_path,
    full_batch_notes,
    precision_used,
    resolve_device,
    result_row,
    student_recipe,
    training_teacher,
)
from kd_ray.train.teachers import Ensemble, TeacherStore, default_store, ensure_members, load_ensemble, member_steps

EvalCallback = Callable[[dict[str, Any], dict[str, Any] | None], None]  # (metrics, checkpoint) per evaluation


def run_trial(
    config: TrialConfig | dict[str, Any],
    on_eval: EvalCallback | None = None,
    resume: dict[str, Any] | None = None,
    *,
    store: TeacherStore | str | None = None,
    data_dir: str | None = None,
    progress: Progress | None = None,
    retrain_teachers: bool = False,
    predictions_dir: str | None = None,
    trial_id: str | None = None,
) -> dict[str, Any]:
    """Train (or load) the teacher ensemble, distil a student, return the final metrics.

    ``on_eval(metrics, checkpoint)`` is called at every evaluation epoch; ``checkpoint`` is a dict of
    tensors that, passed back as ``resume``, continues the trial from that epoch. With
    ``cfg.save_predictions`` and ``predictions_dir``, a student that finished writes its final evaluation's
    per-example predictions to ``<predictions_dir>/<trial_id>.parquet`` (``trial_id``: the id its row has
    in the study's tables; by default one derived from the config, ``predictions.default_trial_id``).
    """
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    check_runnable(cfg)
    store = store if isinstance(store, TeacherStore) else TeacherStore(store or default_store())
    device = resolve_device(cfg.device)
    clock = TrainClock(resume)

    # --- data: the distillation and test sets on the device ---
    if progress:
        for note in full_batch_notes(cfg):
            progress(note)
    data = TrialData(cfg, device, data_dir)

    # --- teacher: its stored members (trained when missing), run on the fastest path measured ---
    ensure_members(cfg, store, data.arrays, device, progress=progress, retrain=retrain_teachers)
    ensemble = load_ensemble(cfg, store, device)
    path = fast_path(cfg, data.info, device)
    recipe = student_recipe(cfg, path)
    teacher = TrialTeacher(ensemble, path, data)

    # --- student: built from its own streams, or restored from the checkpoint ---
    state = build_student_state(cfg, recipe, ensemble, data, device, resume["train_state"] if resume else None)
    plan = schedule(recipe, data.x.shape[0])
    evaluations = StudentEvaluations(cfg, state, plan, data, teacher, clock, on_eval, progress, resume)

    # --- fit ---
    status, error = fit_student(state, data, recipe, teacher.for_training.log_probs, evaluations.on_epoch)
    if state.epoch > 0 and not evaluations.last_metrics and status == TERMINATED:
        # Resumed from the checkpoint of the last epoch (the process died after it, before the final
        # report): nothing is left to train, so the final metrics are those of the restored student.
        evaluations.last_metrics = evaluations.measure()

    # --- per-example predictions of the final student ---
    if cfg.save_predictions and predictions_dir is not None and status == TERMINATED:
        evaluations.save_predictions(predictions_dir, trial_id or default_trial_id(cfg))

    # --- result row ---
    row = result_row(
        status=status, error=error, ensemble=ensemble, teacher_summary=teacher.summary,
        last_metrics=evaluations.last_metrics, epochs_completed=state.epoch, plan=plan,
        teacher_steps=member_steps(cfg, data.arrays.y_train), reference=evaluations.reference, student=state.model,
        data=data,
    )
    if cfg.control and status == TERMINATED:
        row.update(distil_control(cfg, store, data, device, recipe, path, teacher.test_log_probs, progress))

    # --- how it ran ---
    row["train_time_s"] = clock.seconds()
    row["precision_used"] = precision_used(path.bf16)
    row["fast_path"] = path.describe()
    row["device_name"] = device_name(device)
    row.update(versions())
    row["config_json"] = cfg.to_json()
    return row


class TrialTeacher:
    """The trial's teacher ensemble: the float32 one that metrics use, the one that labels training
    batches (run as ``path`` says), its log-probabilities on the test, distillation and validation sets, and its
    metrics."""

    def __init__(self, ensemble: Ensemble, path: FastPath, data: TrialData) -> None:
        self.ensemble = ensemble
        self.for_training = training_teacher(ensemble, path)
        self.test_log_probs, self.distill_log_probs = data.teacher_log_probs(ensemble)
        self.val_log_probs = data.teacher_val_log_probs(ensemble)
        self.summary = data.teacher_summary(ensemble, self.test_log_probs)


def build_student_state(
    cfg: TrialConfig, recipe: Recipe, ensemble: Ensemble, data: TrialData, device: torch.device,
    resume_state: dict | None, network: str = "student",
) -> TrainState:
    """The student (initialised per ``cfg.init``), its optimizer and its generators, each seeded from
    the replicate's own stream of ``network`` (student, or control_student for the control)."""
    streams = network_streams(network, cfg.seed)
    info = data.info
    student = build_seeded(cfg.student_arch, info.input_shape, info.num_classes, cfg.norm, streams.init,
                           cfg.student_arch_args).to(device)
    initialize_student(student, cfg.init, cfg.init_lambda, ensemble.initial_states[0], ensemble.final_states[0])
    if recipe.channels_last:
        student = student.to(memory_format=torch.channels_last)
    state = TrainState(
        student, make_optimizer(student, recipe), torch.Generator(device=device).manual_seed(streams.batches),
        augment_generator=torch.Generator(device=device).manual_seed(streams.augment),
    )
    if data.extra is not None:
        state.extra_generator = torch.Generator(device=device).manual_seed(extra_batches_seed(network, cfg.seed))
    if resume_state is not None:
        state.load_state_dict(resume_state)
    if cfg.compile:
        state.forward = torch.compile(student)
    return state


def aug_agreement(student: torch.nn.Module, ensemble: Ensemble, data: TrialData, cfg: TrialConfig) -> float:
    """Agreement on the replicate's augmented pass over the distillation set (``augmented_pass``)."""
    chunks = augmented_pass(data, cfg)
    teacher = torch.cat([ensemble.log_probs(x) for x in chunks])
    return agreement(teacher, torch.cat([predict(student, x) for x in chunks]))


class StudentEvaluations:
    """The student's epoch boundaries (``fit``'s ``on_epoch``): an evaluation every ``eval_every`` epochs
    and at the last, with a progress line and a checkpoint for ``on_eval``; and the train agreement at
    the start of the convergence window (``reference``), which a checkpoint carries past a restart."""

    def __init__(self, cfg: TrialConfig, state: TrainState, plan: Schedule, data: TrialData, teacher: TrialTeacher,
                 clock: TrainClock, on_eval: EvalCallback | None, progress: Progress | None,
                 resume: dict[str, Any] | None) -> None:
        self.cfg, self.state, self.plan, self.data, self.teacher = cfg, state, plan, data, teacher
        self.clock, self.on_eval, self.progress = clock, on_eval, progress
        self.reference_epoch = convergence_epoch(plan)
        self.reference: float | None = resume.get("convergence_reference") if resume else None
        self.last_metrics: dict[str, Any] = {}  # the last evaluation's
        # The last evaluation's student logits by split, kept for save_predictions only (None: no val split).
        self.last_outputs: dict[str, torch.Tensor | None] = {}
        if state.epoch == 0 and self.reference_epoch == 0:
            self.reference = self.train_agreement()

    def train_agreement(self) -> float:
        return agreement(self.teacher.distill_log_probs, predict(self.state.model, self.data.x))

    def measure(self) -> dict[str, float]:
        """The student's metrics as it is now."""
        model, data, teacher = self.state.model, self.data, self.teacher
        student_test, student_train = predict(model, data.x_test), predict(model, data.x)
        metrics = student_metrics(student_test, teacher.test_log_probs, data.y_test,
                                  student_train, teacher.distill_log_probs)
        student_val = predict(model, data.x_val) if data.has_val else None
        metrics.update(validation_metrics(student_val, teacher.val_log_probs, data.y_val))
        metrics["aug_train_agreement"] = aug_agreement(model, teacher.ensemble, data, self.cfg)
        if self.cfg.save_predictions:
            self.last_outputs = {"test": student_test, "val": student_val, "train": student_train}
        return metrics

    def save_predictions(self, predictions_dir: str, trial_id: str) -> str:
        """The last evaluation's per-example predictions (``kd_ray.train.predictions``); the path written.
        The same logits its metrics were measured on, so the file's top-1 columns give its agreement."""
        out, teacher, data = self.last_outputs, self.teacher, self.data
        splits = {
            "test": (teacher.test_log_probs, out["test"], data.y_test),
            "val": None if out["val"] is None else (teacher.val_log_probs, out["val"], data.y_val),
            "train": (teacher.distill_log_probs, out["train"], data.y),
        }
        return write_predictions(predictions_dir, trial_id, self.cfg.seed, splits)

    def on_epoch(self, epoch: int, loss: float, lr: float) -> None:
        evaluate = epoch % self.cfg.eval_every == 0 or epoch == self.plan.epochs
        student = self.measure() if evaluate else None
        if epoch == self.reference_epoch:
            self.reference = student["train_agreement"] if student is not None else self.train_agreement()
        if student is None:
            return
        metrics = {"epoch": epoch, "lr": lr, "train_loss": loss, **student, **self.teacher.summary}
        metrics["train_time_s"] = self.clock.seconds()
        self.last_metrics = dict(metrics)
        self.report(metrics)

    def report(self, metrics: dict[str, Any]) -> None:
        """The evaluation's progress line, and ``on_eval`` with the checkpoint that resumes from it."""
        if self.progress:
            self.progress(
                f"student epoch {metrics['epoch']}/{self.plan.epochs}: loss {metrics['train_loss']:.4f} "
                f"test acc {metrics['test_acc']:.3f} test agreement {metrics['test_agreement']:.3f} "
                f"train agreement {metrics['train_agreement']:.3f}"
            )
        if self.on_eval is not None:
            checkpoint = {
                "train_state": self.state.state_dict(), "train_time_s": metrics["train_time_s"],
                "convergence_reference": self.reference,
            }
            self.on_eval(metrics, checkpoint)


def fit_student(state: TrainState, data: TrialData, recipe: Recipe, teacher: TeacherFn,
                on_epoch: EpochCallback | None = None) -> tuple[str, str | None]:
    """Distil ``state``'s student from ``teacher`` to the end of its schedule: ``(TERMINATED, None)``, or
    ``(DIVERGED, why)`` when its loss stopped being finite."""
    try:
        fit(state, data.x, data.y, recipe, data.augment_spec, teacher=teacher, on_epoch=on_epoch, extra=data.extra)
    except Diverged as exc:
        return DIVERGED, str(exc)
    return TERMINATED, None


def distil_control(cfg: TrialConfig, store: TeacherStore, data: TrialData, device: torch.device, recipe: Recipe,
                   path: FastPath, teacher_test: torch.Tensor, progress: Progress | None) -> dict[str, Any]:
    """The control: a student of its own streams distilled alike from an independent teacher ensemble.
    Its agreement with the trial's teacher on the test set (``teacher_test``: log-probabilities), or
    the DIVERGED status and why."""
    if progress:
        progress("control: distilling from an independent teacher ensemble")
    ensure_members(cfg, store, data.arrays, device, role="control", progress=progress)
    independent = load_ensemble(cfg, store, device, role="control")
    control = build_student_state(cfg, recipe, independent, data, device, None, network="control_student")
    status, error = fit_student(control, data, recipe, training_teacher(independent, path).log_probs)
    if status == DIVERGED:
        return {"status": DIVERGED, "error": f"control student: {error}"}
    return {"control_test_agreement": agreement(teacher_test, predict(control.model, data.x_test))}
