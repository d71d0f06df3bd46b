"""The one atomic writer: whole files or none, unique temporaries, the usual file mode."""

from __future__ import annotations

import os
import stat

import pytest

from kd_ray import atomic


def test_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "table.txt"
    atomic.write_text(target, "first")
    atomic.write_text(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "table.txt"
    atomic.write_text(target, "kept")

    def broken(stream):
        stream.write(b"half")
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        atomic.write_atomic(target, broken)
    assert target.read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["table.txt"]


def test_written_file_gets_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "report.md"
        atomic.write_text(target, "x")
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_uri_writes_go_through_the_filesystem(tmp_path):
    uri = f"file://{tmp_path}/remote/table.bin"
    atomic.write_bytes(uri, b"\x00\x01")
    assert (tmp_path / "remote" / "table.bin").read_bytes() == b"\x00\x01"
    assert [p.name for p in (tmp_path / "remote").iterdir()] == ["table.bin"]
