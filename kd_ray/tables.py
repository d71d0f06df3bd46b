"""Trial and epoch tables: one pyarrow schema each, atomic Parquet writes, plain reads.

``trials.parquet`` has one row per trial; ``epochs.parquet`` one row per trial and evaluation epoch.
Both live in ``<storage>/<study>/``. Column names are fixed: add, never rename.

While a study runs, each finished trial is written as its own part (``trial_parts/``) and the parts
are compacted into the two tables every few seconds, so the tables grow as trials finish. The
trials table records how many of the study's trials it holds (``read_completeness``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kd_ray.atomic import filesystem, write_atomic
from kd_ray.config import ConfigError, TrialConfig

TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
# Finished trials not yet compacted into the tables: <trial_id>.trial.arrow (its row) and
# <trial_id>.epochs.arrow (its epoch rows), Arrow IPC files (a tenth of Parquet's cost to write and
# read back for one row). The epochs part is written first, so a trial part is never without its epochs.
PARTS_DIR = "trial_parts"
TRIAL_PART, EPOCHS_PART = ".trial.arrow", ".epochs.arrow"
# How many of the study's trials the tables hold, in the trials table's own metadata: one atomic
# write keeps the count and the rows it counts together.
COMPLETENESS_KEY = b"kd_ray.completeness"
PARTIAL, COMPLETE = "partial", "complete"

TERMINATED, ERROR, DIVERGED, STOPPED = "TERMINATED", "ERROR", "DIVERGED", "STOPPED"
STATUSES = (TERMINATED, ERROR, DIVERGED, STOPPED)

# How well the student does on its own.
GENERALIZATION_METRICS = ("test_acc", "test_nll", "test_ece")
# How closely the student matches its teacher. Beside top-1 agreement and KL (kd_ray.train.metrics defines
# each): the mean share of the teacher's top 5 classes among the student's top 5, the Jensen-Shannon divergence,
# and the agreement on the examples the teacher gets right and on those it gets wrong (NaN where there are none).
FIDELITY_METRICS = ("test_agreement", "test_kl", "train_agreement", "train_kl", "aug_train_agreement",
                    "test_top5_overlap", "test_jsd", "test_agreement_teacher_right", "test_agreement_teacher_wrong")
# The student's metrics on the validation examples held out of the train split (TrialConfig.val_fraction),
# defined as the test_* ones; NaN where none are held out. Searches and ASHA select on these.
VALIDATION_METRICS = ("val_acc", "val_nll", "val_ece", "val_agreement", "val_kl",
                      "val_top5_overlap", "val_jsd", "val_agreement_teacher_right", "val_agreement_teacher_wrong")
# The teacher ensemble's own: on the test set, its accuracy on its own (clean) training examples, and its
# mean max predicted probability on the test set (how confident it is).
TEACHER_METRICS = ("teacher_test_acc", "teacher_test_nll", "teacher_test_ece", "teacher_train_acc",
                   "teacher_test_confidence")
# Measured only by trials that run the independent-student control; absent from epochs.parquet.
CONTROL_METRICS = ("control_test_agreement",)
# How alike the final student's and teacher member 0's representations are: linear CKA at up to three
# stages, the first, a middle and the last (kd_ray.train.cka says which); NaN where a network has fewer.
CKA_METRICS = ("cka_stage1", "cka_stage2", "cka_stage3")
# Measured once per trial, after training: absent from epochs.parquet.
AFTER_TRAINING_METRICS = CONTROL_METRICS + CKA_METRICS
# In the column order of the tables.
METRICS = (GENERALIZATION_METRICS + FIDELITY_METRICS + VALIDATION_METRICS + TEACHER_METRICS + CONTROL_METRICS
           + CKA_METRICS)
# Fractions in [0, 1]; the other metrics (KL, JSD, NLL) are in nats.
FRACTION_METRICS = frozenset(m for m in METRICS if m.endswith(
    ("_acc", "_agreement", "_ece", "_confidence", "_overlap", "_teacher_right", "_teacher_wrong")))
# What an Optuna search optimises and ASHA stops trials on: hyperparameters are chosen on validation data,
# and the test metrics are only reported, so that they stay an unbiased estimate of the chosen trials.
SELECTION_METRICS = VALIDATION_METRICS
# Per trial, once: the optimizer steps of the student's schedule and of one teacher member's.
STEP_COUNTS = ("student_steps", "teacher_steps")
# Per trial, once: the inputs a teacher member trained on and the inputs the student distilled on (extra
# inputs included), so that a table says how large its distillation set was against its teacher's.
DATA_SIZES = ("teacher_train_size", "distill_size")
# Per trial, once: the change of train agreement over the second half of training, and whether it
# stayed within the threshold (kd_ray.train.setup.CONVERGED_WITHIN); null for a trial that did not finish.
CONVERGENCE = ("convergence_delta", "converged")

# Per trial, once: the pack it trained in (kd_ray.packs.run; a trial trained alone is a pack of one, its own
# trial_id), how many students that pack held, and this student's share of the pack's time. A packed study's
# pack_id is its name in packs.json (pack0000, ...), the same in the pack's Ray Tune config and trial directory.
PACK = ("pack_id", "pack_size", "pack_time_share")
# Per trial, once: the Ray Tune trial that ran it (its pack's, or its own), and the number of its Optuna trial
# in the study's journal (null outside an Optuna search).
RUN_BY = ("ray_trial_id", "optuna_trial_number")
# Per trial, once, UTC: when its training began (a pack's students: the pack's start; a trial resumed from a
# checkpoint: its first start) and ended (a pack's students: the pack's end; a trial that failed or was stopped:
# its last report). Per epoch row: ``EPOCH_TIMESTAMP``, when that evaluation was reported.
TIMES = ("started_at", "ended_at")
EPOCH_TIMESTAMP = "timestamp"
TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")  # pandas reads it as datetime64[us, UTC]

# Per-example predictions (TrialConfig.save_predictions): one Parquet file per trial, <trial_id>.parquet,
# in this folder of the study's directory (kd_ray.train.predictions writes them, kd_ray.analysis reads them).
PREDICTIONS_DIR = "predictions"


def packed_trial_id(pack_id: str, index: int) -> str:
    """The ``trial_id`` of student ``index`` of the pack (Ray Tune trial) ``pack_id``."""
    return f"{pack_id}_{index}"


# Which code, and which device, produced a row.
PRODUCED_BY = ("kd_ray_version", "git_sha", "torch_version", "ray_version", "device_name")
PROVENANCE = ("teacher_key", *PRODUCED_BY, "precision_used", "fast_path", "config_json")


def check_selection_metric(what: str, metric: str) -> None:
    """Refuse ``metric`` as what a search or scheduler selects on (``what`` names that setting) unless it
    is one of ``SELECTION_METRICS``: one ConfigError line naming the setting, the value and what is allowed."""
    if metric not in SELECTION_METRICS:
        raise ConfigError(f"{what}={metric!r} is not allowed: trials are selected on the validation split and test "
                          f"metrics are only reported; allowed: {', '.join(SELECTION_METRICS)}")


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
    + [pa.field(name, pa.int64()) for name in STEP_COUNTS + DATA_SIZES]
    + [pa.field("convergence_delta", pa.float64()), pa.field("converged", pa.bool_())]
    + [pa.field(p, pa.string()) for p in PROVENANCE]
    + [pa.field("pack_id", pa.string()), pa.field("pack_size", pa.int64()), pa.field("pack_time_share", pa.float64())]
    + [pa.field("ray_trial_id", pa.string()), pa.field("optuna_trial_number", pa.int64())]
    + [pa.field(name, TIMESTAMP_TYPE) for name in TIMES]
)

EPOCHS_SCHEMA = pa.schema(
    [pa.field("study", pa.string()), pa.field("trial_id", pa.string()), pa.field("epoch", pa.int64()),
     pa.field("lr", pa.float64()), pa.field("train_loss", pa.float64())]
    + [pa.field(m, pa.float64()) for m in METRICS if m not in AFTER_TRAINING_METRICS]
    + [pa.field("train_time_s", pa.float64()), pa.field(EPOCH_TIMESTAMP, TIMESTAMP_TYPE)]
)

# The loss surface of one trial (paper Fig. 6c): a row per point (a, b) of the plane through the teacher,
# the student's initial and its final weights, with the distillation loss and the train agreement there;
# every row repeats the three points' coordinates and what produced the table.
LOSS_SURFACE_FILE = "loss_surface.parquet"
PLANE_POINTS = ("teacher", "init", "final")
LOSS_SURFACE_SCHEMA = pa.schema(
    [pa.field(name, pa.float64()) for name in ("a", "b", "loss", "agreement")]
    + [pa.field(f"{point}_{axis}", pa.float64()) for point in PLANE_POINTS for axis in ("a", "b")]
    + [pa.field(p, pa.string()) for p in ("teacher_key", *PRODUCED_BY, "config_json")]
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


def write_study_tables(
    study_dir: str, trials: list[dict], epochs: list[dict], expected: int | None = None
) -> tuple[str, str]:
    """Both tables of a study from rows; with ``expected``, the trials table records its completeness."""
    return _write_tables(study_dir, to_table(trials, TRIALS_SCHEMA), to_table(epochs, EPOCHS_SCHEMA), expected)


def _write_tables(study_dir: str, trials: pa.Table, epochs: pa.Table, expected: int | None) -> tuple[str, str]:
    # Epochs first: a reader that sees a trial's row finds its epochs too.
    epochs_path = write_table(epochs, _join(study_dir, EPOCHS_FILE))
    if expected is not None:
        completeness = Completeness(finished=trials.num_rows, expected=expected)
        trials = trials.replace_schema_metadata({COMPLETENESS_KEY: completeness.to_json()})
    trials_path = write_table(trials, _join(study_dir, TRIALS_FILE))
    return trials_path, epochs_path


def read_table(path: str) -> pa.Table:
    fs, resolved = filesystem(path)
    with fs.open_input_file(resolved) as handle:
        return pq.read_table(handle)


# --- completeness and the parts of a running study ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Completeness:
    """How many of a study's trials its tables hold: ``finished`` (a row each, whatever its status)
    of the ``expected`` trials; ``complete`` once every expected trial is in."""

    finished: int
    expected: int

    @property
    def state(self) -> str:
        return COMPLETE if self.finished >= self.expected else PARTIAL

    def to_json(self) -> str:
        return json.dumps({"finished": self.finished, "expected": self.expected, "completeness": self.state})


def read_completeness(study_dir: str) -> Completeness | None:
    """The completeness the trials table records; None without a table or a record (older tables)."""
    fs, path = filesystem(_join(study_dir, TRIALS_FILE))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_file(path) as handle:
        metadata = pq.read_schema(handle).metadata or {}
    if COMPLETENESS_KEY not in metadata:
        return None
    record = json.loads(metadata[COMPLETENESS_KEY])
    return Completeness(finished=int(record["finished"]), expected=int(record["expected"]))


def write_trial_part(study_dir: str, trial_row: dict[str, Any], epoch_rows: list[dict[str, Any]]) -> None:
    """One finished trial's rows as its own part, for ``compact_trial_parts`` to fold in. A later
    part of the same trial_id replaces it."""
    stem = _join(study_dir, PARTS_DIR, str(trial_row["trial_id"]))
    for table, path in ((to_table(epoch_rows, EPOCHS_SCHEMA), stem + EPOCHS_PART),
                        (to_table([trial_row], TRIALS_SCHEMA), stem + TRIAL_PART)):
        write_atomic(path, lambda stream, table=table: _write_arrow(table, stream))


def _write_arrow(table: pa.Table, stream) -> None:
    with pa.ipc.new_file(stream, table.schema) as writer:
        writer.write_table(table)


def compact_trial_parts(study_dir: str, expected: int) -> Completeness | None:
    """Fold the pending trial parts into the two tables (one row per trial_id: a part replaces the
    rows its trial had, so the last write wins), record the completeness, then delete the parts.

    Returns the completeness written, or None when there was nothing to write (no parts, and a
    table that already records this completeness or no table at all). A crash at any point leaves
    tables a reader can use; the parts not yet deleted are folded in again next time."""
    fs, parts_dir = filesystem(_join(study_dir, PARTS_DIR))
    names = {
        info.base_name for info in fs.get_file_info(pafs.FileSelector(parts_dir, allow_not_found=True))
        if info.type == pafs.FileType.File
    }
    trial_ids = sorted(name[: -len(TRIAL_PART)] for name in names if name.endswith(TRIAL_PART))
    # An epochs part without its trial part is left from a write that did not finish: the trial
    # is not in, and it is written again when it finishes again.
    orphans = [name for name in names if name.endswith(EPOCHS_PART) and name[: -len(EPOCHS_PART)] not in trial_ids]
    trials = _read_if_present(_join(study_dir, TRIALS_FILE), TRIALS_SCHEMA)
    if not trial_ids:
        for name in orphans:
            fs.delete_file(f"{parts_dir}/{name}")
        if trials is None or read_completeness(study_dir) == Completeness(trials.num_rows, expected):
            return None
    epochs = _read_if_present(_join(study_dir, EPOCHS_FILE), EPOCHS_SCHEMA)
    replaced = pa.array(trial_ids, type=pa.string())

    def kept_and_new(table: pa.Table | None, schema: pa.Schema, part: str) -> pa.Table:
        kept = [] if table is None else [table.filter(pc.invert(pc.is_in(table["trial_id"], replaced)))]
        new = [_read_in_schema(fs, f"{parts_dir}/{trial_id}{part}", schema, arrow=True) for trial_id in trial_ids]
        return pa.concat_tables([schema.empty_table(), *kept, *new]).combine_chunks()

    trials = kept_and_new(trials, TRIALS_SCHEMA, TRIAL_PART)
    _write_tables(study_dir, trials, kept_and_new(epochs, EPOCHS_SCHEMA, EPOCHS_PART), expected)
    for trial_id in trial_ids:
        fs.delete_file(f"{parts_dir}/{trial_id}{TRIAL_PART}")  # first: the trial part says the trial is pending
        fs.delete_file(f"{parts_dir}/{trial_id}{EPOCHS_PART}")
    for name in orphans:
        fs.delete_file(f"{parts_dir}/{name}")
    return Completeness(trials.num_rows, expected)


def table_trial_ids(study_dir: str) -> set[str]:
    """The trial_ids in a study's trials table (none without a table)."""
    fs, path = filesystem(_join(study_dir, TRIALS_FILE))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return set()
    with fs.open_input_file(path) as handle:
        return set(pq.read_table(handle, columns=["trial_id"])["trial_id"].to_pylist())


def _join(study_dir: str, *names: str) -> str:
    return "/".join([study_dir.rstrip("/"), *names])


def _read_if_present(path: str, schema: pa.Schema) -> pa.Table | None:
    fs, resolved = filesystem(path)
    if fs.get_file_info(resolved).type != pafs.FileType.File:
        return None
    return _read_in_schema(fs, resolved, schema)


def _read_in_schema(fs: pafs.FileSystem, path: str, schema: pa.Schema, arrow: bool = False) -> pa.Table:
    """A Parquet (or Arrow IPC) file read back in exactly ``schema``: a column the file lacks (written
    before the column was added) is null, a column the schema dropped is left out, the metadata is
    not kept."""
    with fs.open_input_file(path) as handle:
        table = pa.ipc.open_file(handle).read_all() if arrow else pq.read_table(handle)
    if table.schema.equals(schema, check_metadata=False):
        return table.replace_schema_metadata(None)
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)
