"""The report, written by analysis.report and by `kd-ray analyze`."""

from __future__ import annotations

from pathlib import Path

import pytest
from handmade import assert_png, trial_row, write_study

from kd_ray import analysis, cli


def test_report_renders_from_fixture_study(aug_study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = analysis.report(aug_study, n_boot=100)
    assert path == aug_study / "report.md"
    text = path.read_text()
    assert "excluded 2 trials" in capsys.readouterr().out
    headings = [
        "# kd_ray report: `aug`",
        "## Summary",
        "## Fidelity vs generalization",
        "## Independent-student control",
        "## Figures",
        "## Excluded trials",
        "## Provenance",
    ]
    found = [line for line in text.splitlines() if line.startswith("#") and "All metrics" not in line]
    assert found == headings
    assert "abc1234" in text and "2.13.0" in text
    assert "RuntimeError: boom" in text and "Traceback" not in text  # the exception, not the preamble
    for link in [line for line in text.splitlines() if line.startswith("![")]:
        assert_png(aug_study / link.split("(", 1)[1].rstrip(")"))
    assert (aug_study / "summary.csv").is_file() and (aug_study / "correlations.csv").is_file()
    # Every file is written through a temporary file and a rename; none is left behind.
    assert not [p for p in aug_study.rglob("*") if p.name.endswith(".tmp")]


def test_report_of_several_studies_goes_to_common_parent(
    lambda_study: Path, optuna_study: Path, tmp_path: Path
) -> None:
    path = analysis.report([lambda_study, optuna_study], n_boot=0)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    assert "`lambda`" in text and "`search`" in text


# ---------------------------------------------------------------------------------------------------
# kd-ray analyze
# ---------------------------------------------------------------------------------------------------
def analyze(*args: str) -> int:
    return cli.main(["analyze", *args])


def test_main_prints_summary_and_report_path(
    aug_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert analyze(str(aug_study), "--by", "augmentation", "--out", str(out), "--n-boot", "50") == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "combaug" in printed and "±" in printed
    assert f"report: {out / 'report.md'}" in printed
    assert (out / "report.md").is_file() and (out / "figures").is_dir()


def test_report_when_every_trial_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [trial_row("bad", f"x{i}", "ERROR", seed=i, error="OSError: disk full") for i in range(3)]
    study = write_study(tmp_path, "bad", rows)
    assert analyze(str(study)) == 0
    printed = capsys.readouterr().out
    assert "excluded 3 trials (ERROR: 3)" in printed and "no usable trials among 3" in printed
    text = (study / "report.md").read_text()
    assert "0 usable" in text and "OSError: disk full" in text and "## Figures" not in text


def test_main_rejects_path_without_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_study_here"
    assert analyze(str(missing)) == 2
    error = capsys.readouterr().err
    assert str(missing) in error and "trials.parquet" in error and error.count("\n") == 1


def test_main_rejects_unknown_factor(aug_study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert analyze(str(aug_study), "--by", "colour") == 2
    assert "colour" in capsys.readouterr().err


def test_analyze_without_a_path_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert analyze() == 2
    assert "kd-ray analyze: error: the following arguments are required: PATH" in capsys.readouterr().err
