"""The analysis package imports neither torch nor Ray, whichever of its modules loads first."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kd_ray.analysis

SUBMODULES = sorted(m.name for m in pkgutil.iter_modules(kd_ray.analysis.__path__))


def test_the_package_docstring_lists_every_layer() -> None:
    listed = kd_ray.analysis.__doc__.split("bottom to top", 1)[1]
    assert SUBMODULES and all(f"{name} " in listed or f"{name}," in listed or f"{name}." in listed
                              for name in SUBMODULES)


@pytest.mark.parametrize("first", ["", *SUBMODULES])
def test_import_without_torch_or_ray(first: str) -> None:
    # Each module first in turn: an import cycle shows only in some orders.
    code = textwrap.dedent(
        f"""
        import importlib
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "ray"):
                    raise ImportError(f"blocked: {{name}}")
                return None

        sys.meta_path.insert(0, Block())
        importlib.import_module("kd_ray.analysis" + ("." + {first!r} if {first!r} else ""))
        from kd_ray import analysis
        assert analysis.figures.__module__ == "kd_ray.analysis._figures"
        assert analysis.report.__module__ == "kd_ray.analysis._report"
        assert all(hasattr(analysis, name) for name in analysis.__all__)
        assert not any(m.split(".")[0] in ("torch", "ray") for m in sys.modules)
        print("ok")
        """
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
