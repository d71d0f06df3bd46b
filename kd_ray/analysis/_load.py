"""Loading trial and epoch tables: study directories, dtypes, and which trials are usable.

Failed trials are never dropped on load: every row carries ``usable`` (status TERMINATED and finite
metrics) and ``excluded_reason``; the statistics leave unusable rows out and say how many and why.

A table is checked before its rows are read: a column the analysis needs that is missing, or a known
column of the wrong type, raises TableError naming the file, the column, the type found and the type
required. What loading changes or doubts is said in notes (printed on stderr, and written into the
report): a trial read twice (a row repeating another in every column, as from a copied study directory
analysed with its original) is kept once, the first read; rows sharing a study and trial_id but not
their values are kept and named; a text cell longer than MAX_TEXT_CHARS is shortened.
"""

from __future__ import annotations

import glob
import os
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kd_ray.analysis._columns import BOOL_COLUMNS, FLOAT_COLUMNS, INT_COLUMNS, STRING_COLUMNS
from kd_ray.tables import (
    EPOCHS_FILE,
    EPOCHS_SCHEMA,
    METRICS,
    PARTIAL,
    STATUSES,
    TERMINATED,
    TRIALS_FILE,
    Completeness,
    read_completeness,
)

PathLike = str | os.PathLike[str]

NONFINITE = "NONFINITE"  # excluded_reason of a TERMINATED trial whose metrics are not finite

# The longest text cell kept whole. kd_ray writes none longer (an error message is cut to 2,000
# characters); a longer one comes from a foreign or damaged table, and would be carried into arm
# labels, figures and report lines: one of 5 MB in an arm column took minutes and gigabytes to draw.
MAX_TEXT_CHARS = 2_000
# What a longer cell keeps: its start, and its end (where an error message names the exception).
_KEEP_HEAD, _KEEP_TAIL = 1_000, 500
# Rows decoded at a time, each batch's text bounded before the next is read: a highly compressible
# cell (megabytes of one character are a few kilobytes of Parquet) is expanded for one batch only.
READ_BATCH_ROWS = 256

# The Parquet types that hold each kind of value. Nulls stand for values not measured; an integer
# column with nulls comes as float64 from pandas, and coerce_dtypes reads it back as integers.
_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
_NUMBER_TYPES = (pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal, pa.types.is_null)
_INTEGER_TYPES = (pa.types.is_integer, pa.types.is_floating, pa.types.is_null)
_BOOL_TYPES = (pa.types.is_boolean, pa.types.is_null)
# Every known numeric or true/false column, wherever it appears: what it must hold (said in the
# error) and the types that hold it. A metric stored as text would otherwise be read as all null and
# drop out of the summary without a word.
_COLUMN_TYPES: dict[str, tuple[str, tuple]] = {
    **{c: ("numbers (float64; null where not measured)", _NUMBER_TYPES) for c in FLOAT_COLUMNS},
    **{c: ("integers (int64)", _INTEGER_TYPES) for c in INT_COLUMNS},
    **{c: ("true/false (bool)", _BOOL_TYPES) for c in BOOL_COLUMNS},
}
# The columns a table cannot be analysed without: which trial a row is, whether the trial counts,
# and which evaluation an epoch row is.
REQUIRED_COLUMNS: dict[str, dict[str, tuple[str, tuple]]] = {
    TRIALS_FILE: {
        "trial_id": ("text (string) or integers: the trial's id", (*_TEXT_TYPES, pa.types.is_integer)),
        "status": ("text (string): one of " + ", ".join(STATUSES), _TEXT_TYPES),
    },
    EPOCHS_FILE: {
        "trial_id": ("text (string) or integers: the trial's id", (*_TEXT_TYPES, pa.types.is_integer)),
        "epoch": ("integers (int64): the evaluation's epoch", (pa.types.is_integer, pa.types.is_floating)),
    },
}


class TableError(ValueError):
    """A table that cannot be analysed as it is: a required column missing, a column of the wrong type."""


def study_dirs(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """Resolve study directories from paths, ``trials.parquet`` files or glob patterns.

    An explicit path must hold a ``trials.parquet``; a glob keeps the matches that do (so
    ``results/*`` can skip a teacher store beside the studies) and must match at least one.
    Raises FileNotFoundError naming the offending path.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise FileNotFoundError("no study paths given")
    found: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if any(ch in text for ch in "*?["):
            matches = [_as_study_dir(Path(m)) for m in sorted(glob.glob(text))]
            studies = [m for m in matches if (m / TRIALS_FILE).is_file()]
            if not studies:
                raise FileNotFoundError(f"{text}: no study directory with a {TRIALS_FILE} matches")
            found.extend(studies)
        else:
            path = _as_study_dir(Path(text))
            if not (path / TRIALS_FILE).is_file():
                raise FileNotFoundError(
                    f"{text}: no {TRIALS_FILE} here (expected a study directory <storage>/<study>/)"
                )
            found.append(path)
    unique: list[Path] = []
    for path in found:
        if path.resolve() not in {p.resolve() for p in unique}:
            unique.append(path)
    return unique


def partial_studies(directories: Iterable[Path]) -> list[tuple[Path, Completeness]]:
    """The study directories whose tables hold fewer trials than their study expects (it is still
    running, or was interrupted), each with its completeness; tables that record none are complete."""
    found = [(directory, read_completeness(str(directory))) for directory in directories]
    return [(directory, c) for directory, c in found if c is not None and c.state == PARTIAL]


def _as_study_dir(path: Path) -> Path:
    return path.parent if path.name in (TRIALS_FILE, EPOCHS_FILE) and path.is_file() else path


def load_trials(paths: PathLike | Iterable[PathLike], verbose: bool = True) -> pd.DataFrame:
    """Read ``trials.parquet`` of one or many studies into one DataFrame with proper dtypes.

    Every row is kept; ``usable`` and ``excluded_reason`` flag failed trials (see flag_usable).
    Metric columns the tables lack are added as all-null float64 so that callers can rely on them.
    A trial read twice (the same row, as from a copied study directory) is kept once, the first read;
    that, trials that share a study and trial_id but not their values (kept), and text cells shortened
    are said on stderr (with verbose). Raises TableError for a table that cannot be analysed.
    """
    trials, notes = read_trials(study_dirs(paths))
    print_notes(notes, verbose)
    return trials


def read_trials(directories: list[Path]) -> tuple[pd.DataFrame, list[str]]:
    """load_trials of study directories (from study_dirs), returning its notes rather than printing them."""
    frames, sources, notes = _read_tables(directories, TRIALS_FILE)
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    df = coerce_dtypes(df)
    df, repeated = _drop_copies(df, sources, ["study", "trial_id"], "trials")
    for metric in METRICS:
        if metric not in df.columns:
            df[metric] = np.nan
    return flag_usable(df), [*notes, *repeated]


def load_epochs(paths: PathLike | Iterable[PathLike], verbose: bool = True) -> pd.DataFrame:
    """Read ``epochs.parquet`` of one or many studies, flagged with the trial's status and usable.

    Studies without an epochs table contribute nothing; the result may be empty. An epoch row read
    twice (the same row) is kept once, the first read, as load_trials does.
    """
    epochs, notes = read_epochs(study_dirs(paths))
    print_notes(notes, verbose)
    return epochs


def read_epochs(directories: list[Path]) -> tuple[pd.DataFrame, list[str]]:
    """load_epochs of study directories (from study_dirs), returning its notes rather than printing them."""
    frames, sources, notes = _read_tables(directories, EPOCHS_FILE)
    if not frames:
        empty = coerce_dtypes(EPOCHS_SCHEMA.empty_table().to_pandas())
        for metric in METRICS:
            if metric not in empty.columns:
                empty[metric] = pd.Series(dtype="float64")
        return empty.assign(status=pd.Series(dtype="string"), usable=pd.Series(dtype=bool)), notes
    epochs = coerce_dtypes(pd.concat(frames, ignore_index=True))
    epochs, repeated = _drop_copies(epochs, sources, ["study", "trial_id", "epoch"], "epoch rows")
    for metric in METRICS:
        if metric not in epochs.columns:
            epochs[metric] = np.nan
    # Only what decides a trial's usable flag: the configs and provenance are not read again (their
    # notes are read_trials's to say). The first trial of each study and trial_id gives its flag, so
    # that an epoch row meets one trial row, however often its trial was read.
    trial_frames = _read_tables(directories, TRIALS_FILE, columns=("study", "trial_id", "status", *METRICS))[0]
    trials = coerce_dtypes(pd.concat(trial_frames, ignore_index=True)).drop_duplicates(["study", "trial_id"])
    trials = flag_usable(trials)[["study", "trial_id", "status", "usable"]]
    epochs = epochs.drop(columns=[c for c in ("status", "usable") if c in epochs.columns])
    epochs = epochs.merge(trials, on=["study", "trial_id"], how="left")
    # An epoch row whose trial is missing from trials.parquet cannot be attributed to an arm.
    epochs["usable"] = epochs["usable"].fillna(False).astype(bool)
    return epochs, [*notes, *repeated]


def print_notes(notes: Iterable[str], verbose: bool = True) -> None:
    """Say on stderr what loading changed (rows dropped, cells shortened)."""
    if verbose:
        for note in notes:
            print(note, file=sys.stderr)


def _read_tables(
    directories: list[Path], name: str, columns: Iterable[str] | None = None
) -> tuple[list[pd.DataFrame], np.ndarray, list[str]]:
    """The ``name`` table of each directory that has one (its ``columns`` where given), each with
    a ``study`` column (the directory's name where the table has none); the directory each row came
    from; and a note per table whose text cells were shortened."""
    frames, sources, notes = [], [], []
    for directory in directories:
        path = directory / name
        if not path.is_file():
            continue
        frame, shortened = _read_table(path, name, columns)
        if "study" not in frame.columns:
            frame.insert(0, "study", directory.name)
        frames.append(frame)
        sources.append(np.full(len(frame), str(directory), dtype=object))
        if shortened:
            cells = ", ".join(f"{n} in column '{column}'" for column, n in shortened.items())
            notes.append(f"{path}: shortened text cells longer than {MAX_TEXT_CHARS:,} characters to their first "
                         f"{_KEEP_HEAD:,} and last {_KEEP_TAIL:,} characters: {cells}")
    return frames, np.concatenate(sources) if sources else np.array([], dtype=object), notes


def _read_table(path: Path, name: str, columns: Iterable[str] | None) -> tuple[pd.DataFrame, Counter[str]]:
    """One Parquet table, its columns checked (check_columns) before any row is read and its text
    cells bounded batch by batch; with how many cells of each column were shortened."""
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        check_columns(path, name, schema)
        wanted = None if columns is None else [c for c in schema.names if c in set(columns)]
        batches, shortened = [], Counter()
        text_columns = None
        # One thread: in batches this small, handing columns to threads costs more than it saves.
        for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, columns=wanted, use_threads=False):
            if text_columns is None:
                text_columns = [i for i, field in enumerate(batch.schema) if _holds_text(field.type)]
            arrays = list(batch.columns)
            changed = False
            for i in text_columns:
                bounded, n = _bound_text(arrays[i])
                if bounded is not arrays[i]:  # shortened, or a dictionary decoded
                    arrays[i], changed = bounded, True
                if n:
                    shortened[batch.schema.names[i]] += n
            if changed:  # from the arrays' own types (a dictionary of text is decoded), with the pandas metadata
                batch = pa.RecordBatch.from_arrays(arrays, names=batch.schema.names).replace_schema_metadata(
                    batch.schema.metadata)
            batches.append(batch)
    except pa.ArrowException as error:  # not Parquet, cut off, damaged pages
        raise TableError(f"{path}: cannot be read as a Parquet table: {error}") from None
    if batches:
        table = pa.Table.from_batches(batches)
    else:
        table = schema.empty_table() if wanted is None else schema.empty_table().select(wanted)
    return table.to_pandas(), shortened


def check_columns(path: PathLike, name: str, schema: pa.Schema) -> None:
    """Raise TableError unless the table (TRIALS_FILE or EPOCHS_FILE ``name``) has every required
    column, each column once, and each known column in a type that holds its kind of value."""
    counts = Counter(schema.names)
    for column, count in counts.items():
        if count > 1:
            raise TableError(f"{path}: column '{column}' appears {count} times; each column must appear once")
    required = REQUIRED_COLUMNS[name]
    kind = "trials" if name == TRIALS_FILE else "epochs"
    for column, (what, _) in required.items():
        if column not in counts:
            raise TableError(f"{path}: column '{column}' is missing; a {kind} table needs it, holding {what}")
    for field in schema:
        rule = required.get(field.name) or _COLUMN_TYPES.get(field.name)
        if rule is None:
            continue
        what, types = rule
        value_type = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        if not any(is_type(value_type) for is_type in types):
            raise TableError(f"{path}: column '{field.name}' has type {field.type}; it must hold {what}")


def _holds_text(data_type: pa.DataType) -> bool:
    value_type = data_type.value_type if pa.types.is_dictionary(data_type) else data_type
    return any(is_type(value_type) for is_type in _TEXT_TYPES)


def _bound_text(values: pa.Array) -> tuple[pa.Array, int]:
    """Text values (see _holds_text) with every cell longer than MAX_TEXT_CHARS cut to its start and
    end around a marker saying how much was cut; and how many cells were."""
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()  # a shortened dictionary could repeat a value
    if pa.types.is_string_view(values.type):
        values = values.cast(pa.large_string())
    if len(values) == 0:
        return values, 0
    # Bytes are never fewer than characters, and the longest cell in bytes is read off the offsets
    # without touching the text: most batches of most tables are passed on here.
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int64 if pa.types.is_large_string(values.type) else np.int32)
    if np.diff(offsets[values.offset:values.offset + len(values) + 1]).max() <= MAX_TEXT_CHARS:
        return values, 0
    lengths = pc.utf8_length(values)  # in characters, as the slices below count
    long = pc.greater(lengths, MAX_TEXT_CHARS)
    count = pc.sum(long).as_py() or 0  # None when every cell is null
    if not count:
        return values, 0
    text = values.type

    def literal(words: str) -> pa.Scalar:
        return pa.scalar(words, type=text)

    cut = pc.cast(pc.subtract(lengths, _KEEP_HEAD + _KEEP_TAIL), text)
    shortened = pc.binary_join_element_wise(
        pc.utf8_slice_codeunits(values, 0, _KEEP_HEAD), literal(" … ["), cut, literal(" characters cut] … "),
        pc.utf8_slice_codeunits(values, -_KEEP_TAIL), literal(""),
    )
    return pc.if_else(long, shortened, values), count


def _drop_copies(df: pd.DataFrame, sources: np.ndarray, keys: list[str], what: str) -> tuple[pd.DataFrame, list[str]]:
    """df without the rows that repeat a row before them in every column (the same trial read twice,
    as from a copied study directory analysed with its original), the first read kept: the paths are
    read in the order given. Rows that share their ``keys`` with another but not all its values are
    all kept, as different trials: nothing says which of them is the right one, and ids made by other
    tools can coincide. Notes say how many rows of each were found and where; rows with a null key
    are never matched."""
    keyed = df[keys].notna().all(axis=1).to_numpy(dtype=bool)
    shared = df.duplicated(keys, keep=False).to_numpy(dtype=bool) & keyed
    if not shared.any():
        return df, []
    # Compared as text, which every dtype (nullable integers, floats, a foreign column's lists) becomes.
    copies = np.zeros(len(df), dtype=bool)
    copies[shared] = df[shared].astype("string").fillna("\0null").duplicated(keep="first").to_numpy(dtype=bool)
    same = " and ".join([", ".join(keys[:-1]), keys[-1]])
    notes = []
    if copies.any():
        notes.append(f"dropped {copies.sum()} repeated {what} ({_counted(sources[copies])}): each a copy of one "
                     f"read before it (the same {same}, the same values), which is kept")
    kept = df[~copies]
    conflicting = kept.duplicated(keys, keep=False).to_numpy(dtype=bool) & keyed[~copies]
    if conflicting.any():
        notes.append(f"{conflicting.sum()} {what} share their {same} with another but not its values "
                     f"({_counted(sources[~copies][conflicting])}): all kept, as different {what}")
    return kept.reset_index(drop=True), notes


def _counted(sources: np.ndarray) -> str:
    """'3 from results/a, 1 from results/b'."""
    return ", ".join(f"{n} from {source}" for source, n in Counter(sources).items())


def coerce_dtypes(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with each known column in the dtype its schema type gives; other columns as they are."""
    df = df.copy()
    for column in df.columns:
        if column in FLOAT_COLUMNS:
            df[column] = pd.to_numeric(df[column], errors="coerce").astype("float64")
        elif column in INT_COLUMNS:
            values = pd.to_numeric(df[column], errors="coerce")
            finite = values.dropna()
            # Nullable Int64 keeps 3 as "3" after a concat introduced nulls; non-integers stay float.
            if (finite == np.round(finite)).all():
                df[column] = values.astype("Int64")
            else:
                df[column] = values.astype("float64")
        elif column in BOOL_COLUMNS:
            df[column] = df[column].astype("boolean")
        elif column in STRING_COLUMNS:
            df[column] = df[column].astype("string")
    return df


def flag_usable(df: pd.DataFrame) -> pd.DataFrame:
    """Return a copy with ``usable`` (bool) and ``excluded_reason`` (status, NONFINITE or null).

    A trial is usable when its status is TERMINATED, none of its metrics is infinite, and its
    test_acc and test_agreement are present (where the table records those metrics at all).
    """
    df = df.copy()
    status = df["status"].astype("string") if "status" in df.columns else pd.Series("", index=df.index)
    terminated = (status == TERMINATED).fillna(False).to_numpy(dtype=bool)
    finite = np.ones(len(df), dtype=bool)
    for metric in METRICS:
        if metric not in df.columns:
            continue
        values = as_float(df[metric])
        finite &= ~np.isinf(values)
        if metric in ("test_acc", "test_agreement") and not np.isnan(values).all():
            finite &= ~np.isnan(values)
    df["usable"] = terminated & finite
    reason = status.fillna("UNKNOWN").where(~terminated, NONFINITE)
    df["excluded_reason"] = reason.where(~df["usable"], pd.NA).astype("string")
    return df


def ensure_flags(df: pd.DataFrame) -> pd.DataFrame:
    """df itself when it carries the usable flags already (from load_trials), else flagged."""
    return df if {"usable", "excluded_reason"} <= set(df.columns) else flag_usable(df)


def exclusion_counts(df: pd.DataFrame) -> str:
    """'DIVERGED: 1, ERROR: 2' for the unusable rows, statuses in their usual order; '' if none."""
    excluded = df.loc[~df["usable"], "excluded_reason"].fillna("UNKNOWN")
    counts = excluded.value_counts()
    order = [s for s in (*STATUSES, NONFINITE) if s in counts.index]
    order += sorted(s for s in counts.index if s not in order)
    return ", ".join(f"{reason}: {counts[reason]}" for reason in order)


def exclusion_message(df: pd.DataFrame) -> str | None:
    """'excluded 2 trials (...); pass include_failed=True to keep them', or None when none is."""
    n_excluded = int((~df["usable"]).sum())
    if n_excluded == 0:
        return None
    noun = "trial" if n_excluded == 1 else "trials"
    return f"excluded {n_excluded} {noun} ({exclusion_counts(df)}); pass include_failed=True to keep them"


def usable_rows(df: pd.DataFrame, include_failed: bool, verbose: bool) -> pd.DataFrame:
    """The usable rows (all rows with include_failed), printing the exclusions when verbose."""
    df = ensure_flags(df)
    if include_failed:
        return df
    message = exclusion_message(df)
    if message and verbose:
        print(message)
    return df[df["usable"]]


def as_float(values: pd.Series | pd.DataFrame) -> np.ndarray:
    """A float array with NaN for nulls, from any numeric or nullable (Int64, boolean) column(s)."""
    if isinstance(values, pd.DataFrame):
        values = values.apply(pd.to_numeric, errors="coerce")
    else:
        values = pd.to_numeric(values, errors="coerce")
    return values.to_numpy(dtype=float, na_value=np.nan)


def finite_values(values: pd.Series | np.ndarray) -> np.ndarray:
    array = as_float(pd.Series(values))
    return array[np.isfinite(array)]


def has_values(df: pd.DataFrame, *columns: str) -> bool:
    """Every one of ``columns`` is in df and holds at least one finite value."""
    return all(c in df.columns and finite_values(df[c]).size > 0 for c in columns)
