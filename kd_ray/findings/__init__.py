"""The paper's findings as claims over trial tables, each decided by paired tests against its minimum effect.

    from kd_ray import findings
    for finding, verdict in findings.judge_findings("results/reproduction"):
        print(finding.number, verdict.verdict)

Each finding is judged on its own: its claims form one family (every claim must hold; Holm's correction
over the tests that can fail it), its preconditions another (see ``_claims`` for the rules), so no
finding's verdict depends on which other studies exist. Like ``kd_ray.analysis``, this package needs
neither torch nor Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kd_ray import analysis
from kd_ray.findings._claims import (
    ABOVE,
    ALPHA,
    BELOW,
    CLAIM,
    FAILS,
    HIGHER,
    HOLDS,
    INCONCLUSIVE,
    LOWER,
    MIN_EFFECT,
    MIN_EFFECT_WHY,
    NO_GAIN,
    NO_LOSS,
    NOT_COVERED,
    PERCENT_METRICS,
    PRECONDITION,
    RELATIVE_MIN_EFFECT,
    SAME,
    Claim,
    Sample,
    above,
    below,
    describe_claim,
    describe_sample,
    higher,
    holm,
    judge_finding,
    lower,
    no_gain,
    no_loss,
    paired_differences,
    per_seed,
    same,
    sample,
    seeds_to_decide,
)
from kd_ray.findings._operating import NOISY, REALISTIC_NOISE, REPORTED_CASES, Case, verdict_rates
from kd_ray.findings._rules import FINDINGS, Finding

__all__ = [
    "ABOVE", "ALPHA", "BELOW", "CLAIM", "FAILS", "FINDINGS", "HIGHER", "HOLDS", "INCONCLUSIVE", "LOWER", "MIN_EFFECT",
    "MIN_EFFECT_WHY", "NOISY", "NOT_COVERED", "NO_GAIN", "NO_LOSS", "PERCENT_METRICS", "PRECONDITION",
    "REALISTIC_NOISE", "RELATIVE_MIN_EFFECT", "REPORTED_CASES", "SAME", "Case", "Claim", "Finding", "Sample",
    "Verdict", "above", "below", "describe_claim", "describe_sample", "higher", "holm", "judge_claims",
    "judge_finding", "judge_findings", "lower", "no_gain", "no_loss", "paired_differences", "per_seed", "same",
    "sample", "seeds_to_decide", "verdict_rates",
]


@dataclass
class Verdict:
    verdict: str
    evidence: list[str] = field(default_factory=list)  # one line per claim, numbers and verdict
    claims: list[Claim] = field(default_factory=list)
    arms: list[str] = field(default_factory=list)  # each arm's mean ± sd, as measured


def judge_claims(claims: list[Claim]) -> list[Claim]:
    """Judge ``claims`` as the claims (and preconditions) of one finding; each claim gets its verdict."""
    judge_finding(claims)
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


def judge_rule(finding: Finding, storage: Path) -> Verdict:
    """One finding's verdict: its rule's claims over its studies' tables, judged as one family."""
    if not finding.studies or finding.rule is None:
        return Verdict(NOT_COVERED, [finding.why_not_covered])
    tables = load_study_tables(storage, finding.studies)
    if isinstance(tables, str):
        return Verdict(NOT_COVERED, [tables])
    claims = finding.rule(tables)
    if isinstance(claims, str):  # the tables cannot test the finding at this scale, and say why
        return Verdict(NOT_COVERED, [claims])
    verdict, note = judge_finding(claims)
    arms = [describe_sample(s) for claim in claims for s in (claim.a, claim.b) if s is not None]
    evidence = [describe_claim(c) for c in claims] + ([note] if note else [])
    return Verdict(verdict, evidence, claims, list(dict.fromkeys(arms)))


def judge_findings(storage: str | Path) -> list[tuple[Finding, Verdict]]:
    """Apply every finding's rule to the study tables under ``storage``; each finding is its own family."""
    return [(finding, judge_rule(finding, Path(storage))) for finding in FINDINGS]
