"""Paired claims against a minimum effect in both directions: thresholds, distinct teachers, Holm per finding,
preconditions, and no convergence veto."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from kd_ray import findings
from kd_ray.findings import (
    PRECONDITION,
    Sample,
    above,
    below,
    higher,
    holm,
    judge_finding,
    lower,
    no_gain,
    no_loss,
    paired_differences,
    same,
    seeds_to_decide,
)


def arm(values, metric="test_agreement", label="arm", teachers=None, moving=0, delta=math.nan) -> Sample:
    index = pd.Index(range(len(values)), name="seed")
    keys = pd.Series(teachers if teachers is not None else [f"t{i}" for i in index], index=index)
    return Sample(label, metric, pd.Series(values, index=index, dtype=float), keys, moving, len(values), delta)


def judged(claim):
    return findings.judge_claims([claim])[0]


def test_paired_difference_matches_scipy_ttest():
    rng = np.random.default_rng(1)
    a = 0.8 + rng.normal(0, 0.01, 10)
    b = a - 0.02 + rng.normal(0, 0.005, 10)
    claim = judged(higher(arm(a), arm(b)))
    assert claim.n == 10
    assert claim.mean == pytest.approx(float(np.mean(a - b)))
    assert claim.p_holds == pytest.approx(stats.ttest_rel(a, b, alternative="greater").pvalue)
    # Failing test: the rise is below the 0.5 pp minimum effect.
    assert claim.p_fails[0] == pytest.approx(stats.ttest_1samp(a - b, 0.005, alternative="less").pvalue)
    assert claim.low < claim.mean < claim.high
    assert claim.verdict == findings.HOLDS


def test_pairing_removes_shared_seed_noise():
    # Seeds differ a lot, the arms differ by a constant: unpaired intervals overlap, pairs do not.
    base = np.linspace(0.6, 0.9, 10)
    claim = judged(higher(arm(base + 0.02 + np.tile([0.001, -0.001], 5)), arm(base)))
    assert claim.verdict == findings.HOLDS
    assert claim.high - claim.low < 0.005


def test_wrong_direction_fails_and_a_rise_shown_below_the_margin_is_no_effect():
    a, b = np.full(10, 0.8) + np.tile([0.002, -0.002], 5), np.full(10, 0.85)
    assert judged(higher(arm(a), arm(b))).verdict == findings.FAILS
    assert judged(lower(arm(a), arm(b))).verdict == findings.HOLDS
    # +0.1 pp, significant, but shown below the 0.5 pp minimum effect: no effect of the stated size.
    tiny = judged(higher(arm(b + 0.001 + np.tile([0.0002, -0.0002], 5)), arm(b)))
    assert tiny.p_holds < 0.05 and tiny.p_fails_adjusted[0] < 0.05
    assert tiny.verdict == findings.FAILS
    # A right-direction rise inside the margin but not shown below it is not failed: inconclusive or holds.
    loose = judged(higher(arm(b + 0.003 + np.tile([0.006, -0.006], 5)), arm(b)))
    assert loose.verdict == findings.INCONCLUSIVE


def test_a_difference_inside_the_margin_does_not_fail_a_no_difference_claim():
    # +0.25 pp, significant against 0, inside the 0.5 pp margin: "no difference" holds, it never fails.
    b = np.linspace(0.8, 0.85, 10)
    inside = judged(same(arm(b + 0.0025 + np.tile([0.001, -0.001], 5)), arm(b)))
    assert inside.verdict == findings.HOLDS
    noisy = judged(same(arm(b + 0.0035 + np.tile([0.003, -0.003], 5)), arm(b)))
    assert noisy.verdict == findings.INCONCLUSIVE  # within the margin, not shown inside it


def test_noisy_difference_is_inconclusive_and_says_how_many_seeds_would_decide_it():
    b = np.array([0.80, 0.82, 0.78, 0.81])
    a = b + np.array([0.02, -0.01, 0.03, -0.005])  # +0.88 pp, sd 1.9 pp: neither shown above 0 nor below Δ
    claim = judged(higher(arm(a), arm(b)))
    assert claim.verdict == findings.INCONCLUSIVE
    text = findings.describe_claim(claim)
    assert "replicates would" in text
    needed = seeds_to_decide(claim)
    if needed is not None:  # at that many seeds, the observed mean and sd decide it
        sd, delta = claim.sd, claim.margin
        se = sd / math.sqrt(needed)
        holds = stats.t.sf(claim.mean / se, needed - 1) < 0.05
        fails = stats.t.cdf((claim.mean - delta) / se, needed - 1) < 0.05
        assert holds or fails


def test_equivalence_needs_evidence_not_overlap():
    rng = np.random.default_rng(3)
    wide = judged(same(arm(0.8 + rng.normal(0, 0.05, 4)), arm(0.8 + rng.normal(0, 0.05, 4))))
    assert wide.verdict == findings.INCONCLUSIVE
    base = rng.normal(0.8, 0.05, 10)
    tight = judged(same(arm(base + rng.normal(0, 0.001, 10)), arm(base)))
    assert tight.verdict == findings.HOLDS
    shifted = judged(same(arm(base + 0.03 + rng.normal(0, 0.002, 10)), arm(base)))
    assert shifted.verdict == findings.FAILS


def test_no_gain_and_no_loss_are_one_sided_against_the_margin():
    base = np.linspace(0.7, 0.8, 10)
    jitter = np.tile([0.001, -0.001], 5)
    worse = arm(base - 0.05 + jitter)
    better = arm(base + 0.05 + jitter)
    assert judged(no_gain(worse, arm(base))).verdict == findings.HOLDS
    assert judged(no_gain(better, arm(base))).verdict == findings.FAILS
    assert judged(no_loss(better, arm(base))).verdict == findings.HOLDS
    assert judged(no_loss(worse, arm(base))).verdict == findings.FAILS
    # A significant gain smaller than the margin (+0.2 pp against 0.5 pp) does not fail "no gain".
    assert judged(no_gain(arm(base + 0.002 + jitter / 10), arm(base))).verdict == findings.HOLDS
    # For KL lower is better, and the margin is a tenth of the reference arm's level.
    kl = np.linspace(0.3, 0.4, 10)
    assert judged(no_gain(arm(kl - 0.1 + jitter, "test_kl"), arm(kl, "test_kl"))).verdict == findings.FAILS
    assert judged(no_gain(arm(kl + 0.1 + jitter, "test_kl"), arm(kl, "test_kl"))).verdict == findings.HOLDS
    relative = judged(same(arm(kl * 1.05, "test_kl"), arm(kl, "test_kl")))
    assert relative.margin == pytest.approx(0.1 * kl.mean())
    assert relative.verdict == findings.HOLDS


def test_holm_matches_the_step_down_definition():
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    adjusted = holm(p)
    assert adjusted[3] == pytest.approx(0.02)  # smallest of four: x4
    assert adjusted[0] == pytest.approx(0.03)  # x3
    assert adjusted[2] == pytest.approx(0.06)  # x2
    assert adjusted[1] == pytest.approx(0.06)  # x1 = 0.04, but monotone
    assert math.isnan(adjusted[4])


def test_holm_runs_over_the_failing_tests_of_one_finding_only():
    rng = np.random.default_rng(4)
    base = rng.normal(0.8, 0.02, 5)
    # Each a rise of 0.1 pp, shown below the margin at p about 0.01 alone; twenty in one finding are not.
    claims = [higher(arm(base + 0.001 + rng.normal(0, 0.003, 5)), arm(base)) for _ in range(20)]
    together = findings.judge_claims(claims)
    assert all(q >= p for c in together for p, q in zip(c.p_fails, c.p_fails_adjusted))
    alone = findings.judge_claims([higher(claims[0].a, claims[0].b)])[0]
    assert alone.p_fails_adjusted == alone.p_fails  # another finding's claims do not change this one's
    assert max(c.p_fails_adjusted[0] for c in together) > alone.p_fails_adjusted[0]


def test_thresholds_use_one_sided_tests_and_stay_in_bounds():
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


def test_moving_students_are_context_not_a_veto():
    base = np.linspace(0.7, 0.8, 10)
    still_moving = arm(base - 0.05, moving=10, delta=0.04, label="moving")
    claim = judged(higher(still_moving, arm(base)))
    assert claim.verdict == findings.FAILS  # as it would without the flag
    assert judged(higher(arm(base + 0.05, moving=10, delta=0.04), arm(base))).verdict == findings.HOLDS
    line = findings.describe_sample(still_moving)
    assert "+4.00 pp over the second half" in line and "10 of 10 students" in line


@pytest.mark.parametrize("setting", ["fails", "inconclusive"])
@pytest.mark.parametrize("direction", [+1, -1])
def test_a_precondition_not_shown_blocks_both_verdicts_alike(setting, direction):
    base = np.linspace(0.7, 0.8, 10)
    claim = higher(arm(base + direction * 0.05 + np.tile([0.001, -0.001], 5)), arm(base))
    confidence = [0.5] * 5 if setting == "fails" else [0.6, 0.99, 0.7, 0.95, 0.75]
    precondition = above(arm(np.array(confidence) + np.tile([0.001, -0.001], 5)[:5], "teacher_test_confidence"),
                         0.8, role=PRECONDITION)
    verdict, note = judge_finding([precondition, claim])
    assert verdict == findings.INCONCLUSIVE and "not judged" in note
    assert claim.verdict == (findings.HOLDS if direction > 0 else findings.FAILS)  # the claim's own numbers
    met = above(arm([0.9, 0.91, 0.92, 0.93, 0.94], "teacher_test_confidence"), 0.8, role=PRECONDITION)
    verdict, _ = judge_finding([met, higher(claim.a, claim.b)])
    assert verdict == (findings.HOLDS if direction > 0 else findings.FAILS)


def test_described_verdict_matches_its_numbers():
    base = np.linspace(0.7, 0.8, 10)
    claim = judged(higher(arm(base + 0.03 + np.tile([0.002, -0.002], 5), label="a"), arm(base, label="b")))
    text = findings.describe_claim(claim)
    assert "a − b, test_agreement: +3.00 pp" in text and "90% CI" in text
    assert text.endswith("**holds**")
