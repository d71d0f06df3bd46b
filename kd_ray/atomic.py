"""Atomic file writes, local paths and object-store URIs alike: the one place kd_ray writes a file.

A reader sees either the old file or the new one, never a part: the bytes go to a uniquely named
temporary file beside the target, which is then renamed over it. Two writers of one target never
share a temporary name, and a failed write leaves the old file as it was.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable
from typing import IO

import pyarrow.fs as pafs


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``path`` (a local path or a ``scheme://`` URI) and the path inside it."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> str:
    """Call ``write(stream)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = os.fspath(path)
    if "://" in path:
        return _write_uri(path, write)
    directory, name = os.path.split(os.path.abspath(os.path.expanduser(path)))
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
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
