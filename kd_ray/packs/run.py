"""A pack: K students of one replicate trained at once, one augmentation and one teacher forward per step.

``run_pack`` is ``trial.run_trial`` for the students of one pack (``kd_ray.packs.plan`` says which trials
may share one). They share the distillation data, the teacher ensemble (the largest one asked for:
its first m members are the m-member ensemble) and the batch stream: the replicate's student
streams, which each of them would also draw alone. The students run as one wide network
(``kd_ray.packs.wide``), with their own temperature, label weight, initialisation, learning rate, weight
decay, optimizer and number of epochs (``kd_ray.packs.optim``). Each returns the row ``run_trial``
would return, plus ``pack_id``, ``pack_size`` and ``pack_time_share`` (its share of the pack's
optimizer steps, by which the pack's time is split among its rows).

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
from kd_ray.data.datasets import DATASET_INFO
from kd_ray.models.ensembles import ensemble_log_probs
from kd_ray.packs.optim import PackOptimizer, pack_kd_loss
from kd_ray.packs.plan import PACK_LIMIT, share_key
from kd_ray.packs.wide import feature_major_applies, fold_batch_norms, narrow, wide_forward, widen
from kd_ray.progress import Progress
from kd_ray.provenance import versions
from kd_ray.tables import AFTER_TRAINING_METRICS, CKA_METRICS, DIVERGED, METRICS, TERMINATED
from kd_ray.train.cka import CKA_TEST_INPUTS, stage_cka
from kd_ray.train.distill import Schedule, build_seeded, initialize_student, lr_at, predict, schedule, training_batch
from kd_ray.train.metrics import agreement, student_metrics, teacher_metrics
from kd_ray.train.teachers import Ensemble, TeacherStore, default_store, ensure_members, load_ensemble, member_steps
from kd_ray.train.trial import (
    TrialData,
    augmented_pass,
    check_runnable,
    convergence,
    convergence_epoch,
    extra_batches_seed,
    fast_path,
    resolve_device,
    student_recipe,
)

# (epoch, metrics by student index, checkpoint) at each epoch where a student is evaluated
PackEvalCallback = Callable[[int, dict[int, dict[str, Any]], dict[str, Any]], None]
FINAL_METRICS = tuple(m for m in METRICS if m not in AFTER_TRAINING_METRICS)
FUSED = "teacher and students fused"  # a pack's fast_path: precision, this, then the students' layout
EVAL_CHUNK = 1024  # inputs per stacked evaluation pass (measured: 12 folded MLPs on 18k inputs, 1024 ~ 512 < 2048)


def sub_ensemble(ensemble: Ensemble, cfg: TrialConfig, role: str = "reference") -> Ensemble:
    """The first ``cfg.teacher_members`` members of ``ensemble``: the ensemble ``cfg`` distils from."""
    m = cfg.teacher_members
    return Ensemble(key=cfg.teacher_key(role), models=ensemble.models[:m], initial_states=ensemble.initial_states[:m],
                    final_states=ensemble.final_states[:m], test_logits=ensemble.test_logits[:m],
                    train_logits=ensemble.train_logits[:m])


class PackTeacher:
    """The largest ensemble of the pack as one wide network; the log-probabilities of each student's
    m-member prefix on a batch, computed once per distinct m."""

    def __init__(self, ensemble: Ensemble, members: list[int]) -> None:
        self.wide = fold_batch_norms(widen(ensemble.models).eval())
        self.members = members  # per student
        self.sizes = sorted(set(members))

    @torch.inference_mode()
    def log_probs(self, x: torch.Tensor, class_major: bool = False) -> torch.Tensor:
        """``[K, batch, classes]`` (``class_major``: ``[K, classes, batch]``): student k's teacher on ``x``."""
        logits = wide_forward(self.wide, x, class_major)
        by_size = {m: ensemble_log_probs(logits[:m], class_dim=1 if class_major else -1) for m in self.sizes}
        return torch.stack([by_size[m] for m in self.members])

    def keep(self, keep: list[int]) -> "PackTeacher":
        other = PackTeacher.__new__(PackTeacher)
        other.wide, other.members = self.wide, [self.members[i] for i in keep]
        other.sizes = sorted(set(other.members))
        return other


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


def choose_layout(cfg: TrialConfig, models: list[torch.nn.Module], device: torch.device) -> bool:
    """Feature-major (True) or channel-blocked (False) activations for the pack's wide network. Only
    ``precision='auto'`` times the two (a few training steps each, on copies); a fixed precision fixes
    the layout, as it fixes the rest of the fast path (kd_ray.train.fastpath)."""
    if not feature_major_applies(models[0]):
        return False
    if cfg.precision != "auto":
        return True
    x = torch.randn(cfg.batch_size, *DATASET_INFO[cfg.dataset].input_shape, device=device)

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


class Pack:
    """The live students of a pack as one wide network, its optimizer and the shared generators."""

    def __init__(self, students: list[Student], models: list[torch.nn.Module], active: list[int],
                 teacher: PackTeacher, device: torch.device, seed: int, network: str,
                 feature_major: bool = True, bf16: bool = False) -> None:
        self.students, self.active, self.template = students, active, models[0]
        self.feature_major, self.bf16 = feature_major, bf16
        self.wide = widen(models, feature_major).train()
        self.teacher = teacher.keep(active)
        cfgs = [students[i].cfg for i in active]
        self.optimizer = PackOptimizer(list(self.wide.parameters()), len(active), [c.weight_decay for c in cfgs],
                                       [c.optimizer == "adam" for c in cfgs])
        streams = network_streams(network, seed)
        self.generator = torch.Generator(device=device).manual_seed(streams.batches)
        self.augment_generator = torch.Generator(device=device).manual_seed(streams.augment)
        self.extra_generator: torch.Generator | None = None
        self.epoch = 0

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

    def state_dict(self) -> dict[str, Any]:
        state = {
            "wide": {k: v.clone() for k, v in self.wide.state_dict().items()}, "active": list(self.active),
            "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
            "augment_generator": self.augment_generator.get_state(), "epoch": self.epoch,
        }
        if self.extra_generator is not None:
            state["extra_generator"] = self.extra_generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wide.load_state_dict(state["wide"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.augment_generator.set_state(state["augment_generator"])
        if self.extra_generator is not None:
            self.extra_generator.set_state(state["extra_generator"])
        self.epoch = int(state["epoch"])


def check_pack(configs: list[TrialConfig]) -> None:
    keys = {share_key(cfg) for cfg in configs}
    if len(keys) != 1 or None in keys:
        raise ValueError("run_pack: the configs of a pack must share their teacher, data and batch stream "
                         "(kd_ray.packs.plan.share_key)")


def build_students(configs: list[TrialConfig], ensembles: list[Ensemble], data: TrialData, device: torch.device,
                   network: str) -> list[torch.nn.Module]:
    """Each student's initial network, as ``trial.build_student_state`` builds it alone."""
    models = []
    info = data.info
    for cfg, ensemble in zip(configs, ensembles):
        streams = network_streams(network, cfg.seed)
        model = build_seeded(cfg.student_arch, info.input_shape, info.num_classes, cfg.norm, streams.init).to(device)
        initialize_student(model, cfg.init, cfg.init_lambda, ensemble.initial_states[0], ensemble.final_states[0])
        models.append(model)
    return models


def train_pack(pack: Pack, data: TrialData, on_epoch: Callable[[int, list[float]], None] | None = None) -> None:
    """Run the pack's students to the end of their schedules; ``on_epoch(epoch, losses)`` after each
    epoch with the mean loss of every active student. Non-finite or finished students leave the pack."""
    students = pack.students
    cfg = students[pack.active[0]].cfg
    recipe = student_recipe(cfg)
    x, y, spec = data.x, data.y, data.augment_spec
    n = x.shape[0]
    # As a trial alone: bf16 autocast for the forward passes when the fast path says so; losses in float32.
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=pack.bf16)
    steps_per_epoch = students[0].plan.steps_per_epoch
    last_epoch = max(students[i].plan.epochs for i in pack.active)
    while pack.active and pack.epoch < last_epoch:
        epoch = pack.epoch
        plans = [students[i].plan for i in pack.active]
        recipes = [student_recipe(students[i].cfg) for i in pack.active]
        temperature = torch.tensor([r.temperature for r in recipes], device=x.device)
        alpha = torch.tensor([r.alpha for r in recipes], device=x.device)
        loss_sum = torch.zeros(len(pack.active), device=x.device)
        order = torch.randperm(n, device=x.device, generator=pack.generator)
        steps = max(plan.steps_in(epoch) for plan in plans)
        for i in range(steps):
            step = epoch * steps_per_epoch + i
            lr = torch.tensor([lr_at(r, step, p.total_steps) for r, p in zip(recipes, plans)], device=x.device)
            batch, y_batch = training_batch(x, y, order, i, recipe, spec, pack.augment_generator, data.extra,
                                            pack.extra_generator)
            with autocast:
                logits = wide_forward(pack.wide, batch.x, class_major=True)
                teacher_log_probs = pack.teacher.log_probs(batch.x, class_major=True)
            losses = pack_kd_loss(logits, teacher_log_probs, y_batch, temperature, alpha, batch.mix_index, batch.lam)
            pack.optimizer.zero_grad()
            losses.sum().backward()
            pack.optimizer.step(lr)
            loss_sum += losses.detach()
        pack.epoch = epoch + 1
        mean_losses = (loss_sum / steps).tolist()
        finished = []
        for j, index in enumerate(pack.active):
            student = students[index]
            if not math.isfinite(mean_losses[j]):
                student.status = DIVERGED
                student.error = f"non-finite mean training loss ({mean_losses[j]}) in epoch {epoch + 1}"
                finished.append(index)
            else:
                student.epoch = epoch + 1
                if student.epoch >= student.plan.epochs:
                    finished.append(index)
        if on_epoch is not None:
            on_epoch(epoch + 1, mean_losses)
        for index in finished:
            if students[index].status == TERMINATED:
                students[index].model = narrow(pack.wide, pack.template, pack.active.index(index)).eval()
        if finished:
            pack.keep([i for i in pack.active if i not in finished])


class PackMeasures:
    """Every student's metrics from one stacked pass over the test set, the distillation set and the
    replicate's augmented pass; the teacher's side of each computed once per ensemble size."""

    def __init__(self, data: TrialData, ensembles: list[Ensemble], teacher: PackTeacher, cfg: TrialConfig) -> None:
        self.data = data
        self.teacher_test, self.teacher_distill = zip(*(data.teacher_log_probs(e) for e in ensembles))
        self.augmented = augmented_pass(data, cfg)
        self.teacher_aug = torch.cat([teacher.log_probs(x) for x in self.augmented], dim=1)  # [K, N, C]

    @torch.inference_mode()
    def _stacked(self, pack: Pack, *inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``[K, N, classes]`` logits of the pack's students on each list of input parts, from one
        evaluation copy of the wide network."""
        was_training = pack.wide.training
        wide = fold_batch_norms(pack.wide.eval())
        out = [torch.cat([wide_forward(wide, part).float() for part in parts], dim=1) for parts in inputs]
        pack.wide.train(was_training)
        return out

    def measure(self, pack: Pack, which: list[int]) -> dict[int, dict[str, float]]:
        """Metrics of the students ``which`` (indices into the pack's students, all active)."""
        x, x_test = self.data.x, self.data.x_test
        test, train, aug = self._stacked(pack, list(x_test.split(EVAL_CHUNK)), list(x.split(EVAL_CHUNK)),
                                         self.augmented)
        out = {}
        for index in which:
            j = pack.active.index(index)
            metrics = student_metrics(test[j], self.teacher_test[index], self.data.y_test, train[j],
                                      self.teacher_distill[index])
            metrics["aug_train_agreement"] = agreement(self.teacher_aug[index], aug[j])
            out[index] = metrics
        return out

    def train_agreement(self, pack: Pack, index: int) -> float:
        (train,) = self._stacked(pack, list(self.data.x.split(EVAL_CHUNK)))
        return agreement(self.teacher_distill[index], train[pack.active.index(index)])


def run_pack(
    configs: list[TrialConfig | dict[str, Any]],
    on_eval: PackEvalCallback | None = None,
    resume: dict[str, Any] | None = None,
    *,
    pack_id: str = "pack",
    store: TeacherStore | str | None = None,
    data_dir: str | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Distil the students of ``configs`` as one pack; one result per config, in order, as ``run_trial``'s.

    ``on_eval(epoch, metrics_by_student, checkpoint)`` is called at every epoch at which a student is
    evaluated; ``checkpoint``, passed back as ``resume``, continues the pack from that epoch."""
    cfgs = [c if isinstance(c, TrialConfig) else TrialConfig.from_dict(c) for c in configs]
    check_pack(cfgs)
    for cfg in cfgs:
        check_runnable(cfg)
    store = store if isinstance(store, TeacherStore) else TeacherStore(store or default_store())
    base = cfgs[0]
    device = resolve_device(base.device)
    started = time.perf_counter()
    elapsed_before = float(resume["train_time_s"]) if resume else 0.0

    data = TrialData(base, device, data_dir)
    largest = base.replace(teacher_members=max(c.teacher_members for c in cfgs))
    ensure_members(largest, store, data.arrays, device, progress=progress)
    full = load_ensemble(largest, store, device)
    ensembles = [sub_ensemble(full, cfg) for cfg in cfgs]
    teacher = PackTeacher(full, [c.teacher_members for c in cfgs])
    students = [Student(cfg, schedule(student_recipe(cfg), data.x.shape[0])) for cfg in cfgs]
    models = build_students(cfgs, ensembles, data, device, "student")
    measures = PackMeasures(data, ensembles, teacher, base)
    teacher_summaries = [teacher_metrics(test, data.y_test) for test in measures.teacher_test]

    active = list(range(len(cfgs)))
    if resume:
        for student, saved in zip(students, resume["students"]):
            student.status, student.error, student.epoch = saved["status"], saved["error"], int(saved["epoch"])
            student.last, student.reference = dict(saved["last"]), saved["reference"]
            if saved["final"] is not None:
                student.model = copy.deepcopy(models[0])
                student.model.load_state_dict(saved["final"])
                student.model.eval()
        active = list(resume["pack"]["active"])
    feature_major = choose_layout(base, models, device)
    bf16 = fast_path(base, data.info, device).bf16  # measured under precision=auto, as for a trial alone
    pack = Pack(students, models, list(range(len(cfgs))), teacher, device, base.seed, "student", feature_major, bf16)
    if data.extra is not None:
        pack.extra_generator = torch.Generator(device=device).manual_seed(extra_batches_seed("student", base.seed))
    if resume:
        if active != pack.active:
            pack.keep(active)
        if active:
            pack.load_state_dict(resume["pack"])
        pack.epoch = int(resume["pack"]["epoch"])
        # A checkpoint is taken before the students done (or diverged) at its epoch leave the pack.
        leaving = [i for i in pack.active
                   if students[i].status != TERMINATED or students[i].epoch >= students[i].plan.epochs]
        for index in leaving:
            if students[index].status == TERMINATED:
                students[index].model = narrow(pack.wide, pack.template, pack.active.index(index)).eval()
        if leaving:
            stay = [i for i in pack.active if i not in leaving]
            pack.keep(stay)
    else:
        for index, student in enumerate(students):
            if student.reference_epoch == 0:
                student.reference = measures.train_agreement(pack, index)

    def checkpoint() -> dict[str, Any]:
        saved = [{"status": s.status, "error": s.error, "epoch": s.epoch, "last": dict(s.last),
                  "reference": s.reference, "final": None if s.model is None else s.model.state_dict()}
                 for s in students]
        pack_state = pack.state_dict() if pack.active else {"active": [], "epoch": pack.epoch}
        return {"pack": pack_state, "students": saved, "train_time_s": elapsed_before + time.perf_counter() - started}

    def on_epoch(epoch: int, losses: list[float]) -> None:
        loss_of = dict(zip(pack.active, losses))
        due = [i for i in pack.active if students[i].status == TERMINATED
               and (epoch % students[i].cfg.eval_every == 0 or epoch == students[i].plan.epochs)]
        for index in pack.active:
            student = students[index]
            if student.status == TERMINATED and epoch == student.reference_epoch and index not in due:
                student.reference = measures.train_agreement(pack, index)
        if not due:
            return
        measured = measures.measure(pack, due)
        report = {}
        for index, metrics in measured.items():
            student = students[index]
            if epoch == student.reference_epoch:
                student.reference = metrics["train_agreement"]
            lr = lr_at(student_recipe(student.cfg), epoch * student.plan.steps_per_epoch - 1, student.plan.total_steps)
            row = {"epoch": epoch, "lr": lr, "train_loss": loss_of[index], **metrics, **teacher_summaries[index],
                   "train_time_s": elapsed_before + time.perf_counter() - started}
            student.last = row
            report[index] = row
        if progress:
            mean = sum(r["test_agreement"] for r in report.values()) / len(report)
            progress(f"pack epoch {epoch}: {len(report)} students evaluated, mean test agreement {mean:.3f}")
        if on_eval is not None:
            on_eval(epoch, report, checkpoint())

    if pack.active:
        train_pack(pack, data, on_epoch)
    teacher_steps = [member_steps(cfg, data.arrays.y_train) for cfg in cfgs]
    results = finish(students, ensembles, teacher_summaries, data, teacher_steps, feature_major, bf16)
    controls = [i for i, cfg in enumerate(cfgs) if cfg.control and results[i]["status"] == TERMINATED]
    if controls:
        run_controls(students, results, controls, store, data, measures, device, largest, progress, bf16)
    pack_time = elapsed_before + time.perf_counter() - started
    steps = [s.epoch * s.plan.steps_per_epoch if s.status != TERMINATED else s.plan.total_steps for s in students]
    for result, student_steps in zip(results, steps):
        share = student_steps / max(1, sum(steps))
        result.update(pack_id=pack_id, pack_size=len(cfgs), pack_time_share=share, train_time_s=pack_time * share)
        result["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        result.update(versions())
    return results


def finish(students: list[Student], ensembles: list[Ensemble], teacher_summaries: list[dict],
           data: TrialData, y_train_steps: list[int], feature_major: bool, bf16: bool) -> list[dict[str, Any]]:
    """Each student's result from its last evaluation, as ``run_trial`` writes it."""
    results = []
    cka_inputs = data.x_test[:CKA_TEST_INPUTS]
    for student, ensemble, summary, teacher_steps in zip(students, ensembles, teacher_summaries, y_train_steps):
        result: dict[str, Any] = {"status": student.status, "error": student.error, "teacher_key": ensemble.key}
        result.update(summary)
        result.update({k: student.last.get(k, float("nan")) for k in FINAL_METRICS if k not in summary})
        result["epochs_completed"] = student.epoch
        result["student_steps"] = student.plan.total_steps
        result["teacher_steps"] = teacher_steps
        finished = student.status == TERMINATED
        result["convergence_delta"], result["converged"] = convergence(
            student.last.get("train_agreement") if finished else None, student.reference
        )
        result.update(stage_cka(student.model, ensemble.models[0], cka_inputs) if finished and student.model
                      else dict.fromkeys(CKA_METRICS, float("nan")))
        precision = "bf16" if bf16 else "fp32"
        result["precision_used"] = precision
        result["fast_path"] = f"{precision}, {FUSED} ({'feature-major' if feature_major else 'channel blocks'})"
        result["config_json"] = student.cfg.to_json()
        results.append(result)
    return results


def run_controls(students: list[Student], results: list[dict[str, Any]], controls: list[int], store: TeacherStore,
                 data: TrialData, measures: PackMeasures, device: torch.device, largest: TrialConfig,
                 progress: Progress | None, bf16: bool = False) -> None:
    """The independent-student control of each student in ``controls``, as one pack of its own:
    distilled from the control's ensemble, it records its agreement with the student's reference teacher."""
    if progress:
        progress(f"control: distilling {len(controls)} students from an independent teacher ensemble")
    ensure_members(largest, store, data.arrays, device, role="control", progress=progress)
    full = load_ensemble(largest, store, device, role="control")
    cfgs = [students[i].cfg for i in controls]
    ensembles = [sub_ensemble(full, cfg, "control") for cfg in cfgs]
    controls_of = [Student(cfg, students[i].plan) for cfg, i in zip(cfgs, controls)]
    models = build_students(cfgs, ensembles, data, device, "control_student")
    pack = Pack(controls_of, models, list(range(len(cfgs))), PackTeacher(full, [c.teacher_members for c in cfgs]),
                device, cfgs[0].seed, "control_student", choose_layout(cfgs[0], models, device), bf16)
    if data.extra is not None:
        pack.extra_generator = torch.Generator(device=device).manual_seed(
            extra_batches_seed("control_student", cfgs[0].seed))
    train_pack(pack, data)
    for index, control in zip(controls, controls_of):
        if control.status == DIVERGED:
            results[index].update(status=DIVERGED, error=f"control student: {control.error}")
            continue
        assert control.model is not None
        results[index]["control_test_agreement"] = agreement(measures.teacher_test[index],
                                                             predict(control.model, data.x_test))


def student_bytes(cfg: TrialConfig) -> int:
    """Memory one student adds to a pack: weights, gradients and two optimizer states, plus the
    activations of one training batch kept for the backward pass (measured by a forward pass)."""
    info = DATASET_INFO[cfg.dataset]
    model = build_seeded(cfg.student_arch, info.input_shape, info.num_classes, cfg.norm, 0).train()
    outputs: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.numel()))
             for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.zeros(cfg.batch_size, *info.input_shape))
    for hook in hooks:
        hook.remove()
    parameters = sum(p.numel() for p in model.parameters())
    return 4 * (4 * parameters + 2 * sum(outputs))


def max_pack_size(cfg: TrialConfig, budget_bytes: float, limit: int = PACK_LIMIT) -> int:
    """The most students of ``cfg``'s shape a pack may hold within ``budget_bytes`` (1 at least)."""
    return max(1, min(limit, int(budget_bytes // student_bytes(cfg))))
