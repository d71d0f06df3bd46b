"""Hand-built studies for the analysis tests: an augmentation grid with failed trials and epochs,
an ensemble-size x temperature grid, an init_lambda sweep with epochs, and a searched study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from handmade import augmentation_rows, epoch_rows, trial_row, write_study


@pytest.fixture()
def aug_study(tmp_path: Path) -> Path:
    rows = augmentation_rows()
    return write_study(tmp_path, "aug", rows, epoch_rows(rows))


@pytest.fixture()
def mtau_study(tmp_path: Path) -> Path:
    rows = []
    for m in (1, 3, 5):
        for tau in (1.0, 4.0):
            for seed in (0, 1):
                agreement = 0.7 + 0.03 * m + (0.04 if tau > 1 else 0) + 0.005 * seed
                metrics = {
                    "test_agreement": agreement,
                    "test_acc": 0.6 + 0.01 * m,
                    "train_agreement": agreement + 0.1,
                }
                trial_id = f"m{m}-t{tau:g}-{seed}"
                config = {"teacher_members": m, "temperature": tau, "seed": seed}
                rows.append(trial_row("mtau", trial_id, **config, **metrics))
    return write_study(tmp_path, "mtau", rows)


@pytest.fixture()
def lambda_study(tmp_path: Path) -> Path:
    rows, epochs = [], []
    for lam in (0.0, 0.25, 0.375, 0.5, 1.0):
        for seed in (0, 1):
            agreement = 0.79 if lam < 0.375 else 0.99
            trial_id = f"l{lam:g}-{seed}"
            metrics = {
                "test_agreement": agreement - 0.01 * seed,
                "train_agreement": agreement,
                "test_acc": 0.7,
                "test_nll": 1.0,
            }
            config = {"init": "interpolate", "init_lambda": lam, "seed": seed}
            rows.append(trial_row("lambda", trial_id, **config, **metrics))
            for epoch in (10, 20):
                epochs.append(
                    {
                        "study": "lambda",
                        "trial_id": trial_id,
                        "epoch": epoch,
                        "lr": 0.01,
                        "train_loss": 0.5 - lam / 4 + 0.1 * (epoch == 10),
                        "test_agreement": agreement,
                        "train_agreement": agreement,
                    }
                )
    return write_study(tmp_path, "lambda", rows, epochs)


@pytest.fixture()
def optuna_study(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    rows = []
    for i in range(30):
        lr = float(10 ** rng.uniform(-3, -1))
        tau = float(rng.uniform(1, 8))
        metrics = {"test_agreement": float(rng.uniform(0.7, 0.9)), "test_acc": float(rng.uniform(0.6, 0.75))}
        config = {"lr": lr, "temperature": tau, "optuna_trial_number": i}
        rows.append(trial_row("search", f"t{i:02d}", **config, **metrics))
    return write_study(tmp_path, "search", rows)
