"""What produced a result: package versions and the git commit of the code."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from kd_ray import __version__


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    """The commit of the kd_ray checkout, with ``-dirty`` for uncommitted changes; 'unknown' outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
            text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def versions() -> dict[str, str]:
    """kd_ray, torch and ray versions plus the git sha; ray is read without importing it."""
    from importlib import metadata

    def version_of(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "absent"

    return {
        "kd_ray_version": __version__,
        "git_sha": git_sha(),
        "torch_version": version_of("torch"),
        "ray_version": version_of("ray"),
    }
