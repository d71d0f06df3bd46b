"""Choose the fastest numerically safe execution of a training step, by measuring it.

Three choices, each timed on throwaway models of the trial's architecture and batch shape:
- bf16 autocast for the forward passes (losses and metrics stay float32), when asked for (`bf16`)
  or when it measures clearly faster (`auto`);
- channels_last memory layout for image models (convolution libraries often prefer it);
- the teacher members in one vectorized call (torch.func) or one after another.
Each step is timed on a batch of the size the trial really trains on (never more than its data), and a
candidate's timing stops as soon as it is slower than the best so far (``time_candidate``), so a path
that cannot win costs about one step. The measurement runs once per process and configuration; a Ray
worker reused across trials pays it once. What was chosen is written to every trial row
(`precision_used`, `fast_path`).

Only ``precision="auto"`` measures. A fixed precision (``fp32`` or ``bf16``) also fixes the rest of
the path (contiguous layout, the vectorized teacher): the layout and the teacher's execution change
the arithmetic in the last bits, and a timing decision could then give two replicates of one arm
different arithmetic (measured on LeNet-5: a few pp of agreement apart after 200 steps).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kd_ray.models.archs import build_model
from kd_ray.models.ensembles import LoopEnsemble, StackedEnsemble

BF16_MIN_GAIN = 1.2  # bf16 must beat the best fp32 option by this factor to be chosen under auto


@dataclass(frozen=True)
class FastPath:
    bf16: bool = False
    channels_last: bool = False
    stacked_teacher: bool = True

    def describe(self) -> str:
        return (f"{'bf16' if self.bf16 else 'fp32'}, {'channels_last' if self.channels_last else 'contiguous'}, "
                f"teacher {'vectorized' if self.stacked_teacher else 'loop'}")

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def time_candidate(fn: Callable[[], object], repeats: int, device: torch.device, within: float = math.inf) -> float:
    """Seconds per call of ``fn``: one warm-up call (kernel selection, allocator), then up to ``repeats``
    timed calls. Timing stops once the calls so far took longer than ``within`` seconds in all: such a
    candidate has lost to one whose ``repeats`` calls took ``within``, and the mean of its calls so far,
    which is what is returned, is above that one's. So a path that cannot win (bf16 matmuls on a CPU
    without native bf16 run 100x slower than fp32) costs its warm-up and one call, not ``repeats``."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    done, elapsed = 0, 0.0
    while done < max(1, repeats) and elapsed <= within:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        done += 1
        elapsed = time.perf_counter() - started
    return elapsed / done


@functools.lru_cache(maxsize=None)
def choose(
    arch: str, teacher_arch: str, input_shape: tuple[int, ...], num_classes: int, norm: str, members: int,
    batch_size: int, device_name: str, precision: str, repeats: int = 3, student_args: str = "", teacher_args: str = "",
) -> FastPath:
    if precision != "auto":
        return FastPath(bf16=precision == "bf16", channels_last=False, stacked_teacher=True)
    device = torch.device(device_name)
    torch_state = torch.random.get_rng_state()  # throwaway models must not move the trial's RNG
    try:
        return _measure(
            arch, teacher_arch, input_shape, num_classes, norm, members, batch_size, device, precision, repeats,
            student_args, teacher_args,
        )
    finally:
        torch.random.set_rng_state(torch_state)


def _student_step(
    student: torch.nn.Module, optimizer: torch.optim.Optimizer, xb: torch.Tensor, bf16: bool
) -> Callable[[], None]:
    """One training step of ``student`` on ``xb`` (bf16 autocast or not), to be timed."""

    def step() -> None:
        with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = student(xb)
        loss = F.log_softmax(out.float(), -1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _measure(
    arch, teacher_arch, input_shape, num_classes, norm, members, batch_size, device, precision, repeats,
    student_args="", teacher_args="",
) -> FastPath:
    x = torch.rand(batch_size, *input_shape, device=device)
    image = len(input_shape) == 3
    dtypes = {"fp32": [False], "bf16": [True], "auto": [False, True] if _bf16_supported(device) else [False]}[precision]
    layouts = [False, True] if image else [False]
    steps = {}
    for channels_last in layouts:
        student = build_model(arch, input_shape, num_classes, norm, student_args).to(device)
        if channels_last:
            student = student.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(student.parameters(), lr=1e-3)
        xb = FastPath(channels_last=channels_last).layout(x)
        for bf16 in dtypes:
            steps[(bf16, channels_last)] = _student_step(student, optimizer, xb, bf16)
    # Every fp32 candidate first, then bf16: a bf16 candidate is timed only until it is already slower
    # than the best fp32 one divided by BF16_MIN_GAIN (it cannot be chosen then), or than the best
    # bf16 one so far (it cannot be bf16's layout then).
    student_times: dict[tuple[bool, bool], float] = {}
    for bf16, channels_last in sorted(steps):
        rivals = [t for (b, _), t in student_times.items() if b == bf16]
        if bf16:
            rivals += [t / BF16_MIN_GAIN for (b, _), t in student_times.items() if not b]
        within = min(rivals, default=math.inf) * repeats
        student_times[(bf16, channels_last)] = time_candidate(steps[(bf16, channels_last)], repeats, device, within)
    best_fp32 = min(t for (bf16, _), t in student_times.items() if not bf16) if False in dtypes else None
    if best_fp32 is not None and True in dtypes:
        best_bf16 = min(t for (bf16, _), t in student_times.items() if bf16)
        use_bf16 = best_bf16 * BF16_MIN_GAIN < best_fp32
    else:
        use_bf16 = dtypes == [True]
    channels_last = min((t, cl) for (bf16, cl), t in student_times.items() if bf16 == use_bf16)[1]
    path = FastPath(bf16=use_bf16, channels_last=channels_last)

    teachers = [build_model(teacher_arch, input_shape, num_classes, norm, teacher_args).to(device).eval()
                for _ in range(members)]
    if channels_last:
        teachers = [t.to(memory_format=torch.channels_last) for t in teachers]
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    stacked = StackedEnsemble(teachers).cast(dtype)
    looped = LoopEnsemble(teachers).cast(dtype)
    xb = path.layout(x).to(dtype)
    stacked_time = time_candidate(lambda: stacked.logits(xb), repeats, device)
    loop_time = time_candidate(lambda: looped.logits(xb), repeats, device, within=stacked_time * repeats)
    return FastPath(bf16=use_bf16, channels_last=channels_last, stacked_teacher=stacked_time <= loop_time)
