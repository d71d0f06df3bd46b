"""The streams of a pack: what each group of its students is fed, and the teachers that label it.

A pack's students fall into streams (``kd_ray.packs.plan``): the students of one stream share a
teacher, a distillation set and a batch stream, which they would each draw alone. ``StreamBatches`` is
one stream's data and generators, seeded from the replicate's student streams as a trial alone seeds
them, and draws its batches through ``distill.training_batch``, the function a lone trial draws with.
``PackTeacher`` is the teachers of all the pack's streams as one wide network of their members: with
one stream every member reads the stream's batch (the shared input); with several, each member reads
its own stream's batch, stacked feature-major for plain MLPs and in channel blocks for convolutional
networks (``wide.stack_inputs``: each network's first layer reads its own block), so one forward labels
every stream's batch. The students read their streams' batches the same way. A pack of several streams
keeps that per-network layout to its end, even when one stream is left, so that a student leaving never
changes the arithmetic of those that stay.
"""

from __future__ import annotations

import copy
import functools
import time
from typing import Any

import torch

from kd_ray.config import TrialConfig, is_user_function, network_streams
from kd_ray.data.datasets import dataset_info
from kd_ray.models.archs import build_model
from kd_ray.models.ensembles import ensemble_log_probs
from kd_ray.packs.optim import in_students_order, pack_kd_loss
from kd_ray.packs.plan import share_key, stream_key
from kd_ray.packs.wide import (
    can_widen,
    feature_major_applies,
    fold_batch_norms,
    per_network_forward,
    stack_inputs,
    wide_forward,
    widen,
)
from kd_ray.train.distill import training_batch
from kd_ray.train.setup import (
    TrialData,
    data_sizes,
    extra_batches_seed,
    extra_per_batch,
    resolve_device,
    student_recipe,
)
from kd_ray.train.teachers import Ensemble


def group_streams(configs: list[TrialConfig]) -> list[list[int]]:
    """The indices of ``configs`` by stream (``plan.share_key``), streams in order of first appearance."""
    streams: dict[Any, list[int]] = {}
    for index, cfg in enumerate(configs):
        streams.setdefault(share_key(cfg), []).append(index)
    return list(streams.values())


def check_streams(configs: list[TrialConfig]) -> None:
    """A pack's configs must share ``plan.stream_key``: one dataset, student, batch size, device and precision."""
    keys = {stream_key(cfg) for cfg in configs}
    if len(keys) != 1 or None in keys:
        raise ValueError("run_pack: the configs of a pack must share everything but their student fields "
                         "(kd_ray.packs.plan.STUDENT_FIELDS) and their streams' (STREAM_FIELDS)")


@functools.lru_cache(maxsize=None)
def feature_major_applies_to(arch: str, arch_args: str, dataset: str, norm: str) -> bool:
    """Whether ``arch`` is a plain MLP, whose wide network runs feature-major (``wide.feature_major_applies``)."""
    info = dataset_info(dataset)
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: none of the caller's streams
        return feature_major_applies(build_model(arch, info.input_shape, info.num_classes, norm, arch_args))


@functools.lru_cache(maxsize=None)
def reads_own_batches(arch: str, arch_args: str, dataset: str, norm: str) -> bool:
    """Whether a wide network of ``arch`` students can feed each its own batch: a plain MLP (feature-major), or a
    built-in network of inputs with channels (signals, images) whose first layer, grouped, reads each student's
    channels of the stacked batch. A user's factory may reshape its input as it likes: it crosses no streams."""
    if feature_major_applies_to(arch, arch_args, dataset, norm):
        return True
    if is_user_function(arch) or len(dataset_info(dataset).input_shape) < 2:
        return False
    info = dataset_info(dataset)
    with torch.random.fork_rng(devices=[]):
        return can_widen(build_model(arch, info.input_shape, info.num_classes, norm, arch_args)) is None


def can_cross_streams(cfg: TrialConfig) -> bool:
    """Whether ``cfg``'s students and teachers can each read their own stream's batch in a pack."""
    return all(reads_own_batches(arch, args, cfg.dataset, cfg.norm)
               for arch, args in ((cfg.student_arch, cfg.student_arch_args), (cfg.teacher_arch, cfg.teacher_arch_args)))


PROBE_STUDENTS = 4  # students per timed probe of a fused step against lone ones
PROBE_STEPS = 3  # timed steps of each, after one warm-up step


@functools.lru_cache(maxsize=None)
def fused_steps_pay(arch: str, arch_args: str, dataset: str, norm: str, batch_size: int, device_name: str) -> bool:
    """Whether ``PROBE_STUDENTS`` students of a convolutional ``arch``, each on its own batch, take their training
    steps faster as one wide network (grouped convolutions) than one after another, measured on the device: on a
    CPU grouped convolutions often lose (docs/performance.md), on a GPU a lone small network leaves it idle. A
    device this process cannot see is not measured, and the students keep to their streams."""
    device = resolve_device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        return False
    info = dataset_info(dataset)
    with torch.random.fork_rng(devices=[]):  # the probe's weights and inputs are drawn from no caller's stream
        models = [build_model(arch, info.input_shape, info.num_classes, norm, arch_args).to(device).train()
                  for _ in range(PROBE_STUDENTS)]
        batches = [torch.randn(batch_size, *info.input_shape, device=device) for _ in models]
    wide = widen(models, feature_major=False).train()

    def lone() -> None:
        for model, x in zip(models, batches):
            model(x).logsumexp(-1).sum().backward()

    def fused() -> None:
        per_network_forward(wide, stack_inputs(batches, False), False).logsumexp(-1).sum().backward()

    def seconds(step) -> float:
        step()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(PROBE_STEPS):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    return seconds(fused) < seconds(lone)


def across_shape(cfg: TrialConfig) -> tuple[int, int] | None:
    """For ``plan.plan_packs``' ``across``: the shape of ``cfg``'s every training step (distillation-set size,
    extras per batch), which streams of one pack must share; None where its student or teacher cannot read its
    own batch, or where a convolutional student's fused steps measure slower than its lone ones."""
    if not can_cross_streams(cfg):
        return None
    if not feature_major_applies_to(cfg.student_arch, cfg.student_arch_args, cfg.dataset, cfg.norm) and not (
            fused_steps_pay(cfg.student_arch, cfg.student_arch_args, cfg.dataset, cfg.norm, cfg.batch_size,
                            cfg.device)):
        return None
    return data_sizes(cfg).distill, extra_per_batch(cfg)


def step_shape(data: TrialData) -> tuple[int, int]:
    """What decides the shape of a stream's every step: its distillation set's size and the extras per batch."""
    return len(data.x), 0 if data.extra is None else data.extra.per_batch


def check_step_shapes(datas: list[TrialData], per_network: bool) -> None:
    """Streams of one pack must take steps of one shape, and their students (and teachers) per-network inputs."""
    shapes = sorted({step_shape(data) for data in datas})
    if len(shapes) > 1:
        raise ValueError(f"run_pack: the streams' steps differ in shape ({shapes}: distillation-set size, extras "
                         "per batch); pack only streams whose batches match")
    if len(datas) > 1 and not per_network:
        raise ValueError("run_pack: students of several streams must read their own batches (plain MLPs, or "
                         "built-in convolutional networks: kd_ray.packs.streams.reads_own_batches)")


class StreamBatches:
    """One stream's data, batch recipe and generators (batch order, augmentation, extra inputs), seeded from
    the replicate's ``network`` streams as a trial alone seeds them."""

    def __init__(self, cfg: TrialConfig, data: TrialData, network: str, device: torch.device) -> None:
        self.data, self.recipe = data, student_recipe(cfg)  # batch size, augmentation and mixup: the stream's
        streams = network_streams(network, cfg.seed)
        self.generator = torch.Generator(device=device).manual_seed(streams.batches)
        self.augment_generator = torch.Generator(device=device).manual_seed(streams.augment)
        self.extra_generator: torch.Generator | None = None
        if data.extra is not None:
            self.extra_generator = torch.Generator(device=device).manual_seed(extra_batches_seed(network, cfg.seed))

    def epoch_order(self) -> torch.Tensor:
        return torch.randperm(self.data.x.shape[0], device=self.data.x.device, generator=self.generator)

    def batch(self, order: torch.Tensor, step_in_epoch: int):
        """The stream's batch ``step_in_epoch`` of the epoch's ``order`` and its labels (``distill.training_batch``)."""
        data = self.data
        return training_batch(data.x, data.y, order, step_in_epoch, self.recipe, data.augment_spec,
                              self.augment_generator, data.extra, self.extra_generator)

    def state_dict(self) -> dict[str, Any]:
        state = {"generator": self.generator.get_state(), "augment_generator": self.augment_generator.get_state()}
        if self.extra_generator is not None:
            state["extra_generator"] = self.extra_generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.augment_generator.set_state(state["augment_generator"])
        if self.extra_generator is not None:
            self.extra_generator.set_state(state["extra_generator"])


class PackTeacher:
    """The largest ensemble of each of the pack's streams, all members as one wide network; the log-probabilities
    of each student's m-member prefix of its stream's teacher on a batch, computed once per (stream, m)."""

    def __init__(self, ensembles: list[Ensemble], ensemble_sizes: list[int], stream_of: list[int] | None = None,
                 per_network: bool | None = None) -> None:
        self.ensembles = ensembles  # per stream of the pack
        self.ensemble_sizes = ensemble_sizes  # per student: how many members its teacher has
        self.stream_of = stream_of or [0] * len(ensemble_sizes)  # per student: its stream
        self.per_network = len(ensembles) > 1 if per_network is None else per_network
        self.streams = sorted(set(self.stream_of))  # the streams this teacher labels
        models = [model for s in self.streams for model in ensembles[s].models]
        self.feature_major = feature_major_applies(models[0])
        self.wide = fold_batch_norms(widen(models).eval())

    @torch.inference_mode()
    def log_probs(self, x: torch.Tensor | dict[int, torch.Tensor], class_major: bool = False) -> torch.Tensor:
        """``[K, batch, classes]`` (``class_major``: ``[K, classes, batch]``): student k's teacher on its stream's
        batch, ``x[stream]`` (a tensor: every stream's batch)."""
        xs = x if isinstance(x, dict) else {s: x for s in self.streams}
        logits = self.member_logits(xs, class_major)
        class_dim = 1 if class_major else -1
        by_size = {(s, m): ensemble_log_probs(logits[s][:m], class_dim=class_dim)
                   for s, m in sorted(set(zip(self.stream_of, self.ensemble_sizes)))}
        return torch.stack([by_size[(s, m)] for s, m in zip(self.stream_of, self.ensemble_sizes)])

    def member_logits(self, xs: dict[int, torch.Tensor], class_major: bool) -> dict[int, torch.Tensor]:
        """Each stream's members' logits on its batch, ``[members, ...]``."""
        if not self.per_network:
            return {self.streams[0]: wide_forward(self.wide, xs[self.streams[0]], class_major)}
        counts = [len(self.ensembles[s].models) for s in self.streams]
        batches = [xs[s] for s, count in zip(self.streams, counts) for _ in range(count)]
        out = per_network_forward(self.wide, stack_inputs(batches, self.feature_major), self.feature_major,
                                  class_major)
        return dict(zip(self.streams, out.split(counts)))

    def keep(self, keep: list[int]) -> "PackTeacher":
        """The teacher of the students ``keep`` (positions among this teacher's students) alone: the same wide
        network while their streams are this one's, a narrower one once a stream has no student left."""
        sizes, stream_of = [self.ensemble_sizes[i] for i in keep], [self.stream_of[i] for i in keep]
        if sorted(set(stream_of)) != self.streams:
            return PackTeacher(self.ensembles, sizes, stream_of, self.per_network)
        other = copy.copy(self)
        other.ensemble_sizes, other.stream_of = sizes, stream_of
        return other


def stream_losses(logits: torch.Tensor, teacher_log_probs: torch.Tensor, drawn: dict[int, tuple],
                  positions: dict[int, list[int]], temperature: torch.Tensor, alpha: torch.Tensor,
                  divergences: list[str], jsd_beta: torch.Tensor) -> torch.Tensor:
    """``[K]``: each active student's ``pack_kd_loss`` on its own stream's batch (``drawn[stream]``: the batch and
    its labels), the students of stream s at ``positions[s]`` among the K."""
    if len(positions) == 1:
        ((stream, _),) = positions.items()
        batch, y = drawn[stream]
        return pack_kd_loss(logits, teacher_log_probs, y, temperature, alpha, batch.mix_index, batch.lam,
                            divergences, jsd_beta)
    parts, order = [], []
    for stream, where in positions.items():
        batch, y = drawn[stream]
        index = torch.tensor(where, device=logits.device)
        parts.append(pack_kd_loss(logits[index], teacher_log_probs[index], y, temperature[index], alpha[index],
                                  batch.mix_index, batch.lam, [divergences[j] for j in where], jsd_beta[index]))
        order.extend(where)
    return in_students_order(parts, order)
