"""The names analysis reads come from kd_ray.tables and TrialConfig, never typed again."""

from __future__ import annotations

import pyarrow as pa

from kd_ray import analysis, tables
from kd_ray.config import TrialConfig
from kd_ray.tables import TRIALS_SCHEMA, to_table, write_table


def test_metric_groups_partition_the_metrics() -> None:
    groups = (
        analysis.FIDELITY_METRICS
        + analysis.GENERALIZATION_METRICS
        + analysis.VALIDATION_METRICS
        + analysis.TEACHER_METRICS
        + analysis.CONTROL_METRICS
        + analysis.CKA_METRICS
    )
    assert sorted(groups) == sorted(analysis.METRICS) and len(set(groups)) == len(groups)
    assert analysis.METRICS == tables.METRICS and analysis.STATUSES == tables.STATUSES


def test_config_columns_are_the_trial_config_fields() -> None:
    assert analysis.CONFIG_COLUMNS == tuple(TrialConfig.field_names())
    for name in ("teacher_fraction", "teacher_batch_size", "precision"):
        assert name in analysis.CONFIG_COLUMNS


def test_fraction_metrics_are_the_fractions_of_the_tables_and_the_control_gap() -> None:
    assert tables.FRACTION_METRICS <= analysis.FRACTION_METRICS
    assert analysis.FRACTION_METRICS - tables.FRACTION_METRICS == {"control_gap"}
    assert "test_kl" not in analysis.FRACTION_METRICS and "test_agreement" in analysis.FRACTION_METRICS


def test_every_schema_column_is_read_with_its_schema_type(tmp_path) -> None:
    # A real-schema table: every column comes back in the dtype its arrow type names, including
    # config fields the analysis code never names (teacher_fraction, teacher_batch_size, precision).
    row = {"study": "s", "trial_id": "t", "status": "TERMINATED", **TrialConfig().to_dict(),
           "test_acc": 0.5, "test_agreement": 0.6, "epochs_completed": 2, "precision_used": "fp32"}
    write_table(to_table([row], TRIALS_SCHEMA), str(tmp_path / "s" / "trials.parquet"))
    df = analysis.load_trials(tmp_path / "s")
    for field in TRIALS_SCHEMA:
        dtype = str(df[field.name].dtype)
        if pa.types.is_floating(field.type):
            assert dtype == "float64", field.name
        elif pa.types.is_integer(field.type):
            assert dtype == "Int64", field.name
        elif pa.types.is_boolean(field.type):
            assert dtype == "boolean", field.name
        elif pa.types.is_timestamp(field.type):
            assert dtype.startswith("datetime64") and dtype.endswith("UTC]"), field.name
        else:
            assert dtype.startswith("string"), field.name


def test_a_config_field_missing_from_config_json_is_still_a_factor(tmp_path) -> None:
    rows = []
    for i, fraction in enumerate((0.5, 0.5, 1.0, 1.0)):
        config = TrialConfig(teacher_fraction=fraction, seed=i)
        rows.append({"study": "s", "trial_id": f"t{i}", "status": "TERMINATED", **config.to_dict(),
                     "test_acc": 0.5 + i / 100, "test_agreement": 0.7, "config_json": "{}"})
    write_table(to_table(rows, TRIALS_SCHEMA), str(tmp_path / "s" / "trials.parquet"))
    df = analysis.load_trials(tmp_path / "s")
    assert analysis.arm_columns(df) == ["teacher_fraction"]
