"""Planted-effect tests of the findings on training and initialization: 11, 12 and 13 (16 in test_rules.py).

Each finding holds on its study planted as the paper reports it and does not hold when one part of it is
planted false by a clear margin.
"""

from __future__ import annotations

import pytest
from planted import DURATION_HOLDS, PAPER_CURVE, changed, initialization_arms, judged, planted_rows, write_study

from kd_ray import findings

# --- finding 11: longer training slightly raises train agreement; Adam is not better than SGD ----------


def test_longer_training_holds_when_sgd_gains_4_pp_and_adam_stays_below_sgd(tmp_path):
    write_study(tmp_path, "training_duration", planted_rows("training_duration", DURATION_HOLDS))
    verdict = judged(tmp_path, 11)
    assert verdict.verdict == findings.HOLDS
    rise, adam, slight = verdict.claims
    assert (rise.a.label, rise.b.label, rise.kind) == ("sgd, 180 epochs", "sgd, 30 epochs", "higher")
    assert (adam.a.label, adam.b.label, adam.kind) == ("adam, 180 epochs", "sgd, 180 epochs", "no_gain")
    assert slight.kind == "no_gain" and slight.margin == pytest.approx(0.21 / 3)  # a third of 21 pp


@pytest.mark.parametrize("where, level, failing", [
    ({"optimizer": "adam", "epochs": 180}, 0.845, 1),  # Adam 1.5 pp above SGD at the longest run
    ({"optimizer": "sgd", "epochs": 180}, 0.930, 2),  # SGD gains 14 pp, two thirds of the disagreement: not slight
])
def test_longer_training_does_not_hold_when_one_part_is_planted_false(tmp_path, where, level, failing):
    arms = changed(DURATION_HOLDS, where, train_agreement=level)
    write_study(tmp_path, "training_duration", planted_rows("training_duration", arms))
    verdict = judged(tmp_path, 11)
    assert verdict.verdict == findings.FAILS
    assert [i for i, c in enumerate(verdict.claims) if c.verdict == findings.FAILS] == [failing]


# --- finding 12: a sharp threshold in the interpolation lambda ----------------------------------------


def write_initialization(root, curve=PAPER_CURVE, **levels) -> None:
    write_study(root, "initialization", planted_rows("initialization", initialization_arms(curve, **levels),
                                                     spread=0.005))


def test_threshold_holds_on_the_paper_s_curve(tmp_path):
    write_initialization(tmp_path)
    verdict = judged(tmp_path, 12)
    assert verdict.verdict == findings.HOLDS
    level, closed, share = verdict.claims
    assert level.kind == "same" and level.margin == pytest.approx(0.021)  # a tenth of 21 pp
    assert level.mean == pytest.approx(0.014, abs=1e-9)  # 79% at lambda 0, 80.4% at 0.25
    assert closed.mean == pytest.approx((0.976 - 0.790) / 0.21, abs=0.03)  # 89%
    assert share.mean == pytest.approx(0.172 / 0.21, abs=0.03)  # 82%
    assert "the jump, per seed: lambda 0.25 to 0.375" in level.notes
    assert all(c.n == 10 for c in verdict.claims)


@pytest.mark.parametrize("curve, failing", [
    # Gradual: no step is half the rise, and the step before the largest is far above lambda 0.
    ({0.0: 0.79, 0.25: 0.83, 0.375: 0.86, 0.5: 0.90, 0.75: 0.95, 1.0: 1.0}, [0, 2]),
    # A sharp jump, but agreement already 5 pp above random init before it.
    ({0.0: 0.79, 0.25: 0.84, 0.375: 0.99, 0.5: 1.0, 0.75: 1.0, 1.0: 1.0}, [0]),
    # A sharp jump that closes only two thirds of the disagreement: not ~100% above it.
    ({0.0: 0.79, 0.25: 0.80, 0.375: 0.93, 0.5: 0.96, 0.75: 0.99, 1.0: 1.0}, [1]),
])
def test_threshold_does_not_hold_when_one_part_of_the_threshold_is_missing(tmp_path, curve, failing):
    write_initialization(tmp_path, curve)
    verdict = judged(tmp_path, 12)
    assert verdict.verdict == findings.FAILS
    assert [i for i, c in enumerate(verdict.claims) if c.verdict == findings.FAILS] == failing


def test_threshold_leaves_out_a_seed_missing_a_lambda(tmp_path):
    rows = planted_rows("initialization", initialization_arms(), spread=0.005)
    rows = [r for r in rows if not (r["init"] == "interpolate" and r["init_lambda"] == 0.5 and r["seed"] == 3)]
    write_study(tmp_path, "initialization", rows)
    verdict = judged(tmp_path, 12)
    assert verdict.verdict == findings.HOLDS
    assert all(c.n == 9 for c in verdict.claims)


def test_threshold_with_fewer_than_4_lambdas_is_not_covered_with_its_reason(tmp_path):
    write_initialization(tmp_path, {0.0: 0.79, 0.5: 0.997, 1.0: 1.0})
    verdict = judged(tmp_path, 12)
    assert verdict.verdict == findings.NOT_COVERED
    assert verdict.evidence == ["the initialization study has 3 interpolation lambdas; a threshold needs at least 4"]


def test_threshold_without_a_seed_that_has_every_lambda_is_not_covered_not_a_crash(tmp_path):
    rows = planted_rows("initialization", initialization_arms(), spread=0.005)
    lambdas = list(PAPER_CURVE)
    # Seed s lacks lambda number s % 6: every lambda is there, no seed's curve is whole.
    rows = [r for r in rows if not (r["init"] == "interpolate" and r["init_lambda"] == lambdas[r["seed"] % 6])]
    write_study(tmp_path, "initialization", rows)
    verdict = judged(tmp_path, 12)
    assert verdict.verdict == findings.NOT_COVERED
    assert verdict.evidence == ["no seed of the initialization study has train agreement at every interpolation lambda"]


# --- finding 13: the teacher's initial weights do not change final agreement --------------------------


def test_teacher_init_holds_when_agreement_and_kl_match_random_init(tmp_path):
    write_initialization(tmp_path)
    verdict = judged(tmp_path, 13)
    assert verdict.verdict == findings.HOLDS
    assert [(c.metric, c.kind, c.n) for c in verdict.claims] == [("test_agreement", "same", 10),
                                                                ("test_kl", "same", 10)]


def test_teacher_init_holds_with_a_difference_inside_the_margin(tmp_path):
    # +0.25 pp at a 0.5 pp margin: shown inside it, so "no change" holds rather than failing.
    rows = planted_rows("initialization", initialization_arms(teacher_init_agreement=0.8025), noise=0.002)
    write_study(tmp_path, "initialization", rows)
    verdict = judged(tmp_path, 13)
    assert verdict.verdict == findings.HOLDS
    assert verdict.claims[0].mean == pytest.approx(0.0025) and verdict.claims[0].margin == 0.005


@pytest.mark.parametrize("levels, failing", [
    (dict(teacher_init_agreement=0.815), 0),  # +1.5 pp agreement
    (dict(teacher_init_kl=0.255), 1),  # KL 15% below random init's 0.30, its margin 10%
])
def test_teacher_init_does_not_hold_when_one_metric_changes_by_three_margins(tmp_path, levels, failing):
    write_initialization(tmp_path, **levels)
    verdict = judged(tmp_path, 13)
    assert verdict.verdict == findings.FAILS
    assert [i for i, c in enumerate(verdict.claims) if c.verdict == findings.FAILS] == [failing]


def test_teacher_init_pairs_over_the_seeds_both_arms_share(tmp_path):
    rows = planted_rows("initialization", initialization_arms(), seeds=12, noise=0.002)
    write_study(tmp_path, "initialization", [r for r in rows if not (r["init"] == "teacher_init" and r["seed"] >= 9)])
    verdict = judged(tmp_path, 13)
    assert verdict.verdict == findings.HOLDS
    assert [c.n for c in verdict.claims] == [9, 9]
    assert all("n=9 pairs" in line for line in verdict.evidence)
