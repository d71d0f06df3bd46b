"""The findings' rules on planted trial tables: each rule decides by the paper's wording.

Here: every finding holds on studies planted as the paper reports them, whatever the convergence flags say,
and the earlier rule tests. Each finding's own planted-effect tests are in test_rules_data.py (2, 3, 4, 5, 6,
9, 10), test_rules_sweeps.py (1, 7, 8, 14, 15, 17) and test_rules_training.py (11, 12, 13); 16's are here.
"""

from __future__ import annotations

import numpy as np
import pytest
from planted import (
    augmentation_rows,
    capacity_rows,
    initialization_arms,
    judged,
    planted_rows,
    row,
    write_every_study,
    write_study,
)

from kd_ray import analysis, findings

STUDIES = ("temperature_sweep", "small_teacher", "dataset_size", "synthetic_data", "augmentation_ablation",
           "augmentation_convnet", "ensemble_size", "training_duration", "initialization", "alpha_sweep",
           "student_capacity")


def test_every_finding_holds_on_studies_planted_as_the_paper_reports_them(tmp_path):
    write_every_study(tmp_path)
    verdicts = {f.number: v.verdict for f, v in findings.judge_findings(tmp_path)}
    assert verdicts == {number: findings.HOLDS for number in range(1, 18)}
    for study in STUDIES:  # most students flagged unconverged, as the local 60-epoch students are
        trials = analysis.load_trials(tmp_path / study, verbose=False)
        assert trials["convergence_delta"].notna().all()
        assert 0 < trials["converged"].astype(bool).sum() < (~trials["converged"].astype(bool)).sum()


@pytest.mark.parametrize("converged", [True, False])
def test_no_verdict_depends_on_the_convergence_flags(tmp_path, converged):
    write_every_study(tmp_path / "mixed")
    write_every_study(tmp_path / "flagged", converged=converged)

    def outcome(root):
        return {f.number: (v.verdict, [(c.verdict, c.n, c.mean) for c in v.claims])
                for f, v in findings.judge_findings(root)}

    assert outcome(tmp_path / "flagged") == outcome(tmp_path / "mixed")


def test_a_finding_planted_false_does_not_hold_with_every_student_unconverged(tmp_path):
    # Teacher init 1.5 pp above random init (finding 13), every student's train agreement still moving 10 pp.
    rows = planted_rows("initialization", initialization_arms(teacher_init_agreement=0.815))
    write_study(tmp_path, "initialization", [{**r, "converged": False, "convergence_delta": 0.10} for r in rows])
    verdict = judged(tmp_path, 13)
    assert verdict.verdict == findings.FAILS
    assert "10 of 10 students by 2 pp or more" in " ".join(verdict.arms)


def test_ensemble_rule_on_a_planted_study(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for m, level in ((1, 0.80), (8, 0.90)):
        for seed in range(6):
            rows.append(row("ensemble_size", seed, teacher_members=m, temperature=1.0,
                            test_agreement=level + rng.normal(0, 0.003), test_acc=level - 0.1 + rng.normal(0, 0.003),
                            teacher_test_acc=level - 0.05 + rng.normal(0, 0.003)))
    rows.append({"study": "ensemble_size", "trial_id": "bad", "status": "DIVERGED", "teacher_members": 8,
                 "temperature": 1.0, "seed": 9, "test_agreement": 0.0, "test_acc": 0.0})
    write_study(tmp_path, "ensemble_size", rows)
    verdicts = {f.number: v for f, v in findings.judge_findings(tmp_path)}
    assert verdicts[7].verdict == findings.HOLDS
    assert all("n=6 pairs" in line for line in verdicts[7].evidence)  # the diverged row is left out
    assert verdicts[2].verdict == findings.NOT_COVERED
    assert verdicts[3].verdict == findings.NOT_COVERED  # dataset_size was not run


def test_ensemble_rule_with_one_teacher_for_every_seed_is_inconclusive(tmp_path):
    rows = []
    for m, level in ((1, 0.80), (8, 0.90)):
        for seed in range(6):
            rows.append(row("ensemble_size", seed, teacher_members=m, temperature=1.0, teacher_key=f"fixed-{m}",
                            test_agreement=level + seed * 1e-3, test_acc=level + seed * 1e-3,
                            teacher_test_acc=level))
    write_study(tmp_path, "ensemble_size", rows)
    verdict = judged(tmp_path, 7)
    teacher_claim = verdict.claims[0]
    assert teacher_claim.metric == "teacher_test_acc" and teacher_claim.n == 1
    assert verdict.verdict == findings.INCONCLUSIVE


def test_teacher_init_rule_is_an_equivalence_test(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for seed in range(10):
        base = 0.8 + rng.normal(0, 0.03)
        for init, shift in (("random", 0.0), ("teacher_init", 0.034)):  # +3.4 pp: not "no change"
            rows.append(row("initialization", seed, init=init, init_lambda=0.0, test_agreement=base + shift +
                            rng.normal(0, 0.004), test_kl=0.3 + rng.normal(0, 0.001)))
    write_study(tmp_path, "initialization", rows)
    verdict = judged(tmp_path, 13)
    assert verdict.verdict == findings.FAILS
    assert "+3." in verdict.evidence[0]


def test_capacity_rule_holds_when_the_largest_student_gains_a_little(tmp_path):
    write_study(tmp_path, "student_capacity", capacity_rows(largest_gain=0.01))
    verdict = judged(tmp_path, 16)
    assert verdict.verdict == findings.HOLDS
    no_loss, no_gain = verdict.claims
    assert (no_loss.kind, no_gain.kind) == ("no_loss", "no_gain") and no_gain.margin == 0.03
    assert no_loss.a.label == "mlp4-w2 from mlp" and no_loss.b.label == "mlp from mlp"
    assert no_loss.n == 6 and abs(no_loss.mean - 0.01) < 0.005
    assert "no gain beyond ±3.00 pp" in verdict.evidence[1]


def test_capacity_rule_says_why_its_no_gain_margin_is_3_pp(tmp_path):
    write_study(tmp_path, "student_capacity", capacity_rows(largest_gain=0.01))
    line = judged(tmp_path, 16).evidence[1]
    assert "minimum effect 3.00 pp" in line and "a twentieth of the local disagreement" not in line


def test_capacity_rule_fails_when_the_largest_student_gains_a_lot(tmp_path):
    write_study(tmp_path, "student_capacity", capacity_rows(largest_gain=0.08))
    verdict = judged(tmp_path, 16)
    assert verdict.verdict == findings.FAILS
    assert [c.verdict for c in verdict.claims] == [findings.HOLDS, findings.FAILS]  # not lower, but +8 pp


def test_capacity_rule_pairs_each_teacher_with_its_largest_student(tmp_path):
    rows = []
    for seed in range(4):
        for teacher, students in (("preresnet20", ("preresnet20", "preresnet56")),
                                  ("preresnet56", ("preresnet56", "preresnet110"))):
            for student in students:
                rows.append(row("student_capacity", seed, teacher_arch=teacher, student_arch=student,
                                test_agreement=0.8 + 0.001 * seed + 0.005 * (student != teacher)))
    write_study(tmp_path, "student_capacity", rows)
    verdict = judged(tmp_path, 16)
    assert [(c.a.label, c.b.label) for c in verdict.claims[::2]] == [
        ("preresnet56 from preresnet20", "preresnet20 from preresnet20"),
        ("preresnet110 from preresnet56", "preresnet56 from preresnet56"),
    ]
    assert all(c.n == 4 for c in verdict.claims)


def test_every_finding_is_numbered_once_and_names_its_rule():
    numbers = [f.number for f in findings.FINDINGS]
    assert numbers == list(range(1, 18))
    for finding in findings.FINDINGS:
        if finding.rule is not None:
            assert finding.studies and finding.rule_text
            assert not finding.rule.__name__.startswith("_")


def test_out_of_domain_inputs_are_judged_against_baseline_without_extras(tmp_path):
    write_study(tmp_path, "augmentation_ablation", augmentation_rows(ood_gain=-0.005))
    verdict = judged(tmp_path, 10)
    assert verdict.verdict == findings.HOLDS
    labels = [c.a.label for c in verdict.claims]
    assert labels == ["noise, tau=4", "noise, tau=4", "baseline + ood inputs at 1:4, tau=4",
                      "baseline + ood inputs at 1:4, tau=4"]
    assert all(c.b.label == "baseline, tau=4" and c.n == 8 for c in verdict.claims)  # OOD trials are not baseline's

    write_study(tmp_path, "augmentation_ablation", augmentation_rows(ood_gain=0.03))
    verdict = judged(tmp_path, 10)
    assert verdict.verdict == findings.FAILS  # out-of-domain inputs that help contradict the finding


def test_more_data_includes_the_synthetic_samples_at_each_ensemble_size(tmp_path):
    rng = np.random.default_rng(5)
    sizes, synthetic = [], []
    for seed in range(6):
        for split in ("train", "holdout", "both"):
            for fraction, extra, level in ((1.0, 8000, 0.88), (0.25, 0, 0.85)):
                sizes.append(row("dataset_size", seed, distill_split=split, distill_fraction=fraction,
                                 extra_data=extra, test_agreement=level + rng.normal(0, 0.002)))
        for m in (1, 3):
            for extra, level in ((0, 0.86), (1000, 0.86), (16000, 0.86)):
                synthetic.append(row("synthetic_data", seed, teacher_members=m, extra_data=extra,
                                     test_agreement=level + rng.normal(0, 0.002)))
    write_study(tmp_path, "dataset_size", sizes)
    write_study(tmp_path, "synthetic_data", synthetic)
    verdict = judged(tmp_path, 3)
    assert [c.a.label for c in verdict.claims[3:]] == ["m=1, 16000 synthetic at 1:4", "m=3, 16000 synthetic at 1:4"]
    assert [c.verdict for c in verdict.claims[:3]] == [findings.HOLDS] * 3
    assert verdict.claims[3].verdict != findings.HOLDS and verdict.verdict != findings.HOLDS  # no gain: not "raises"


def test_teacher_init_rule_reports_cka_per_stage_beside_its_claims(tmp_path):
    rng = np.random.default_rng(6)
    rows = []
    for seed in range(6):
        for init, cka in (("random", 0.8), ("teacher_init", 0.9)):
            rows.append(row("initialization", seed, init=init, init_lambda=0.0,
                            test_agreement=0.8 + rng.normal(0, 0.002), test_kl=0.3 + rng.normal(0, 0.001),
                            cka_stage1=cka, cka_stage2=cka - 0.1))
    write_study(tmp_path, "initialization", rows)
    verdict = judged(tmp_path, 13)
    assert verdict.verdict == findings.HOLDS  # CKA is shown, not judged
    assert ("linear CKA with the teacher per stage (cka_stage1, cka_stage2): random init 0.800 / 0.700, "
            "teacher's initial weights 0.900 / 0.800") in verdict.evidence[0]


def alpha_rows(dataset: str, real: float, control: float, seeds: int = 8) -> list[dict]:
    rng = np.random.default_rng(5)
    return [row("alpha_sweep", seed, dataset=dataset, alpha=0.0, test_agreement=real + rng.normal(0, 0.002),
                control_test_agreement=control + rng.normal(0, 0.002)) for seed in range(seeds)]


@pytest.mark.parametrize("dataset, verdict", [("cifar100", "HOLDS"), ("cifar10", "FAILS")])
def test_the_control_share_is_measured_above_the_dataset_s_own_chance(tmp_path, dataset, verdict):
    # control 0.24 of real 0.40: above chance 1/100 that is 0.23 / 0.39 = 0.59 of the real student's
    # agreement (more than half); above chance 1/10 it is 0.14 / 0.30 = 0.47 (less than half).
    write_study(tmp_path, "alpha_sweep", alpha_rows(dataset, real=0.40, control=0.24))
    verdicts = dict((f.number, v) for f, v in findings.judge_findings(tmp_path))
    assert verdicts[15].verdict == getattr(findings, verdict)
