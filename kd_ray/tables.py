"""Trial and epoch tables: one pyarrow schema each, atomic Parquet writes, plain reads.

``trials.parquet`` has one row per trial; ``epochs.parquet`` one row per trial and evaluation epoch.
Both live in ``<storage>/<study>/``. Column names are fixed: add, never rename.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from kd_ray.atomic import filesystem, write_atomic
from kd_ray.config import TrialConfig

TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"

TERMINATED, ERROR, DIVERGED, STOPPED = "TERMINATED", "ERROR", "DIVERGED", "STOPPED"
STATUSES = (TERMINATED, ERROR, DIVERGED, STOPPED)

# How well the student does on its own.
GENERALIZATION_METRICS = ("test_acc", "test_nll", "test_ece")
# How closely the student matches its teacher.
FIDELITY_METRICS = ("test_agreement", "test_kl", "train_agreement", "train_kl", "aug_train_agreement")
TEACHER_METRICS = ("teacher_test_acc", "teacher_test_nll", "teacher_test_ece")
# Measured only by trials that run the independent-student control; absent from epochs.parquet.
CONTROL_METRICS = ("control_test_agreement",)
# In the column order of the tables.
METRICS = GENERALIZATION_METRICS + FIDELITY_METRICS + TEACHER_METRICS + CONTROL_METRICS
# Fractions in [0, 1]; the other metrics (KL, NLL) are in nats.
FRACTION_METRICS = frozenset(m for m in METRICS if m.endswith(("_acc", "_agreement", "_ece")))

# Which code, and which device, produced a row.
PRODUCED_BY = ("kd_ray_version", "git_sha", "torch_version", "ray_version", "device_name")
PROVENANCE = ("teacher_key", *PRODUCED_BY, "precision_used", "fast_path", "config_json")

_ARROW_TYPES = {
    "str": pa.string(), "int": pa.int64(), "float": pa.float64(), "float | None": pa.float64(), "bool": pa.bool_(),
}


def _config_fields() -> list[pa.Field]:
    return [pa.field(f.name, _ARROW_TYPES[f.type]) for f in dataclasses.fields(TrialConfig)]


TRIALS_SCHEMA = pa.schema(
    [pa.field("study", pa.string()), pa.field("trial_id", pa.string()), pa.field("status", pa.string()),
     pa.field("error", pa.string())]
    + _config_fields()
    + [pa.field(m, pa.float64()) for m in METRICS]
    + [pa.field("epochs_completed", pa.int64()), pa.field("train_time_s", pa.float64())]
    + [pa.field(p, pa.string()) for p in PROVENANCE]
)

EPOCHS_SCHEMA = pa.schema(
    [pa.field("study", pa.string()), pa.field("trial_id", pa.string()), pa.field("epoch", pa.int64()),
     pa.field("lr", pa.float64()), pa.field("train_loss", pa.float64())]
    + [pa.field(m, pa.float64()) for m in METRICS if m not in CONTROL_METRICS]
    + [pa.field("train_time_s", pa.float64())]
)


def to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) to a table of exactly ``schema``; missing values become nulls, extras are dropped."""
    rows = list(rows)
    columns = {}
    for field in schema:
        values = []
        for row in rows:
            value = row.get(field.name)
            if value is not None and pa.types.is_floating(field.type):
                value = float(value)
            values.append(value)
        columns[field.name] = pa.array(values, type=field.type)
    return pa.table(columns, schema=schema)


def write_table(table: pa.Table, path: str) -> str:
    """Write a Parquet file atomically (``kd_ray.atomic``): readers never see a partial table."""
    return write_atomic(path, lambda stream: pq.write_table(table, stream))


def write_study_tables(study_dir: str, trials: list[dict], epochs: list[dict]) -> tuple[str, str]:
    trials_path = write_table(to_table(trials, TRIALS_SCHEMA), f"{study_dir.rstrip('/')}/{TRIALS_FILE}")
    epochs_path = write_table(to_table(epochs, EPOCHS_SCHEMA), f"{study_dir.rstrip('/')}/{EPOCHS_FILE}")
    return trials_path, epochs_path


def read_table(path: str) -> pa.Table:
    fs, resolved = filesystem(path)
    with fs.open_input_file(resolved) as handle:
        return pq.read_table(handle)
