"""The decision rules' operating characteristics, by simulation with known true effects.

Each case draws whole findings (400 or more per case) at n = 10 and n = 5 seeds with realistic seed
noise, and judges them with the rules the document uses. Bounds:
- a null claim ("no difference", "no gain", "no loss") whose true effect is 1.5 Δ or more holds in at
  most 5% of draws, and one whose true effect is 0.5 Δ or less does not hold in at most 5%;
- a difference claim with a true effect of 0 holds in at most 5% (family-wise: a finding of three such
  claims); one whose true effect is 1.5 Δ the claimed way does not hold in at most 5%;
- at n = 10 and realistic noise a true effect of 3 Δ is detected in at least 80%.
A true effect of exactly 0 puts a "raises" claim on the boundary of its test, where the false rate is
alpha itself; there the bound allows the simulation's own error (2.6 standard errors of the rate).
"""

from __future__ import annotations

import math

import pytest

from kd_ray.findings import (
    FAILS,
    HIGHER,
    HOLDS,
    LOWER,
    NO_GAIN,
    NO_LOSS,
    NOISY,
    REALISTIC_NOISE,
    REPORTED_CASES,
    SAME,
    Case,
    verdict_rates,
)

DRAWS = 400
BOUNDARY_DRAWS = 2000


def boundary_bound(draws: int) -> float:
    return 0.05 + 2.6 * math.sqrt(0.05 * 0.95 / draws)


@pytest.mark.parametrize("n", [10, 5])
@pytest.mark.parametrize("noise", [REALISTIC_NOISE, NOISY])
@pytest.mark.parametrize("kind, effect", [(SAME, 1.5), (SAME, -1.5), (NO_GAIN, 1.5), (NO_LOSS, -1.5),
                                          (SAME, 2.0), (NO_GAIN, 3.0)])
def test_a_null_claim_with_a_true_effect_beyond_its_margin_rarely_holds(kind, effect, n, noise):
    rates = verdict_rates(Case(kind, effect, n, noise), DRAWS, seed=1)
    assert rates[HOLDS] <= 0.05, rates


@pytest.mark.parametrize("n", [10, 5])
@pytest.mark.parametrize("noise", [REALISTIC_NOISE, NOISY])
@pytest.mark.parametrize("kind, effect", [(SAME, 0.5), (SAME, -0.5), (SAME, 0.0), (NO_GAIN, 0.5),
                                          (NO_GAIN, -2.0), (NO_LOSS, -0.5), (NO_LOSS, 2.0)])
def test_a_null_claim_with_a_true_effect_within_half_its_margin_rarely_fails(kind, effect, n, noise):
    rates = verdict_rates(Case(kind, effect, n, noise), DRAWS, seed=2)
    assert rates[FAILS] <= 0.05, rates


@pytest.mark.parametrize("n", [10, 5])
@pytest.mark.parametrize("kind, claims", [(HIGHER, 1), (LOWER, 1), (HIGHER, 3)])
def test_a_difference_claim_with_no_true_effect_rarely_holds(kind, claims, n):
    rates = verdict_rates(Case(kind, 0.0, n, REALISTIC_NOISE, claims), BOUNDARY_DRAWS, seed=3)
    assert rates[HOLDS] <= boundary_bound(BOUNDARY_DRAWS), rates


@pytest.mark.parametrize("n", [10, 5])
@pytest.mark.parametrize("noise", [REALISTIC_NOISE, NOISY])
@pytest.mark.parametrize("kind, effect, claims", [(HIGHER, 1.5, 1), (LOWER, -1.5, 1), (HIGHER, 1.5, 3),
                                                  (HIGHER, 3.0, 3)])
def test_a_difference_claim_with_a_true_effect_beyond_its_margin_rarely_fails(kind, effect, claims, n, noise):
    rates = verdict_rates(Case(kind, effect, n, noise, claims), DRAWS, seed=4)
    assert rates[FAILS] <= 0.05, rates


@pytest.mark.parametrize("kind, effect, noise", [
    (HIGHER, 3.0, REALISTIC_NOISE), (LOWER, -3.0, REALISTIC_NOISE), (SAME, 3.0, REALISTIC_NOISE),
    (NO_GAIN, 3.0, REALISTIC_NOISE), (NO_LOSS, -3.0, REALISTIC_NOISE), (HIGHER, 3.0, NOISY), (LOWER, -3.0, NOISY),
])
def test_a_true_effect_of_three_margins_is_detected_at_ten_seeds(kind, effect, noise):
    rates = verdict_rates(Case(kind, effect, 10, noise), DRAWS, seed=5)
    detected = rates[HOLDS] if kind in (HIGHER, LOWER) else rates[FAILS]
    assert detected >= 0.8, rates


def test_a_rise_shown_smaller_than_its_margin_does_not_hold():
    # A real rise of a fifth of Δ, measured tightly: shown both above 0 and below Δ, it is no effect.
    rates = verdict_rates(Case(HIGHER, 0.2, 10, REALISTIC_NOISE / 10), DRAWS, seed=6)
    assert rates[FAILS] >= 0.95, rates


def test_every_reported_case_runs():
    for _, case, _ in REPORTED_CASES:
        rates = verdict_rates(case, 50, seed=7)
        assert math.isclose(sum(rates.values()), 1.0)
