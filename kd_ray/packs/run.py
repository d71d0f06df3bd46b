"""A pack: K students trained at once as one wide network, one teacher forward per step for all of them.

``run_pack`` is ``trial.run_trial`` for the students of one pack (``kd_ray.packs.plan`` says which trials
may share one). Its students fall into streams (``kd_ray.packs.streams``): those of one stream share the
distillation data, the teacher ensemble (the largest one asked for: its first m members are the m-member
ensemble) and the batch stream, the replicate's student streams, which each of them would also draw
alone. A pack of one stream draws one augmented batch per step for all its students; a pack of several
(other seeds, augmentation policies, data splits or extra inputs) draws one per stream, each student
reading its own stream's batch, and labels them all with one forward of every stream's teacher. The
students run as one wide network (``kd_ray.packs.wide``), with their own temperature, label weight,
initialisation, learning rate, weight decay, optimizer and number of epochs (``kd_ray.packs.optim``).
Each returns the row ``run_trial`` would return, plus ``pack_id``, ``pack_size`` and ``pack_time_share``
(its share of the pack's optimizer steps, by which the pack's time is split among its rows).

A student whose epoch loss is not finite is marked DIVERGED and leaves the pack at that epoch
boundary; a student whose epochs are done leaves it too. The others go on unchanged: their blocks
of the wide network never mix with another's. A checkpoint holds the whole pack.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from kd_ray.config import TrialConfig, network_streams
from kd_ray.data.datasets import dataset_info
from kd_ray.packs.optim import PackOptimizer
from kd_ray.packs.streams import (
    PackTeacher,
    StreamBatches,
    can_cross_streams,
    check_step_shapes,
    check_streams,
    group_streams,
    stream_losses,
)
from kd_ray.packs.wide import (
    feature_major_applies,
    fold_batch_norms,
    narrow,
    per_network_forward,
    stack_inputs,
    wide_forward,
    widen,
)
from kd_ray.progress import Progress
from kd_ray.provenance import versions
from kd_ray.tables import DIVERGED, TERMINATED, packed_trial_id
from kd_ray.train.distill import (
    Schedule,
    build_seeded,
    initialize_student,
    lr_at,
    predict,
    schedule,
)
from kd_ray.train.metrics import agreement, student_metrics, validation_metrics
from kd_ray.train.predictions import write_predictions
from kd_ray.train.setup import (
    TrainClock,
    TrialData,
    augmented_pass,
    check_runnable,
    convergence_epoch,
    device_name,
    fast_path,
    precision_used,
    resolve_device,
    result_row,
    student_recipe,
)
from kd_ray.train.teachers import Ensemble, TeacherStore, default_store, ensure_members, load_ensemble, member_steps

# (epoch, metrics by student index, checkpoint) at each epoch where a student is evaluated
PackEvalCallback = Callable[[int, dict[int, dict[str, Any]], dict[str, Any]], None]
FUSED = "teacher and students fused"  # a pack's fast_path: precision, this, then the students' layout
EVAL_CHUNK = 1024  # inputs per stacked evaluation pass (measured: 12 folded MLPs on 18k inputs, 1024 ~ 512 < 2048)


def sub_ensemble(ensemble: Ensemble, cfg: TrialConfig, role: str = "reference") -> Ensemble:
    """The first ``cfg.teacher_members`` members of ``ensemble``: the ensemble ``cfg`` distils from."""
    m = cfg.teacher_members
    return Ensemble(key=cfg.teacher_key(role), models=ensemble.models[:m], initial_states=ensemble.initial_states[:m],
                    final_states=ensemble.final_states[:m], test_logits=ensemble.test_logits[:m],
                    train_logits=ensemble.train_logits[:m])


@dataclass
class Student:
    """One student of a pack: its config, recipe, schedule and what it has measured so far."""

    cfg: TrialConfig
    plan: Schedule
    status: str = TERMINATED
    error: str | None = None
    epoch: int = 0  # epochs completed
    last: dict[str, Any] = field(default_factory=dict)  # its last evaluation
    reference: float | None = None  # train agreement at the start of its convergence window
    model: torch.nn.Module | None = None  # its final network, once it has left the pack at its last epoch

    @property
    def reference_epoch(self) -> int:
        return convergence_epoch(self.plan)

    def state_dict(self) -> dict[str, Any]:
        return {"status": self.status, "error": self.error, "epoch": self.epoch, "last": dict(self.last),
                "reference": self.reference, "final": None if self.model is None else self.model.state_dict()}

    def load_state_dict(self, saved: dict[str, Any], template: torch.nn.Module) -> None:
        """Its progress from a checkpoint; a final network is loaded into a copy of ``template``."""
        self.status, self.error, self.epoch = saved["status"], saved["error"], int(saved["epoch"])
        self.last, self.reference = dict(saved["last"]), saved["reference"]
        if saved["final"] is not None:
            self.model = copy.deepcopy(template)
            self.model.load_state_dict(saved["final"])
            self.model.eval()


def choose_layout(cfg: TrialConfig, models: list[torch.nn.Module], device: torch.device) -> bool:
    """Feature-major (True) or channel-blocked (False) activations for the pack's wide network. Only
    ``precision='auto'`` times the two (a few training steps each, on copies); a fixed precision fixes
    the layout, as it fixes the rest of the fast path (kd_ray.train.fastpath)."""
    if not feature_major_applies(models[0]):
        return False
    if cfg.precision != "auto":
        return True
    x = torch.randn(cfg.batch_size, *dataset_info(cfg.dataset).input_shape, device=device)

    def seconds(feature_major: bool) -> float:
        wide = widen([copy.deepcopy(m) for m in models], feature_major).train()
        for repeat in range(8):
            if repeat == 3:  # after the warm-up steps
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
            wide_forward(wide, x).float().logsumexp(-1).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    return seconds(True) <= seconds(False)


@dataclass
class PackView:
    """Some of a pack's active students as a wide network of their own, for evaluation."""

    students: list[Student]
    wide: torch.nn.Module
    active: list[int]


class WidePack:
    """The live students of a pack as one wide network, its optimizer, its teacher, and its streams' batches
    (``streams.StreamBatches``; student i is fed by ``streams[stream_of[i]]``). With several streams every
    student reads its own stream's batch (per-network inputs), to the pack's end."""

    def __init__(self, students: list[Student], models: list[torch.nn.Module], active: list[int],
                 teacher: PackTeacher, streams: list[StreamBatches], stream_of: list[int],
                 feature_major: bool = True, bf16: bool = False) -> None:
        self.students, self.active, self.template = students, active, models[0]
        self.feature_major, self.bf16 = feature_major, bf16
        self.streams, self.stream_of = streams, stream_of
        self.per_network = len(streams) > 1
        self.wide = widen(models, feature_major).train()
        self.teacher = teacher.keep(active)
        cfgs = [students[i].cfg for i in active]
        self.optimizer = PackOptimizer(list(self.wide.parameters()), len(active), [c.weight_decay for c in cfgs],
                                       [c.optimizer == "adam" for c in cfgs])
        self.epoch = 0

    def positions(self) -> dict[int, list[int]]:
        """Each live stream's students, as positions among the active ones, streams in order."""
        where: dict[int, list[int]] = {}
        for j, index in enumerate(self.active):
            where.setdefault(self.stream_of[index], []).append(j)
        return dict(sorted(where.items()))

    def forward(self, drawn: dict[int, tuple]) -> torch.Tensor:
        """``[K, classes, batch]`` logits of the active students, each on its stream's batch (``drawn[stream]``)."""
        if not self.per_network:
            ((batch, _),) = drawn.values()
            return wide_forward(self.wide, batch.x, class_major=True)
        inputs = stack_inputs([drawn[self.stream_of[i]][0].x for i in self.active], self.feature_major)
        return per_network_forward(self.wide, inputs, self.feature_major, class_major=True)

    def view(self, indices: list[int]) -> "WidePack | PackView":
        """The active students ``indices`` for evaluation: the pack itself when it has one stream (its students
        all read the same inputs), else a wide network of theirs alone."""
        if not self.per_network:
            return self
        models = [narrow(self.wide, self.template, self.active.index(i)) for i in indices]
        return PackView(self.students, widen(models, self.feature_major).train(self.wide.training), list(indices))

    def keep(self, keep: list[int]) -> None:
        """Only the students ``keep`` (indices into ``students``) stay in the pack; the others leave."""
        if not keep:
            self.active = []  # nothing left to train; the wide network is not used again
            return
        where = [self.active.index(i) for i in keep]
        models = [narrow(self.wide, self.template, j) for j in where]
        self.wide = widen(models, self.feature_major).train()
        self.optimizer = self.optimizer.keep(where, list(self.wide.parameters()))
        self.teacher = self.teacher.keep(where)
        self.active = keep

    def release(self, leaving: list[int]) -> None:
        """The students ``leaving`` leave the pack; each that finished its schedule keeps its final network."""
        for index in leaving:
            student = self.students[index]
            if student.status == TERMINATED:
                student.model = narrow(self.wide, self.template, self.active.index(index)).eval()
        if leaving:
            self.keep([i for i in self.active if i not in leaving])

    def state_dict(self) -> dict[str, Any]:
        return {
            "wide": {k: v.clone() for k, v in self.wide.state_dict().items()}, "active": list(self.active),
            "optimizer": self.optimizer.state_dict(), "streams": [stream.state_dict() for stream in self.streams],
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wide.load_state_dict(state["wide"])
        self.optimizer.load_state_dict(state["optimizer"])
        for stream, saved in zip(self.streams, state["streams"]):
            stream.load_state_dict(saved)
        self.epoch = int(state["epoch"])

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's pack (``state_dict``, or only its active students and epoch when none
        was left), once the students' own progress is restored."""
        active = list(state["active"])
        if active != self.active:
            self.keep(active)
        if active:
            self.load_state_dict(state)
        self.epoch = int(state["epoch"])
        # A checkpoint is taken before the students done (or diverged) at its epoch leave the pack.
        students = self.students
        self.release([i for i in self.active
                      if students[i].status != TERMINATED or students[i].epoch >= students[i].plan.epochs])


def build_students(configs: list[TrialConfig], ensembles: list[Ensemble], data: TrialData, device: torch.device,
                   network: str) -> list[torch.nn.Module]:
    """Each student's initial network, as ``trial.build_student_state`` builds it alone."""
    models = []
    info = data.info
    for cfg, ensemble in zip(configs, ensembles):
        streams = network_streams(network, cfg.seed)
        model = build_seeded(cfg.student_arch, info.input_shape, info.num_classes, cfg.norm, streams.init,
                             cfg.student_arch_args).to(device)
        initialize_student(model, cfg.init, cfg.init_lambda, ensemble.initial_states[0], ensemble.final_states[0])
        models.append(model)
    return models


def train_wide_pack(pack: WidePack, on_epoch: Callable[[int, list[float]], None] | None = None) -> None:
    """Run the pack's students to the end of their schedules; ``on_epoch(epoch, losses)`` after each
    epoch with the mean loss of every active student. Non-finite or finished students leave the pack."""
    last_epoch = max(pack.students[i].plan.epochs for i in pack.active)
    while pack.active and pack.epoch < last_epoch:
        mean_losses = train_epoch(pack)
        leaving = close_epoch(pack, mean_losses)
        if on_epoch is not None:
            on_epoch(pack.epoch, mean_losses)
        pack.release(leaving)


def train_epoch(pack: WidePack) -> list[float]:
    """One epoch of the pack's active students: each step one augmented batch per live stream and one teacher
    forward for all of them, and each student's own loss and learning rate. Each student's mean loss."""
    students, epoch = pack.students, pack.epoch
    device = pack.streams[0].data.x.device
    plans = [students[i].plan for i in pack.active]
    recipes = [student_recipe(students[i].cfg) for i in pack.active]
    temperature = torch.tensor([r.temperature for r in recipes], device=device)
    alpha = torch.tensor([r.alpha for r in recipes], device=device)
    divergences = [r.loss for r in recipes]
    jsd_beta = torch.tensor([r.jsd_beta for r in recipes], device=device)
    loss_sum = torch.zeros(len(pack.active), device=device)
    positions = pack.positions()
    orders = {stream: pack.streams[stream].epoch_order() for stream in positions}
    steps = max(plan.steps_in(epoch) for plan in plans)
    steps_per_epoch = plans[0].steps_per_epoch  # the pack's streams take steps of one shape (streams.step_shape)
    # As a trial alone: bf16 autocast for the forward passes when the fast path says so; losses in float32.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=pack.bf16)
    for i in range(steps):
        step = epoch * steps_per_epoch + i
        lr = torch.tensor([lr_at(r, step, p.total_steps) for r, p in zip(recipes, plans)], device=device)
        drawn = {stream: pack.streams[stream].batch(order, i) for stream, order in orders.items()}
        with autocast:
            logits = pack.forward(drawn)
            teacher_log_probs = pack.teacher.log_probs({s: batch.x for s, (batch, _) in drawn.items()},
                                                       class_major=True)
        losses = stream_losses(logits, teacher_log_probs, drawn, positions, temperature, alpha, divergences,
                               jsd_beta)
        pack.optimizer.zero_grad()
        losses.sum().backward()
        pack.optimizer.step(lr)
        loss_sum += losses.detach()
    pack.epoch = epoch + 1
    return (loss_sum / steps).tolist()


def close_epoch(pack: WidePack, mean_losses: list[float]) -> list[int]:
    """The end of the pack's epoch for each active student: DIVERGED when its mean loss is not finite,
    else one more epoch completed. The students that leave the pack now: diverged, or done."""
    leaving = []
    for j, index in enumerate(pack.active):
        student = pack.students[index]
        if not math.isfinite(mean_losses[j]):
            student.status = DIVERGED
            student.error = f"non-finite mean training loss ({mean_losses[j]}) in epoch {pack.epoch}"
            leaving.append(index)
        else:
            student.epoch = pack.epoch
            if student.epoch >= student.plan.epochs:
                leaving.append(index)
    return leaving


class PackMeasures:
    """The metrics of one stream's students (``ensembles``: each one's teacher, by its index among the pack's
    students) from one stacked pass over the test set, the stream's distillation set, the validation set and its
    augmented pass; the teacher's side of each computed once per ensemble size. With a ``predictions_dir``, a
    student with ``save_predictions`` measured at its last epoch writes its per-example predictions there
    (``kd_ray.train.predictions``), named by ``trial_ids`` (one per student of the pack: its row's id)."""

    def __init__(self, data: TrialData, ensembles: dict[int, Ensemble], full: Ensemble, cfg: TrialConfig,
                 predictions_dir: str | None = None, trial_ids: list[str] | None = None) -> None:
        self.data = data
        if predictions_dir is not None and trial_ids is None:
            raise ValueError("PackMeasures: predictions_dir needs the students' trial_ids to name their files")
        self.predictions_dir, self.trial_ids = predictions_dir, trial_ids
        self.students = list(ensembles)
        self.teacher_test, self.teacher_distill, self.teacher_val = {}, {}, {}
        for index, ensemble in ensembles.items():
            self.teacher_test[index], self.teacher_distill[index] = data.teacher_log_probs(ensemble)
            self.teacher_val[index] = data.teacher_val_log_probs(ensemble)
        self.augmented = augmented_pass(data, cfg)
        teacher = PackTeacher([full], [len(e.models) for e in ensembles.values()])
        self.teacher_aug = dict(zip(self.students, torch.cat([teacher.log_probs(x) for x in self.augmented], dim=1)))

    @torch.inference_mode()
    def _stacked(self, pack: WidePack | PackView, *inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[K, N, classes]`` logits of the pack's students on each list of input parts, from one
        evaluation copy of the wide network."""
        was_training = pack.wide.training
        wide = fold_batch_norms(pack.wide.eval())
        out = [torch.cat([wide_forward(wide, part).float() for part in parts], dim=1) for parts in inputs]
        pack.wide.train(was_training)
        return out

    def measure(self, pack: WidePack, which: list[int], final: tuple[int, ...] = ()) -> dict[int, dict[str, float]]:
        """Metrics of the students ``which`` (indices into the pack's students, all active and of this stream);
        those of them in ``final`` are at their last epoch, and write their predictions when they save them."""
        data, view = self.data, pack.view(which)
        # Without validation examples there is no validation pass, and the val_* metrics are NaN.
        val_parts = [list(data.x_val.split(EVAL_CHUNK))] if data.has_val else []
        test, train, aug, *val = self._stacked(view, list(data.x_test.split(EVAL_CHUNK)),
                                               list(data.x.split(EVAL_CHUNK)), self.augmented, *val_parts)
        out = {}
        for index in which:
            j = view.active.index(index)
            metrics = student_metrics(test[j], self.teacher_test[index], data.y_test, train[j],
                                      self.teacher_distill[index])
            metrics.update(validation_metrics(val[0][j] if val else None, self.teacher_val[index], data.y_val))
            metrics["aug_train_agreement"] = agreement(self.teacher_aug[index], aug[j])
            out[index] = metrics
            if index in final and self.predictions_dir is not None and pack.students[index].cfg.save_predictions:
                self.save_predictions(pack, index, test[j], val[0][j] if val else None, train[j])
        return out

    def save_predictions(self, pack: WidePack, index: int, test: torch.Tensor, val: torch.Tensor | None,
                         train: torch.Tensor) -> str:
        """Student ``index``'s per-example predictions from the logits its metrics were measured on."""
        data = self.data
        splits = {
            "test": (self.teacher_test[index], test, data.y_test),
            "val": None if val is None else (self.teacher_val[index], val, data.y_val),
            "train": (self.teacher_distill[index], train, data.y),
        }
        return write_predictions(self.predictions_dir, self.trial_ids[index], pack.students[index].cfg.seed, splits)

    def train_agreement(self, pack: WidePack, index: int) -> float:
        view = pack.view([index])
        (train,) = self._stacked(view, list(self.data.x.split(EVAL_CHUNK)))
        return agreement(self.teacher_distill[index], train[view.active.index(index)])


class PackEvaluations:
    """The pack's epoch boundaries (``train_wide_pack``'s ``on_epoch``): the students due are evaluated
    (every ``eval_every`` epochs and at the last of each), stream by stream (``measures``: one per stream), each
    one's train agreement at the start of its convergence window is kept, and ``on_eval`` gets the evaluations
    with a checkpoint of the pack."""

    def __init__(self, pack: WidePack, measures: list[PackMeasures], teacher_summaries: list[dict[str, float]],
                 clock: TrainClock, on_eval: PackEvalCallback | None, progress: Progress | None) -> None:
        self.pack, self.measures, self.teacher_summaries = pack, measures, teacher_summaries
        self.clock, self.on_eval, self.progress = clock, on_eval, progress

    def on_epoch(self, epoch: int, losses: list[float]) -> None:
        pack, students = self.pack, self.pack.students
        loss_of = dict(zip(pack.active, losses))
        due = [i for i in pack.active if students[i].status == TERMINATED
               and (epoch % students[i].cfg.eval_every == 0 or epoch == students[i].plan.epochs)]
        for index in pack.active:
            student = students[index]
            if student.status == TERMINATED and epoch == student.reference_epoch and index not in due:
                student.reference = self.measures[pack.stream_of[index]].train_agreement(pack, index)
        if not due:
            return
        report = {}
        final = tuple(i for i in due if epoch == students[i].plan.epochs)
        measured: dict[int, dict[str, float]] = {}
        for stream, measures in enumerate(self.measures):
            which = [i for i in due if pack.stream_of[i] == stream]
            if which:
                measured.update(measures.measure(pack, which, final))
        for index in due:
            metrics, student = measured[index], students[index]
            if epoch == student.reference_epoch:
                student.reference = metrics["train_agreement"]
            lr = lr_at(student_recipe(student.cfg), epoch * student.plan.steps_per_epoch - 1, student.plan.total_steps)
            row = {"epoch": epoch, "lr": lr, "train_loss": loss_of[index], **metrics, **self.teacher_summaries[index],
                   "train_time_s": self.clock.seconds()}
            student.last = row
            report[index] = row
        self.report(epoch, report)

    def report(self, epoch: int, report: dict[int, dict[str, Any]]) -> None:
        """The evaluations' progress line, and ``on_eval`` with the checkpoint that resumes from them."""
        if self.progress:
            mean = sum(r["test_agreement"] for r in report.values()) / len(report)
            self.progress(f"pack epoch {epoch}: {len(report)} students evaluated, mean test agreement {mean:.3f}")
        if self.on_eval is not None:
            self.on_eval(epoch, report, self.checkpoint())

    def checkpoint(self) -> dict[str, Any]:
        pack = self.pack
        pack_state = pack.state_dict() if pack.active else {"active": [], "epoch": pack.epoch}
        return {"pack": pack_state, "students": [s.state_dict() for s in pack.students],
                "train_time_s": self.clock.seconds()}


@dataclass
class PackStream:
    """One stream of a pack (``streams.group_streams``): its students (indices), its data, the config of the
    largest teacher ensemble its students ask for, and that ensemble."""

    students: list[int]
    data: TrialData
    largest: TrialConfig
    full: Ensemble


def stream_numbers(streams: list[PackStream]) -> list[int]:
    """Each student's stream, by its index among the pack's students: the number of the stream holding it."""
    stream_of = [0] * sum(len(stream.students) for stream in streams)
    for number, stream in enumerate(streams):
        for index in stream.students:
            stream_of[index] = number
    return stream_of


def load_streams(cfgs: list[TrialConfig], device: torch.device, data_dir: str | None, store: TeacherStore,
                 progress: Progress | None) -> list[PackStream]:
    """Each stream's data, checked to take steps of one shape before any teacher is trained, then its teacher
    ensemble: the largest asked for, whose first m members are each m-member one."""
    groups = group_streams(cfgs)
    datas = [TrialData(cfgs[students[0]], device, data_dir) for students in groups]
    check_step_shapes(datas, len(groups) == 1 or can_cross_streams(cfgs[0]))
    streams = []
    for students, data in zip(groups, datas):
        largest = cfgs[students[0]].replace(teacher_members=max(cfgs[i].teacher_members for i in students))
        ensure_members(largest, store, data.arrays, device, progress=progress)
        streams.append(PackStream(students, data, largest, load_ensemble(largest, store, device)))
    return streams


def run_pack(
    configs: list[TrialConfig | dict[str, Any]],
    on_eval: PackEvalCallback | None = None,
    resume: dict[str, Any] | None = None,
    *,
    pack_id: str = "pack",
    store: TeacherStore | str | None = None,
    data_dir: str | None = None,
    progress: Progress | None = None,
    predictions_dir: str | None = None,
    trial_ids: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Distil the students of ``configs`` as one pack; one result per config, in order, as ``run_trial``'s.

    ``on_eval(epoch, metrics_by_student, checkpoint)`` is called at every epoch at which a student is
    evaluated; ``checkpoint``, passed back as ``resume``, continues the pack from that epoch. With
    ``predictions_dir``, each student with ``save_predictions`` that finishes writes its per-example predictions
    at its last evaluation to ``<predictions_dir>/<trial_id>.parquet``, ``trial_ids[index]`` being the id of its
    row in the study's tables (by default ``tables.packed_trial_id(pack_id, index)``)."""
    cfgs = [c if isinstance(c, TrialConfig) else TrialConfig.from_dict(c) for c in configs]
    check_streams(cfgs)
    if trial_ids is not None and len(trial_ids) != len(cfgs):
        raise ValueError(f"run_pack: {len(trial_ids)} trial_ids for {len(cfgs)} students; give one per student")
    for cfg in cfgs:
        check_runnable(cfg)
    store = store if isinstance(store, TeacherStore) else TeacherStore(store or default_store())
    base = cfgs[0]
    device = resolve_device(base.device)
    clock = TrainClock(resume)

    # --- data and teachers, stream by stream: each the largest ensemble its students ask for ---
    streams = load_streams(cfgs, device, data_dir, store, progress)
    stream_of = stream_numbers(streams)
    ensembles = [sub_ensemble(streams[stream_of[i]].full, cfg) for i, cfg in enumerate(cfgs)]
    datas = [streams[stream_of[i]].data for i in range(len(cfgs))]
    teacher = PackTeacher([stream.full for stream in streams], [c.teacher_members for c in cfgs], stream_of)

    # --- students: one wide network, built from the replicate's streams, or restored from the checkpoint ---
    students = [Student(cfg, schedule(student_recipe(cfg), data.x.shape[0])) for cfg, data in zip(cfgs, datas)]
    models = build_students(cfgs, ensembles, datas[0], device, "student")
    trial_ids = trial_ids or [packed_trial_id(pack_id, index) for index in range(len(cfgs))]
    measures = [PackMeasures(stream.data, {i: ensembles[i] for i in stream.students}, stream.full,
                             cfgs[stream.students[0]], predictions_dir, trial_ids) for stream in streams]
    teacher_summaries = [datas[i].teacher_summary(ensembles[i], measures[stream_of[i]].teacher_test[i])
                         for i in range(len(cfgs))]
    if resume:
        for student, saved in zip(students, resume["students"]):
            student.load_state_dict(saved, models[0])
    # Several streams: a plain MLP feature-major, any other network in channel blocks (streams.stack_inputs).
    feature_major = feature_major_applies(models[0]) if len(streams) > 1 else choose_layout(base, models, device)
    bf16 = fast_path(base, datas[0].info, device).bf16  # measured under precision=auto, as for a trial alone
    batches = [StreamBatches(cfgs[stream.students[0]], stream.data, "student", device) for stream in streams]
    pack = WidePack(students, models, list(range(len(cfgs))), teacher, batches, stream_of, feature_major, bf16)
    if resume:
        pack.restore(resume["pack"])
    else:
        for index, student in enumerate(students):
            if student.reference_epoch == 0:
                student.reference = measures[stream_of[index]].train_agreement(pack, index)

    # --- fit ---
    evaluations = PackEvaluations(pack, measures, teacher_summaries, clock, on_eval, progress)
    if pack.active:
        train_wide_pack(pack, evaluations.on_epoch)

    # --- result rows, and each stream's controls ---
    teacher_steps = [member_steps(cfg, data.arrays.y_train) for cfg, data in zip(cfgs, datas)]
    results = student_rows(students, ensembles, teacher_summaries, datas, teacher_steps, feature_major, bf16,
                           len(streams))
    for stream, stream_measures in zip(streams, measures):
        controls = [i for i in stream.students if cfgs[i].control and results[i]["status"] == TERMINATED]
        if controls:
            run_controls(students, results, controls, store, stream, stream_measures, device, progress, bf16)

    # --- how the pack ran ---
    add_pack_provenance(results, students, pack_id, clock.seconds(), device)
    return results


def student_rows(students: list[Student], ensembles: list[Ensemble], teacher_summaries: list[dict],
                 datas: list[TrialData], teacher_steps: list[int], feature_major: bool, bf16: bool,
                 streams: int = 1) -> list[dict[str, Any]]:
    """Each student's result row from its last evaluation (``setup.result_row``; ``datas``: each one's stream's
    data), with the pack's fast path."""
    rows = []
    layout = "feature-major" if feature_major else "channel blocks"
    across = f" across {streams} streams" if streams > 1 else ""
    for student, ensemble, summary, data, steps in zip(students, ensembles, teacher_summaries, datas, teacher_steps):
        row = result_row(
            status=student.status, error=student.error, ensemble=ensemble, teacher_summary=summary,
            last_metrics=student.last, epochs_completed=student.epoch, plan=student.plan, teacher_steps=steps,
            reference=student.reference, student=student.model, data=data,
        )
        row["precision_used"] = precision_used(bf16)
        row["fast_path"] = f"{precision_used(bf16)}, {FUSED}{across} ({layout})"
        row["config_json"] = student.cfg.to_json()
        rows.append(row)
    return rows


def run_controls(students: list[Student], results: list[dict[str, Any]], controls: list[int], store: TeacherStore,
                 stream: PackStream, measures: PackMeasures, device: torch.device, progress: Progress | None,
                 bf16: bool = False) -> None:
    """The independent-student control of each student in ``controls`` (all of one ``stream``), as one pack of
    its own: distilled from the control's ensemble, it records its agreement with the student's reference teacher."""
    if progress:
        progress(f"control: distilling {len(controls)} students from an independent teacher ensemble")
    data = stream.data
    ensure_members(stream.largest, store, data.arrays, device, role="control", progress=progress)
    full = load_ensemble(stream.largest, store, device, role="control")
    cfgs = [students[i].cfg for i in controls]
    ensembles = [sub_ensemble(full, cfg, "control") for cfg in cfgs]
    controls_of = [Student(cfg, students[i].plan) for cfg, i in zip(cfgs, controls)]
    models = build_students(cfgs, ensembles, data, device, "control_student")
    batches = [StreamBatches(cfgs[0], data, "control_student", device)]
    pack = WidePack(controls_of, models, list(range(len(cfgs))), PackTeacher([full], [c.teacher_members for c in cfgs]),
                    batches, [0] * len(cfgs), choose_layout(cfgs[0], models, device), bf16)
    train_wide_pack(pack)
    for index, control in zip(controls, controls_of):
        if control.status == DIVERGED:
            results[index].update(status=DIVERGED, error=f"control student: {control.error}")
            continue
        assert control.model is not None
        results[index]["control_test_agreement"] = agreement(measures.teacher_test[index],
                                                             predict(control.model, data.x_test))


def add_pack_provenance(results: list[dict[str, Any]], students: list[Student], pack_id: str, pack_time: float,
                        device: torch.device) -> None:
    """How the pack ran, in each student's row: the pack, its share of the pack's optimizer steps (by
    which the pack's time is split), the device and the versions."""
    steps = [s.epoch * s.plan.steps_per_epoch if s.status != TERMINATED else s.plan.total_steps for s in students]
    for result, student_steps in zip(results, steps):
        share = student_steps / max(1, sum(steps))
        result.update(pack_id=pack_id, pack_size=len(students), pack_time_share=share, train_time_s=pack_time * share)
        result["device_name"] = device_name(device)
        result.update(versions())
