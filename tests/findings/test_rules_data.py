"""Planted-effect tests of the findings on which data the student is distilled on: 2, 3, 4, 5, 6, 9 and 10.

Each finding holds on its studies planted as the paper reports them (every claim true by three minimum
effects or more) and does not hold when one part of it is planted false by as much.
"""

from __future__ import annotations

import pytest
from planted import (
    AUGMENTATION_HOLDS,
    CONVNET_HOLDS,
    DATASET_SIZE_HOLDS,
    EXTRA,
    MNIST1D_100X,
    MNIST_20X,
    SYNTHETIC_DATA_HOLDS,
    changed,
    judged,
    planted_rows,
    small_teacher_arm,
    small_teacher_rows,
    write_planted,
    write_study,
)

from kd_ray import findings

# --- finding 2: a teacher on 200 inputs, distilled on a large in-domain set, agrees >= 99% ----------------


def test_small_teacher_holds_when_the_arm_with_100x_the_teacher_s_inputs_agrees_above_99_percent(tmp_path):
    write_study(tmp_path, "small_teacher", small_teacher_rows([small_teacher_arm(**MNIST1D_100X, agreement=0.995),
                                                               small_teacher_arm(**MNIST_20X, agreement=0.940)]))
    verdict = judged(tmp_path, 2)
    assert verdict.verdict == findings.HOLDS
    (claim,) = verdict.claims
    assert claim.kind == "above" and claim.value == 0.99 and claim.n == 10
    assert claim.a.label.startswith("mnist1d: distilled on ")  # not the 20x mnist arm at 94%


def test_small_teacher_does_not_hold_when_the_100x_arm_agrees_below_99_percent(tmp_path):
    write_study(tmp_path, "small_teacher", small_teacher_rows([small_teacher_arm(**MNIST1D_100X, agreement=0.970),
                                                               small_teacher_arm(**MNIST_20X, agreement=0.940)]))
    assert judged(tmp_path, 2).verdict == findings.FAILS


def test_small_teacher_judges_the_most_inputs_per_teacher_input_not_the_most_inputs(tmp_path):
    # mnist: 60,000 images for a 1,000-image teacher (60x, the most inputs) at 94%; mnist1d: 20,000 for 200 (100x).
    arms = [small_teacher_arm("mnist", inputs=60000, extra=0, agreement=0.940, teacher_train_size=1000),
            small_teacher_arm(**MNIST1D_100X, agreement=0.995)]
    write_study(tmp_path, "small_teacher", small_teacher_rows(arms))
    verdict = judged(tmp_path, 2)
    assert verdict.verdict == findings.HOLDS
    assert verdict.claims[0].a.label.startswith("mnist1d: distilled on ")


def test_small_teacher_arm_at_exactly_50x_the_teacher_s_inputs_is_judged(tmp_path):
    fifty = small_teacher_arm("mnist", inputs=10000, extra=0, agreement=0.970)  # 10,000 / 200
    write_study(tmp_path, "small_teacher", small_teacher_rows([fifty]))
    verdict = judged(tmp_path, 2)
    assert verdict.verdict == findings.FAILS
    assert verdict.claims[0].a.label == "mnist: distilled on 50x the teacher's inputs"


def test_small_teacher_below_50x_the_teacher_s_inputs_is_not_covered_as_not_testable_at_this_scale(tmp_path):
    # The 20x arm agrees 99.5%, but 4,000 images for a 200-image teacher are no large in-domain set.
    write_study(tmp_path, "small_teacher", small_teacher_rows([small_teacher_arm(**MNIST_20X, agreement=0.995)]))
    verdict = judged(tmp_path, 2)
    assert verdict.verdict == findings.NOT_COVERED
    assert verdict.evidence[0].startswith("not testable at this scale: the largest distillation set is 20x the "
                                          "teacher's 200 inputs, below the 50x")


def test_small_teacher_counts_generated_inputs_once(tmp_path):
    # 4,000 signals and 16,000 generated ones for a 200-signal teacher: 100x, distill_size counting the extras.
    write_study(tmp_path, "small_teacher", small_teacher_rows([small_teacher_arm(**MNIST1D_100X, agreement=0.995)]))
    assert judged(tmp_path, 2).claims[0].a.label == "mnist1d: distilled on 100x the teacher's inputs"


def test_small_teacher_arm_at_40x_with_generated_inputs_is_not_testable(tmp_path):
    # 4,000 signals and 4,000 generated ones for a 200-signal teacher: 40x, below 50x (the rule reads 60x).
    arm = small_teacher_arm("mnist1d", inputs=4000, extra=4000, agreement=0.995)
    write_study(tmp_path, "small_teacher", small_teacher_rows([arm]))
    assert judged(tmp_path, 2).verdict == findings.NOT_COVERED


def test_small_teacher_tables_without_the_set_sizes_are_not_covered(tmp_path):
    rows = small_teacher_rows([small_teacher_arm(**MNIST1D_100X, agreement=0.995)])
    write_study(tmp_path, "small_teacher", rows, without=("distill_size", "teacher_train_size"))
    verdict = judged(tmp_path, 2)
    assert verdict.verdict == findings.NOT_COVERED
    assert "do not record the distillation and teacher set sizes" in verdict.evidence[0]


def test_small_teacher_rows_whose_set_sizes_are_empty_are_not_covered_rather_than_a_crash(tmp_path):
    # Rows from before the sizes were recorded, in a table that has their columns: empty cells.
    rows = small_teacher_rows([small_teacher_arm(**MNIST1D_100X, agreement=0.995)])
    rows = [{k: v for k, v in r.items() if k not in ("distill_size", "teacher_train_size")} for r in rows]
    write_study(tmp_path, "small_teacher", rows)
    verdict = judged(tmp_path, 2)
    assert verdict.verdict == findings.NOT_COVERED


# --- finding 3: more in-domain distillation inputs raise test agreement -----------------------------------


def write_dataset_size(root, arms=DATASET_SIZE_HOLDS, synthetic=SYNTHETIC_DATA_HOLDS) -> None:
    write_planted(root, dataset_size=arms, synthetic_data=synthetic)


def test_more_data_holds_when_every_split_and_the_synthetic_samples_raise_agreement(tmp_path):
    write_dataset_size(tmp_path)
    verdict = judged(tmp_path, 3)
    assert verdict.verdict == findings.HOLDS
    assert [c.kind for c in verdict.claims] == ["higher"] * 5
    assert [c.a.label for c in verdict.claims] == [
        f"{split}, all + {EXTRA} extra" for split in ("train", "holdout", "both")
    ] + ["m=1, 16000 synthetic at 1:4", "m=3, 16000 synthetic at 1:4"]
    assert all(c.n == 10 for c in verdict.claims)


def test_more_data_does_not_hold_when_less_data_gives_higher_agreement_in_one_split(tmp_path):
    # Holdout: all of it plus extras at 83.5%, a quarter of it at 85%: the wrong way by 1.5 pp.
    arms = changed(DATASET_SIZE_HOLDS, {"distill_split": "holdout", "distill_fraction": 1.0, "extra_data": EXTRA},
                   test_agreement=0.835)
    write_dataset_size(tmp_path, arms)
    verdict = judged(tmp_path, 3)
    assert verdict.verdict == findings.FAILS
    assert [c.verdict for c in verdict.claims] == [findings.HOLDS, findings.FAILS] + [findings.HOLDS] * 3
    assert verdict.claims[1].mean == pytest.approx(-0.015)


def test_more_data_pairs_each_split_over_the_seeds_both_its_arms_share(tmp_path):
    rows = planted_rows("dataset_size", DATASET_SIZE_HOLDS)
    rows = [r for r in rows if not (r["distill_split"] == "train" and r["distill_fraction"] == 0.25 and r["seed"] >= 7)]
    write_study(tmp_path, "dataset_size", rows)
    write_study(tmp_path, "synthetic_data", planted_rows("synthetic_data", SYNTHETIC_DATA_HOLDS))
    verdict = judged(tmp_path, 3)
    assert verdict.verdict == findings.HOLDS
    assert [c.n for c in verdict.claims] == [7, 10, 10, 10, 10]
    assert "n=7 pairs" in verdict.evidence[0]


# --- finding 4: inputs beyond the teacher's training set lower train agreement, test agreement not lower ---


def write_outside_inputs(root, arms=DATASET_SIZE_HOLDS, policies=AUGMENTATION_HOLDS) -> None:
    write_planted(root, dataset_size=arms, augmentation_ablation=policies)


def test_outside_inputs_hold_when_train_agreement_drops_and_test_agreement_rises(tmp_path):
    write_outside_inputs(tmp_path)
    verdict = judged(tmp_path, 4)
    assert verdict.verdict == findings.HOLDS
    assert [(c.kind, c.metric) for c in verdict.claims] == [("lower", "train_agreement"),
                                                            ("no_loss", "test_agreement")] * 2
    assert verdict.claims[2].a.label == "combaug1d, tau=4" and verdict.claims[2].b.label == "baseline, tau=4"


def test_outside_inputs_hold_when_test_agreement_stays_flat(tmp_path):
    write_outside_inputs(tmp_path, policies=changed(AUGMENTATION_HOLDS, {"augmentation": "combaug1d"},
                                                    test_agreement=0.850))
    verdict = judged(tmp_path, 4)
    assert verdict.verdict == findings.HOLDS
    assert verdict.claims[3].mean == pytest.approx(0.0, abs=1e-12)


def test_outside_inputs_do_not_hold_when_the_combined_augmentation_lowers_test_agreement(tmp_path):
    write_outside_inputs(tmp_path, policies=changed(AUGMENTATION_HOLDS, {"augmentation": "combaug1d"},
                                                    test_agreement=0.835))
    verdict = judged(tmp_path, 4)
    assert verdict.verdict == findings.FAILS
    assert [c.verdict for c in verdict.claims] == [findings.HOLDS] * 3 + [findings.FAILS]


def test_outside_inputs_do_not_hold_when_extra_samples_raise_train_agreement(tmp_path):
    arms = changed(DATASET_SIZE_HOLDS, {"distill_split": "train", "distill_fraction": 1.0, "extra_data": EXTRA},
                   train_agreement=0.915)
    write_outside_inputs(tmp_path, arms)
    verdict = judged(tmp_path, 4)
    assert verdict.verdict == findings.FAILS
    assert verdict.claims[0].verdict == findings.FAILS


@pytest.mark.parametrize("number", [4, 6])
def test_dataset_size_without_extra_samples_does_not_fail_a_finding_on_extra_samples(tmp_path, number):
    arms = [(config, levels) for config, levels in DATASET_SIZE_HOLDS if config["extra_data"] == 0]
    write_outside_inputs(tmp_path, arms)
    assert judged(tmp_path, number).verdict != findings.FAILS


# --- finding 5: heavier augmentation lowers agreement on the augmented distillation data ------------------


def write_augmentation(root, policies=AUGMENTATION_HOLDS, convnet=CONVNET_HOLDS) -> None:
    write_planted(root, augmentation_ablation=policies, augmentation_convnet=convnet)


def test_heavy_augmentation_holds_when_each_heavy_policy_lowers_augmented_agreement_on_both_networks(tmp_path):
    write_augmentation(tmp_path)
    verdict = judged(tmp_path, 5)
    assert verdict.verdict == findings.HOLDS
    assert [c.a.label for c in verdict.claims] == ["combaug1d, tau=4", "mixup, tau=4", "combaug, tau=4 (smallcnn)",
                                                   "mixup, tau=4 (smallcnn)"]
    assert all(c.kind == "lower" and c.metric == "aug_train_agreement" and c.n == 10 for c in verdict.claims)


def test_heavy_augmentation_does_not_hold_when_mixup_raises_augmented_agreement_on_the_convnet(tmp_path):
    write_augmentation(tmp_path, convnet=changed(CONVNET_HOLDS, {"augmentation": "mixup"}, aug_train_agreement=0.965))
    verdict = judged(tmp_path, 5)
    assert verdict.verdict == findings.FAILS
    assert [c.verdict for c in verdict.claims] == [findings.HOLDS] * 3 + [findings.FAILS]


def test_heavy_augmentation_leaves_out_a_policy_a_study_did_not_run(tmp_path):
    convnet = [(config, levels) for config, levels in CONVNET_HOLDS if config["augmentation"] != "mixup"]
    write_augmentation(tmp_path, convnet=convnet)
    verdict = judged(tmp_path, 5)
    assert verdict.verdict == findings.HOLDS
    assert len(verdict.claims) == 3


# --- finding 6: a self-distilled student can beat an overfitting teacher; extra data pulls it back -------


def teacher_train_acc(arms, level: float):
    return [(config, {**levels, "teacher_train_acc": level}) for config, levels in arms]


def test_self_distillation_holds_when_the_student_beats_its_overfitting_teacher(tmp_path):
    write_study(tmp_path, "dataset_size", planted_rows("dataset_size", DATASET_SIZE_HOLDS))
    verdict = judged(tmp_path, 6)
    assert verdict.verdict == findings.HOLDS
    precondition, *claims = verdict.claims
    assert precondition.role == findings.PRECONDITION and precondition.verdict == findings.HOLDS
    assert precondition.mean == pytest.approx(0.20, abs=0.01)  # teacher 100% on its training inputs, 80% on test
    assert [c.kind for c in claims] == ["higher", "lower", "higher"]


def test_self_distillation_does_not_hold_when_the_student_stays_below_its_overfitting_teacher(tmp_path):
    arms = changed(DATASET_SIZE_HOLDS, {"distill_split": "train", "distill_fraction": 1.0, "extra_data": 0},
                   test_acc=0.785)  # its teacher: 80%
    write_study(tmp_path, "dataset_size", planted_rows("dataset_size", arms))
    verdict = judged(tmp_path, 6)
    assert verdict.verdict == findings.FAILS
    assert [c.verdict for c in verdict.claims] == [findings.HOLDS, findings.FAILS, findings.HOLDS, findings.HOLDS]


@pytest.mark.parametrize("student_acc, claim_verdict", [(0.820, findings.HOLDS), (0.785, findings.FAILS)])
def test_self_distillation_without_an_overfitting_teacher_is_inconclusive_whichever_way_the_claims_point(
        tmp_path, student_acc, claim_verdict):
    # The teacher: 81% on its training inputs, 80% on test, 1 pp apart (not the 5 pp of a teacher that overfits).
    arms = changed(DATASET_SIZE_HOLDS, {"distill_split": "train", "distill_fraction": 1.0, "extra_data": 0},
                   test_acc=student_acc)
    write_study(tmp_path, "dataset_size", planted_rows("dataset_size", teacher_train_acc(arms, 0.81)))
    verdict = judged(tmp_path, 6)
    assert verdict.verdict == findings.INCONCLUSIVE
    assert verdict.claims[0].verdict == findings.FAILS
    assert verdict.claims[1].verdict == claim_verdict  # the claim's own numbers, shown
    assert "not judged: the setting the finding presumes is not met" in verdict.evidence


def test_self_distillation_without_the_teacher_s_train_accuracy_is_inconclusive(tmp_path):
    rows = planted_rows("dataset_size", DATASET_SIZE_HOLDS)
    write_study(tmp_path, "dataset_size", rows, without=("teacher_train_acc",))
    verdict = judged(tmp_path, 6)
    assert verdict.verdict == findings.INCONCLUSIVE
    assert verdict.claims[0].n == 0
    assert "not judged: the setting the finding presumes is not shown" in verdict.evidence


# --- finding 9: D0 gives higher accuracy but lower agreement than D1; D0 u D1 is best on both ------------


def test_own_half_holds_when_d0_is_more_accurate_d1_more_faithful_and_both_best(tmp_path):
    write_study(tmp_path, "dataset_size", planted_rows("dataset_size", DATASET_SIZE_HOLDS))
    verdict = judged(tmp_path, 9)
    assert verdict.verdict == findings.HOLDS
    assert [(c.a.label, c.b.label, c.kind) for c in verdict.claims] == [
        ("train", "holdout", "higher"), ("train", "holdout", "lower"), ("both", "train", "higher"),
        ("both", "holdout", "higher"), ("both", "train", "higher"), ("both", "holdout", "higher")]


@pytest.mark.parametrize("split, levels, failing", [
    ("both", dict(test_agreement=0.855), 5),  # D0 u D1 1.5 pp below D1's agreement: not best on both
    ("train", dict(test_agreement=0.885), 1),  # D0 1.5 pp above D1's agreement
    ("holdout", dict(test_acc=0.835), 0),  # D1 1.5 pp above D0's accuracy
])
def test_own_half_does_not_hold_when_one_comparison_is_planted_the_wrong_way(tmp_path, split, levels, failing):
    arms = changed(DATASET_SIZE_HOLDS, {"distill_split": split, "distill_fraction": 1.0, "extra_data": 0}, **levels)
    write_study(tmp_path, "dataset_size", planted_rows("dataset_size", arms))
    verdict = judged(tmp_path, 9)
    assert verdict.verdict == findings.FAILS
    assert verdict.claims[failing].verdict == findings.FAILS


# --- finding 10: noise or out-of-domain inputs do not help accuracy or agreement ------------------------


def test_noise_and_outside_inputs_hold_when_neither_gains_accuracy_or_agreement(tmp_path):
    write_study(tmp_path, "augmentation_ablation", planted_rows("augmentation_ablation", AUGMENTATION_HOLDS))
    verdict = judged(tmp_path, 10)
    assert verdict.verdict == findings.HOLDS
    assert [c.kind for c in verdict.claims] == ["no_gain"] * 4
    assert all(c.n == 10 for c in verdict.claims)


@pytest.mark.parametrize("where, failing", [({"augmentation": "noise"}, 0), ({"extra_source": "ood"}, 2)])
def test_noise_and_outside_inputs_do_not_hold_when_one_raises_accuracy(tmp_path, where, failing):
    policies = changed(AUGMENTATION_HOLDS, where, test_acc=0.795)  # baseline: 78%
    write_study(tmp_path, "augmentation_ablation", planted_rows("augmentation_ablation", policies))
    verdict = judged(tmp_path, 10)
    assert verdict.verdict == findings.FAILS
    assert verdict.claims[failing].metric == "test_acc" and verdict.claims[failing].verdict == findings.FAILS
