"""Per-example predictions (``TrialConfig.save_predictions``): every trial's file as one DataFrame.

Each trial that saved its predictions wrote ``<study>/predictions/<trial_id>.parquet``: a row per example of
the test set, the validation split and the distillation set (``split``), with the teacher's and the
student's top classes and probabilities (``kd_ray.train.predictions`` defines the columns). A row's
``trial_id`` is the one its trial has in ``trials.parquet``, so the two tables join on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kd_ray.analysis._load import TableError
from kd_ray.tables import PREDICTIONS_DIR

# The columns every predictions file has, beside its top-k ones.
PREDICTION_KEYS = ("trial_id", "seed", "split", "example", "label")


def load_predictions(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Every predictions file of a study directory (its ``predictions/`` folder) as one DataFrame, in the
    order of the files' names; ``path`` may also name a predictions folder itself (``kd-ray trial`` writes
    ``./predictions``). Files of different top-k widths (datasets of under 5 classes) are aligned, the
    missing columns null. Raises FileNotFoundError when there are no predictions, TableError for a file
    that is not a predictions table."""
    folder = Path(path)
    if (folder / PREDICTIONS_DIR).is_dir():
        folder = folder / PREDICTIONS_DIR
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{path}: no predictions here (expected <study>/{PREDICTIONS_DIR}/<trial_id>.parquet, "
                                "written by trials with save_predictions=true)")
    tables = [_read(file) for file in files]
    table = pa.concat_tables(tables, promote_options="default")
    return table.to_pandas()


def _read(file: Path) -> pa.Table:
    try:
        table = pq.read_table(file)
    except pa.ArrowException as error:
        raise TableError(f"{file}: cannot be read as a Parquet table: {error}") from None
    missing = [column for column in PREDICTION_KEYS if column not in table.column_names]
    if missing:
        raise TableError(f"{file}: column '{missing[0]}' is missing; a predictions table needs "
                         f"{', '.join(PREDICTION_KEYS)} and the top-k columns")
    return table.replace_schema_metadata(None)
