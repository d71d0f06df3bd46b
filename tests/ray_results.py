"""Reading Ray Tune's per-trial result files (result.json, one JSON object a line) in the tests."""

from __future__ import annotations

import json
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
