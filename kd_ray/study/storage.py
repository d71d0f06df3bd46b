"""Where a study lives: its name, its storage, the lock that gives it one driver, and whether it began.

- ``check_study_name``: a study's name is one path component of bounded length, so that
  ``<storage>/<name>`` stays inside the storage and clear of the storage's own folders.
- ``check_storage``: a local ``--storage`` is (or can be made) a writable directory, before Ray starts.
- ``study_lock``: one driver per study. The lock is an ``flock`` on ``<storage>/locks/<name>.lock``,
  which the kernel drops when its holder dies, so a killed driver never leaves a stale lock behind.
- ``study_state``: absent, not begun (a run that ended before Ray Tune saved any state: a rerun may
  take the directory over) or begun (only ``--resume`` goes on with it).
- ``growth_folder``: where a growth of a study's seeds runs its own Ray Tune experiment, inside the study.

This module imports neither Ray nor torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator

import pyarrow.fs as pafs

from kd_ray.atomic import filesystem, is_uri
from kd_ray.config import ConfigError
from kd_ray.tables import EPOCHS_FILE, PARTS_DIR, TRIALS_FILE

# The storage's own folders: the teacher store every study shares, and the study locks.
TEACHERS_DIR = "teachers"
LOCKS_DIR = "locks"
RESERVED_NAMES = (TEACHERS_DIR, LOCKS_DIR)
# A study's name becomes a directory, a lock file (``<name>.lock``) and part of Ray Tune's names for
# its trials; 100 characters leaves room for those within a file name's 255 bytes.
MAX_NAME_LENGTH = 100
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=,-]*")
# The files of <storage>/<name>/ beside the tables: what decides the study's trials, Ray Tune's saved
# Tuner and the prefix of its saved experiment states, and an Optuna search's study.
SPEC_FILE = "spec.json"
TUNER_FILE = "tuner.pkl"
EXPERIMENT_STATE_PREFIX = "experiment_state-"
OPTUNA_JOURNAL = "optuna.journal"
# A growth of the study's seeds runs as a Ray Tune experiment of its own, in <storage>/<name>/grown-<k>/.
GROWTH_FOLDER = "grown-"
# What only a study that began holds: Ray Tune's saved experiment state, the tables, trial parts.
_BEGUN_MARKERS = (TRIALS_FILE, EPOCHS_FILE, PARTS_DIR)
# What a run that ended before its first saved state can leave: its spec, Ray Tune's Tuner (cut off when
# pickling it failed) and an Optuna journal with no trial told. A rerun replaces them.
_NOT_BEGUN_LEFTOVERS = (SPEC_FILE, TUNER_FILE, OPTUNA_JOURNAL)

ABSENT, NOT_BEGUN, BEGUN = "absent", "not begun", "begun"


def check_study_name(name: str) -> None:
    """Raise ConfigError unless ``name`` is one safe path component: letters, digits and ``_ . + = , -``,
    not starting with a dot or a dash, at most MAX_NAME_LENGTH characters, none of RESERVED_NAMES."""
    allowed = (f"a name of 1 to {MAX_NAME_LENGTH} characters: letters, digits and _ . + = , - (not first: "
               f". or -), other than {' or '.join(RESERVED_NAMES)}")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        shown = name if not isinstance(name, str) or len(name) <= 40 else f"{name[:40]}... ({len(name)} characters)"
        raise ConfigError(f"study name {shown!r} is not allowed; allowed: {allowed}")
    if name in RESERVED_NAMES:
        raise ConfigError(f"study name {name!r} is the storage's own folder; allowed: {allowed}")


# How a storage fails, and what the user does about it: (what happened, the fix).
STORAGE_FAULTS = {
    errno.ENOSPC: ("ran out of space", "free space there"),
    errno.EDQUOT: ("is over its disk quota", "free space there or raise the quota"),
    errno.EROFS: ("turned read-only", "make it writable again"),
    errno.EACCES: ("refused a write (permission denied)", "make it writable again"),
    errno.EPERM: ("refused a write (operation not permitted)", "make it writable again"),
    errno.ENOENT: ("disappeared (deleted, moved or unmounted)", "put it back"),
    errno.ESTALE: ("went stale (its network filesystem lost it)", "mount it again"),
    errno.EIO: ("failed with an I/O error", "check the disk"),
}


class StorageError(RuntimeError):
    """The storage failed: one line naming it, what happened and the way on (exit code 4). ``line``
    gives it with another way to rerun, for a study that does not exist yet (``rerun_hint``)."""

    def __init__(self, where: str, code: int, detail: str) -> None:
        self.where, self.code, self.detail = where, code, detail
        super().__init__(self.line("rerun the same command with --resume"))

    def line(self, rerun: str) -> str:
        what, fix = STORAGE_FAULTS[self.code]
        return f"{self.where} {what} ({self.detail}); {fix}, then {rerun}"

    def line_for(self, study_dir: str) -> str:
        """The line, saying --resume only where the study's folder exists (a fault before the study began
        is rerun as it was) or will again, once the fix puts back the storage that disappeared."""
        return self.line("rerun the same command with --resume" if self.code == errno.ENOENT
                         else rerun_hint(study_dir))


def os_error_detail(error: OSError, filename: str | None) -> str:
    """``Read-only file system: /mnt/s/locks``: what the OS said, and of which file."""
    return (error.strerror or os.strerror(error.errno)) + (f": {filename}" if filename else "")

    def __reduce__(self):
        return StorageError, (self.where, self.code, self.detail)


def check_storage(storage_path: str) -> None:
    """A local storage must be a directory, or a path where one can be made, and must take the study
    locks' folder: else one line, a ConfigError for a path that cannot be a directory, a StorageError
    for a storage that refuses writes. A URI (``s3://``, ``gs://``) is left to its filesystem."""
    if is_uri(storage_path):
        return
    try:
        os.makedirs(storage_path, exist_ok=True)
        if not os.path.isdir(storage_path):
            raise NotADirectoryError(errno.ENOTDIR, "a file, not a directory")
        os.makedirs(os.path.join(storage_path, LOCKS_DIR), exist_ok=True)
    except OSError as exc:
        if os.path.islink(storage_path) and not os.path.exists(storage_path):
            reason = "a symbolic link that leads nowhere (a loop, or a missing target)"
        elif exc.errno in STORAGE_FAULTS and exc.errno != errno.ENOENT:
            detail = os_error_detail(exc, exc.filename)
            raise StorageError(f"the storage {storage_path}", exc.errno, detail) from None
        else:
            reason = {errno.EEXIST: "a file, not a directory", errno.ENOTDIR: "a part of its path is a file",
                      errno.ELOOP: "a loop of symbolic links"}.get(exc.errno, exc.strerror or str(exc))
        raise ConfigError(f"--storage {storage_path} cannot hold studies: {reason}; allowed: a directory "
                          f"you can write, or a path where one can be made") from None


def lock_path(storage_path: str, name: str) -> str:
    """The lock of study ``name``: in the storage's ``locks/`` folder, or, for a URI storage (where no
    file lock exists), in this user's cache, which keeps out a second driver on this machine only."""
    if not is_uri(storage_path):
        return os.path.join(storage_path, LOCKS_DIR, f"{name}.lock")
    digest = hashlib.sha256(f"{storage_path.rstrip('/')}/{name}".encode()).hexdigest()[:24]
    return os.path.join(os.path.expanduser("~/.cache/kd_ray"), LOCKS_DIR, f"{name}-{digest}.lock")


@contextlib.contextmanager
def study_lock(storage_path: str, name: str) -> Iterator[None]:
    """Hold study ``name``'s lock while the body runs; a study whose lock another live driver holds is
    refused with one ConfigError line naming that driver."""
    path = lock_path(storage_path, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a"):
        pass  # the lock file exists from here on; it is never removed, so every driver locks one inode
    # Locked through a read-only descriptor: a file open for writing would keep its filesystem from
    # being remounted read-only (a storage fault a study must still meet as one, not as "busy").
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"study {name} is being run by another driver ({_holder(path)}; lock {path}): one driver per "
                f"study. Wait for it to end, then rerun with --resume, or pass another --name"
            ) from None
        # Who holds it, for the message a second driver prints.
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(path, "w") as handle:
            handle.write(json.dumps(holder))
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _holder(path: str) -> str:
    try:
        with open(path) as handle:
            holder = json.loads(handle.read())
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a driver that is starting"  # its lock is taken, its details not yet written


def study_state(study_dir: str) -> str:
    """ABSENT, NOT_BEGUN or BEGUN (see the module's docstring)."""
    fs, path = filesystem(study_dir)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return ABSENT
    if info.type != pafs.FileType.Directory:
        raise ConfigError(f"study directory {study_dir} is a file, not a directory; allowed: a directory, or no "
                          f"such path. Move the file, or pass another --name")
    names = {entry.base_name for entry in fs.get_file_info(pafs.FileSelector(path))}
    begun = any(n in _BEGUN_MARKERS or is_experiment_state(n) for n in names)
    return BEGUN if begun else NOT_BEGUN


def is_experiment_state(name: str) -> bool:
    """Whether ``name`` is one of Ray Tune's saved experiment states (``experiment_state-<time>.json``)."""
    return name.startswith(EXPERIMENT_STATE_PREFIX) and name.endswith(".json")


def clear_not_begun(study_dir: str) -> None:
    """Remove what a run that ended before Ray Tune's first saved state left in ``study_dir``, so that
    neither a rerun nor ``--resume`` meets it (a cut-off ``tuner.pkl`` would block both)."""
    fs, path = filesystem(study_dir)
    for name in _NOT_BEGUN_LEFTOVERS:
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(f"{path}/{name}")


def growth_folder(number: int) -> str:
    """The folder of the study directory where growth ``number`` (1, 2, ...) of its seeds runs."""
    return f"{GROWTH_FOLDER}{number}"


def rerun_hint(study_dir: str) -> str:
    """How to go on after a study stopped early: ``--resume`` once its directory exists, else the same
    command (``--resume`` refuses a study that is not there)."""
    try:
        state = study_state(study_dir)
    except (ConfigError, OSError):
        state = ABSENT
    return "rerun the same command" + (" with --resume" if state != ABSENT else "")
