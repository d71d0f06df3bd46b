"""Paired statistical tests behind the findings' verdicts: pandas and scipy only.

A claim compares two arms of one study on one metric. Arms of a study share their seeds, and a seed
names a replicate (its data stream, its student init and, by default, its own teacher), so the
comparison is *paired*: the differences ``a - b`` over shared seeds, their mean and 95% t-interval.
Statistics of teacher metrics count distinct teachers, not seeds.

Every metric has a stated minimum effect (``MIN_EFFECT``): a difference smaller than it is no effect
worth claiming. With it:
- a *difference* claim ("a is higher than b") holds when the two-sided t-test of the paired
  differences is significant after Holm's correction across every difference test of the document,
  in the claimed direction, and the differences are not shown equivalent to zero; it does not hold
  when the difference is significant the other way or the differences are shown equivalent to zero
  within the minimum effect; otherwise it is inconclusive, and the minimum detectable effect (80%
  power at the same alpha) says how large an effect the data could have shown;
- a *no-difference* claim holds only when an equivalence test (TOST, alpha 0.05) shows the mean
  difference within plus or minus the minimum effect; a *no-gain* claim when a one-sided
  non-superiority test shows it below the minimum effect; either does not hold when a difference
  test is significant (Holm) the forbidden way; otherwise inconclusive;
- a *threshold* claim ("agreement below 99%") holds when the arm's 95% interval lies on the claimed
  side, does not hold when it lies wholly on the other side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
POWER = 0.8
HOLDS, FAILS, INCONCLUSIVE, NOT_COVERED = "holds", "does not hold", "inconclusive", "not covered"

# The smallest difference a claim about each metric counts as an effect (fractions: 0.01 = 1 pp).
MIN_EFFECT = {
    "test_agreement": 0.01,
    "train_agreement": 0.01,
    "aug_train_agreement": 0.01,
    "control_test_agreement": 0.01,
    "test_acc": 0.01,
    "teacher_test_acc": 0.01,
    "test_ece": 0.01,
    "test_kl": 0.02,
    "train_kl": 0.02,
    "test_nll": 0.02,
}
PERCENT_METRICS = {
    "test_agreement", "train_agreement", "aug_train_agreement", "control_test_agreement", "test_acc",
    "teacher_test_acc", "test_ece",
}
LOWER_IS_BETTER = {"test_ece", "test_kl", "train_kl", "test_nll", "teacher_test_ece", "teacher_test_nll"}

HIGHER, LOWER, SAME, NO_GAIN, NO_LOSS, ABOVE, BELOW = "higher", "lower", "same", "no_gain", "no_loss", "above", "below"
DIFFERENCE_KINDS = (HIGHER, LOWER, SAME, NO_GAIN, NO_LOSS)


@dataclass
class Sample:
    """One arm's metric, a value per seed (the mean of that seed's rows)."""

    label: str
    metric: str
    values: pd.Series  # index: seed
    teachers: pd.Series  # index: seed; the teacher_key of that seed's rows
    unconverged: int = 0  # trials of the arm that had not converged
    trials: int = 0


def sample(trials: pd.DataFrame, metric: str, label: str, **where) -> Sample:
    """The usable rows of ``trials`` matching ``where`` (column=value), as a per-seed sample of ``metric``."""
    # astype(bool): an empty sample's column is of object dtype, which pandas would take for column labels.
    rows = trials[trials["usable"].astype(bool)] if "usable" in trials else trials
    for column, value in where.items():
        if isinstance(value, float):
            rows = rows[(rows[column] - value).abs() < 1e-9]
        else:
            rows = rows[rows[column] == value]
    rows = rows[np.isfinite(rows[metric].astype(float))]
    values = rows.groupby("seed")[metric].mean().astype(float)
    teachers = rows.groupby("seed")["teacher_key"].first() if "teacher_key" in rows else pd.Series(dtype=object)
    # A missing convergence verdict (older tables) counts as converged: only a recorded False refuses.
    unconverged = int(rows["converged"].eq(False).sum()) if "converged" in rows else 0
    return Sample(label, metric, values, teachers, unconverged, len(rows))


@dataclass
class Claim:
    """One statistical claim of a finding: ``kind`` of ``a`` against ``b`` (or against ``value``)."""

    kind: str
    a: Sample
    b: Sample | None = None
    value: float | None = None
    min_effect: float | None = None
    # Filled by measure():
    n: int = 0
    mean: float = math.nan  # mean paired difference a - b (threshold claims: the mean of a)
    low: float = math.nan  # its 95% t-interval
    high: float = math.nan
    p_difference: float = math.nan  # two-sided, H0: no difference
    p_adjusted: float = math.nan  # after Holm across the document
    p_equivalence: float = math.nan  # TOST (same), non-superiority (no_gain) or non-inferiority (no_loss)
    mde: float = math.nan  # minimum detectable effect at POWER
    refused_failure: bool = False  # failed by the numbers, held inconclusive for unconverged students
    verdict: str = INCONCLUSIVE
    notes: list[str] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.a.metric

    @property
    def margin(self) -> float:
        return self.min_effect if self.min_effect is not None else MIN_EFFECT.get(self.metric, 0.01)


def higher(a: Sample, b: Sample, min_effect: float | None = None) -> Claim:
    return Claim(HIGHER, a, b, min_effect=min_effect)


def lower(a: Sample, b: Sample, min_effect: float | None = None) -> Claim:
    return Claim(LOWER, a, b, min_effect=min_effect)


def same(a: Sample, b: Sample, min_effect: float | None = None) -> Claim:
    return Claim(SAME, a, b, min_effect=min_effect)


def no_gain(a: Sample, b: Sample, min_effect: float | None = None) -> Claim:
    """``a`` is not better than ``b`` by the minimum effect (better: lower for losses, KL and ECE)."""
    return Claim(NO_GAIN, a, b, min_effect=min_effect)


def no_loss(a: Sample, b: Sample, min_effect: float | None = None) -> Claim:
    """``a`` is not worse than ``b`` by the minimum effect."""
    return Claim(NO_LOSS, a, b, min_effect=min_effect)


def above(a: Sample, value: float) -> Claim:
    return Claim(ABOVE, a, value=value)


def below(a: Sample, value: float) -> Claim:
    return Claim(BELOW, a, value=value)


def paired_differences(a: Sample, b: Sample) -> np.ndarray:
    """``a - b`` over shared seeds; for teacher metrics one value per distinct pair of teachers."""
    joined = pd.DataFrame({"a": a.values, "b": b.values}).dropna()
    if a.metric.startswith("teacher_") or b.metric.startswith("teacher_"):
        joined["ta"] = a.teachers.reindex(joined.index)
        joined["tb"] = b.teachers.reindex(joined.index)
        joined = joined.groupby(["ta", "tb"], dropna=False)[["a", "b"]].mean()
    return (joined["a"] - joined["b"]).to_numpy(dtype=float)


def one_sample_values(a: Sample) -> np.ndarray:
    if a.metric.startswith("teacher_") and len(a.teachers):
        return a.values.groupby(a.teachers.reindex(a.values.index)).mean().to_numpy(dtype=float)
    return a.values.to_numpy(dtype=float)


def _t_p(statistic: float, df: int, tail: str) -> float:
    if tail == "two":
        return float(2 * stats.t.sf(abs(statistic), df))
    return float(stats.t.sf(statistic, df)) if tail == "greater" else float(stats.t.cdf(statistic, df))


def _p(mean: float, se: float, df: int, null: float, tail: str) -> float:
    """The t-test p-value of H0: mean == null, with the zero-variance case decided exactly."""
    if se == 0:
        if tail == "two":
            return 1.0 if mean == null else 0.0
        beyond = mean > null if tail == "greater" else mean < null
        return 0.0 if beyond else 1.0
    return _t_p((mean - null) / se, df, tail)


def measure(claim: Claim) -> Claim:
    """The claim's n, mean, interval and raw p-values (Holm and the verdict come in ``decide``)."""
    values = one_sample_values(claim.a) if claim.b is None else paired_differences(claim.a, claim.b)
    values = values[np.isfinite(values)]
    claim.n = len(values)
    if claim.n < 2:
        claim.notes.append(f"{claim.n} paired replicate(s): at least 2 are needed")
        return claim
    df = claim.n - 1
    claim.mean = float(values.mean())
    se = float(values.std(ddof=1) / math.sqrt(claim.n))
    half = float(stats.t.ppf(1 - ALPHA / 2, df) * se)
    claim.low, claim.high = claim.mean - half, claim.mean + half
    if claim.b is None:
        if claim.metric in PERCENT_METRICS:  # a fraction's mean lies in [0, 1]
            claim.low, claim.high = max(claim.low, 0.0), min(claim.high, 1.0)
        return claim
    margin = claim.margin
    claim.p_difference = _p(claim.mean, se, df, 0.0, "two")
    claim.mde = float((stats.t.ppf(1 - ALPHA / 2, df) + stats.t.ppf(POWER, df)) * se)
    better_is_lower = claim.metric in LOWER_IS_BETTER
    if claim.kind in (SAME, HIGHER, LOWER):
        claim.p_equivalence = max(_p(claim.mean, se, df, -margin, "greater"), _p(claim.mean, se, df, margin, "less"))
    elif (claim.kind == NO_GAIN) != better_is_lower:  # a not above b + margin
        claim.p_equivalence = _p(claim.mean, se, df, margin, "less")
    else:  # a not below b - margin
        claim.p_equivalence = _p(claim.mean, se, df, -margin, "greater")
    return claim


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment; NaN p-values are left out of the family and stay NaN."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running, m = 0.0, len(order)
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def decide(claim: Claim) -> str:
    """The verdict of one measured, Holm-adjusted claim."""
    if claim.n < 2:
        return INCONCLUSIVE
    if claim.kind in (ABOVE, BELOW):
        wanted_side = claim.low > claim.value if claim.kind == ABOVE else claim.high < claim.value
        other_side = claim.high <= claim.value if claim.kind == ABOVE else claim.low >= claim.value
        return HOLDS if wanted_side else FAILS if other_side else INCONCLUSIVE
    significant = claim.p_adjusted < ALPHA
    equivalent = claim.p_equivalence < ALPHA
    up = claim.mean > 0
    if claim.kind in (HIGHER, LOWER):
        if equivalent:
            return FAILS
        if significant:
            return HOLDS if up == (claim.kind == HIGHER) else FAILS
        return INCONCLUSIVE
    if equivalent:
        return HOLDS
    if claim.kind == SAME:
        return FAILS if significant else INCONCLUSIVE
    gain_is_up = (claim.kind == NO_GAIN) != (claim.metric in LOWER_IS_BETTER)
    return FAILS if significant and up == gain_is_up else INCONCLUSIVE


def refuse_unconverged(claim: Claim) -> None:
    """A claim does not fail on students that had not converged: it is inconclusive instead."""
    arms = [s for s in (claim.a, claim.b) if s is not None and s.unconverged]
    if claim.verdict == FAILS and arms:
        claim.verdict = INCONCLUSIVE
        claim.refused_failure = True
        claim.notes += ["the numbers alone say does not hold; not failed because students had not converged"]
        claim.notes += [f"{s.label}: {s.unconverged} of {s.trials} students had not converged" for s in arms]


def _number(metric: str, value: float, signed: bool = False) -> str:
    if math.isnan(value):
        return "n/a"
    if metric in PERCENT_METRICS:
        return f"{value * 100:+.2f} pp" if signed else f"{value * 100:.2f}%"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _size(metric: str, value: float) -> str:
    """An unsigned difference: a margin or a detectable effect (percentage points for fractions)."""
    return _number(metric, value, signed=True).lstrip("+")


def describe_sample(s: Sample) -> str:
    values = one_sample_values(s)
    n = len(values)
    mean = float(np.mean(values)) if n else math.nan
    sd = float(np.std(values, ddof=1)) if n > 1 else math.nan
    what = "teachers" if s.metric.startswith("teacher_") else "seeds"
    sd_text = "n/a" if math.isnan(sd) else _number(s.metric, sd).replace("%", " pp")
    return f"{s.label}: {s.metric} {_number(s.metric, mean)} ± {sd_text} (n={n} {what})"


KIND_TEXT = {HIGHER: "higher", LOWER: "lower", SAME: "equal within", NO_GAIN: "no gain beyond",
             NO_LOSS: "no loss beyond", ABOVE: "above", BELOW: "below"}


def describe_claim(claim: Claim) -> str:
    """One line: what was claimed, the numbers, and the verdict they give."""
    m = claim.metric
    if claim.b is None:
        text = (f"{claim.a.label}: {m} {_number(m, claim.mean)} (95% CI {_number(m, claim.low)} to "
                f"{_number(m, claim.high)}, n={claim.n}); claim: {KIND_TEXT[claim.kind]} {_number(m, claim.value)}")
    else:
        claimed = KIND_TEXT[claim.kind]
        if claim.kind in (SAME, NO_GAIN, NO_LOSS):
            claimed += f" ±{_size(m, claim.margin)}"
        text = (f"{claim.a.label} − {claim.b.label}, {m}: {_number(m, claim.mean, True)} (95% CI "
                f"{_number(m, claim.low, True)} to {_number(m, claim.high, True)}, n={claim.n} pairs, "
                f"p={claim.p_difference:.3g}, Holm p={claim.p_adjusted:.3g}, "
                f"equivalence p={claim.p_equivalence:.3g}); claim: {claimed}; "
                f"minimum effect {_size(m, claim.margin)}")
        if claim.verdict == INCONCLUSIVE and not claim.refused_failure and not math.isnan(claim.mde):
            text += f"; detectable at 80% power: {_size(m, claim.mde)}"
    text += f" → **{claim.verdict}**"
    return text + "".join(f" ({note})" for note in claim.notes)


def combine(verdicts: list[str]) -> str:
    if not verdicts:
        return INCONCLUSIVE
    if FAILS in verdicts:
        return FAILS
    if INCONCLUSIVE in verdicts:
        return INCONCLUSIVE
    return HOLDS
