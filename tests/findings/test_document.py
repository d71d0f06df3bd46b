"""docs/reproduction.md as kd_ray.reproduction writes it: every finding, every experiment of the paper,
and the loss surface's three points, from planted tables."""

from __future__ import annotations

import numpy as np
from planted import augmentation_rows, write_every_study, write_study

from kd_ray import findings, reproduction
from kd_ray.findings import FINDINGS
from kd_ray.tables import LOSS_SURFACE_FILE, LOSS_SURFACE_SCHEMA, to_table, write_table


def loss_plane_rows() -> list[dict]:
    points = {"teacher": (0.0, 0.0), "init": (2.0, 0.0), "final": (1.5, 1.0)}
    rows = []
    for a in (0.0, 1.5, 2.0):
        for b in (0.0, 1.0):
            rows.append({"a": a, "b": b, "loss": 0.1 + a + b, "agreement": 1.0 - 0.1 * (a + b),
                         **{f"{p}_{axis}": xy[i] for p, xy in points.items() for i, axis in enumerate("ab")}})
    return rows


def test_the_document_covers_every_finding_and_experiment(tmp_path):
    storage = tmp_path / "results"
    write_study(storage, "augmentation_ablation", augmentation_rows(ood_gain=0.0))
    write_table(to_table(loss_plane_rows(), LOSS_SURFACE_SCHEMA), str(storage / "loss_surface" / LOSS_SURFACE_FILE))
    (storage / "loss_surface" / "loss_surface.png").write_bytes(b"\x89PNG planted")
    out = tmp_path / "docs" / "reproduction.md"
    reproduction.write_document(storage, out, {}, 8, figures_dir=tmp_path / "docs" / "figures" / "reproduction")
    text = out.read_text()

    for finding in FINDINGS:
        assert f"### Finding {finding.number}: " in text
    assert "### Finding 10: holds" in text  # noise and out-of-domain inputs give no gain in the planted study
    for number, _, study, _ in reproduction.EXPERIMENTS:
        assert f"| {number} |" in text
        if study != "—":
            assert f"`studies/{study}.py`" in text
    # The three points of the plane with the loss and agreement there (loss 0.1 + a + b).
    assert "| teacher | (0, 0) | 0.1000 | 100.00% |" in text
    assert "| init | (2, 0) | 2.1000 | 80.00% |" in text
    assert "| final | (1.5, 1) | 2.6000 | 75.00% |" in text
    assert (tmp_path / "docs" / "figures" / "reproduction" / "loss_surface.png").read_bytes() == b"\x89PNG planted"
    assert np.all([f"| {name} |" in text for name in ("synthetic_data", "augmentation_convnet")])  # the paper plan
    # Runs: each study's trials and the code that produced them (planted rows have no git sha).
    assert "| augmentation_ablation | 24 | 24 | 0.00 | unknown | complete before | — |" in text  # a trial per row
    assert "| synthetic_data | — | — | — | — | complete before | — |" in text


def test_the_document_states_its_rules_and_no_verdict_contradicts_its_claims(tmp_path):
    storage = tmp_path / "results"
    write_every_study(storage)
    out = tmp_path / "docs" / "reproduction.md"
    reproduction.write_document(storage, out, {}, 10, figures_dir=tmp_path / "docs" / "figures" / "reproduction")
    text = out.read_text()
    # The rules, each metric's margin and why, and the simulated operating characteristics.
    assert "| raises (higher) | a rise above 0 | a rise below Δ (too small, or the wrong way) |" in text
    assert "| test_agreement | 0.5 pp | a twentieth of the local disagreement" in text
    assert "| test_kl | 10% of the reference arm's mean |" in text
    assert "| no difference, true effect 1.5Δ: holds |" in text
    assert "no verdict depends on it" in text and "never *fails*" not in text
    # Every planted study serves findings that hold, and every finding's verdict is its claims' combination.
    for finding, verdict in findings.judge_findings(storage):
        assert f"### Finding {finding.number}: holds" in text
        assert verdict.verdict == findings.HOLDS
        assert all(claim.verdict == findings.HOLDS for claim in verdict.claims)
