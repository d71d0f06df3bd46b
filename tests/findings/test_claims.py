"""Paired claims: differences, equivalence, Holm, thresholds, distinct teachers, convergence."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kd_ray import findings
from kd_ray.findings import Sample, above, below, higher, holm, lower, no_gain, no_loss, paired_differences, same


def arm(values, metric="test_agreement", label="arm", teachers=None, unconverged=0) -> Sample:
    index = pd.Index(range(len(values)), name="seed")
    keys = pd.Series(teachers if teachers is not None else [f"t{i}" for i in index], index=index)
    return Sample(label, metric, pd.Series(values, index=index, dtype=float), keys, unconverged, len(values))


def judged(claim):
    return findings.judge_claims([claim])[0]


def test_paired_difference_matches_scipy_ttest():
    rng = np.random.default_rng(1)
    a = 0.8 + rng.normal(0, 0.01, 10)
    b = a - 0.02 + rng.normal(0, 0.005, 10)
    claim = judged(higher(arm(a), arm(b)))
    expected = stats.ttest_rel(a, b)
    assert claim.n == 10
    assert claim.mean == pytest.approx(float(np.mean(a - b)))
    assert claim.p_difference == pytest.approx(expected.pvalue)
    assert claim.low < claim.mean < claim.high
    assert claim.verdict == findings.HOLDS


def test_pairing_removes_shared_seed_noise():
    # Seeds differ a lot, the arms differ by a constant: unpaired intervals overlap, pairs do not.
    base = np.linspace(0.6, 0.9, 10)
    claim = judged(higher(arm(base + 0.02 + np.tile([0.001, -0.001], 5)), arm(base)))
    assert claim.verdict == findings.HOLDS
    assert claim.high - claim.low < 0.005


def test_wrong_direction_fails_and_small_effect_is_not_a_difference():
    a, b = np.full(10, 0.8) + np.tile([0.002, -0.002], 5), np.full(10, 0.85)
    assert judged(higher(arm(a), arm(b))).verdict == findings.FAILS
    assert judged(lower(arm(a), arm(b))).verdict == findings.HOLDS
    # +0.2 pp, significant, but inside the 1 pp minimum effect: no effect of the stated size.
    tiny = judged(higher(arm(b + 0.002 + np.tile([0.0005, -0.0005], 5)), arm(b)))
    assert tiny.p_difference < 0.05 and tiny.p_equivalence < 0.05
    assert tiny.verdict == findings.FAILS


def test_noisy_difference_is_inconclusive_with_a_detectable_effect():
    rng = np.random.default_rng(2)
    a, b = 0.8 + rng.normal(0, 0.05, 4), 0.8 + rng.normal(0, 0.05, 4)
    claim = judged(higher(arm(a), arm(b)))
    assert claim.verdict == findings.INCONCLUSIVE
    sd = np.std(a - b, ddof=1)
    expected = (stats.t.ppf(0.975, 3) + stats.t.ppf(0.8, 3)) * sd / 2
    assert claim.mde == pytest.approx(expected)
    assert "detectable at 80% power" in findings.describe_claim(claim)


def test_equivalence_needs_evidence_not_overlap():
    rng = np.random.default_rng(3)
    # Overlapping but wide: "same" is not shown.
    wide = judged(same(arm(0.8 + rng.normal(0, 0.05, 4)), arm(0.8 + rng.normal(0, 0.05, 4))))
    assert wide.verdict == findings.INCONCLUSIVE
    # Tight around zero: equivalent within the 1 pp margin.
    base = rng.normal(0.8, 0.05, 10)
    tight = judged(same(arm(base + rng.normal(0, 0.001, 10)), arm(base)))
    assert tight.verdict == findings.HOLDS
    # A clear +3 pp difference: "same" does not hold.
    shifted = judged(same(arm(base + 0.03 + rng.normal(0, 0.002, 10)), arm(base)))
    assert shifted.verdict == findings.FAILS


def test_no_gain_and_no_loss_are_one_sided():
    base = np.linspace(0.7, 0.8, 10)
    jitter = np.tile([0.001, -0.001], 5)
    worse = arm(base - 0.05 + jitter)
    better = arm(base + 0.05 + jitter)
    assert judged(no_gain(worse, arm(base))).verdict == findings.HOLDS
    assert judged(no_gain(better, arm(base))).verdict == findings.FAILS
    assert judged(no_loss(better, arm(base))).verdict == findings.HOLDS
    assert judged(no_loss(worse, arm(base))).verdict == findings.FAILS
    # For KL lower is better: a lower KL is a gain.
    kl = np.linspace(0.3, 0.4, 10)
    assert judged(no_gain(arm(kl - 0.1 + jitter, "test_kl"), arm(kl, "test_kl"))).verdict == findings.FAILS
    assert judged(no_gain(arm(kl + 0.1 + jitter, "test_kl"), arm(kl, "test_kl"))).verdict == findings.HOLDS


def test_holm_matches_the_step_down_definition():
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    adjusted = holm(p)
    assert adjusted[3] == pytest.approx(0.02)  # smallest of four: x4
    assert adjusted[0] == pytest.approx(0.03)  # x3
    assert adjusted[2] == pytest.approx(0.06)  # x2
    assert adjusted[1] == pytest.approx(0.06)  # x1 = 0.04, but monotone
    assert math.isnan(adjusted[4])


def test_holm_runs_across_claims():
    rng = np.random.default_rng(4)
    base = rng.normal(0.8, 0.02, 5)
    # Each alone is significant at 0.05 (p about 0.03); 20 of them together are not.
    claims = [higher(arm(base + 0.02 + rng.normal(0, 0.012, 5)), arm(base)) for _ in range(20)]
    alone = findings.judge_claims([higher(claims[0].a, claims[0].b)])[0]
    together = findings.judge_claims(claims)
    assert all(c.p_adjusted >= c.p_difference for c in together)
    assert max(c.p_adjusted for c in together) > alone.p_adjusted


def test_thresholds_use_the_interval_and_stay_in_bounds():
    high = judged(above(arm([0.995, 0.996, 0.997, 0.998]), 0.99))
    assert high.verdict == findings.HOLDS
    assert high.high <= 1.0  # a fraction's interval is bounded
    assert judged(below(arm([0.995, 0.996, 0.997, 0.998]), 0.99)).verdict == findings.FAILS
    assert judged(above(arm([0.97, 0.995, 0.999, 0.98]), 0.99)).verdict == findings.INCONCLUSIVE


def test_teacher_metrics_count_distinct_teachers():
    one_teacher = arm([0.77] * 5, "teacher_test_acc", teachers=["same"] * 5)
    other = arm([0.80] * 5, "teacher_test_acc", teachers=["other"] * 5)
    assert len(paired_differences(other, one_teacher)) == 1
    claim = judged(higher(other, one_teacher))
    assert claim.n == 1 and claim.verdict == findings.INCONCLUSIVE  # one teacher pair is no replicate
    varied = judged(higher(arm(0.80 + np.arange(5) * 1e-3, "teacher_test_acc"),
                           arm(0.77 + np.arange(5) * 1e-3, "teacher_test_acc")))
    assert varied.n == 5 and varied.verdict == findings.HOLDS


def test_unconverged_students_never_make_a_claim_fail():
    base = np.linspace(0.7, 0.8, 10)
    claim = judged(higher(arm(base - 0.05, unconverged=10), arm(base)))
    assert claim.verdict == findings.INCONCLUSIVE
    assert any("not converged" in note for note in claim.notes)
    assert judged(higher(arm(base - 0.05), arm(base))).verdict == findings.FAILS
    # The line says the numbers alone fail it, and offers no detectable effect: one was detected.
    text = findings.describe_claim(claim)
    assert "the numbers alone say does not hold" in text and "detectable at 80% power" not in text


def test_described_verdict_matches_its_numbers():
    base = np.linspace(0.7, 0.8, 10)
    claim = judged(higher(arm(base + 0.03 + np.tile([0.002, -0.002], 5), label="a"), arm(base, label="b")))
    text = findings.describe_claim(claim)
    assert "a − b, test_agreement: +3.00 pp" in text
    assert text.endswith("**holds**")
