"""The paper's findings as claims over trial tables, judged by paired tests with stated power.

    from kd_ray import findings
    for finding, verdict in findings.judge_findings("results/reproduction"):
        print(finding.number, verdict.verdict)

Every claim of every finding is measured first; Holm's correction then runs across all difference
tests of the whole set, and only then is each claim decided (see ``_claims`` for the rules). Like
``kd_ray.analysis``, this package needs neither torch nor Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kd_ray import analysis
from kd_ray.findings._claims import (
    ALPHA,
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    MIN_EFFECT,
    NOT_COVERED,
    PERCENT_METRICS,
    POWER,
    Claim,
    Sample,
    above,
    below,
    combine,
    decide,
    describe_claim,
    describe_sample,
    higher,
    holm,
    lower,
    measure,
    no_gain,
    no_loss,
    paired_differences,
    refuse_unconverged,
    same,
    sample,
)
from kd_ray.findings._rules import FINDINGS, Finding

__all__ = [
    "ALPHA", "FAILS", "FINDINGS", "HOLDS", "INCONCLUSIVE", "MIN_EFFECT", "NOT_COVERED", "PERCENT_METRICS", "POWER",
    "Claim", "Finding", "Sample", "Verdict",
    "above", "below", "describe_claim", "describe_sample", "higher", "holm", "judge_claims", "judge_findings",
    "lower", "no_gain", "no_loss", "paired_differences", "same", "sample",
]


@dataclass
class Verdict:
    verdict: str
    evidence: list[str] = field(default_factory=list)  # one line per claim, numbers and verdict
    claims: list[Claim] = field(default_factory=list)
    arms: list[str] = field(default_factory=list)  # each arm's mean ± sd, as measured


def judge_claims(claims: list[Claim]) -> list[Claim]:
    """Measure every claim, adjust the difference tests together (Holm), then decide each."""
    for claim in claims:
        measure(claim)
    for claim, adjusted in zip(claims, holm([c.p_difference for c in claims])):
        claim.p_adjusted = adjusted
    for claim in claims:
        claim.verdict = decide(claim)
        refuse_unconverged(claim)
    return claims


def load_study_tables(storage: Path, studies: tuple[str, ...]) -> dict[str, pd.DataFrame] | str:
    """The trials of each study, or the reason one is missing."""
    tables = {}
    for study in studies:
        path = storage / study
        if not (path / analysis.TRIALS_FILE).exists():
            return f"{path} has no {analysis.TRIALS_FILE}"
        tables[study] = analysis.load_trials(path)
    return tables


def judge_findings(storage: str | Path) -> list[tuple[Finding, Verdict]]:
    """Apply every finding's rule to the study tables under ``storage``."""
    storage = Path(storage)
    pending: list[tuple[Finding, list[Claim] | None, str]] = []
    for finding in FINDINGS:
        if not finding.studies or finding.rule is None:
            pending.append((finding, None, finding.why_not_covered))
            continue
        tables = load_study_tables(storage, finding.studies)
        if isinstance(tables, str):
            pending.append((finding, None, tables))
            continue
        pending.append((finding, finding.rule(tables), ""))
    judge_claims([c for _, claims, _ in pending if claims for c in claims])
    out = []
    for finding, claims, reason in pending:
        if claims is None:
            out.append((finding, Verdict(NOT_COVERED, [reason])))
            continue
        arms = []
        for claim in claims:
            arms += [describe_sample(s) for s in (claim.a, claim.b) if s is not None]
        verdict = combine([c.verdict for c in claims]) if claims else INCONCLUSIVE
        out.append((finding, Verdict(verdict, [describe_claim(c) for c in claims], claims, list(dict.fromkeys(arms)))))
    return out
