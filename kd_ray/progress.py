"""Progress lines: the callback type the training layers report through, and the one way to print them."""

from __future__ import annotations

import sys
import time
from typing import Callable

Progress = Callable[[str], None]  # one line for a person, e.g. "teacher member 0: epoch 6/30 loss 0.912"


def printer(label: str = "", stderr: bool = False) -> Progress:
    """A Progress that prints ``[<label> HH:MM:SS] message`` to stdout (or stderr), flushed at once."""
    prefix = f"{label} " if label else ""

    def show(message: str) -> None:
        # The stream is looked up at each line, so a redirected sys.stdout or sys.stderr is followed.
        stream = sys.stderr if stderr else sys.stdout
        print(f"[{prefix}{time.strftime('%H:%M:%S')}] {message}", file=stream, flush=True)

    return show
