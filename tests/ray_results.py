"""Reading Ray Tune's per-trial result files (result.json, one JSON object a line) in the tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def parse_reports(result_json: str) -> list[dict]:
    """Every result in a trial's result.json text, in order; a line still being written is left out."""
    out = []
    for line in result_json.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


def parse_epoch_reports(result_json: str) -> list[dict]:
    """The per-epoch reports: every result but the trial's final one."""
    return [r for r in parse_reports(result_json) if not r.get("final")]


def reports(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return parse_reports(path.read_text()) if path.is_file() else []


def epoch_reports(trial_dir: Path) -> list[dict]:
    return [r for r in reports(trial_dir) if not r.get("final")]


@contextmanager
def acting_on_a_report(trial_dirs: Callable[[], list[Path]], caught: Callable[[dict], bool],
                       act: Callable[[dict], None], join_s: float = 30.0) -> Iterator[dict]:
    """While the body runs, a thread watches the latest epoch report of every trial in ``trial_dirs()``;
    the first that ``caught`` accepts is acted on (``act(report)``: kill its pid, remove its node), once.
    Yields a dict that then holds that trial's directory name (``trial``), ``pid``, ``epoch`` and
    ``node_id``; empty if no report was caught."""
    found: dict = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for directory in trial_dirs():
                logged = epoch_reports(directory)
                if logged and caught(logged[-1]):
                    act(logged[-1])
                    found.update(trial=directory.name, **{k: logged[-1].get(k) for k in ("pid", "epoch", "node_id")})
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield found
    finally:
        stop.set()
        watcher.join(join_s)
