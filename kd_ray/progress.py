"""Progress lines: the callback type the training layers report through, the one way to print them, and
the line a study prints per finished trial."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable

Progress = Callable[[str], None]  # one line for a person, e.g. "teacher member 0: epoch 6/30 loss 0.912"


def printer(label: str = "", stderr: bool = False) -> Progress:
    """A Progress that prints ``[<label> HH:MM:SS] message`` to stdout (or stderr), flushed at once."""
    prefix = f"{label} " if label else ""

    def show(message: str) -> None:
        # The stream is looked up at each line, so a redirected sys.stdout or sys.stderr is followed.
        stream = sys.stderr if stderr else sys.stdout
        print(f"[{prefix}{time.strftime('%H:%M:%S')}] {message}", file=stream, flush=True)

    return show


def format_duration(seconds: float) -> str:
    """A span of time for a person: ``42s``, ``3m05s``, ``2h07m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def time_left_s(mean_trial_s: float, remaining: int, slots: int) -> float:
    """About how long ``remaining`` trials of ``mean_trial_s`` each take, ``slots`` of them at a time.

    Whole waves of ``slots`` trials: the trials running now count as not started, so the estimate
    errs long by at most one trial's time."""
    if remaining <= 0:
        return 0.0
    return mean_trial_s * math.ceil(remaining / max(1, slots))


def trial_done_line(done: int, total: int, outcome: str, arm: dict[str, Any], metrics: dict[str, float],
                    elapsed_s: float, left_s: float | None) -> str:
    """One line per finished trial, e.g.
    ``trial 3/28 done | augmentation=mixup temperature=4 | test_agreement 0.912 test_acc 0.801 |
    1m12s elapsed, about 4m50s left``; ``left_s`` is None while no trial has finished cleanly."""
    parts = [f"trial {done}/{total} {outcome}"]
    if arm:
        parts.append(" ".join(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
                              for name, value in arm.items()))
    if metrics:
        parts.append(" ".join(f"{name} {value:.3f}" for name, value in metrics.items()))
    timing = f"{format_duration(elapsed_s)} elapsed"
    if done < total:
        timing += ", time left not known yet" if left_s is None else f", about {format_duration(left_s)} left"
    parts.append(timing)
    return " | ".join(parts)


# The one progress logger of kd_ray's own lines: ``[kd_ray HH:MM:SS] message`` on stdout.
log = printer("kd_ray")
