"""Trial and epoch tables: the schema holds every column the design names, rows become tables of
exactly that schema, and Parquet writes are atomic (temporary file, then rename)."""

from __future__ import annotations

import dataclasses
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kd_ray import tables
from kd_ray.config import TrialConfig
from kd_ray.tables import EPOCHS_SCHEMA, METRICS, PROVENANCE, TRIALS_SCHEMA, to_table, write_study_tables, write_table

# The columns DESIGN.md ("Tables") names for trials.parquet. The provenance `device` of the design
# is `device_name` in the table, because `device` is already the TrialConfig field of that name.
DESIGN_TRIAL_COLUMNS = (
    "study", "trial_id", "status", "error",
    "dataset", "teacher_arch", "student_arch", "teacher_members", "temperature", "alpha", "augmentation",
    "distill_split", "distill_fraction", "epochs", "optimizer", "lr", "init", "init_lambda", "seed",
    "test_acc", "test_nll", "test_ece", "test_agreement", "test_kl", "train_agreement", "train_kl",
    "aug_train_agreement", "teacher_test_acc", "teacher_test_nll", "teacher_test_ece", "control_test_agreement",
    "epochs_completed", "train_time_s",
    "teacher_key", "kd_ray_version", "git_sha", "torch_version", "ray_version", "device", "device_name",
    "config_json",
)
# TrialConfig fields DESIGN.md lists under "TrialConfig fields".
DESIGN_CONFIG_FIELDS = (
    "dataset", "teacher_split", "distill_split", "distill_fraction", "extra_data", "teacher_arch",
    "teacher_members", "teacher_epochs", "student_arch", "temperature", "alpha", "augmentation", "mixup_alpha",
    "epochs", "batch_size", "optimizer", "lr", "weight_decay", "lr_schedule", "init", "init_lambda", "seed",
    "eval_every", "device",
)
DESIGN_EPOCH_COLUMNS = (
    "study", "trial_id", "epoch", "lr", "train_loss",
    "test_acc", "test_nll", "test_ece", "test_agreement", "test_kl", "train_agreement", "train_kl",
    "aug_train_agreement", "teacher_test_acc", "teacher_test_nll", "teacher_test_ece",
)

_EXPECTED_TYPES = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "float | None": pa.float64(),
                   "bool": pa.bool_()}


# --- the schema -----------------------------------------------------------------------------------


def test_trials_schema_has_every_design_column():
    names = TRIALS_SCHEMA.names
    missing = [c for c in DESIGN_TRIAL_COLUMNS if c not in names]
    assert not missing, f"trials schema lacks {missing}"
    assert len(names) == len(set(names)), "a column appears twice"
    for metric in METRICS:
        assert TRIALS_SCHEMA.field(metric).type == pa.float64()
    for name in ("study", "trial_id", "status", "error", *PROVENANCE):
        assert TRIALS_SCHEMA.field(name).type == pa.string(), name
    assert TRIALS_SCHEMA.field("epochs_completed").type == pa.int64()
    assert TRIALS_SCHEMA.field("train_time_s").type == pa.float64()
    # The leading columns come in the order the design gives them.
    assert names[:4] == ["study", "trial_id", "status", "error"]


def test_trials_schema_has_every_trial_config_field_with_its_type():
    for f in dataclasses.fields(TrialConfig):
        assert f.name in TRIALS_SCHEMA.names, f.name
        assert TRIALS_SCHEMA.field(f.name).type == _EXPECTED_TYPES[f.type], f.name
    for name in DESIGN_CONFIG_FIELDS:
        assert name in TrialConfig.field_names(), name
        assert name in TRIALS_SCHEMA.names, name


def test_epochs_schema_has_every_design_column():
    names = EPOCHS_SCHEMA.names
    missing = [c for c in DESIGN_EPOCH_COLUMNS if c not in names]
    assert not missing, f"epochs schema lacks {missing}"
    assert len(names) == len(set(names))
    assert EPOCHS_SCHEMA.field("epoch").type == pa.int64()
    assert EPOCHS_SCHEMA.field("train_loss").type == pa.float64()


def test_statuses_are_the_design_ones():
    assert set(tables.STATUSES) == {"TERMINATED", "ERROR", "DIVERGED", "STOPPED"}


# --- rows to tables -------------------------------------------------------------------------------


def _row(trial_id: str = "t0", **extra) -> dict:
    cfg = TrialConfig(temperature=2.0, seed=3)
    return {"study": "s", "trial_id": trial_id, "status": "TERMINATED", **cfg.to_dict(),
            "test_acc": 0.5, "test_agreement": 1, "epochs_completed": 4, "train_time_s": 2, **extra}


def test_to_table_fills_missing_with_nulls_and_drops_extras():
    rows = [_row("a", not_a_column="x", training_iteration=7), {"study": "s", "trial_id": "b"}]
    table = to_table(rows, TRIALS_SCHEMA)
    assert table.schema.equals(TRIALS_SCHEMA)
    assert table.num_rows == 2
    assert "not_a_column" not in table.column_names and "training_iteration" not in table.column_names
    data = table.to_pylist()
    assert data[0]["temperature"] == 2.0 and data[0]["seed"] == 3 and data[0]["lr"] == 0.05
    assert data[0]["error"] is None and data[0]["test_nll"] is None and data[0]["teacher_key"] is None
    # ints given for float columns are stored as floats
    assert data[0]["test_agreement"] == 1.0 and isinstance(data[0]["test_agreement"], float)
    assert data[0]["train_time_s"] == 2.0
    second = data[1]
    assert second["trial_id"] == "b"
    assert all(second[c] is None for c in TRIALS_SCHEMA.names if c not in ("study", "trial_id"))


def test_to_table_of_no_rows_is_an_empty_table_of_the_schema():
    table = to_table([], EPOCHS_SCHEMA)
    assert table.num_rows == 0
    assert table.schema.equals(EPOCHS_SCHEMA)


def test_to_table_refuses_a_value_of_the_wrong_type():
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError)):
        to_table([{"study": "s", "trial_id": "t", "epochs_completed": "many"}], TRIALS_SCHEMA)


# --- atomic writes --------------------------------------------------------------------------------


def _files(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_write_table_round_trips_and_leaves_no_temporary_file(tmp_path):
    table = to_table([_row("a"), _row("b", temperature=8.0)], TRIALS_SCHEMA)
    path = tmp_path / "nested" / "dir" / "trials.parquet"  # the directory is created
    returned = write_table(table, str(path))
    assert returned == str(path)
    assert _files(path.parent) == ["trials.parquet"]
    back = tables.read_table(str(path))
    assert back.equals(table)
    assert back.schema.equals(TRIALS_SCHEMA)
    frame = pd.read_parquet(path)
    assert list(frame["trial_id"]) == ["a", "b"]
    assert list(frame["temperature"]) == [2.0, 8.0]


def test_write_table_replaces_an_existing_file_whole(tmp_path):
    path = str(tmp_path / "trials.parquet")
    write_table(to_table([_row(f"old{i}") for i in range(5)], TRIALS_SCHEMA), path)
    new = to_table([_row("new")], TRIALS_SCHEMA)
    write_table(new, path)
    back = tables.read_table(path)
    assert back.equals(new)
    assert back.column("trial_id").to_pylist() == ["new"]
    assert _files(tmp_path) == ["trials.parquet"]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = str(tmp_path / "trials.parquet")
    old = to_table([_row("old")], TRIALS_SCHEMA)
    write_table(old, path)
    before = open(path, "rb").read()

    def broken_write(table, where, *args, **kwargs):
        where.write(b"PAR1 half a parquet file")  # some bytes reach the temporary file first
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        write_table(to_table([_row("new")], TRIALS_SCHEMA), path)
    monkeypatch.undo()

    assert _files(tmp_path) == ["trials.parquet"]
    assert open(path, "rb").read() == before
    assert tables.read_table(path).equals(old)


def test_a_failed_first_write_creates_no_file(tmp_path, monkeypatch):
    def broken_write(table, where, *args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(pq, "write_table", broken_write)
    with pytest.raises(RuntimeError):
        write_table(to_table([_row()], TRIALS_SCHEMA), str(tmp_path / "trials.parquet"))
    assert _files(tmp_path) == []


def test_write_study_tables_writes_both_tables(tmp_path):
    trials = [_row("a"), _row("b")]
    epochs = [{"study": "s", "trial_id": t, "epoch": e, "lr": 0.1, "train_loss": 1.0 / e, "test_acc": 0.4,
               "hostname": "dropped"} for t in ("a", "b") for e in (1, 2, 3)]
    study_dir = tmp_path / "study"
    trials_path, epochs_path = write_study_tables(str(study_dir), trials, epochs)
    assert trials_path == str(study_dir / "trials.parquet") and epochs_path == str(study_dir / "epochs.parquet")
    assert _files(study_dir) == ["epochs.parquet", "trials.parquet"]
    assert pq.read_schema(trials_path).equals(TRIALS_SCHEMA, check_metadata=False)
    assert pq.read_schema(epochs_path).equals(EPOCHS_SCHEMA, check_metadata=False)
    frame = pd.read_parquet(epochs_path)
    assert len(frame) == 6
    assert frame.groupby("trial_id")["epoch"].apply(list).to_dict() == {"a": [1, 2, 3], "b": [1, 2, 3]}
    assert frame["test_kl"].isna().all()
    assert len(pd.read_parquet(trials_path)) == 2
