"""Tables analysis must refuse or tame: a required column missing or of the wrong type, a trial read
twice (a copied study analysed with its original), and a text cell of megabytes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from handmade import augmentation_rows, epoch_rows, trial_row, write_study

from kd_ray import analysis, cli

FIVE_MB = 5_000_000


def _rows_without(column: str) -> list[dict]:
    return [{k: v for k, v in row.items() if k != column} for row in augmentation_rows()]


def _analyze_in_process(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = cli.main(["analyze", *argv, "--n-boot", "0"])  # an uncaught exception fails the test here
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out


def _assert_refused(code: int, lines: list[str], *needles: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("kd-ray analyze: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --- required columns ------------------------------------------------------------------------------


@pytest.mark.parametrize("table, column", [("trials", "status"), ("trials", "trial_id"), ("epochs", "epoch")])
def test_a_missing_required_column_is_refused_in_one_line(table, column, tmp_path, capsys) -> None:
    rows = augmentation_rows()
    epochs = epoch_rows(rows)
    if table == "trials":
        rows = _rows_without(column)
    else:
        epochs = [{k: v for k, v in row.items() if k != column} for row in epochs]
    study = write_study(tmp_path, "s", rows, epochs)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(analysis.TableError, match=f"column '{column}' is missing"):
        analysis.load_epochs(study) if table == "epochs" else analysis.load_trials(study)
    code, lines, out = _analyze_in_process(capsys, str(study))
    _assert_refused(code, lines, str(study / f"{table}.parquet"), f"column '{column}' is missing",
                    f"a {table} table needs it")
    assert out == ""
    assert sorted(tmp_path.rglob("*")) == before  # no report, no figures


def test_a_missing_status_names_the_statuses_allowed(tmp_path, capsys) -> None:
    study = write_study(tmp_path, "s", _rows_without("status"))
    code, lines, _ = _analyze_in_process(capsys, str(study))
    _assert_refused(code, lines, "text (string): one of TERMINATED, ERROR, DIVERGED, STOPPED")


def _with_column(rows: list[dict], column: str, convert) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame[column] = [convert(v) for v in frame[column]]
    return frame


# (column, how its values are stored, the type the message names, what it says is required)
MISTYPED = [
    ("test_agreement", lambda v: f"{v:.4f}", "string", "numbers (float64"),  # numbers written as text
    ("test_acc", lambda v: "n/a" if np.isnan(v) else str(v), "string", "numbers (float64"),
    ("status", lambda v: ["TERMINATED", "ERROR", "DIVERGED"].index(v), "int64", "text (string): one of"),
    ("seed", str, "string", "integers (int64)"),
    ("control", str, "string", "true/false (bool)"),
    ("temperature", lambda v: f"{v}x", "string", "numbers (float64"),
]


@pytest.mark.parametrize("column, convert, found, required", MISTYPED, ids=[c[0] for c in MISTYPED])
def test_a_mistyped_column_is_refused_naming_the_type_found_and_required(
    column, convert, found, required, tmp_path, capsys
) -> None:
    study = tmp_path / "s"
    study.mkdir()
    _with_column(augmentation_rows(), column, convert).to_parquet(study / "trials.parquet", index=False)
    code, lines, _ = _analyze_in_process(capsys, str(study))
    # pandas 3 writes text as large_string, pandas 2 as string: the message names either.
    _assert_refused(code, lines, f"column '{column}' has type ", required)
    assert found in lines[0].split("has type ", 1)[1].split(";")[0]
    assert not (study / "report.md").exists()


@pytest.mark.parametrize("text_type", [pa.string(), pa.large_string()], ids=str)
def test_a_text_metric_is_refused_whichever_text_type_stores_it(text_type, tmp_path) -> None:
    # Built with pyarrow, not pandas: the check must not depend on the dtype pandas gives text.
    frame = pd.DataFrame(augmentation_rows())
    table = pa.Table.from_pandas(frame, preserve_index=False)
    index = table.schema.get_field_index("test_agreement")
    as_text = pa.array([None if np.isnan(v) else str(v) for v in frame["test_agreement"]], type=text_type)
    table = table.set_column(index, pa.field("test_agreement", text_type), as_text)
    (tmp_path / "s").mkdir()
    pq.write_table(table, tmp_path / "s" / "trials.parquet")
    with pytest.raises(analysis.TableError, match=f"'test_agreement' has type {text_type}; it must hold numbers"):
        analysis.load_trials(tmp_path / "s")


def test_a_column_that_appears_twice_is_refused(tmp_path) -> None:
    table = pa.table([pa.array(["s"]), pa.array(["t0"]), pa.array(["TERMINATED"]), pa.array([0.5]), pa.array([0.6])],
                     names=["study", "trial_id", "status", "test_acc", "test_acc"])
    (tmp_path / "s").mkdir()
    pq.write_table(table, tmp_path / "s" / "trials.parquet")
    with pytest.raises(analysis.TableError, match="column 'test_acc' appears 2 times"):
        analysis.load_trials(tmp_path / "s")


def test_what_the_schema_allows_is_still_read(tmp_path) -> None:
    """Not over-strict: integer metrics, an all-null metric, a categorical status, an integer column
    stored as floats with nulls and integer trial ids are what pandas writes for sound tables."""
    rows = augmentation_rows()
    frame = pd.DataFrame(rows)
    frame["teacher_test_nll"] = None  # all null: Parquet type null
    frame["train_kl"] = 1  # integers where floats are expected
    frame["status"] = frame["status"].astype("category")
    frame["teacher_members"] = frame["teacher_members"].astype(float)
    frame.loc[0, "teacher_members"] = np.nan
    frame["trial_id"] = range(len(frame))
    (tmp_path / "s").mkdir()
    frame.to_parquet(tmp_path / "s" / "trials.parquet", index=False)
    df = analysis.load_trials(tmp_path / "s")
    assert len(df) == len(rows)
    assert df["usable"].sum() == 12
    assert df["teacher_test_nll"].isna().all() and (df["train_kl"] == 1.0).all()
    assert str(df["teacher_members"].dtype) == "Int64"
    assert df["trial_id"].tolist() == [str(i) for i in range(len(rows))]


# --- trials read twice -----------------------------------------------------------------------------


def test_a_copied_study_analysed_with_its_original_counts_each_trial_once(tmp_path, capsys) -> None:
    rows = augmentation_rows()
    original = write_study(tmp_path, "a", rows, epoch_rows(rows))
    copy = tmp_path / "a_copy"
    shutil.copytree(original, copy)
    alone = analysis.load_trials(original)
    capsys.readouterr()
    both = analysis.load_trials([original, copy])
    err = capsys.readouterr().err
    pd.testing.assert_frame_equal(both, alone)
    assert f"dropped {len(rows)} repeated trials ({len(rows)} from {copy}): each a copy of one read before it" in err
    assert "share their" not in err
    assert len(analysis.load_epochs([original, copy], verbose=False)) == len(analysis.load_epochs(original))

    # The command: the same summary as the original alone, the drop said on stderr and in report.md.
    single = tmp_path / "single"
    code, _, out_alone = _analyze_in_process(capsys, str(original), "--out", str(single))
    assert code == 0
    code, lines, out_both = _analyze_in_process(capsys, str(original), str(copy))
    assert code == 0
    assert out_both.replace(str(tmp_path / "report.md"), "") == out_alone.replace(str(single / "report.md"), "")
    assert any(f"dropped {len(rows)} repeated trials ({len(rows)} from {copy})" in line for line in lines), lines
    report = (tmp_path / "report.md").read_text()
    assert f"{len(rows)} trials loaded" in report
    assert f"**Loading note**: dropped {len(rows)} repeated trials ({len(rows)} from {copy})" in report
    assert "repeated epoch rows" in report
    assert (tmp_path / "summary.csv").read_text() == (single / "summary.csv").read_text()


def test_trials_sharing_an_id_but_not_their_values_are_kept_and_named(tmp_path, capsys) -> None:
    """Not a copy: nothing says which result is the right one, and other tools' ids can coincide."""
    first = write_study(tmp_path, "first", [trial_row("s", "t0", test_acc=0.5, test_agreement=0.8),
                                            trial_row("s", "t1", test_acc=0.6, test_agreement=0.9)])
    second = write_study(tmp_path, "second", [trial_row("s", "t0", test_acc=0.1, test_agreement=0.2),
                                              trial_row("s", "t1", test_acc=0.6, test_agreement=0.9)])
    capsys.readouterr()
    df = analysis.load_trials([first, second])
    err = capsys.readouterr().err
    assert df["trial_id"].tolist() == ["t0", "t1", "t0"]  # t1 of second is a copy; t0 differs
    assert df["test_acc"].tolist() == [0.5, 0.6, 0.1]
    assert f"dropped 1 repeated trials (1 from {second})" in err
    assert (f"2 trials share their study and trial_id with another but not its values (1 from {first}, "
            f"1 from {second}): all kept, as different trials") in err
    # The same trial_id in another study is another trial: nothing to say.
    other = write_study(tmp_path, "other", [trial_row("other", "t0", test_acc=0.3, test_agreement=0.4)])
    capsys.readouterr()
    assert len(analysis.load_trials([first, other])) == 3
    assert capsys.readouterr().err == ""


# --- text cells of megabytes -----------------------------------------------------------------------


def test_a_text_cell_of_megabytes_is_shortened_keeping_its_start_and_end(tmp_path, capsys) -> None:
    rows = augmentation_rows()
    rows[0]["augmentation"] = "a" * FIVE_MB
    error = "Traceback (most recent call last):\n" + "  frame\n" * 700_000 + "RuntimeError: the real cause"
    rows[-1]["error"] = error
    rows[1]["config_json"] = "é" * 3_000  # two bytes a character: the bound counts characters
    study = write_study(tmp_path, "s", rows)
    capsys.readouterr()
    df = analysis.load_trials(study)
    err = capsys.readouterr().err
    lengths = df[["augmentation", "error", "config_json"]].map(lambda v: 0 if pd.isna(v) else len(v))
    assert lengths.max().max() <= analysis.MAX_TEXT_CHARS
    cut = df["augmentation"].iloc[0]
    assert cut.startswith("a" * 1_000 + " … [") and cut.endswith("] … " + "a" * 500)
    assert f"[{FIVE_MB - 1_500} characters cut]" in cut
    last = df["error"].iloc[-1]
    assert last.startswith("Traceback") and last.endswith("RuntimeError: the real cause")
    assert df["config_json"].iloc[1] == "é" * 1_000 + " … [1500 characters cut] … " + "é" * 500
    assert df["augmentation"].iloc[1:].tolist() == [r["augmentation"] for r in rows[1:]]  # short cells whole
    [note] = [line for line in err.splitlines() if "shortened" in line]
    assert str(study / "trials.parquet") in note
    for column in ("augmentation", "error", "config_json"):
        assert f"1 in column '{column}'" in note


def _kd_ray() -> list[str]:
    script = Path(sys.executable).parent / "kd-ray"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kd_ray.cli"]


def test_kd_ray_analyze_as_its_own_process_refuses_a_table_without_status(tmp_path) -> None:
    study = write_study(tmp_path / "tables", "s", _rows_without("status"))
    command = [*_kd_ray(), "analyze", str(study)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert lines == [f"kd-ray analyze: error: {study / 'trials.parquet'}: column 'status' is missing; a trials table "
                     "needs it, holding text (string): one of TERMINATED, ERROR, DIVERGED, STOPPED"]
    assert "Traceback" not in done.stdout + done.stderr
    assert sorted(p.name for p in study.iterdir()) == ["trials.parquet"]


# Runs the command given after it and says on its last stderr line the command's peak resident
# memory: measured from a small parent, not from pytest, whose own pages a forked child starts with.
MEASURE = (
    "import resource, subprocess, sys, time; start = time.monotonic(); code = subprocess.call(sys.argv[1:]); "
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
    "print(f'measured: {time.monotonic() - start:.2f} s {peak} KiB', file=sys.stderr); sys.exit(code)"
)


def test_kd_ray_analyze_as_its_own_process_takes_seconds_on_a_5_mb_cell(tmp_path) -> None:
    """5 MB of text as an arm's name took over 5 minutes and 3.6 GB (drawing it in the figures'
    legends); shortened on load, the command costs what the same table with short names does."""
    rows = augmentation_rows()
    rows[0]["augmentation"] = "a" * FIVE_MB
    rows[1]["config_json"] = "{" + "x" * FIVE_MB + "}"
    hostile = write_study(tmp_path / "hostile", "s", rows, epoch_rows(augmentation_rows()))
    sound = write_study(tmp_path / "sound", "s", augmentation_rows(), epoch_rows(augmentation_rows()))
    env = {**os.environ, "MPLBACKEND": "Agg"}
    procs = {
        study: subprocess.Popen([sys.executable, "-c", MEASURE, *_kd_ray(), "analyze", str(study), "--n-boot", "0"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for study in (hostile, sound)
    }
    measured = {}
    for study, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=120)  # minutes before: past this, it is not fixed
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"kd-ray analyze {study} ran past 120 s")
        assert proc.returncode == 0, err
        assert "Traceback" not in out + err
        seconds, _, kib, _ = err.splitlines()[-1].removeprefix("measured: ").split()
        measured[study] = (float(seconds), int(kib) / 1024, err)
    (seconds, peak_mib, err), (sound_seconds, sound_mib, _) = measured[hostile], measured[sound]
    print(f"kd-ray analyze, 5 MB cells: {seconds:.1f} s, peak {peak_mib:.0f} MiB; "
          f"short cells: {sound_seconds:.1f} s, peak {sound_mib:.0f} MiB")
    # The two 5 MB cells as read, and one batch of rows around them: tens of MiB, not gigabytes.
    assert peak_mib < sound_mib + 150, (peak_mib, sound_mib)
    assert "shortened text cells" in err and "1 in column 'augmentation'" in err
    report = (hostile / "report.md").read_text()
    assert len(report) < 200_000  # 5 MB copied into every table of the report before
    assert "characters cut]" in report
