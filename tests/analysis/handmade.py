"""Hand-built trial and epoch tables for the analysis tests, written to a temporary directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kd_ray import analysis

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AUGMENTATIONS = ("baseline", "mixup", "combaug")
# Per arm: (mean agreement, mean accuracy). Across arms accuracy falls as agreement rises, within an
# arm it rises with agreement: the overall and within-arm correlations have opposite signs.
ARM_CENTRES = {"baseline": (0.80, 0.74), "mixup": (0.86, 0.70), "combaug": (0.92, 0.66)}
SEEDS = (0, 1, 2, 3)

CONFIG_DEFAULTS: dict[str, Any] = {
    "dataset": "mnist1d",
    "teacher_split": "full",
    "distill_split": "train",
    "distill_fraction": 1.0,
    "extra_data": 0,
    "data_seed": 0,
    "teacher_arch": "conv1d",
    "teacher_members": 3,
    "teacher_epochs": 30,
    "teacher_lr": 0.05,
    "teacher_seed": 0,
    "norm": "batch",
    "student_arch": "conv1d",
    "temperature": 4.0,
    "alpha": 0.0,
    "augmentation": "baseline",
    "mixup_alpha": 1.0,
    "epochs": 20,
    "batch_size": 128,
    "optimizer": "sgd",
    "lr": 0.05,
    "weight_decay": 1e-4,
    "lr_schedule": "cosine",
    "init": "random",
    "init_lambda": 0.0,
    "control": False,
    "seed": 0,
    "eval_every": 5,
    "device": "auto",
    "compile": False,
}


def trial_row(study: str, trial_id: str, status: str = "TERMINATED", **values: Any) -> dict[str, Any]:
    config = {k: values.pop(k, v) for k, v in CONFIG_DEFAULTS.items()}
    metrics = {m: values.pop(m, np.nan) for m in analysis.METRICS}
    row = {"study": study, "trial_id": trial_id, "status": status, "error": values.pop("error", None)}
    row |= config | metrics
    row |= {
        "epochs_completed": values.pop("epochs_completed", config["epochs"]),
        "train_time_s": values.pop("train_time_s", 12.5),
        "teacher_key": "t" + str(config["teacher_members"]),
        "kd_ray_version": "0.1.0",
        "git_sha": "abc1234",
        "torch_version": "2.13.0",
        "ray_version": "2.60.0",
        "device_name": "cpu",
        "config_json": json.dumps(config, sort_keys=True),
    }
    row |= values
    return row


def write_study(
    root: Path, name: str, rows: list[dict[str, Any]], epochs: list[dict[str, Any]] | None = None
) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(directory / "trials.parquet", index=False)
    if epochs is not None:
        pd.DataFrame(epochs).to_parquet(directory / "epochs.parquet", index=False)
    return directory


def augmentation_rows() -> list[dict[str, Any]]:
    rng = np.random.default_rng(7)
    rows = []
    for augmentation in AUGMENTATIONS:
        agree0, acc0 = ARM_CENTRES[augmentation]
        for seed in SEEDS:
            offset = (seed - 1.5) * 0.01 + rng.normal(0, 0.002)
            agreement = agree0 + offset
            rows.append(
                trial_row(
                    "aug",
                    f"{augmentation}-{seed}",
                    augmentation=augmentation,
                    seed=seed,
                    control=True,
                    test_agreement=agreement,
                    test_acc=acc0 + 0.8 * offset + rng.normal(0, 0.001),
                    test_kl=0.5 - agreement / 2 + rng.normal(0, 0.003),
                    test_nll=1.2 - acc0 + rng.normal(0, 0.01),
                    test_ece=0.05 + rng.normal(0, 0.005),
                    train_agreement=0.99 - 0.1 * AUGMENTATIONS.index(augmentation) + rng.normal(0, 0.004),
                    train_kl=0.05,
                    teacher_test_acc=0.72,
                    control_test_agreement=agreement - 0.05 - 0.01 * AUGMENTATIONS.index(augmentation),
                )
            )
    # A terminated trial whose KL was not recorded: it counts, but not towards test_kl's n.
    rows[0]["test_kl"] = np.nan
    diverged = {"test_acc": 0.01, "test_agreement": 0.01, "test_kl": np.inf}
    rows.append(
        trial_row("aug", "mixup-4", "DIVERGED", augmentation="mixup", seed=4, control=True, **diverged)
    )
    error = "Traceback (most recent call last):\nRuntimeError: boom"
    rows.append(
        trial_row("aug", "combaug-5", "ERROR", augmentation="combaug", seed=5, control=True, error=error)
    )
    return rows


def epoch_rows(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for trial in trials:
        if trial["status"] == "ERROR":
            continue
        for epoch in (5, 10, 15, 20):
            fraction = epoch / 20
            row = {
                "study": trial["study"],
                "trial_id": trial["trial_id"],
                "epoch": epoch,
                "lr": 0.05 * (1 - fraction),
                "train_loss": 1.0 - 0.5 * fraction,
            }
            for metric in analysis.METRICS:
                value = trial[metric]
                row[metric] = value * (0.7 + 0.3 * fraction) if np.isfinite(value) else value
            rows.append(row)
    return rows


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
