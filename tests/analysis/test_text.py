"""The plain-text summary printed after a study."""

from __future__ import annotations

from pathlib import Path

from kd_ray import analysis


def test_format_summary(aug_study: Path) -> None:
    text = analysis.format_summary(analysis.load_trials(aug_study), verbose=False)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["augmentation", "n", "excluded"]
    assert "test_agreement (%)" in lines[0] and "test_kl" in lines[0]
    assert len(lines) == 2 + 3 and "±" in lines[2]
