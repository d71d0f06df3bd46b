"""Planted trial tables for the findings' tests: rows written as a study would leave them."""

from __future__ import annotations

import numpy as np

from kd_ray.tables import TRIALS_SCHEMA, to_table, write_table


def write_study(root, name: str, rows: list[dict]) -> None:
    write_table(to_table(rows, TRIALS_SCHEMA), str(root / name / "trials.parquet"))


def row(study: str, seed: int, **values) -> dict:
    return {"study": study, "trial_id": f"{study}-{len(str(values))}-{seed}-{id(values)}", "status": "TERMINATED",
            "seed": seed, "teacher_key": f"teacher-{seed}", **values}


def augmentation_rows(ood_gain: float, seeds: int = 8) -> list[dict]:
    rng = np.random.default_rng(4)
    rows = []
    for seed in range(seeds):
        base = 0.85 + rng.normal(0, 0.01)
        arms = [("baseline", "generator", 0, 0.0), ("noise", "generator", 0, -0.01), ("ood", "ood", 1797, ood_gain)]
        for policy, source, extra, gain in arms:
            augmentation = "baseline" if policy == "ood" else policy
            rows.append(row("augmentation_ablation", seed, augmentation=augmentation, temperature=4.0,
                            extra_source=source, extra_data=extra, test_agreement=base + gain + rng.normal(0, 0.002),
                            test_acc=base - 0.07 + gain + rng.normal(0, 0.002)))
    return rows
