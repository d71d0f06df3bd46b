"""benchmarks/throughput.py's matmul peak is measured in seconds, even for a dtype the device runs slowly."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _throughput():
    spec = importlib.util.spec_from_file_location("kd_ray_benchmark_throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_slow_dtype_s_peak_is_measured_in_seconds():
    throughput = _throughput()
    # float16 matmuls run near 2 GFLOP/s on a CPU without native fp16, as bf16 does on one without native
    # bf16: at 2048 wide, 13 products (the old fixed measurement) took over a minute and a half.
    started = time.perf_counter()
    flops, side = throughput.matmul_peak(torch.device("cpu"), torch.float16, 2048)
    elapsed = time.perf_counter() - started
    assert elapsed < 6 * throughput.PEAK_SECONDS, elapsed
    assert flops > 0 and side in (128, 256, 512, 1024, 2048)
    # A fast dtype is measured on the largest matrix allowed, still in about PEAK_SECONDS.
    started = time.perf_counter()
    _, small_side = throughput.matmul_peak(torch.device("cpu"), torch.float32, 256)
    assert small_side == 256 and time.perf_counter() - started < 6 * throughput.PEAK_SECONDS
