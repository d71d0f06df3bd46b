"""The import layers of kd_ray, read from the source: every import (deferred and TYPE_CHECKING ones
included) points down a layer, no two modules import each other, and no module takes another
module's private (underscore) names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kd_ray"

# Bottom to top. A module may import only modules of a lower layer; a package counts as one module
# from the outside (its submodules may import each other downward, checked separately).
LAYERS: list[tuple[str, ...]] = [
    ("kd_ray", "kd_ray.atomic", "kd_ray.config", "kd_ray.progress"),  # names every wing shares
    ("kd_ray.tables", "kd_ray.provenance"),
    ("kd_ray.analysis",),
    ("kd_ray.findings",),
    ("kd_ray.data",),
    ("kd_ray.models",),
    ("kd_ray.train",),
    ("kd_ray.packs",),
    ("kd_ray.study",),  # every module that imports Ray
    ("kd_ray.loss_surface", "kd_ray.reproduction"),
    ("kd_ray.cli",),
]
# The folders, each one unit of LAYERS from the outside.
SUBPACKAGES = ("kd_ray.analysis", "kd_ray.findings", "kd_ray.data", "kd_ray.models", "kd_ray.train", "kd_ray.packs",
               "kd_ray.study")
# Where Ray may be imported: a study runs on Ray, nothing below it does.
RAY_MAY_BE_IMPORTED_IN = ("kd_ray.study", "kd_ray.cli")
RANK = {module: rank for rank, layer in enumerate(LAYERS) for module in layer}
# kd_ray.analysis may use only these kd_ray modules: a laptop analyses tables with pandas alone.
ANALYSIS_MAY_IMPORT = {"kd_ray.atomic", "kd_ray.config", "kd_ray.tables"}
# Third-party private modules used on purpose, with the reason.
ALLOWED_FOREIGN_PRIVATE = {
    "ray.autoscaler._private.util",  # Ray's offline cluster-config validation; ray is pinned for it
    # A study's own Ray on the loopback: the switch Ray reads once, at import (kd_ray.study.guards)
    "ray._private.ray_constants",
    # Ray caches its auth mode and token per process: re-read for the token made for a run (kd_ray.study.guards)
    "ray._raylet",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((node.lineno, target, [alias.name for alias in node.names]))
    return found


def unit_of(module: str, modules: dict[str, Path]) -> str | None:
    """The layer unit a kd_ray module belongs to: a package for its submodules, else itself."""
    parts = module.split(".")
    if len(parts) >= 2 and (PACKAGE / parts[1] / "__init__.py").exists():
        return ".".join(parts[:2])
    while module and module not in modules:
        module = module.rsplit(".", 1)[0] if "." in module else ""
    return module or None


def resolved_targets(module: str, names: list[str], modules: dict[str, Path]) -> list[str]:
    """`from kd_ray import analysis` imports the module kd_ray.analysis, not the package root."""
    submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
    return submodules or [module]


def test_every_module_has_a_layer():
    modules = package_modules()
    missing = sorted({unit_of(m, modules) for m in modules} - set(RANK))
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"


def test_imports_point_down():
    modules = package_modules()
    violations = []
    for name, path in modules.items():
        unit = unit_of(name, modules)
        for line, target, names in imports_of(path, name):
            if not target or not target.startswith("kd_ray"):
                continue
            for resolved in resolved_targets(target, names, modules):
                target_unit = unit_of(resolved, modules)
                if target_unit is None or target_unit == unit or unit not in RANK or target_unit not in RANK:
                    continue  # a module missing from LAYERS fails test_every_module_has_a_layer
                if unit == "kd_ray.analysis" and target_unit not in ANALYSIS_MAY_IMPORT:
                    violations.append(f"{path.name}:{line} analysis imports {resolved}")
                elif RANK[target_unit] >= RANK[unit]:
                    violations.append(f"{path.relative_to(ROOT)}:{line} {unit} imports {resolved} (not lower)")
    assert not violations, "imports that point up a layer or sideways:\n" + "\n".join(violations)


def test_package_root_imports_nothing_of_its_own():
    for _, target, _ in imports_of(PACKAGE / "__init__.py", "kd_ray"):
        assert not (target or "").startswith("kd_ray"), f"kd_ray/__init__.py imports {target}"


def test_only_the_study_folder_imports_ray():
    modules = package_modules()
    found = []
    for name, path in modules.items():
        if unit_of(name, modules) in RAY_MAY_BE_IMPORTED_IN:
            continue
        found += [f"{path.relative_to(ROOT)}:{line} imports {target}" for line, target, _ in imports_of(path, name)
                  if target == "ray" or (target or "").startswith("ray.")]
    assert not found, "Ray is imported outside kd_ray/study:\n" + "\n".join(found)


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_subpackage_modules_do_not_form_a_circle(package: str):
    modules = {n: p for n, p in package_modules().items() if n.startswith(package + ".")}
    edges = {n: set() for n in modules}
    for name, path in modules.items():
        for _, target, names in imports_of(path, name):
            for resolved in resolved_targets(target or "", names, modules):
                if resolved in modules and resolved != name:
                    edges[name].add(resolved)

    def reaches(start: str, goal: str, seen: frozenset = frozenset()) -> bool:
        return goal in edges[start] or any(reaches(n, goal, seen | {start}) for n in edges[start] - seen)

    circles = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if reaches(b, a))
    assert not circles, f"{package} submodules import each other: {circles}"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def source_files() -> list[Path]:
    return [p for d in ("kd_ray", "studies", "benchmarks", "tests") for p in sorted((ROOT / d).rglob("*.py"))]


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_names_taken_across_modules(path: Path):
    modules = package_modules()
    name = module_name(path)
    own_unit = unit_of(name, modules) if name.startswith("kd_ray") else None
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases: dict[str, str] = {}  # local name -> kd_ray module it stands for
    problems = []
    for line, target, names in imports_of(path, name):
        target = target or ""
        if target in ALLOWED_FOREIGN_PRIVATE:
            continue
        ours = target.startswith("kd_ray")
        if not ours and own_unit is None:
            continue  # tests and scripts may use a library's test utilities; the package may not
        crosses = not ours or unit_of(target, modules) != own_unit
        hidden = [part for part in target.split(".") if _private(part)]
        if crosses and hidden:
            problems.append(f"line {line}: imports private module {target}")
        if crosses:
            problems += [f"line {line}: takes {n} from {target}" for n in names if _private(n)]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kd_ray"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in modules:
                    aliases[alias.asname or alias.name] = full
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kd_ray") and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr):
            module = aliases.get(node.value.id)
            if module and unit_of(module, modules) != own_unit:
                problems.append(f"line {node.lineno}: uses {node.value.id}.{node.attr}")
    assert not problems, f"{path.relative_to(ROOT)} reaches into another module's private names:\n" + "\n".join(
        problems
    )
