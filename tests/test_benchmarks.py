"""The benchmarks run end to end in their tiny mode and print their closing line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, timeout: int) -> list[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny"], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


@pytest.mark.slow
def test_throughput_tiny():
    lines = _run("throughput.py", 600)
    assert re.fullmatch(r"speedup: \d+\.\d\d", lines[-1]), lines[-1]
    assert float(lines[-1].split()[1]) > 0
    workload_lines = [line for line in lines if "img/s" in line and "ratio" in line]
    assert len(workload_lines) == 2  # the CIFAR-shaped workload and the embedded default


@pytest.mark.slow
def test_study_overhead_tiny():
    lines = _run("study_overhead.py", 600)
    assert re.fullmatch(r"overhead: -?\d+\.\d{3}", lines[-1]), lines[-1]
