"""Every function of kd_ray reads in one screen: at most MAX_LINES lines from its def line to its last
line, docstring included. A longer one is split into named steps, each small enough to test alone."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kd_ray"
MAX_LINES = 80


def long_functions() -> list[str]:
    """'path:line name (n lines)' for every function or method over MAX_LINES lines."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            # Decorators are not counted: the function starts at its def line.
            length = node.end_lineno - node.lineno + 1
            if length > MAX_LINES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_max_lines() -> None:
    too_long = long_functions()
    assert not too_long, f"functions over {MAX_LINES} lines; split them into named steps:\n" + "\n".join(too_long)
