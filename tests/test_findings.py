"""The findings rules decide verdicts from confidence intervals, as docs/reproduction.md states."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kd_ray import analysis, findings
from kd_ray.tables import TRIALS_SCHEMA, to_table, write_table


def _arm(label: str, values: list[float]) -> findings.Arm:
    n, mean, sd, low, high = analysis.mean_ci(pd.Series(values))
    return findings.Arm(label, "test_agreement", n, mean, sd, low, high)


def test_compare_by_confidence_intervals():
    high = _arm("a", [0.90, 0.91, 0.92])
    low = _arm("b", [0.80, 0.81, 0.82])
    wide = _arm("c", [0.70, 0.95, 0.85])
    assert findings.compare(high, low) == "higher"
    assert findings.compare(low, high) == "lower"
    assert findings.compare(high, wide) == "overlap"
    assert findings.compare(_arm("one", [0.9]), low) == "overlap"  # one seed gives no interval


def test_claims_and_combination():
    high, low = _arm("a", [0.90, 0.91, 0.92]), _arm("b", [0.80, 0.81, 0.82])
    assert findings.claim_difference(high, low, "higher") == findings.HOLDS
    assert findings.claim_difference(low, high, "higher") == findings.FAILS
    assert findings.claim_difference(high, _arm("c", [0.7, 0.95, 0.85]), "higher") == findings.INCONCLUSIVE
    assert findings.claim_no_gain(high, low) == findings.FAILS
    assert findings.claim_no_gain(low, high) == findings.HOLDS
    assert findings.combine([findings.HOLDS, findings.INCONCLUSIVE]) == findings.INCONCLUSIVE
    assert findings.combine([findings.HOLDS, findings.FAILS, findings.INCONCLUSIVE]) == findings.FAILS
    assert findings.combine([findings.HOLDS, findings.HOLDS]) == findings.HOLDS


def _write_study(root, name: str, rows: list[dict]) -> None:
    write_table(to_table(rows, TRIALS_SCHEMA), str(root / name / "trials.parquet"))


def test_evaluate_on_a_planted_ensemble_study(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for m, level in ((1, 0.80), (8, 0.90)):
        for seed in range(5):
            rows.append({
                "study": "ensemble_size", "trial_id": f"{m}-{seed}", "status": "TERMINATED", "seed": seed,
                "teacher_members": m, "temperature": 1.0, "test_agreement": level + rng.normal(0, 0.003),
                "test_acc": level - 0.1 + rng.normal(0, 0.003), "teacher_test_acc": level - 0.05 + seed * 1e-4,
            })
    rows.append({"study": "ensemble_size", "trial_id": "bad", "status": "DIVERGED", "teacher_members": 8,
                 "temperature": 1.0, "seed": 9, "test_agreement": 0.0, "test_acc": 0.0})
    _write_study(tmp_path, "ensemble_size", rows)
    verdicts = {f.number: v for f, v in findings.evaluate(tmp_path)}
    assert verdicts[7].verdict == findings.HOLDS
    assert any("m=8" in line and "n=5" in line for line in verdicts[7].evidence)  # the diverged row is left out
    assert verdicts[2].verdict == findings.NOT_COVERED
    assert verdicts[3].verdict == findings.NOT_COVERED  # dataset_size was not run


def test_evaluate_reverses_when_the_data_does(tmp_path):
    rows = []
    for m, level in ((1, 0.90), (8, 0.80)):
        for seed in range(4):
            rows.append({"study": "ensemble_size", "trial_id": f"{m}-{seed}", "status": "TERMINATED", "seed": seed,
                         "teacher_members": m, "temperature": 1.0, "test_agreement": level + 0.001 * seed,
                         "test_acc": level + 0.001 * seed, "teacher_test_acc": level + 0.001 * seed})
    _write_study(tmp_path, "ensemble_size", rows)
    verdicts = {f.number: v for f, v in findings.evaluate(tmp_path)}
    assert verdicts[7].verdict == findings.FAILS


def test_reproduction_document_from_tables(tmp_path):
    from kd_ray import reproduction

    rows = [{"study": "alpha_sweep", "trial_id": f"{a}-{s}", "status": "TERMINATED", "seed": s, "alpha": a,
             "teacher_members": 3, "temperature": 1.0, "test_agreement": 0.85 + 0.001 * s,
             "control_test_agreement": 0.84 + 0.001 * s, "test_acc": 0.7, "torch_version": "t", "ray_version": "r",
             "git_sha": "abc", "device_name": "cpu", "train_time_s": 1.0}
            for a in (0.0, 0.5) for s in range(3)]
    _write_study(tmp_path / "storage", "alpha_sweep", rows)
    out = tmp_path / "docs" / "reproduction.md"
    reproduction.write_document(tmp_path / "storage", out, {"alpha_sweep": {"wall_s": 60.0, "exit": 0}}, 3,
                                figures_dir=tmp_path / "docs" / "figures" / "reproduction")
    text = out.read_text()
    verdict_rows = [line for line in text.splitlines() if line.startswith("| ") and "**" in line]
    assert len(verdict_rows) == len(findings.FINDINGS) == 17
    assert "| 14 |" in text and "| 15 |" in text
    assert text.count("**not covered**") >= 10  # every study but alpha_sweep is absent here
    assert "## The paper preset on a GPU cluster" in text and "GPU-hours" in text
    assert "abc" in text  # provenance names the git sha of the trials
