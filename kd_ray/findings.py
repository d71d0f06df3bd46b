"""The paper's findings as rules over trial tables: holds, does not hold, or inconclusive.

Each rule compares arms of a study by the 95% confidence interval of a metric's mean over seeds
(t-distribution, ``analysis.mean_ci``):
- "A is higher than B" when A's interval lies wholly above B's; "lower" likewise; otherwise the
  intervals overlap and the comparison is inconclusive.
- A finding that claims a difference holds when the difference is there in the claimed direction,
  does not hold when it is there in the other direction, and is inconclusive when intervals overlap.
- A finding that claims *no* difference ("does not help", "does not change") holds when the
  intervals overlap or the claimed-absent gain is absent, and does not hold when the gain is there.
A finding with several parts holds only if every part holds; it does not hold if any part does not.
Like ``analysis``, this module needs neither torch nor Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from kd_ray import analysis

HOLDS, FAILS, INCONCLUSIVE, NOT_COVERED = "holds", "does not hold", "inconclusive", "not covered"


@dataclass
class Arm:
    label: str
    metric: str
    n: int
    mean: float
    sd: float
    low: float
    high: float

    def text(self) -> str:
        scale = 100 if self.metric in analysis.FRACTION_METRICS else 1
        unit = "%" if scale == 100 else ""
        return (f"{self.label}: {self.metric} {self.mean * scale:.2f}{unit} ± {self.sd * scale:.2f} "
                f"(n={self.n}, 95% CI {self.low * scale:.2f}–{self.high * scale:.2f})")


def arm(trials: pd.DataFrame, metric: str, label: str, **where) -> Arm:
    rows = trials[trials["usable"]]
    for column, value in where.items():
        rows = rows[rows[column] == value] if not isinstance(value, float) else rows[(rows[column] - value).abs() < 1e-9]
    n, mean, sd, low, high = analysis.mean_ci(rows[metric])
    return Arm(label, metric, n, mean, sd, low, high)


def compare(a: Arm, b: Arm) -> str:
    """'higher', 'lower' or 'overlap' for a against b by their confidence intervals."""
    if a.n < 2 or b.n < 2 or any(math.isnan(v) for v in (a.low, a.high, b.low, b.high)):
        return "overlap"
    if a.low > b.high:
        return "higher"
    if a.high < b.low:
        return "lower"
    return "overlap"


def claim_difference(a: Arm, b: Arm, expected: str) -> str:
    found = compare(a, b)
    return HOLDS if found == expected else INCONCLUSIVE if found == "overlap" else FAILS


def claim_no_gain(a: Arm, b: Arm) -> str:
    """Holds unless a is clearly higher than b."""
    return FAILS if compare(a, b) == "higher" else HOLDS


def combine(parts: list[str]) -> str:
    if FAILS in parts:
        return FAILS
    if INCONCLUSIVE in parts:
        return INCONCLUSIVE
    return HOLDS


@dataclass
class Verdict:
    verdict: str
    evidence: list[str] = field(default_factory=list)


@dataclass
class Finding:
    number: int
    claim: str
    study: str | None  # None: no study covers it
    setting: str
    rule: str
    evaluate: Callable[[pd.DataFrame], Verdict] | None = None
    figure: str | None = None
    why_not_covered: str = ""


# --- the rules ----------------------------------------------------------------------------------


def _f1(t: pd.DataFrame) -> Verdict:
    student = arm(t, "test_agreement", "m=1, tau=4", teacher_members=1, temperature=4.0)
    teacher = arm(t, "teacher_test_acc", "teacher", teacher_members=1, temperature=4.0)
    if student.n < 2:
        return Verdict(INCONCLUSIVE, [student.text()])
    verdict = HOLDS if student.high < 0.99 and teacher.mean < 0.95 else FAILS if student.low >= 0.99 else INCONCLUSIVE
    return Verdict(verdict, [teacher.text(), student.text()])


def _f2(t: pd.DataFrame) -> Verdict:
    extra = int(t.loc[t["usable"], "extra_data"].max())
    most = arm(t, "test_agreement", f"all train data + {extra} generated", distill_split="both", extra_data=extra)
    own = arm(t, "test_agreement", "the teacher's own examples only", distill_split="train", extra_data=0)
    teacher = arm(t, "teacher_test_acc", "teacher", distill_split="both", extra_data=extra)
    verdict = HOLDS if most.low >= 0.99 else FAILS if most.high < 0.99 else INCONCLUSIVE
    return Verdict(verdict, [teacher.text(), own.text(), most.text()])


def _f3(t: pd.DataFrame) -> Verdict:
    parts, evidence = [], []
    for split in ("train", "holdout", "both"):
        more = arm(t, "test_agreement", f"{split}, fraction 1, +8000", distill_split=split, distill_fraction=1.0, extra_data=8000)
        less = arm(t, "test_agreement", f"{split}, fraction 0.25, +0", distill_split=split, distill_fraction=0.25, extra_data=0)
        parts.append(claim_difference(more, less, "higher"))
        evidence += [more.text(), less.text()]
    return Verdict(combine(parts), evidence)


def _f4(t: pd.DataFrame) -> Verdict:
    base = dict(distill_split="train", distill_fraction=1.0)
    with_extra = arm(t, "train_agreement", "D0 + 8000 extra", **base, extra_data=8000)
    without = arm(t, "train_agreement", "D0 only", **base, extra_data=0)
    test_extra = arm(t, "test_agreement", "D0 + 8000 extra", **base, extra_data=8000)
    test_without = arm(t, "test_agreement", "D0 only", **base, extra_data=0)
    train_part = claim_difference(with_extra, without, "lower")
    test_part = FAILS if compare(test_extra, test_without) == "lower" else HOLDS
    return Verdict(combine([train_part, test_part]), [with_extra.text(), without.text(), test_extra.text(), test_without.text()])


def _f5(t: pd.DataFrame) -> Verdict:
    parts, evidence = [], []
    baseline = arm(t, "aug_train_agreement", "baseline, tau=4", augmentation="baseline", temperature=4.0)
    evidence.append(baseline.text())
    for policy in ("rotation", "combaug"):
        heavy = arm(t, "aug_train_agreement", f"{policy}, tau=4", augmentation=policy, temperature=4.0)
        if heavy.n:
            parts.append(claim_difference(heavy, baseline, "lower"))
            evidence.append(heavy.text())
    return Verdict(combine(parts) if parts else INCONCLUSIVE, evidence)


def _f6(t: pd.DataFrame) -> Verdict:
    base = dict(distill_split="train", distill_fraction=1.0)
    student = arm(t, "test_acc", "student, D0 only", **base, extra_data=0)
    teacher = arm(t, "teacher_test_acc", "teacher", **base, extra_data=0)
    agreement_extra = arm(t, "test_agreement", "D0 + 8000 extra", **base, extra_data=8000)
    agreement = arm(t, "test_agreement", "D0 only", **base, extra_data=0)
    exceeds = HOLDS if student.mean > teacher.mean and compare(student, teacher) != "lower" else FAILS
    raises = claim_difference(agreement_extra, agreement, "higher")
    return Verdict(combine([exceeds, raises]), [student.text(), teacher.text(), agreement_extra.text(), agreement.text()])


def _f7(t: pd.DataFrame) -> Verdict:
    sizes = sorted(t.loc[t["usable"], "teacher_members"].dropna().unique())
    small, large = int(sizes[0]), int(sizes[-1])
    parts, evidence = [], []
    for metric in ("teacher_test_acc", "test_agreement", "test_acc"):
        a = arm(t, metric, f"m={large}", teacher_members=large)
        b = arm(t, metric, f"m={small}", teacher_members=small)
        parts.append(claim_difference(a, b, "higher"))
        evidence += [a.text(), b.text()]
    return Verdict(combine(parts), evidence)


def _f8(t: pd.DataFrame) -> Verdict:
    m = int(t.loc[t["usable"], "teacher_members"].max())
    arms = {tau: arm(t, "test_agreement", f"m={m}, tau={tau:g}", teacher_members=m, temperature=tau) for tau in (1.0, 4.0, 8.0, 16.0)}
    higher = claim_difference(arms[4.0], arms[1.0], "higher")
    similar = HOLDS if compare(arms[8.0], arms[4.0]) == "overlap" and compare(arms[16.0], arms[4.0]) == "overlap" else FAILS
    return Verdict(combine([higher, similar]), [a.text() for a in arms.values()])


def _f9(t: pd.DataFrame) -> Verdict:
    arms = {}
    for split in ("train", "holdout", "both"):
        for metric in ("test_acc", "test_agreement"):
            arms[split, metric] = arm(t, metric, f"{split}", distill_split=split, distill_fraction=1.0, extra_data=0)
    parts = [
        claim_difference(arms["train", "test_acc"], arms["holdout", "test_acc"], "higher"),
        claim_difference(arms["train", "test_agreement"], arms["holdout", "test_agreement"], "lower"),
        FAILS if any(compare(arms["both", m], arms[s, m]) == "lower" for s in ("train", "holdout") for m in ("test_acc", "test_agreement")) else HOLDS,
    ]
    return Verdict(combine(parts), [a.text() for a in arms.values()])


def _f10(t: pd.DataFrame) -> Verdict:
    parts, evidence = [], []
    for metric in ("test_acc", "test_agreement"):
        noise = arm(t, metric, "noise, tau=4", augmentation="noise", temperature=4.0)
        baseline = arm(t, metric, "baseline, tau=4", augmentation="baseline", temperature=4.0)
        parts.append(claim_no_gain(noise, baseline))
        evidence += [noise.text(), baseline.text()]
    return Verdict(combine(parts), evidence)


def _f11(t: pd.DataFrame) -> Verdict:
    epochs = sorted(t.loc[t["usable"], "epochs"].dropna().unique())
    short, long = int(epochs[0]), int(epochs[-1])
    sgd_long = arm(t, "train_agreement", f"sgd, {long} epochs", optimizer="sgd", epochs=long)
    sgd_short = arm(t, "train_agreement", f"sgd, {short} epochs", optimizer="sgd", epochs=short)
    adam_long = arm(t, "train_agreement", f"adam, {long} epochs", optimizer="adam", epochs=long)
    longer = claim_difference(sgd_long, sgd_short, "higher")
    adam = claim_no_gain(adam_long, sgd_long)
    return Verdict(combine([longer, adam]), [sgd_short.text(), sgd_long.text(), adam_long.text()])


def _f12(t: pd.DataFrame) -> Verdict:
    lambdas = sorted(t.loc[t["usable"] & (t["init"] == "interpolate"), "init_lambda"].dropna().unique())
    arms = [arm(t, "test_agreement", f"lambda={lam:g}", init="interpolate", init_lambda=float(lam)) for lam in lambdas]
    random_init = arm(t, "test_agreement", "random init", init="random")
    if len(arms) < 3:
        return Verdict(INCONCLUSIVE, [random_init.text()])
    means = [a.mean for a in arms]
    rise = means[-1] - means[0]
    jump = max(b - a for a, b in zip(means, means[1:]))
    parts = [
        HOLDS if compare(arms[0], random_init) == "overlap" else FAILS,
        HOLDS if arms[-1].low >= 0.99 else FAILS,
        HOLDS if rise > 0 and jump >= 0.5 * rise else FAILS,
    ]
    return Verdict(combine(parts), [random_init.text()] + [a.text() for a in arms])


def _f13(t: pd.DataFrame) -> Verdict:
    teacher_init = arm(t, "test_agreement", "teacher's initial weights", init="teacher_init")
    random_init = arm(t, "test_agreement", "random init", init="random")
    return Verdict(HOLDS if compare(teacher_init, random_init) == "overlap" else FAILS, [teacher_init.text(), random_init.text()])


def _f14(t: pd.DataFrame) -> Verdict:
    alphas = sorted(t.loc[t["usable"], "alpha"].dropna().unique())
    zero = arm(t, "test_agreement", "alpha=0", alpha=0.0)
    others = [arm(t, "test_agreement", f"alpha={a:g}", alpha=float(a)) for a in alphas if a > 0]
    return Verdict(combine([claim_no_gain(o, zero) for o in others]), [zero.text()] + [o.text() for o in others])


def _f15(t: pd.DataFrame) -> Verdict:
    real = arm(t, "test_agreement", "student of the reference teacher, alpha=0", alpha=0.0)
    control = arm(t, "control_test_agreement", "student of an independent teacher, alpha=0", alpha=0.0)
    if control.n == 0:
        return Verdict(INCONCLUSIVE, [real.text()])
    ratio = control.mean / real.mean
    verdict = HOLDS if ratio >= 0.9 else FAILS
    return Verdict(verdict, [real.text(), control.text(), f"control / real agreement = {ratio:.3f} (rule: >= 0.9)"])


def _f17(t: pd.DataFrame) -> Verdict:
    usable = t[t["usable"]]
    means = usable.groupby(["teacher_members", "temperature"])[["test_agreement", "test_ece", "test_acc"]].mean()
    most_faithful = means["test_agreement"].idxmax()
    best_calibrated = means["test_ece"].idxmin()
    most_accurate = means["test_acc"].idxmax()
    faithful = arm(usable, "test_ece", f"most faithful arm m={most_faithful[0]}, tau={most_faithful[1]:g}",
                   teacher_members=most_faithful[0], temperature=float(most_faithful[1]))
    calibrated = arm(usable, "test_ece", f"best calibrated arm m={best_calibrated[0]}, tau={best_calibrated[1]:g}",
                     teacher_members=best_calibrated[0], temperature=float(best_calibrated[1]))
    verdict = HOLDS if most_faithful == best_calibrated or compare(faithful, calibrated) == "overlap" else FAILS
    return Verdict(verdict, [faithful.text(), calibrated.text(), f"most accurate arm: m={most_accurate[0]}, tau={most_accurate[1]:g}"])


FINDINGS = [
    Finding(1, "Same-architecture student, alpha 0, distilled on the teacher's training data: test agreement clearly below 100% when teacher accuracy is well below 100%.",
            "temperature_sweep", "m = 1, tau = 4", "holds if the agreement CI lies below 99% and teacher accuracy is below 95%", _f1, "members_x_temperature.png"),
    Finding(2, "A teacher trained on very few examples, distilled on a large in-domain set: test agreement >= 99%.",
            "small_teacher", "teacher on a stratified 5% of mnist1d's train set (200 signals); student on all 4000 + 8000 generated",
            "holds if the agreement CI lies at or above 99%, does not hold if it lies below", _f2, "arms.png"),
    Finding(3, "More in-domain distillation inputs raise test agreement.",
            "dataset_size", "each split: fraction 1 + 8000 generated samples vs fraction 0.25", "holds if more data is higher for every split", _f3, "arms.png"),
    Finding(4, "Inputs beyond the teacher's training set lower train agreement while test agreement stays flat or rises.",
            "dataset_size", "teacher on D0; student on D0 with and without 8000 extra samples", "train agreement lower with extra data, test agreement not lower", _f4, "arms.png"),
    Finding(5, "Heavier augmentation gives lower train agreement on the augmented distillation data.",
            "augmentation_ablation", "digits, tau = 4: rotation and combaug vs baseline", "aug-train agreement lower than baseline for each heavy policy", _f5, "arms.png"),
    Finding(6, "Self-distillation on the teacher's training data: the student's accuracy can exceed the teacher's; adding non-training data raises agreement.",
            "dataset_size", "teacher on D0; student on D0, with and without 8000 extra samples", "student accuracy above the teacher's and agreement higher with extra data", _f6, "test_acc_vs_test_agreement.png"),
    Finding(7, "Larger ensembles: teacher accuracy up, test agreement up, student accuracy up.",
            "ensemble_size", "smallest vs largest m, tau = 1", "all three higher for the largest m", _f7, "arms.png"),
    Finding(8, "For a confident teacher, tau = 4 gives higher test agreement than tau = 1; tau in {4, 8, 16} similar.",
            "temperature_sweep", "largest m", "tau 4 above tau 1, and 8 and 16 overlapping 4", _f8, "members_x_temperature.png"),
    Finding(9, "Distilling on D0 gives higher accuracy but lower agreement than D1; D0 u D1 is best on both.",
            "dataset_size", "teacher on D0, fraction 1, no extra data", "D0 acc above D1, D0 agreement below D1, both never below either", _f9, "arms.png"),
    Finding(10, "Noise inputs do not help accuracy or agreement.",
            "augmentation_ablation", "digits, tau = 4: noise vs baseline", "noise not higher than baseline on either", _f10, "arms.png"),
    Finding(11, "Longer training slightly raises train agreement; Adam is not better than SGD.",
            "training_duration", "layer norm, self-distillation, shortest vs longest run", "SGD longest above shortest; Adam not above SGD at the longest", _f11, "agreement_over_epochs.png"),
    Finding(12, "Initialising the student near the teacher shows a sharp threshold in lambda.",
            "initialization", "layer norm, interpolation lambda sweep", "lambda 0 overlaps random init, lambda 1 >= 99%, the largest adjacent jump is at least half the rise", _f12, "init_lambda.png"),
    Finding(13, "Starting from the teacher's initial weights does not change final agreement.",
            "initialization", "teacher_init vs random", "CIs overlap", _f13, "arms.png"),
    Finding(14, "For m > 1, raising alpha does not raise agreement.",
            "alpha_sweep", "m = 3, tau = 1", "no alpha > 0 above alpha 0", _f14, "arms.png"),
    Finding(15, "A student distilled from an independent teacher agrees with the reference teacher almost as well as the real student.",
            "alpha_sweep", "m = 3, tau = 1, alpha 0, independent ensemble of other member seeds", "control agreement at least 90% of the real student's", _f15, "arms.png"),
    Finding(16, "A deeper or wider student raises agreement only a little.",
            None, "", "", why_not_covered="no local study varies the student's depth or width"),
    Finding(17, "The most faithful student in an ensemble-distillation sweep is the best calibrated, not necessarily the most accurate.",
            "temperature_sweep", "m x tau grid", "the most faithful arm's ECE overlaps the lowest ECE", _f17, "members_x_temperature.png"),
]


def evaluate(storage: str | Path) -> list[tuple[Finding, Verdict]]:
    """Apply every rule to the study tables under ``storage``."""
    storage = Path(storage)
    out = []
    for finding in FINDINGS:
        if finding.study is None or finding.evaluate is None:
            out.append((finding, Verdict(NOT_COVERED, [finding.why_not_covered])))
            continue
        path = storage / finding.study
        if not (path / "trials.parquet").exists():
            out.append((finding, Verdict(NOT_COVERED, [f"{path} has no trials.parquet"])))
            continue
        trials = analysis.load_trials(path)
        out.append((finding, finding.evaluate(trials)))
    return out
