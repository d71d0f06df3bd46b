"""Trial and epoch tables: one pyarrow schema each, atomic Parquet writes, plain reads.

``trials.parquet`` has one row per trial; ``epochs.parquet`` one row per trial and evaluation epoch.
Both live in ``<storage>/<study>/``. Column names are fixed: add, never rename.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kd_ray.config import TrialConfig

STATUSES = ("TERMINATED", "ERROR", "DIVERGED", "STOPPED")
METRICS = (
    "test_acc", "test_nll", "test_ece", "test_agreement", "test_kl", "train_agreement", "train_kl",
    "aug_train_agreement", "teacher_test_acc", "teacher_test_nll", "teacher_test_ece",
    "control_test_agreement",
)
PROVENANCE = (
    "teacher_key", "kd_ray_version", "git_sha", "torch_version", "ray_version", "device_name", "precision_used", "fast_path",
    "config_json",
)

_ARROW_TYPES = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "float | None": pa.float64(), "bool": pa.bool_()}


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
    + [pa.field(m, pa.float64()) for m in METRICS if m != "control_test_agreement"]
    + [pa.field("train_time_s", pa.float64())]
)


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


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
    """Write a Parquet file atomically: a temporary file in the same directory, then a rename."""
    fs, resolved = _filesystem(path)
    directory = resolved.rsplit("/", 1)[0]
    fs.create_dir(directory, recursive=True)
    tmp = f"{directory}/.{resolved.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(tmp) as out:
            pq.write_table(table, out)
        fs.move(tmp, resolved)
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
    return path


def write_study_tables(study_dir: str, trials: list[dict], epochs: list[dict]) -> tuple[str, str]:
    trials_path = write_table(to_table(trials, TRIALS_SCHEMA), f"{study_dir.rstrip('/')}/trials.parquet")
    epochs_path = write_table(to_table(epochs, EPOCHS_SCHEMA), f"{study_dir.rstrip('/')}/epochs.parquet")
    return trials_path, epochs_path


def read_table(path: str) -> pa.Table:
    fs, resolved = _filesystem(path)
    with fs.open_input_file(resolved) as handle:
        return pq.read_table(handle)
