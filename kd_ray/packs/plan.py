"""Which trials of a study run together as one pack: the only place that knows the rules.

A pack is one Ray Tune trial that trains several students at once (``kd_ray.packs.run``). Its students
fall into *streams*: the students of one stream share everything that decides the teacher, the
distillation data and the batch stream (``share_key``: every ``TrialConfig`` field except the ones in
``STUDENT_FIELDS``, which only the student's own loss, optimizer and schedule read), so one augmentation
and one teacher forward per step serve them all. ``teacher_members`` may differ too: member i of a
replicate is the same network whatever the ensemble's size (``TrialConfig.teacher_replicate``), so the
largest ensemble's forward gives the smaller ensembles' labels.

Streams may differ in ``STREAM_FIELDS`` (replicate seed, augmentation policy, data split and fraction,
extra inputs, the teacher's recipe) and still share a pack, each fed its own batches, where the caller
says that a config's students can (``across``: the shape of a training step, or None where its student
cannot take per-student inputs): their steps must then have one shape. A compiled student (``compile``)
is never packed. Pure: plain values in, plain values out; no torch, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable

from kd_ray.config import TrialConfig

# What students of one pack may differ in.
STUDENT_FIELDS = (
    "temperature", "alpha", "init", "init_lambda", "lr", "weight_decay", "optimizer", "lr_schedule", "epochs",
    "teacher_members", "loss", "jsd_beta",
)
# What streams of one pack may differ in: each stream draws its own batches from its own data and is
# labelled by its own teacher, so these decide only what a student is fed, not the shape of its network.
STREAM_FIELDS = (
    "seed", "augmentation", "mixup_alpha", "teacher_split", "distill_split", "distill_fraction", "teacher_fraction",
    "extra_data", "extra_source", "extra_path", "extra_ratio", "val_fraction", "data_seed", "teacher_seed",
    "teacher_sharing", "teacher_epochs", "teacher_lr", "teacher_batch_size", "control", "save_predictions",
)
PACK_MODES = ("off", "auto")
PACK_LIMIT = 32  # students per pack at most: beyond it a step gains little, and a lost pack costs more


@dataclass(frozen=True)
class Pack:
    """Students (indices into the study's configs, in their order) that train as one Ray Tune trial."""

    pack_id: str
    trial_indices: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.trial_indices)


def share_key(cfg: TrialConfig) -> tuple[tuple[str, Any], ...] | None:
    """What a pack's students must share; None for a config that is never packed."""
    if cfg.compile:
        return None
    return tuple((name, value) for name, value in sorted(cfg.to_dict().items()) if name not in STUDENT_FIELDS)


def stream_key(cfg: TrialConfig) -> tuple[tuple[str, Any], ...] | None:
    """What the streams of one pack must share (``share_key`` without ``STREAM_FIELDS``); None: never packed."""
    key = share_key(cfg)
    return None if key is None else tuple((name, value) for name, value in key if name not in STREAM_FIELDS)


def split_evenly(items: list, parts: int) -> list[list]:
    """``items`` in ``parts`` consecutive runs whose sizes differ by one at most, in order."""
    size, extra = divmod(len(items), parts)
    runs, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        runs.append(items[start:end])
        start = end
    return runs


def plan_packs(configs: Iterable[TrialConfig], max_size: int = PACK_LIMIT, min_packs: int = 1,
               alone: Callable[[TrialConfig], bool] | None = None,
               across: Callable[[TrialConfig], Hashable | None] | None = None) -> list[Pack]:
    """The packs of a study: configs grouped by ``share_key`` (first appearance first), each group
    cut into packs of at most ``max_size``; while there are fewer packs than ``min_packs`` (the trials
    the cluster runs at once), the largest pack is halved, so packing never leaves a slot idle. A config that
    ``alone`` holds true of is a pack of its own.

    With ``across``, configs of different streams group by ``stream_key`` and the shape ``across`` gives
    them (those it gives None group by ``share_key``), each group's streams kept in runs; and no pack
    holds more than its share of the study, ``len(configs) / min_packs`` rounded up, so that the packs
    running at once end together."""
    configs = list(configs)
    if max_size < 1 or min_packs < 1:
        raise ValueError(f"plan_packs: max_size={max_size} and min_packs={min_packs} must be >= 1")
    groups: dict[Any, list[int]] = {}
    for index, cfg in enumerate(configs):
        key = None if alone is not None and alone(cfg) else group_key(cfg, across)
        groups.setdefault(("alone", index) if key is None else key, []).append(index)
    if across is not None:
        max_size = min(max_size, -(-len(configs) // min_packs))
    runs: list[list[int]] = []
    for indices in groups.values():
        streams: dict[Any, list[int]] = {}
        for index in indices:
            streams.setdefault(share_key(configs[index]), []).append(index)
        indices = [index for stream in streams.values() for index in stream]
        parts = -(-len(indices) // max_size)
        runs += [sorted(run) for run in split_evenly(indices, parts)]  # streams split in runs, rows in order
    while len(runs) < min_packs:
        largest = max(range(len(runs)), key=lambda i: len(runs[i]))
        if len(runs[largest]) < 2:
            break
        runs[largest:largest + 1] = split_evenly(runs[largest], 2)
    runs.sort(key=lambda run: min(run))
    return [Pack(f"pack{number:04d}", tuple(run)) for number, run in enumerate(runs)]


def group_key(cfg: TrialConfig, across: Callable[[TrialConfig], Hashable | None] | None) -> Any:
    """Which configs may share a pack: one stream's (``share_key``), or, where ``across`` gives ``cfg`` a step
    shape, every stream's of that shape and ``stream_key``; None for a config never packed."""
    shape = None if across is None or share_key(cfg) is None else across(cfg)
    if shape is None:
        return share_key(cfg)
    return ("across streams", stream_key(cfg), shape)


def describe_packs(packs: list[Pack]) -> str:
    """One line for the study's log: how many packs of which sizes."""
    sizes: dict[int, int] = {}
    for pack in packs:
        sizes[pack.size] = sizes.get(pack.size, 0) + 1
    students = sum(pack.size for pack in packs)
    parts = ", ".join(f"{count} of {size}" for size, count in sorted(sizes.items(), reverse=True))
    return f"{students} students in {len(packs)} Ray Tune trials (packs: {parts})"
