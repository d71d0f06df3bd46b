"""Atomic file writes, local paths and object-store URIs alike: the one place kd_ray writes a file.

A reader sees either the old file or the new one, never a part: the bytes go to a uniquely named
temporary file beside the target, which is then renamed over it. Two writers of one target never
share a temporary name, and a failed write leaves the old file as it was.
"""

from __future__ import annotations

import errno
import os
import tempfile
import uuid
from collections.abc import Callable
from typing import IO

import pyarrow as pa
import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    """Whether ``path`` names an object store (``s3://``, ``gs://``, ...) rather than a local path."""
    return "://" in path


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``path`` (a local path or a ``scheme://`` URI) and the path inside it."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> str:
    """Call ``write(stream)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = os.fspath(path)
    if is_uri(path):
        return _write_uri(path, write)
    directory, name = os.path.split(os.path.abspath(os.path.expanduser(path)))
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; a written result gets the mode open() would give it.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_uri(uri: str, write: Callable[[IO[bytes]], None]) -> str:
    fs, resolved = filesystem(uri)
    directory, name = resolved.rsplit("/", 1)
    fs.create_dir(directory, recursive=True)
    temporary = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(temporary) as stream:
            write(stream)
        fs.move(temporary, resolved)
    finally:
        if fs.get_file_info(temporary).type != pafs.FileType.NotFound:
            fs.delete_file(temporary)
    return uri


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    return write_atomic(path, lambda stream: stream.write(data))


def write_text(path: str | os.PathLike, text: str) -> str:
    return write_bytes(path, text.encode("utf-8"))


# --- the filesystem Ray Tune writes a local study through ----------------------------------------


class _AtomicOutput:
    """A file that pyarrow writes to: the bytes go to a temporary file beside ``path``, renamed over
    it on a clean close. A failed write (no space, a read-only filesystem) removes the temporary
    file at once and leaves ``path`` as it was."""

    def __init__(self, path: str) -> None:
        self.path = path
        directory, name = os.path.split(path)
        os.makedirs(directory, exist_ok=True)
        self.temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
        # os.open rather than mkstemp: the file gets the usual umask permissions, not 0600.
        self.file = os.fdopen(os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
        self.closed = False

    def _abort(self, error: OSError) -> OSError:
        self.closed = True
        try:
            self.file.close()
        except OSError:
            pass
        if os.path.exists(self.temporary):
            os.unlink(self.temporary)
        # Name the file that could not be written: the errors of os.write carry no file name.
        return OSError(error.errno, error.strerror, self.path) if error.errno and not error.filename else error

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            raise self._abort(error) from None

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as error:
            raise self._abort(error) from None

    def tell(self) -> int:
        return self.file.tell()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.file.close()  # flushes; an error here is a failed write too
            os.replace(self.temporary, self.path)
        except OSError as error:
            raise self._abort(error) from None
        self.closed = True


class AtomicLocalHandler(pafs.FileSystemHandler):
    """The local filesystem, except that every file written replaces its old version atomically
    (``_AtomicOutput``) and nothing is created under ``root`` once ``root`` is gone.

    Ray Tune copies the whole experiment (its saved state, every trial's result log) from the driver
    to the storage every few seconds, writing each file in place: a copy that fails half way (the
    disk full) truncates the last good version. Through this handler a failed copy leaves it whole.
    Without fsync, for speed (Ray Tune rewrites these files every few seconds): a power cut may lose
    the last versions, a failed write never does. And a study directory that was deleted, moved or
    unmounted is not silently created again, empty, in its place."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.local = pafs.LocalFileSystem()

    def __eq__(self, other) -> bool:
        return isinstance(other, AtomicLocalHandler) and other.root == self.root

    def __ne__(self, other) -> bool:
        return not self == other

    def __reduce__(self):  # Ray ships the filesystem to every trial's worker
        return AtomicLocalHandler, (self.root,)

    def _check_root(self, path: str) -> None:
        inside = os.path.abspath(path) + os.sep
        if inside.startswith(self.root + os.sep) and not os.path.isdir(self.root):
            raise FileNotFoundError(errno.ENOENT, "the directory is gone (deleted, moved or unmounted)", self.root)

    def get_type_name(self) -> str:
        return "kd_ray-atomic-local"

    def normalize_path(self, path: str) -> str:
        return self.local.normalize_path(path)

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        if os.path.abspath(path) != self.root:
            self._check_root(path)
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.local.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError(errno.EPERM, "refusing to delete the contents of /")

    def delete_file(self, path: str) -> None:
        self.local.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._check_root(dest)
        self.local.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with self.local.open_input_stream(src) as source, self.open_output_stream(dest, None) as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)

    def open_input_stream(self, path: str):
        return self.local.open_input_stream(path)

    def open_input_file(self, path: str):
        return self.local.open_input_file(path)

    def open_output_stream(self, path: str, metadata):
        self._check_root(path)
        return pa.PythonFile(_AtomicOutput(path), mode="w")

    def open_append_stream(self, path: str, metadata):
        self._check_root(path)
        return self.local.open_append_stream(path)


def atomic_local_filesystem(root: str) -> pafs.FileSystem:
    """A pyarrow filesystem for Ray Tune's ``storage_filesystem``: see ``AtomicLocalHandler``."""
    return pafs.PyFileSystem(AtomicLocalHandler(root))
