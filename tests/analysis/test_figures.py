"""Figures: the PNGs each kind of study supports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from handmade import assert_png, trial_row, write_study

from kd_ray import analysis


def test_figures_are_valid_pngs(
    aug_study: Path, mtau_study: Path, lambda_study: Path, optuna_study: Path, tmp_path: Path
) -> None:
    scatters = {"test_acc_vs_test_agreement", "test_nll_vs_test_kl", "test_ece_vs_test_agreement"}
    cases = {
        aug_study: scatters | {"arms", "agreement_over_epochs"},
        mtau_study: {"test_acc_vs_test_agreement", "arms", "members_x_temperature"},
        lambda_study: {"test_acc_vs_test_agreement", "arms", "agreement_over_epochs", "init_lambda"},
        optuna_study: {"test_acc_vs_test_agreement", "pareto_front"},
    }
    for study, expected in cases.items():
        out = tmp_path / "figures" / study.name
        paths = analysis.figures(analysis.load_trials(study), analysis.load_epochs(study), out)
        assert {p.stem for p in paths} == expected
        for path in paths:
            assert_png(path)
        # Written through a temporary file and a rename: nothing else is left beside the figures.
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)


def test_two_factor_bars_and_explicit_objectives(aug_study: Path, mtau_study: Path, tmp_path: Path) -> None:
    df = analysis.load_trials([aug_study, mtau_study])
    objectives = {"test_agreement": "max", "test_kl": "min"}
    paths = analysis.figures(df, None, tmp_path / "f", by=["study", "temperature"], objectives=objectives)
    assert {"arms", "pareto_front"} <= {p.stem for p in paths}
    for path in paths:
        assert_png(path)


def test_figures_of_thousands_of_trials(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3000):
        augmentation = ("baseline", "mixup", "noise")[i % 3]
        agreement = float(rng.normal(0.85, 0.02))
        rows.append(trial_row("big", f"t{i}", augmentation=augmentation, seed=i, test_agreement=agreement,
                              test_acc=agreement - 0.05 + float(rng.normal(0, 0.01)),
                              test_kl=float(rng.uniform(0.2, 0.4)), test_nll=float(rng.uniform(0.8, 1.0))))
    study = write_study(tmp_path, "big", rows)
    paths = analysis.figures(analysis.load_trials(study), None, tmp_path / "f")
    assert {"test_acc_vs_test_agreement", "test_nll_vs_test_kl", "arms"} <= {p.stem for p in paths}
    for path in paths:
        assert_png(path)
