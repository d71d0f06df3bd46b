"""Planted-effect tests of the findings on the teacher and the distillation recipe: 1, 7, 8, 14, 15 and 17.

Each finding holds on its study planted as the paper reports it (every claim true by three minimum
effects or more) and does not hold when one part of it is planted false by as much.
"""

from __future__ import annotations

import pytest
from planted import (
    ENSEMBLE_HOLDS,
    SWEEP_AGREEMENT,
    SWEEP_ECE,
    SWEEP_NOISE,
    SWEEP_TEACHER,
    alpha_arms,
    changed,
    judged,
    planted_rows,
    temperature_sweep_arms,
    write_study,
)

from kd_ray import findings


def write_sweep(root, seeds: int = 10, noise: float = 0.003, spread: float = 0.01, **levels) -> None:
    rows = planted_rows("temperature_sweep", temperature_sweep_arms(**levels), seeds=seeds, noise=noise, spread=spread)
    write_study(root, "temperature_sweep", rows)


def with_level(table: dict, m: int, tau_index: int, level: float) -> dict:
    """``table`` (levels per m, one per tau) with the level of one (m, tau) changed."""
    return {**table, m: tuple(level if i == tau_index else v for i, v in enumerate(table[m]))}


# --- finding 1: the student's test agreement is clearly below 100% when its teacher's accuracy is -------


def test_agreement_below_perfect_holds_for_a_79_percent_teacher_and_an_82_percent_student(tmp_path):
    write_sweep(tmp_path)
    verdict = judged(tmp_path, 1)
    assert verdict.verdict == findings.HOLDS
    teacher, student = verdict.claims
    assert (teacher.metric, teacher.kind, teacher.value) == ("teacher_test_acc", "below", 0.95)
    assert (student.metric, student.kind, student.value) == ("test_agreement", "below", 0.99)
    assert student.a.label == "m=1, tau=4" and student.n == 10 and teacher.n == 10  # ten distinct teachers


def test_agreement_below_perfect_does_not_hold_when_the_student_agrees_99_6_percent(tmp_path):
    # Near 100% seeds differ little: a tenth of the usual noise, so no planted agreement passes 100%.
    write_sweep(tmp_path, noise=0.0005, spread=0.001, agreement=with_level(SWEEP_AGREEMENT, 1, 1, 0.996))
    verdict = judged(tmp_path, 1)
    assert verdict.verdict == findings.FAILS
    assert [c.verdict for c in verdict.claims] == [findings.HOLDS, findings.FAILS]


def test_agreement_below_perfect_does_not_hold_when_the_teacher_is_97_percent_accurate(tmp_path):
    teacher = {**SWEEP_TEACHER, 1: {**SWEEP_TEACHER[1], "teacher_test_acc": 0.97}}
    write_sweep(tmp_path, noise=0.002, spread=0.002, teacher=teacher)
    verdict = judged(tmp_path, 1)
    assert verdict.verdict == findings.FAILS
    assert [c.verdict for c in verdict.claims] == [findings.FAILS, findings.HOLDS]


# --- finding 7: larger ensembles raise teacher accuracy, agreement and (saturating) student accuracy ----


def test_larger_ensembles_hold_when_all_three_rise_and_student_accuracy_saturates(tmp_path):
    write_study(tmp_path, "ensemble_size", planted_rows("ensemble_size", ENSEMBLE_HOLDS))
    verdict = judged(tmp_path, 7)
    assert verdict.verdict == findings.HOLDS
    assert [(c.a.label, c.b.label, c.metric, c.kind) for c in verdict.claims] == [
        ("m=8", "m=1", "teacher_test_acc", "higher"), ("m=8", "m=1", "test_agreement", "higher"),
        ("m=8", "m=1", "test_acc", "higher"), ("m=8", "m=3", "test_acc", "no_gain")]
    assert verdict.claims[0].n == 10  # a distinct teacher ensemble per m and seed


def test_larger_ensembles_do_not_hold_when_student_accuracy_keeps_rising_past_the_middle_size(tmp_path):
    arms = changed(ENSEMBLE_HOLDS, {"teacher_members": 8}, test_acc=0.815)  # m = 3: 80%
    write_study(tmp_path, "ensemble_size", planted_rows("ensemble_size", arms))
    verdict = judged(tmp_path, 7)
    assert verdict.verdict == findings.FAILS
    assert [c.verdict for c in verdict.claims] == [findings.HOLDS] * 3 + [findings.FAILS]


def test_larger_ensembles_do_not_hold_when_agreement_drops_with_the_largest_ensemble(tmp_path):
    arms = changed(ENSEMBLE_HOLDS, {"teacher_members": 8}, test_agreement=0.845)  # m = 1: 86%
    write_study(tmp_path, "ensemble_size", planted_rows("ensemble_size", arms))
    verdict = judged(tmp_path, 7)
    assert verdict.verdict == findings.FAILS
    assert verdict.claims[1].verdict == findings.FAILS


# --- finding 8: for a confident teacher tau 4 beats tau 1, and tau 4, 8, 16 are alike ------------------


def test_temperature_holds_for_a_confident_teacher_when_tau_4_beats_1_and_8_16_match_4(tmp_path):
    write_sweep(tmp_path)
    verdict = judged(tmp_path, 8)
    assert verdict.verdict == findings.HOLDS
    precondition, *claims = verdict.claims
    assert precondition.role == findings.PRECONDITION and precondition.a.metric == "teacher_test_confidence"
    assert precondition.a.label.startswith("teacher m=5")  # the largest m
    assert [(c.a.label, c.b.label, c.kind) for c in claims] == [
        ("m=5, tau=4", "m=5, tau=1", "higher"), ("m=5, tau=8", "m=5, tau=4", "same"),
        ("m=5, tau=16", "m=5, tau=4", "same")]


def test_temperature_does_not_hold_for_a_confident_teacher_when_tau_16_loses_agreement(tmp_path):
    write_sweep(tmp_path, agreement=with_level(SWEEP_AGREEMENT, 5, 3, 0.835))  # tau 4: 85%
    verdict = judged(tmp_path, 8)
    assert verdict.verdict == findings.FAILS
    assert [c.verdict for c in verdict.claims] == [findings.HOLDS] * 3 + [findings.FAILS]


@pytest.mark.parametrize("tau_1, claim_verdict", [(0.830, findings.HOLDS), (0.865, findings.FAILS)])
def test_temperature_with_an_unconfident_teacher_is_inconclusive_whichever_way_the_claims_point(
        tmp_path, tau_1, claim_verdict):
    teacher = {**SWEEP_TEACHER, 5: {**SWEEP_TEACHER[5], "teacher_test_confidence": 0.70}}
    write_sweep(tmp_path, teacher=teacher, agreement=with_level(SWEEP_AGREEMENT, 5, 0, tau_1))
    verdict = judged(tmp_path, 8)
    assert verdict.verdict == findings.INCONCLUSIVE
    assert verdict.claims[0].verdict == findings.FAILS
    assert verdict.claims[1].verdict == claim_verdict  # tau 4 over tau 1, by its own numbers
    assert "not judged: the setting the finding presumes is not met" in verdict.evidence


def test_temperature_without_the_teacher_s_confidence_is_inconclusive(tmp_path):
    rows = planted_rows("temperature_sweep", temperature_sweep_arms())
    write_study(tmp_path, "temperature_sweep", rows, without=("teacher_test_confidence",))
    verdict = judged(tmp_path, 8)
    assert verdict.verdict == findings.INCONCLUSIVE
    assert verdict.claims[0].n == 0


# --- finding 14: for m > 1 raising alpha does not raise agreement -------------------------------------


def test_alpha_holds_when_every_alpha_above_0_lowers_agreement(tmp_path):
    write_study(tmp_path, "alpha_sweep", planted_rows("alpha_sweep", alpha_arms()))
    verdict = judged(tmp_path, 14)
    assert verdict.verdict == findings.HOLDS
    assert [(c.a.label, c.b.label, c.kind) for c in verdict.claims] == [("alpha=0.3", "alpha=0", "no_gain"),
                                                                       ("alpha=0.7", "alpha=0", "no_gain")]


def test_alpha_does_not_hold_when_one_alpha_raises_agreement(tmp_path):
    write_study(tmp_path, "alpha_sweep", planted_rows("alpha_sweep", alpha_arms({0.0: 0.850, 0.3: 0.865, 0.7: 0.800})))
    verdict = judged(tmp_path, 14)
    assert verdict.verdict == findings.FAILS
    assert [c.verdict for c in verdict.claims] == [findings.FAILS, findings.HOLDS]


# --- finding 15: a student of an independent teacher explains most of the agreement ---------------------


def test_independent_student_holds_when_the_control_reaches_93_percent_of_the_real_agreement(tmp_path):
    write_study(tmp_path, "alpha_sweep", planted_rows("alpha_sweep", alpha_arms()))
    verdict = judged(tmp_path, 15)
    assert verdict.verdict == findings.HOLDS
    gap, share = verdict.claims
    assert gap.mean == pytest.approx(0.05) and share.mean == pytest.approx(0.70 / 0.75, abs=0.005)


def test_independent_student_does_not_hold_when_the_control_agrees_as_much_as_the_real_student(tmp_path):
    write_study(tmp_path, "alpha_sweep", planted_rows("alpha_sweep", alpha_arms(control=0.850)))
    verdict = judged(tmp_path, 15)
    assert verdict.verdict == findings.FAILS
    assert [c.verdict for c in verdict.claims] == [findings.FAILS, findings.HOLDS]  # no knowledge transferred


def test_independent_student_does_not_hold_when_the_control_reaches_under_half_the_real_agreement(tmp_path):
    write_study(tmp_path, "alpha_sweep", planted_rows("alpha_sweep", alpha_arms(control=0.400)))  # 0.30 / 0.75
    verdict = judged(tmp_path, 15)
    assert verdict.verdict == findings.FAILS
    assert [c.verdict for c in verdict.claims] == [findings.HOLDS, findings.FAILS]


# --- finding 17: the most faithful arm is the best calibrated, not necessarily the most accurate --------


def test_most_faithful_holds_when_the_most_faithful_arm_is_the_best_calibrated_but_not_the_most_accurate(tmp_path):
    write_sweep(tmp_path, noise=SWEEP_NOISE)
    verdict = judged(tmp_path, 17)
    assert verdict.verdict == findings.HOLDS
    (claim,) = verdict.claims
    assert (claim.kind, claim.metric, claim.n) == ("no_loss", "test_ece", 10)
    note = ("each seed's two arms chosen on the other seeds; the most faithful arm's accuracy rank among 12 arms, "
            "per seed: ")
    (ranks,) = [n[len(note):] for n in claim.notes if n.startswith(note)]
    assert all(int(rank) > 1 for rank in ranks.split(", "))  # m = 5 at tau 1 is the most accurate


def test_most_faithful_does_not_hold_when_another_arm_is_calibrated_3_points_better(tmp_path):
    ece = {**SWEEP_ECE, 5: (0.050, 0.050, 0.050, 0.050), 3: (0.055, 0.020, 0.040, 0.045)}
    write_sweep(tmp_path, noise=SWEEP_NOISE, ece=ece)
    verdict = judged(tmp_path, 17)
    assert verdict.verdict == findings.FAILS
    assert verdict.claims[0].mean == pytest.approx(0.03, abs=0.003)


def test_most_faithful_does_not_fail_when_every_arm_is_equally_well_calibrated(tmp_path):
    write_sweep(tmp_path, seeds=30, noise=0.005, ece={m: (0.030,) * 4 for m in SWEEP_ECE})
    verdict = judged(tmp_path, 17)
    assert verdict.verdict != findings.FAILS


def test_most_faithful_pairs_only_the_seeds_with_two_arms_or_more(tmp_path):
    rows = planted_rows("temperature_sweep", temperature_sweep_arms(), noise=SWEEP_NOISE)
    rows = [r for r in rows if r["seed"] < 8 or (r["teacher_members"], r["temperature"]) == (1, 1.0)]
    write_study(tmp_path, "temperature_sweep", rows)
    verdict = judged(tmp_path, 17)
    assert verdict.verdict == findings.HOLDS
    assert verdict.claims[0].n == 8


def test_most_faithful_with_one_arm_per_seed_is_not_covered_with_its_reason(tmp_path):
    rows = planted_rows("temperature_sweep", temperature_sweep_arms())
    one_arm = [r for r in rows if (r["teacher_members"], r["temperature"]) == (5, 4.0)]
    write_study(tmp_path, "temperature_sweep", one_arm)
    verdict = judged(tmp_path, 17)
    assert verdict.verdict == findings.NOT_COVERED
    assert verdict.evidence == ["no seed of temperature_sweep has two arms to compare, beside other seeds to choose "
                                "them on"]
