"""Loading trial and epoch tables: study directories, dtypes, and which trials are usable.

Failed trials are never dropped on load: every row carries ``usable`` (status TERMINATED and finite
metrics) and ``excluded_reason``; the statistics leave unusable rows out and say how many and why.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
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


def load_trials(paths: PathLike | Iterable[PathLike]) -> pd.DataFrame:
    """Read ``trials.parquet`` of one or many studies into one DataFrame with proper dtypes.

    Every row is kept; ``usable`` and ``excluded_reason`` flag failed trials (see flag_usable).
    Metric columns the tables lack are added as all-null float64 so that callers can rely on them.
    """
    frames = _read_tables(study_dirs(paths), TRIALS_FILE)
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    df = coerce_dtypes(df)
    for metric in METRICS:
        if metric not in df.columns:
            df[metric] = np.nan
    return flag_usable(df)


def load_epochs(paths: PathLike | Iterable[PathLike]) -> pd.DataFrame:
    """Read ``epochs.parquet`` of one or many studies, flagged with the trial's status and usable.

    Studies without an epochs table contribute nothing; the result may be empty.
    """
    directories = study_dirs(paths)
    frames = _read_tables(directories, EPOCHS_FILE)
    if not frames:
        empty = coerce_dtypes(EPOCHS_SCHEMA.empty_table().to_pandas())
        for metric in METRICS:
            if metric not in empty.columns:
                empty[metric] = pd.Series(dtype="float64")
        return empty.assign(status=pd.Series(dtype="string"), usable=pd.Series(dtype=bool))
    epochs = coerce_dtypes(pd.concat(frames, ignore_index=True))
    for metric in METRICS:
        if metric not in epochs.columns:
            epochs[metric] = np.nan
    # Only what decides a trial's usable flag: the configs and provenance are not read again.
    trial_frames = _read_tables(directories, TRIALS_FILE, columns=("study", "trial_id", "status", *METRICS))
    trials = flag_usable(coerce_dtypes(pd.concat(trial_frames, ignore_index=True)))
    trials = trials[["study", "trial_id", "status", "usable"]]
    epochs = epochs.drop(columns=[c for c in ("status", "usable") if c in epochs.columns])
    epochs = epochs.merge(trials, on=["study", "trial_id"], how="left")
    # An epoch row whose trial is missing from trials.parquet cannot be attributed to an arm.
    epochs["usable"] = epochs["usable"].fillna(False).astype(bool)
    return epochs


def _read_tables(directories: list[Path], name: str, columns: Iterable[str] | None = None) -> list[pd.DataFrame]:
    """The ``name`` table of each directory that has one (its ``columns`` where given), each with
    a ``study`` column (the directory's name where the table has none)."""
    keep = None if columns is None else set(columns)
    frames = []
    for directory in directories:
        path = directory / name
        if not path.is_file():
            continue
        wanted = None if keep is None else [c for c in pq.read_schema(path).names if c in keep]
        frame = pq.read_table(path, columns=wanted).to_pandas()
        if "study" not in frame.columns:
            frame.insert(0, "study", directory.name)
        frames.append(frame)
    return frames


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
