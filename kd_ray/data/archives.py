"""Downloaded dataset files, verified by md5 before anything reads them, and the ``.npz`` caches built from them.

A file lives in the cache directory under its own name. When it is there, its md5 must be the
official one or it is an error (never parsed, never deleted: the user decides). When it is absent it
is downloaded, from each of its URLs in turn, through a temporary file that only a download with the
right md5 is renamed from, so a failed or wrong download leaves nothing behind. Every ``DataError``
names the file, where it belongs and how to fix it.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import IO, Callable, Sequence

import numpy as np

from kd_ray.atomic import write_atomic

DOWNLOAD_TIMEOUT_S = 60


class DataError(RuntimeError):
    """Data that is missing or corrupt; the message says where the file belongs and how to fix it."""


def how_to_fix(url: str, md5: str, path: Path) -> str:
    return (
        f"Download {url} and place it at {path} (expected md5 {md5}), or set KD_RAY_DATA "
        f"to a directory that holds {path.name}."
    )


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified_file(what: str, path: Path, md5: str, urls: Sequence[str], download: bool) -> Path:
    """``path`` once its md5 is ``md5``: checked when present, else downloaded first (when allowed).

    ``what`` names the file in messages (``"cifar10 archive"``); ``urls`` are tried in order, the
    official one first."""
    if path.exists():
        actual = md5_of(path)
        if actual != md5:
            raise DataError(
                f"{what} {path} is corrupt or not the official file: md5 {actual}, expected {md5}. Delete it "
                "and let kd_ray download it again, or replace it by hand. " + how_to_fix(urls[0], md5, path)
            )
        return path
    if not download:
        raise DataError(f"{what} not found at {path} and download=False. " + how_to_fix(urls[0], md5, path))
    failures = []
    for url in urls:
        try:
            write_atomic(path, _fetcher(url, md5))
            return path
        except DataError as exc:
            failures.append(f"from {url}: {exc}")
    raise DataError(f"could not download {what} ({'; '.join(failures)}). " + how_to_fix(urls[0], md5, path))


def _fetcher(url: str, md5: str) -> Callable[[IO[bytes]], None]:
    def fetch(out: IO[bytes]) -> None:
        digest = hashlib.md5()
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DataError(str(exc)) from exc
        if digest.hexdigest() != md5:
            # Raised inside the write: the temporary file is removed and nothing is renamed into place.
            raise DataError(f"the download has md5 {digest.hexdigest()}, expected {md5}; it was discarded")

    return fetch


# --- the .npz caches -----------------------------------------------------------------------------


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    # Writing through the file object stops np.savez from appending its own ".npz".
    write_atomic(path, lambda stream: np.savez(stream, **arrays))


def read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file, or None when it is absent or unreadable (then it is rebuilt)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
