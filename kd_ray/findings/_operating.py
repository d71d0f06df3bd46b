"""The decision rules' operating characteristics, measured by simulation with a known true effect.

A simulated finding is a family of paired claims of one kind, each on its own two arms; a replicate
(seed) draws both arms' values, with a shared seed level and independent paired noise. The verdicts
come from the same ``judge_finding`` as the real tables', so the rates are those of the rules as run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kd_ray.findings._claims import (
    FAILS,
    HIGHER,
    HOLDS,
    INCONCLUSIVE,
    LOWER,
    MIN_EFFECT,
    NO_GAIN,
    NO_LOSS,
    SAME,
    Claim,
    Sample,
    judge_finding,
)

DELTA = MIN_EFFECT["test_agreement"]
# The sd of a paired difference of test agreement between two arms over seeds, as the local reproduction
# measures it (0.3 to 0.9 pp for most claims); the noisy case is its largest arms' (mixup, 1.6 to 4 pp sd).
REALISTIC_NOISE = 0.005
NOISY = 0.01
SEED_LEVEL_SD = 0.01  # how much a whole replicate moves both arms together (pairing removes it)


@dataclass(frozen=True)
class Case:
    """``claims`` claims of ``kind``, each with true effect ``effect`` (in units of Δ), at ``n`` seeds."""

    kind: str
    effect: float
    n: int
    noise: float = REALISTIC_NOISE
    claims: int = 1


def simulated_claim(kind: str, effect: float, n: int, noise: float, rng: np.random.Generator) -> Claim:
    """Two arms of test agreement over ``n`` seeds whose true mean difference is ``effect`` x Δ."""
    seeds = pd.Index(range(n), name="seed")
    level = 0.85 + rng.normal(0.0, SEED_LEVEL_SD, n)
    b = level + rng.normal(0.0, noise / np.sqrt(2), n)
    a = level + effect * DELTA + rng.normal(0.0, noise / np.sqrt(2), n)
    teachers = pd.Series([f"teacher-{seed}" for seed in seeds], index=seeds)
    arm_a = Sample("a", "test_agreement", pd.Series(a, index=seeds), teachers, trials=n)
    arm_b = Sample("b", "test_agreement", pd.Series(b, index=seeds), teachers, trials=n)
    return Claim(kind, arm_a, arm_b)


def verdict_rates(case: Case, draws: int, seed: int = 0) -> dict[str, float]:
    """The share of ``draws`` simulated findings of ``case`` that hold, do not hold, or are inconclusive."""
    rng = np.random.default_rng(seed)
    counts: Counter[str] = Counter()
    for _ in range(draws):
        family = [simulated_claim(case.kind, case.effect, case.n, case.noise, rng) for _ in range(case.claims)]
        verdict, _ = judge_finding(family)
        counts[verdict] += 1
    return {verdict: counts[verdict] / draws for verdict in (HOLDS, FAILS, INCONCLUSIVE)}


# The cases the document reports and the tests bound: a wrong verdict's rate, or a right one's (power).
REPORTED_CASES = [
    ("no difference, true effect 1.5Δ: holds", Case(SAME, 1.5, 10), HOLDS),
    ("no difference, true effect 0.5Δ: does not hold", Case(SAME, 0.5, 10), FAILS),
    ("no difference, true effect 0.9Δ: does not hold", Case(SAME, 0.9, 10), FAILS),
    ("no gain, true gain 1.5Δ: holds", Case(NO_GAIN, 1.5, 10), HOLDS),
    ("no loss, true loss 0.5Δ: does not hold", Case(NO_LOSS, -0.5, 10), FAILS),
    ("raises, true effect 0: holds", Case(HIGHER, 0.0, 10), HOLDS),
    ("raises, true effect 0: holds (a finding of three such claims)", Case(HIGHER, 0.0, 10, claims=3), HOLDS),
    ("raises, true effect 1.5Δ: does not hold (three claims)", Case(HIGHER, 1.5, 10, claims=3), FAILS),
    ("lowers, true effect -1.5Δ: does not hold", Case(LOWER, -1.5, 10), FAILS),
    ("raises, true effect 3Δ: holds (power)", Case(HIGHER, 3.0, 10), HOLDS),
    ("raises, true effect 3Δ, noisy: holds (power)", Case(HIGHER, 3.0, 10, NOISY), HOLDS),
    ("no difference, true effect 0: holds (power)", Case(SAME, 0.0, 10), HOLDS),
]
