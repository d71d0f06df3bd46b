"""Which train indices the teacher and the student see, and which neither sees: the validation split, the
D0/D1 halves, fractions, seeded strata.

Pure numpy on the label array; the same arguments always give the same sorted int64 indices.
"""

from __future__ import annotations

import numpy as np

from kd_ray.config import DISTILL_SPLITS, MAX_VAL_FRACTION, TEACHER_SPLITS, ConfigError, seed_stream


def val_size(val_fraction: float, n: int) -> int:
    """How many of ``n`` train examples the validation split holds: none for fraction 0, else
    ``round(val_fraction * n)`` and at least one."""
    return 0 if float(val_fraction) == 0.0 else min(n, max(1, int(round(float(val_fraction) * n))))


def val_indices(y_train: np.ndarray, *, val_fraction: float, data_seed: int) -> np.ndarray:
    """The sorted int64 train indices held out as validation data: a stratified ``val_fraction`` of the
    whole train split drawn with ``data_seed`` (stream kind val_holdout).

    Keyed by ``data_seed`` alone, so every arm and replicate of a study holds out the same examples, and
    a teacher shared by several arms (or by every replicate) never trained on any trial's validation data."""
    y = _labels(y_train)
    if not 0.0 <= float(val_fraction) <= MAX_VAL_FRACTION:
        raise ConfigError(f"val_fraction={val_fraction!r} is out of range; allowed: [0, {MAX_VAL_FRACTION:g}]")
    _check_seed("data_seed", data_seed)
    everything = np.arange(len(y), dtype=np.int64)
    size = val_size(val_fraction, len(y))
    if size == 0:
        return np.zeros((0,), np.int64)
    return _stratified_subset(everything, y, size, _rng("val_holdout", data_seed))


def split_indices(
    y_train: np.ndarray,
    *,
    teacher_split: str,
    distill_split: str,
    distill_fraction: float,
    data_seed: int,
    seed: int,
    val_fraction: float,
    teacher_fraction: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(teacher_idx, distill_idx)``: sorted int64 indices into the train arrays.

    First the validation split (``val_indices``) is taken out; every draw below is from the rest, the
    training pool, so neither the teacher nor the student ever sees a validation example.
    teacher_split ``full``: the teacher uses the whole pool and the distillation base set is also the
    whole pool (``train`` or ``both``; ``holdout`` has nothing to hold out and is refused).
    teacher_split ``half``: a stratified half D0 of the pool drawn with ``data_seed`` (D1 is the rest);
    the teacher uses D0 and the base set is D0 (``train``), D1 (``holdout``) or D0 and D1 (``both``).
    ``teacher_fraction`` < 1 trains the teacher on a stratified subset of its split (drawn with
    ``data_seed``); ``train`` then means exactly that subset, the teacher's own training data.
    The distillation set is then a stratified subset of the base set of size
    ``round(distill_fraction * len(base))`` drawn with ``seed`` (at least one per class when the
    size allows; fraction 1 keeps the whole base set). Each of the four draws has its own stream
    (``seed_stream`` kinds val_holdout, data_half, teacher_subset, distill_subset), so none repeats
    another even when data_seed == seed.
    """
    y = _labels(y_train)
    if teacher_split not in TEACHER_SPLITS:
        raise ConfigError(f"teacher_split={teacher_split!r} is not allowed; choose one of: {', '.join(TEACHER_SPLITS)}")
    if distill_split not in DISTILL_SPLITS:
        raise ConfigError(f"distill_split={distill_split!r} is not allowed; choose one of: {', '.join(DISTILL_SPLITS)}")
    if not 0.0 < float(distill_fraction) <= 1.0:
        raise ConfigError(f"distill_fraction={distill_fraction!r} is out of range; allowed: (0, 1]")
    if not 0.0 < float(teacher_fraction) <= 1.0:
        raise ConfigError(f"teacher_fraction={teacher_fraction!r} is out of range; allowed: (0, 1]")
    _check_seed("seed", seed)

    pool = np.setdiff1d(np.arange(len(y), dtype=np.int64), val_indices(y, val_fraction=val_fraction,
                                                                        data_seed=data_seed))
    if teacher_split == "full":
        if distill_split == "holdout":
            raise ConfigError(
                "distill_split='holdout' needs teacher_split='half' (the holdout half D1 exists only "
                "when the teacher is trained on D0); got teacher_split='full'"
            )
        teacher_idx = pool
        base = pool
    else:
        d0 = _stratified_subset(pool, y, len(pool) // 2, _rng("data_half", data_seed))
        d1 = np.setdiff1d(pool, d0)
        teacher_idx = d0
        base = {"train": d0, "holdout": d1, "both": pool}[distill_split]
    if float(teacher_fraction) < 1.0:
        size = max(1, int(round(float(teacher_fraction) * len(teacher_idx))))
        teacher_idx = _stratified_subset(teacher_idx, y, size, _rng("teacher_subset", data_seed))
        if distill_split == "train":
            base = teacher_idx

    if float(distill_fraction) == 1.0:
        distill_idx = base
    else:
        size = max(1, int(round(float(distill_fraction) * len(base))))
        distill_idx = _stratified_subset(base, y, size, _rng("distill_subset", seed))
    return np.sort(teacher_idx).astype(np.int64), np.sort(distill_idx).astype(np.int64)


def _labels(y_train: np.ndarray) -> np.ndarray:
    y = np.asarray(y_train)
    if y.ndim != 1:
        raise ConfigError(f"y_train must be one-dimensional, got shape {y.shape}")
    return y


def _check_seed(label: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 2**32:
        raise ConfigError(f"{label}={value!r} must be an integer in [0, 4294967295]")


def _rng(kind: str, seed: int) -> np.random.Generator:
    return np.random.default_rng(seed_stream(kind, int(seed)))


def _stratified_subset(candidates: np.ndarray, y: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` of ``candidates`` drawn per class in proportion to the class counts.

    Allocation is by largest remainder with random tie-breaks, so each class gets the floor or the
    ceiling of its exact share; then every present class gets at least one when ``size`` allows.
    """
    labels = y[candidates]
    classes, counts = np.unique(labels, return_counts=True)
    size = min(size, len(candidates))
    quota = size * counts / len(candidates)
    alloc = np.floor(quota).astype(np.int64)
    left = size - int(alloc.sum())
    if left > 0:
        order = np.lexsort((rng.random(len(classes)), -(quota - alloc)))
        alloc[order[:left]] += 1
    if size >= len(classes):
        for c in np.flatnonzero(alloc == 0):
            alloc[int(np.argmax(alloc))] -= 1
            alloc[c] = 1
    chosen = [
        rng.permutation(candidates[labels == cls])[:k] for cls, k in zip(classes, alloc) if k > 0
    ]
    if not chosen:
        return np.zeros((0,), np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)
