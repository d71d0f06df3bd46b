"""Tests for kd_ray.data.splits: the validation split, the D0/D1 halves, teacher and distillation fractions,
seeded strata."""

from __future__ import annotations

import numpy as np
import pytest

from kd_ray.config import ConfigError
from kd_ray.data.splits import split_indices, val_indices


def _labels() -> np.ndarray:
    # Uneven, partly odd class counts, shuffled: the cases where rounding matters.
    counts = [101, 100, 99, 57, 3, 200, 1, 64, 33, 80]
    y = np.concatenate([np.full(c, k) for k, c in enumerate(counts)]).astype(np.int64)
    return np.random.default_rng(0).permutation(y)


def _split(y: np.ndarray, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
    args: dict[str, object] = {
        "teacher_split": "full",
        "distill_split": "train",
        "distill_fraction": 1.0,
        "data_seed": 0,
        "seed": 0,
        "val_fraction": 0.0,
    }
    args.update(kwargs)
    return split_indices(y, **args)  # type: ignore[arg-type]


def test_split_full() -> None:
    y = _labels()
    for distill_split in ("train", "both"):
        teacher, distill = _split(y, distill_split=distill_split)
        assert np.array_equal(teacher, np.arange(len(y))) and np.array_equal(distill, teacher)
        assert teacher.dtype == np.int64 and distill.dtype == np.int64
    with pytest.raises(ConfigError, match="holdout"):
        _split(y, distill_split="holdout")


def test_split_half_is_stratified_disjoint_and_covering() -> None:
    y = _labels()
    d0, train = _split(y, teacher_split="half", distill_split="train", data_seed=3)
    _, d1 = _split(y, teacher_split="half", distill_split="holdout", data_seed=3)
    _, both = _split(y, teacher_split="half", distill_split="both", data_seed=3)

    assert np.array_equal(train, d0)
    assert len(np.intersect1d(d0, d1)) == 0
    assert np.array_equal(np.union1d(d0, d1), np.arange(len(y))) and np.array_equal(both, np.arange(len(y)))
    assert len(d0) == len(y) // 2
    assert np.all(np.diff(d0) > 0) and np.all(np.diff(d1) > 0)
    full_counts = np.bincount(y, minlength=10)
    d0_counts = np.bincount(y[d0], minlength=10)
    assert np.all(np.abs(d0_counts - full_counts / 2) <= 1)


def test_split_seeds() -> None:
    y = _labels()
    a = _split(y, teacher_split="half", distill_split="holdout", distill_fraction=0.3, data_seed=1, seed=2)
    b = _split(y, teacher_split="half", distill_split="holdout", distill_fraction=0.3, data_seed=1, seed=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    other_data = _split(y, teacher_split="half", distill_split="holdout", distill_fraction=0.3, data_seed=2, seed=2)
    assert not np.array_equal(a[0], other_data[0])
    other_seed = _split(y, teacher_split="half", distill_split="holdout", distill_fraction=0.3, data_seed=1, seed=3)
    assert np.array_equal(a[0], other_seed[0]) and not np.array_equal(a[1], other_seed[1])


def test_split_fraction_sizes_and_strata() -> None:
    y = _labels()
    d0, _ = _split(y, teacher_split="half")
    for teacher_split, distill_split, base_len in (("full", "train", len(y)), ("half", "train", len(d0)),
                                                   ("half", "holdout", len(y) - len(d0)), ("half", "both", len(y))):
        for fraction in (0.01, 0.1, 0.25, 0.5, 0.9):
            teacher, distill = _split(y, teacher_split=teacher_split, distill_split=distill_split,
                                      distill_fraction=fraction, seed=5)
            assert len(distill) == round(fraction * base_len)
            assert np.all(np.diff(distill) > 0)
            base_classes = len(np.unique(y[_split(y, teacher_split=teacher_split, distill_split=distill_split)[1]]))
            if len(distill) >= base_classes:  # at least one per class where the size allows
                assert len(np.unique(y[distill])) == base_classes
            if distill_split == "train":
                assert np.all(np.isin(distill, teacher))
            if distill_split == "holdout":
                assert not np.any(np.isin(distill, teacher))
    _, tiny = _split(y, distill_fraction=0.001)
    assert len(tiny) == 1


def test_split_rejects_bad_arguments() -> None:
    y = _labels()
    with pytest.raises(ConfigError):
        _split(y, distill_fraction=0.0)
    with pytest.raises(ConfigError):
        _split(y, teacher_split="quarter")
    with pytest.raises(ConfigError):
        _split(y, seed=-1)


def test_teacher_fraction_is_a_stratified_subset_and_train_means_exactly_it() -> None:
    y = _labels()
    d0, _ = _split(y, teacher_split="half", data_seed=2)
    teacher, train = _split(y, teacher_split="half", distill_split="train", teacher_fraction=0.2, data_seed=2)
    assert len(teacher) == round(0.2 * len(d0)) and np.all(np.isin(teacher, d0))
    assert np.array_equal(train, teacher)  # "train" is the teacher's own training data
    _, both = _split(y, teacher_split="half", distill_split="both", teacher_fraction=0.2, data_seed=2)
    assert np.array_equal(both, np.arange(len(y)))
    with pytest.raises(ConfigError, match="teacher_fraction"):
        _split(y, teacher_fraction=0.0)


# --- the validation split -------------------------------------------------------------------------------------------

COMBINATIONS = [("full", "train"), ("full", "both"), ("half", "train"), ("half", "holdout"), ("half", "both")]


@pytest.mark.parametrize("teacher_split, distill_split", COMBINATIONS)
@pytest.mark.parametrize("teacher_fraction", [1.0, 0.3])
@pytest.mark.parametrize("distill_fraction", [1.0, 0.4])
def test_no_validation_example_is_a_teacher_or_distillation_example(
    teacher_split: str, distill_split: str, teacher_fraction: float, distill_fraction: float
) -> None:
    y = _labels()
    val = val_indices(y, val_fraction=0.1, data_seed=4)
    teacher, distill = _split(y, teacher_split=teacher_split, distill_split=distill_split, val_fraction=0.1,
                              teacher_fraction=teacher_fraction, distill_fraction=distill_fraction, data_seed=4, seed=9)
    assert len(val) == round(0.1 * len(y)) and val.dtype == np.int64 and np.all(np.diff(val) > 0)
    assert not np.isin(val, teacher).any() and not np.isin(val, distill).any()
    if (teacher_split, distill_split, teacher_fraction, distill_fraction) == ("full", "train", 1.0, 1.0):
        # Everything else is training data: the validation split takes nothing more than its share.
        assert np.array_equal(np.union1d(val, teacher), np.arange(len(y)))


def test_the_validation_split_is_stratified_and_fixed_by_the_data_seed_alone() -> None:
    y = _labels()
    val = val_indices(y, val_fraction=0.2, data_seed=1)
    counts, val_counts = np.bincount(y, minlength=10), np.bincount(y[val], minlength=10)
    assert np.all(np.abs(val_counts - 0.2 * counts) <= 1) and np.all(val_counts[counts > 0] >= 1)
    assert np.array_equal(val, val_indices(y, val_fraction=0.2, data_seed=1))
    assert not np.array_equal(val, val_indices(y, val_fraction=0.2, data_seed=2))
    # Every replicate and arm of a data seed holds out the same examples, whatever its student's seed.
    for seed, distill_split in ((0, "holdout"), (5, "both")):
        _, distill = _split(y, teacher_split="half", distill_split=distill_split, distill_fraction=0.5,
                            val_fraction=0.2, data_seed=1, seed=seed)
        assert not np.isin(val, distill).any()


def test_the_validation_split_is_drawn_first_and_the_halves_from_the_rest() -> None:
    y = _labels()
    val = val_indices(y, val_fraction=0.1, data_seed=3)
    d0, _ = _split(y, teacher_split="half", val_fraction=0.1, data_seed=3)
    _, d1 = _split(y, teacher_split="half", distill_split="holdout", val_fraction=0.1, data_seed=3)
    pool = len(y) - len(val)
    assert len(d0) == pool // 2 and len(d1) == pool - pool // 2
    assert np.array_equal(np.union1d(np.union1d(d0, d1), val), np.arange(len(y)))


def test_val_fraction_zero_holds_out_nothing_and_a_bad_one_is_refused() -> None:
    y = _labels()
    assert len(val_indices(y, val_fraction=0.0, data_seed=0)) == 0
    teacher, _ = _split(y, val_fraction=0.0)
    assert np.array_equal(teacher, np.arange(len(y)))
    assert len(val_indices(y, val_fraction=1e-9, data_seed=0)) == 1  # a fraction above 0 holds out one at least
    for bad in (-0.1, 0.6):
        with pytest.raises(ConfigError, match=r"val_fraction=.* is out of range; allowed: \[0, 0.5\]"):
            val_indices(y, val_fraction=bad, data_seed=0)
