"""Reading a study's files with other tools, as the README shows: its DuckDB query on trials.parquet
gives what pandas gives, and an Optuna search's journal loads with Optuna itself (what optuna-dashboard
reads)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
SAMPLES = 2


def readme_duckdb_query() -> str:
    """The SQL of the README's DuckDB example, with the table path it reads."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r'duckdb\.sql\("""(.*?)"""\)', readme, re.S)
    assert match, "README.md shows no duckdb.sql(\"\"\"...\"\"\") example"
    return match.group(1)


@pytest.fixture(scope="module")
def search_study(tmp_path_factory) -> Path:
    """A two-trial Optuna search (studies/optuna_search.py) at a tiny scale; its study directory."""
    storage = tmp_path_factory.mktemp("readers")
    argv = [sys.executable, str(REPO / "studies" / "optuna_search.py"), "--storage", str(storage),
            "--num-samples", str(SAMPLES), "--set", "teacher_members=1", "--set", "teacher_epochs=2",
            "--set", "epochs=2", "--set", "eval_every=1", "--quiet"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(argv, cwd=REPO, env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return storage / "optuna_search"


def test_the_readme_duckdb_query_gives_what_pandas_gives(search_study):
    import duckdb

    query = readme_duckdb_query()
    path = re.search(r"FROM '([^']+)'", query).group(1)
    assert path.endswith("/trials.parquet")
    by_duckdb = duckdb.sql(query.replace(path, str(search_study / "trials.parquet"))).df()

    trials = pd.read_parquet(search_study / "trials.parquet")
    assert len(trials) == SAMPLES
    by_pandas = (trials[trials["status"] == "TERMINATED"]
                 .groupby(["augmentation", "temperature"])
                 .agg(n=("trial_id", "size"), agreement=("test_agreement", "mean"), accuracy=("test_acc", "mean"))
                 .reset_index().sort_values("agreement", ascending=False, ignore_index=True))
    assert list(by_duckdb.columns) == list(by_pandas.columns)
    assert by_duckdb["n"].sum() == SAMPLES
    pd.testing.assert_frame_equal(by_duckdb, by_pandas, check_dtype=False)


def test_the_search_journal_loads_with_optuna(search_study):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(search_study / "optuna.journal")))
    names = optuna.get_all_study_names(storage)
    assert len(names) == 1 and names[0].startswith("optuna_search-")
    study = optuna.load_study(study_name=names[0], storage=storage)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]  # val_agreement, val_acc
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == len(study.trials) == SAMPLES

    trials = pd.read_parquet(search_study / "trials.parquet")
    for trial in finished:
        row = trials[trials["lr"] == trial.params["lr"]]
        assert len(row) == 1, (trial.params, trials["lr"].tolist())
        row = row.iloc[0]
        assert row["temperature"] == pytest.approx(trial.params["temperature"])
        # Optuna is told the validation metrics; the test metrics are only reported.
        assert trial.values == pytest.approx([row["val_agreement"], row["val_acc"]])
