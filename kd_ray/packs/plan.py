"""Which trials of a study run together as one pack: the only place that knows the rules.

A pack is one Ray Tune trial that trains several students at once (``kd_ray.packs.run``): one
augmentation and one teacher forward per step, shared by every student. So its students must
share everything that decides the teacher, the distillation data and the batch stream: every
``TrialConfig`` field except the ones in ``STUDENT_FIELDS``, which only the student's own loss,
optimizer and schedule read. ``teacher_members`` may differ too: member i of a replicate is the
same network whatever the ensemble's size (``TrialConfig.teacher_replicate``), so the largest
ensemble's forward gives the smaller ensembles' labels. A compiled student (``compile``) is never
packed. Pure: plain values in, plain values out; no torch, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from kd_ray.config import TrialConfig

# What students of one pack may differ in.
STUDENT_FIELDS = (
    "temperature", "alpha", "init", "init_lambda", "lr", "weight_decay", "optimizer", "lr_schedule", "epochs",
    "teacher_members", "loss", "jsd_beta",
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
               alone: Callable[[TrialConfig], bool] | None = None) -> list[Pack]:
    """The packs of a study: configs grouped by ``share_key`` (first appearance first), each group
    cut into packs of at most ``max_size``; while there are fewer packs than ``min_packs`` (the trials
    the cluster runs at once), the largest pack is halved, so packing never leaves a slot idle. A config that
    ``alone`` holds true of is a pack of its own."""
    if max_size < 1 or min_packs < 1:
        raise ValueError(f"plan_packs: max_size={max_size} and min_packs={min_packs} must be >= 1")
    groups: dict[Any, list[int]] = {}
    for index, cfg in enumerate(configs):
        key = None if alone is not None and alone(cfg) else share_key(cfg)
        groups.setdefault(("alone", index) if key is None else key, []).append(index)
    runs: list[list[int]] = []
    for indices in groups.values():
        parts = -(-len(indices) // max_size)
        runs += split_evenly(indices, parts)
    while len(runs) < min_packs:
        largest = max(range(len(runs)), key=lambda i: len(runs[i]))
        if len(runs[largest]) < 2:
            break
        runs[largest:largest + 1] = split_evenly(runs[largest], 2)
    runs.sort(key=lambda run: run[0])
    return [Pack(f"pack{number:04d}", tuple(run)) for number, run in enumerate(runs)]


def describe_packs(packs: list[Pack]) -> str:
    """One line for the study's log: how many packs of which sizes."""
    sizes: dict[int, int] = {}
    for pack in packs:
        sizes[pack.size] = sizes.get(pack.size, 0) + 1
    students = sum(pack.size for pack in packs)
    parts = ", ".join(f"{count} of {size}" for size, count in sorted(sizes.items(), reverse=True))
    return f"{students} students in {len(packs)} Ray Tune trials (packs: {parts})"
