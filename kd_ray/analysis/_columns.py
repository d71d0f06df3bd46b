"""The columns analysis reads, derived from kd_ray.tables (metric names, schemas) and TrialConfig, so
that a metric or a config field added there reaches analysis without an edit here."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from kd_ray import tables
from kd_ray.config import TrialConfig

# test_agreement − control_test_agreement (see control_gap): a fraction, like the two it subtracts.
CONTROL_GAP = "control_gap"
# Shown as percentages; the rest (KL, NLL in nats) are shown as they are.
FRACTION_METRICS: frozenset[str] = tables.FRACTION_METRICS | {CONTROL_GAP}

# Every TrialConfig field is a column of trials.parquet.
CONFIG_COLUMNS: tuple[str, ...] = tuple(TrialConfig.field_names())
# What the report's provenance table counts the trials by.
PROVENANCE_COLUMNS: tuple[str, ...] = tables.PRODUCED_BY


def _columns_of_type(is_type: Callable[[pa.DataType], bool]) -> tuple[str, ...]:
    names: list[str] = []
    for field in (*tables.TRIALS_SCHEMA, *tables.EPOCHS_SCHEMA):
        if is_type(field.type) and field.name not in names:
            names.append(field.name)
    return tuple(names)


# The pandas dtype a column is read as follows from its type in the schemas.
FLOAT_COLUMNS = _columns_of_type(pa.types.is_floating)
INT_COLUMNS = _columns_of_type(pa.types.is_integer)
BOOL_COLUMNS = _columns_of_type(pa.types.is_boolean)
STRING_COLUMNS = _columns_of_type(pa.types.is_string)
