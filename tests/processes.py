"""Processes and sockets of a test's own subprocesses, read from /proc: a study started in its own
session (``start_new_session``) is found, with every Ray process it starts, by its session id."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if os.getsid(pid) != sid:
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            found.append(pid)
    return found


def kill_session(sid: int) -> None:
    for pid in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def command_line(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        return text or Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def environment(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _address(hex_address: str) -> tuple[str, int]:
    """/proc/net/tcp's ``0100007F:1F90`` (or tcp6's 32 hex digits) as ('127.0.0.1', 8080)."""
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # The kernel writes each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(port, 16)


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state held by one of ``pids``."""
    listening = {}  # socket inode -> (address, port)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                listening[fields[9]] = _address(fields[1])
    found = []
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:[") and link[8:-1] in listening:
                found.append((pid, *listening[link[8:-1]]))
    return found


def is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "::ffff:127.0.0.1") or address.startswith("::ffff:127.")


def wait_for(condition, timeout: float, what: str, proc=None, log: Path | None = None):
    """Poll ``condition`` until it returns something true; fail (with the log) if ``proc`` exits first."""
    import pytest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            pytest.fail(f"the process exited ({proc.returncode}) while waiting for {what}:\n{tail}")
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log else ""
    pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{tail}")


class Driver:
    """A study script run as its own process, in its own session (``sid``), so that it and every Ray
    process it starts can be found and killed; its output goes to ``log``."""

    def __init__(self, script: Path, argv: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> None:
        inherited = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env = {**inherited, "RAY_AUTH_MODE": "disabled", **(env or {})}
        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, str(script), *argv], cwd=cwd, env=env, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.sid = self.proc.pid  # the session leader

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the driver did not exit within {timeout} s:\n{self.output()[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._out.close()


@contextlib.contextmanager
def started_drivers(script: Path, cwd: Path) -> Iterator[Callable[..., Driver]]:
    """``start(argv, log, env=None)`` starts a Driver of ``script``; at the end, whatever is left in the
    sessions of the drivers started is killed (each process by its pid)."""
    started: list[Driver] = []

    def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Driver:
        driver = Driver(script, argv, log, cwd, env)
        started.append(driver)
        return driver

    try:
        yield start
    finally:
        for driver in started:
            kill_session(driver.sid)
            driver.close()
