"""Paired tests behind the findings' verdicts, each decided against a minimum effect in both directions.

A claim compares two arms of one study on one metric. Arms of a study share their seeds, and a seed
names a replicate (its data stream, its student init and, by default, its own teacher), so the
comparison is *paired*: the differences ``a - b`` over shared seeds, their mean and 90% t-interval
(the interval whose bounds are the one-sided tests at ALPHA = 0.05). Statistics of teacher metrics
count distinct teachers, not seeds.

Every claim states its minimum effect Δ (``MIN_EFFECT``, or relative to the reference arm's level for
KL and NLL, ``RELATIVE_MIN_EFFECT``, or a finding's own with its reason) and has two sets of one-sided
t-tests (``claim_tests``): those that can make it hold and those that can make it fail.

    claim            holds when shown              does not hold when shown
    higher (raises)  d > 0                         d < Δ (too small, or the wrong way)
    lower            d < 0                         d > -Δ
    same             -Δ < d < Δ (TOST)             d > Δ, or d < -Δ
    no gain          gain < Δ                      gain > Δ
    no loss          loss < Δ                      loss > Δ
    above v          mean > v                      mean < v
    below v          mean < v                      mean > v

(gain: ``d``, or ``-d`` for metrics where lower is better.) Multiplicity is handled per finding, the
same way for every test that can decide its verdict: the finding holds only when every claim holds,
each at ALPHA (an intersection–union test, which needs no adjustment), and a claim does not hold when
one of its failing tests is significant after Holm's correction over all failing tests of the
finding. A claim shown both ways (a significant rise smaller than Δ) does not hold. A finding's
preconditions (``role="precondition"``: the setting the paper's wording presumes) are their own
family; unless every one holds the finding is inconclusive, whichever way its claims point. The
rules' operating characteristics are measured by simulation in tests/findings/test_operating.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
HOLDS, FAILS, INCONCLUSIVE, NOT_COVERED = "holds", "does not hold", "inconclusive", "not covered"
CLAIM, PRECONDITION = "claim", "precondition"
MAX_SEEDS = 200  # the largest replicate count an inconclusive claim's "seeds to decide" looks for

AGREEMENT_WHY = (
    "a twentieth of the local disagreement (about 10 pp at 90% agreement): the paper reads 1.5 pp of its "
    "15.5 pp disagreement (MixUp over baseline) as an effect and 0.07 pp (teacher init) as none"
)
# The smallest difference a claim about each metric counts as an effect (fractions: 0.005 = 0.5 pp).
MIN_EFFECT = {
    "test_agreement": 0.005,
    "train_agreement": 0.005,
    "aug_train_agreement": 0.005,
    "control_test_agreement": 0.005,
    "val_agreement": 0.005,
    "test_acc": 0.005,
    "val_acc": 0.005,
    "teacher_test_acc": 0.005,
    "test_ece": 0.005,
}
MIN_EFFECT_WHY = {
    **{metric: AGREEMENT_WHY for metric in MIN_EFFECT if "agreement" in metric},
    "test_acc": "accuracy sits on agreement's scale locally (about 80%), so the same half point",
    "val_acc": "accuracy sits on agreement's scale locally (about 80%), so the same half point",
    "teacher_test_acc": "accuracy sits on agreement's scale locally (about 80%), so the same half point",
    "test_ece": "half a point of calibration error, against local levels of 2 to 6 pp",
}
# KL and NLL have no natural unit: their minimum effect is a fraction of the reference arm's mean. Locally
# test KL is 0.02 to 0.06; the paper reads 0.836 vs 0.838 (0.2%) as no change and 0.217 vs 0.157 (28%) as
# a gain, and a tenth lies between them.
RELATIVE_MIN_EFFECT = {"test_kl": 0.1, "train_kl": 0.1, "val_kl": 0.1, "test_nll": 0.05, "val_nll": 0.05}
PERCENT_METRICS = set(MIN_EFFECT) | {"teacher_train_acc", "teacher_test_confidence", "acc_gap_to_teacher",
                                     "teacher_overfit"}
LOWER_IS_BETTER = {"test_ece", "test_kl", "train_kl", "val_kl", "test_nll", "val_nll", "teacher_test_ece",
                   "teacher_test_nll"}

HIGHER, LOWER, SAME, NO_GAIN, NO_LOSS, ABOVE, BELOW = "higher", "lower", "same", "no_gain", "no_loss", "above", "below"
GREATER, LESS = "greater", "less"  # a one-sided test's alternative: the mean is greater (less) than its null


@dataclass
class Sample:
    """One arm's metric, a value per seed (the mean of that seed's rows)."""

    label: str
    metric: str
    values: pd.Series  # index: seed
    teachers: pd.Series  # index: seed; the teacher_key of that seed's rows
    moving: int = 0  # students whose train agreement still moved by the convergence rule's amount
    trials: int = 0
    convergence_delta: float = math.nan  # the arm's mean change of train agreement over the second half


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
    moving = int(rows["converged"].eq(False).sum()) if "converged" in rows else 0
    has_delta = "convergence_delta" in rows and len(rows)
    delta = float(rows["convergence_delta"].astype(float).mean()) if has_delta else math.nan
    return Sample(label, metric, values, teachers, moving, len(rows), delta)


def per_seed(label: str, metric: str, values: pd.Series) -> Sample:
    """A sample derived per seed (a share, a rank, a level at a seed's own threshold)."""
    values = values.astype(float).dropna()
    return Sample(label, metric, values, pd.Series(dtype=object), trials=len(values))


@dataclass
class Claim:
    """One statistical claim of a finding: ``kind`` of ``a`` against ``b`` (or against ``value``)."""

    kind: str
    a: Sample
    b: Sample | None = None
    value: float | None = None
    min_effect: float | None = None
    why: str = ""  # why this minimum effect (a finding's own); the metric's reason otherwise
    role: str = CLAIM
    # Filled by measure():
    n: int = 0
    mean: float = math.nan  # mean paired difference a - b (threshold claims: the mean of a)
    sd: float = math.nan
    low: float = math.nan  # its 90% t-interval
    high: float = math.nan
    margin: float = math.nan  # the minimum effect in the metric's units
    p_holds: float = math.nan  # the largest p of the tests that make it hold (all must be significant)
    p_fails: list[float] = field(default_factory=list)  # each failing test's raw p
    p_fails_adjusted: list[float] = field(default_factory=list)  # after Holm over the finding's failing tests
    family_failing_tests: int = 1  # how many failing tests share the Holm family with this claim's
    verdict: str = INCONCLUSIVE
    notes: list[str] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.a.metric

    @property
    def margin_why(self) -> str:
        if self.why:
            return self.why
        if self.metric in RELATIVE_MIN_EFFECT:
            return f"{RELATIVE_MIN_EFFECT[self.metric]:.0%} of the reference arm's level"
        return MIN_EFFECT_WHY.get(self.metric, "")


def higher(a: Sample, b: Sample, min_effect: float | None = None, why: str = "") -> Claim:
    """``a`` raises the metric over ``b``, by at least the minimum effect."""
    return Claim(HIGHER, a, b, min_effect=min_effect, why=why)


def lower(a: Sample, b: Sample, min_effect: float | None = None, why: str = "") -> Claim:
    return Claim(LOWER, a, b, min_effect=min_effect, why=why)


def same(a: Sample, b: Sample, min_effect: float | None = None, why: str = "") -> Claim:
    return Claim(SAME, a, b, min_effect=min_effect, why=why)


def no_gain(a: Sample, b: Sample, min_effect: float | None = None, why: str = "") -> Claim:
    """``a`` is not better than ``b`` by the minimum effect (better: lower for losses, KL and ECE)."""
    return Claim(NO_GAIN, a, b, min_effect=min_effect, why=why)


def no_loss(a: Sample, b: Sample, min_effect: float | None = None, why: str = "") -> Claim:
    """``a`` is not worse than ``b`` by the minimum effect."""
    return Claim(NO_LOSS, a, b, min_effect=min_effect, why=why)


def above(a: Sample, value: float, role: str = CLAIM) -> Claim:
    return Claim(ABOVE, a, value=value, role=role)


def below(a: Sample, value: float, role: str = CLAIM) -> Claim:
    return Claim(BELOW, a, value=value, role=role)


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


def claim_margin(claim: Claim) -> float:
    """Δ in the metric's units: the claim's own, a fraction of the reference arm's level, or the metric's."""
    if claim.min_effect is not None:
        return float(claim.min_effect)
    if claim.metric in RELATIVE_MIN_EFFECT and claim.b is not None:
        level = abs(float(claim.b.values.mean())) if len(claim.b.values) else math.nan
        return RELATIVE_MIN_EFFECT[claim.metric] * level
    return MIN_EFFECT.get(claim.metric, 0.005)


def claim_tests(claim: Claim) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
    """``(holding tests, failing tests)``, each a list of ``(null value, alternative)`` on the mean."""
    delta = claim.margin
    gain = -1.0 if claim.metric in LOWER_IS_BETTER else 1.0  # the sign of a gain in d = a - b
    up, down = (GREATER, LESS) if gain > 0 else (LESS, GREATER)
    return {
        HIGHER: ([(0.0, GREATER)], [(delta, LESS)]),
        LOWER: ([(0.0, LESS)], [(-delta, GREATER)]),
        SAME: ([(-delta, GREATER), (delta, LESS)], [(delta, GREATER), (-delta, LESS)]),
        NO_GAIN: ([(gain * delta, down)], [(gain * delta, up)]),
        NO_LOSS: ([(-gain * delta, up)], [(-gain * delta, down)]),
        ABOVE: ([(claim.value, GREATER)], [(claim.value, LESS)]),
        BELOW: ([(claim.value, LESS)], [(claim.value, GREATER)]),
    }[claim.kind]


def one_sided_p(mean: float, se: float, df: int, null: float, alternative: str) -> float:
    """The t-test p-value of H0 against ``mean`` being ``alternative`` than ``null``; se = 0 decided exactly."""
    if se == 0:
        beyond = mean > null if alternative == GREATER else mean < null
        return 0.0 if beyond else 1.0
    statistic = (mean - null) / se
    return float(stats.t.sf(statistic, df) if alternative == GREATER else stats.t.cdf(statistic, df))


def measure(claim: Claim) -> Claim:
    """The claim's n, mean, interval, margin and the raw p-values of its holding and failing tests."""
    values = one_sample_values(claim.a) if claim.b is None else paired_differences(claim.a, claim.b)
    values = values[np.isfinite(values)]
    claim.n = len(values)
    claim.margin = claim_margin(claim) if claim.b is not None else math.nan
    if claim.n < 2:
        claim.notes.append(f"{claim.n} paired replicate(s): at least 2 are needed")
        return claim
    df = claim.n - 1
    claim.mean = float(values.mean())
    claim.sd = float(values.std(ddof=1))
    se = claim.sd / math.sqrt(claim.n)
    half = float(stats.t.ppf(1 - ALPHA, df) * se)
    claim.low, claim.high = claim.mean - half, claim.mean + half
    if claim.b is None and claim.metric in PERCENT_METRICS:  # a fraction's mean lies in [0, 1]
        claim.low, claim.high = max(claim.low, 0.0), min(claim.high, 1.0)
    holding, failing = claim_tests(claim)
    claim.p_holds = max(one_sided_p(claim.mean, se, df, null, alt) for null, alt in holding)
    claim.p_fails = [one_sided_p(claim.mean, se, df, null, alt) for null, alt in failing]
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


def adjust_failing_tests(family: list[Claim]) -> None:
    """Holm over every failing test of the family's measured claims."""
    measured = [c for c in family if c.n >= 2]
    adjusted = holm([p for c in measured for p in c.p_fails])
    for claim in measured:
        claim.p_fails_adjusted, adjusted = adjusted[:len(claim.p_fails)], adjusted[len(claim.p_fails):]


def decide(claim: Claim) -> str:
    """The verdict of one measured claim whose failing tests are adjusted."""
    if claim.n < 2:
        return INCONCLUSIVE
    if any(p < ALPHA for p in claim.p_fails_adjusted):
        return FAILS
    return HOLDS if claim.p_holds < ALPHA else INCONCLUSIVE


def seeds_to_decide(claim: Claim) -> int | None:
    """The replicates at which the observed mean and sd would decide the claim (None: not within MAX_SEEDS).

    A failing test is taken at ALPHA over the family's failing tests, Holm's threshold for its smallest p.
    """
    if claim.n < 2 or claim.sd == 0 or math.isnan(claim.sd):
        return None
    holding, failing = claim_tests(claim)
    for n in range(claim.n + 1, MAX_SEEDS + 1):
        se, df = claim.sd / math.sqrt(n), n - 1
        if max(one_sided_p(claim.mean, se, df, null, alt) for null, alt in holding) < ALPHA:
            return n
        threshold = ALPHA / claim.family_failing_tests
        if min(one_sided_p(claim.mean, se, df, null, alt) for null, alt in failing) < threshold:
            return n
    return None


def judge_family(family: list[Claim]) -> str:
    """Measure, adjust and decide one family of claims; its combined verdict."""
    for claim in family:
        measure(claim)
    adjust_failing_tests(family)
    failing_tests = max(1, sum(len(c.p_fails) for c in family if c.n >= 2))
    for claim in family:
        claim.verdict = decide(claim)
        claim.family_failing_tests = failing_tests
    return combine([c.verdict for c in family])


def judge_finding(claims: list[Claim]) -> tuple[str, str]:
    """``(verdict, note)`` of one finding: its preconditions and its claims, each judged as a family."""
    preconditions = [c for c in claims if c.role == PRECONDITION]
    claims = [c for c in claims if c.role != PRECONDITION]
    setting = judge_family(preconditions) if preconditions else HOLDS
    verdict = judge_family(claims) if claims else INCONCLUSIVE
    if setting != HOLDS:
        shown = "not met" if setting == FAILS else "not shown"
        return INCONCLUSIVE, f"not judged: the setting the finding presumes is {shown}"
    return verdict, ""


def combine(verdicts: list[str]) -> str:
    if not verdicts:
        return INCONCLUSIVE
    if FAILS in verdicts:
        return FAILS
    if INCONCLUSIVE in verdicts:
        return INCONCLUSIVE
    return HOLDS


def _number(metric: str, value: float, signed: bool = False) -> str:
    if math.isnan(value):
        return "n/a"
    if metric in PERCENT_METRICS:
        return f"{value * 100:+.2f} pp" if signed else f"{value * 100:.2f}%"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _size(metric: str, value: float) -> str:
    """An unsigned difference: a margin (percentage points for fractions)."""
    return _number(metric, value, signed=True).lstrip("+")


def describe_sample(s: Sample) -> str:
    """The arm's mean ± sd, and how much its students still moved (context, never a verdict)."""
    values = one_sample_values(s)
    n = len(values)
    mean = float(np.mean(values)) if n else math.nan
    sd = float(np.std(values, ddof=1)) if n > 1 else math.nan
    what = "teachers" if s.metric.startswith("teacher_") else "seeds"
    sd_text = "n/a" if math.isnan(sd) else _number(s.metric, sd).replace("%", " pp")
    text = f"{s.label}: {s.metric} {_number(s.metric, mean)} ± {sd_text} (n={n} {what})"
    if not math.isnan(s.convergence_delta):
        text += (f"; train agreement moved {s.convergence_delta * 100:+.2f} pp over the second half of training "
                 f"({s.moving} of {s.trials} students by 2 pp or more)")
    return text


KIND_TEXT = {HIGHER: "higher", LOWER: "lower", SAME: "equal within", NO_GAIN: "no gain beyond",
             NO_LOSS: "no loss beyond", ABOVE: "above", BELOW: "below"}


def _p_text(claim: Claim) -> str:
    fails = ", ".join(f"{p:.3g} (Holm {q:.3g})" for p, q in zip(claim.p_fails, claim.p_fails_adjusted))
    return f"p(holds)={claim.p_holds:.3g}, p(does not hold)={fails or 'n/a'}"


def describe_claim(claim: Claim) -> str:
    """One line: what was claimed, the numbers, and the verdict they give."""
    m = claim.metric
    role = "precondition: " if claim.role == PRECONDITION else ""
    if claim.b is None:
        text = (f"{role}{claim.a.label}: {m} {_number(m, claim.mean)} (90% CI {_number(m, claim.low)} to "
                f"{_number(m, claim.high)}, n={claim.n}, {_p_text(claim)}); claim: {KIND_TEXT[claim.kind]} "
                f"{_number(m, claim.value)}")
    else:
        claimed = KIND_TEXT[claim.kind]
        if claim.kind in (SAME, NO_GAIN, NO_LOSS):
            claimed += f" ±{_size(m, claim.margin)}"
        text = (f"{role}{claim.a.label} − {claim.b.label}, {m}: {_number(m, claim.mean, True)} (90% CI "
                f"{_number(m, claim.low, True)} to {_number(m, claim.high, True)}, n={claim.n} pairs, "
                f"{_p_text(claim)}); claim: {claimed}; minimum effect {_size(m, claim.margin)}")
        if claim.margin_why:
            text += f" ({claim.margin_why})"
    if claim.verdict == INCONCLUSIVE and claim.n >= 2:
        needed = seeds_to_decide(claim)
        text += (f"; at this mean and noise {needed} replicates would decide it" if needed
                 else f"; at this mean and noise {MAX_SEEDS} replicates would not decide it")
    text += f" → **{claim.verdict}**"
    return text + "".join(f" ({note})" for note in claim.notes)
