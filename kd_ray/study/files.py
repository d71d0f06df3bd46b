"""Studies as files: a study's grid or search and its run settings, in YAML or TOML.

``read_study_file`` reads one and checks every key before any compute; ``study_document`` turns a
``Study`` back into the same layout, and ``to_yaml`` / ``to_toml`` write it. The layout is flat, one
top-level key per setting of ``kd_ray.study.spec.Study`` (docs/study-files.md has a worked example):

    name: my_sweep                 # the study's folder in the storage; required unless --name is given
    base:                          # TrialConfig fields every trial shares; the others keep their defaults
      dataset: mnist1d
      epochs: 90
    axes:                          # field: [values]; every axis is crossed with the others and the arms
      teacher_members: [1, 3, 5]
      temperature: [1.0, 4.0]
    arms:                          # a list of field dicts, each crossed with the axes
      - {optimizer: sgd, lr: 0.05}
      - {optimizer: adam, lr: 0.001}
    seeds: 2                       # a count (seeds 0 and 1) or a list of seeds ([4, 7]); default 1
    search:                        # an Optuna search instead of axes and arms
      space: {temperature: [logfloat, 1.0, 16.0], augmentation: [choice, [none, mixup]]}
      metrics: [val_agreement]     # one metric (TPE) or several (NSGA-II), each with its mode
      modes: [max]
      num_samples: 16
      seed: 0
    scheduler: fifo                # fifo or asha
    asha_grace_epochs: 2
    storage: results               # a directory or a URI (s3://, gs://)
    cpus_per_trial: 1.0
    gpus_per_trial: 0.0
    max_concurrent_trials: 4       # null (YAML) or absent: as many as the CPUs allow
    max_failures: 2
    pack: auto                     # auto or off
    trackers: [tensorboard]        # any of tensorboard, mlflow, wandb

In TOML the same keys: top-level scalars first, then the tables ``[base]``, ``[axes]``, ``[search]``,
``[search.space]`` and one ``[[arms]]`` table per arm. A bad key or value is refused with one line
naming the file, the line (YAML) or the key path (TOML), the value and what is allowed.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from kd_ray.config import ConfigError, TrialConfig
from kd_ray.packs.plan import PACK_MODES
from kd_ray.study.spec import TRACKERS, OptunaSpec, Study

SUFFIXES = (".yaml", ".yml", ".toml")
SEARCH_KINDS = ("float", "logfloat", "int", "choice")
SEED_LIMIT = 2**32  # a seed is one key word of kd_ray.config.seed_stream


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The run settings a file may give, each with its check and what it allows.
SETTINGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "scheduler": (lambda v: v in ("fifo", "asha"), "fifo or asha"),
    "asha_grace_epochs": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "storage": (lambda v: isinstance(v, str) and bool(v.strip()), "a directory or URI (a non-empty string)"),
    "cpus_per_trial": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "gpus_per_trial": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "max_concurrent_trials": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1, or null"),
    "max_failures": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "pack": (lambda v: v in PACK_MODES, " or ".join(PACK_MODES)),
    "trackers": (lambda v: isinstance(v, list) and all(t in TRACKERS for t in v),
                 f"a list of {', '.join(TRACKERS)}"),
}
STUDY_KEYS = ("name", "base", "axes", "arms", "seeds", "search", *SETTINGS)
SEARCH_KEYS = ("space", "metrics", "modes", "num_samples", "seed")


@dataclass
class StudyFile:
    """What a study file asks for, every value checked and typed: the base, axes and arms as TrialConfig
    field values, and ``settings`` as keyword arguments of ``Study``. ``seeds`` is None when not given."""

    path: str
    name: str | None = None
    base: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    arms: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[int] | None = None
    search: OptunaSpec | None = None
    settings: dict[str, Any] = field(default_factory=dict)


# --- where a value sits: a line of a YAML file, a key path of a TOML file ----------------------------


def key_path(keys: tuple) -> str:
    """('arms', 2, 'lr') -> 'arms[2].lr'."""
    text = ""
    for key in keys:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


@dataclass
class Where:
    """Places in one study file: ``lines`` maps a key path (its parts as strings) to its YAML line;
    None for TOML, whose reader keeps no lines."""

    path: str
    lines: dict[tuple[str, ...], int] | None = None

    def at(self, *keys: Any) -> str:
        """``file:line: key.path`` (YAML) or ``file: key.path`` (TOML)."""
        name = key_path(keys)
        if self.lines is None:
            return f"{self.path}: {name}" if name else self.path
        parts = tuple(str(key) for key in keys)
        while parts not in self.lines and parts:  # a key the file does not hold: the line of its parent
            parts = parts[:-1]
        line = self.lines.get(parts, 1)
        return f"{self.path}:{line}: {name}" if name else f"{self.path}:{line}"

    def refuse(self, keys: tuple, value: Any, allowed: str) -> ConfigError:
        return ConfigError(f"{self.at(*keys)}={value!r} is not allowed; allowed: {allowed}")


def _yaml_lines(node: yaml.Node, path: str, keys: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """The line of every key and list item under ``node``; a key given twice in one mapping is refused
    (YAML would keep the last silently)."""
    lines = {keys: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{path}:{line}: {key_path(keys + (key,))} is given twice; allowed: each key once")
            seen.add(key)
            lines.update(_yaml_lines(value_node, path, keys + (key,)))
            lines[keys + (key,)] = line  # the key's own line, not its value's
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines.update(_yaml_lines(item, path, keys + (str(index),)))
    return lines


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _parse_yaml(path: str, text: str) -> tuple[Any, Where]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        document = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = _one_line(" ".join(p for p in (exc.context, exc.problem) if p))
        raise ConfigError(f"{path}{line}: not valid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(str(exc))}") from None
    return document, Where(path, {} if node is None else _yaml_lines(node, path))


def _parse_toml(path: str, text: str) -> tuple[Any, Where]:
    try:  # the standard library's from Python 3.11; on 3.10 the same reader as the tomli package
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(f"{path}: reading TOML needs Python 3.11 or the tomli package (pip install tomli); "
                              f"allowed here: a .yaml study file") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        where = f"{path}:{found.group(1)}" if found else path
        raise ConfigError(f"{where}: not valid TOML: {_one_line(str(exc))}") from None
    return document, Where(path)


# --- reading ----------------------------------------------------------------------------------------


def read_study_file(path: str | Path) -> StudyFile:
    """The study a YAML or TOML file asks for; raises ConfigError, one line naming the file and the line
    (YAML) or key path (TOML), for anything it cannot run."""
    path = str(path)
    # --- the text ---
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"{path}: a study file's name ends in {', '.join(SUFFIXES)}; got {suffix or 'no suffix'!r}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it as text: {getattr(exc, 'strerror', None) or exc}") from None
    document, where = _parse_toml(path, text) if suffix == ".toml" else _parse_yaml(path, text)
    # --- the keys ---
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(f"{where.at()}: a study file is a mapping of {', '.join(STUDY_KEYS)}; got "
                          f"{type(document).__name__}")
    _refuse_unknown(where, document, STUDY_KEYS, ())
    # --- the values, each checked where it sits ---
    study = StudyFile(path=path)
    if "name" in document:
        if not isinstance(document["name"], str) or not document["name"].strip():
            raise where.refuse(("name",), document["name"], "a study name (a non-empty string)")
        study.name = document["name"]
    base = _mapping(where, document, "base")
    study.base = _base_values(where, base)
    arms = _arms(where, document)
    study.axes = _axes(where, _mapping(where, document, "axes"), study.base, arms)
    study.arms = _typed_arms(where, arms, study.base, study.axes)
    if "seeds" in document:
        study.seeds = _seeds(where, document["seeds"])
    if "search" in document:
        study.search = _search(where, _mapping(where, document, "search"), study.base)
    for key, (allowed, what) in SETTINGS.items():
        if key in document:
            if not allowed(document[key]):
                raise where.refuse((key,), document[key], what)
            study.settings[key] = document[key]
    return study


def _refuse_unknown(where: Where, mapping: dict, known: tuple[str, ...], keys: tuple) -> None:
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"{where.at(*keys, key)}: unknown key {key!r}; {hint}allowed: {', '.join(known)}")


def _mapping(where: Where, document: dict, key: str) -> dict:
    value = document.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise where.refuse((key,), value, "a mapping of field: value")
    return value


def _offending_key(message: str, fields: dict[str, Any]) -> str | None:
    """The field a TrialConfig error is about: the one it names first."""
    for key in fields:
        if message.startswith((f"{key}=", f"unknown field '{key}'")):
            return key
    named = [(found.start(), key) for key in fields if (found := re.search(rf"\b{re.escape(key)}\b", message))]
    return min(named)[1] if named else None


def _config(where: Where, keys: tuple, fields: dict[str, Any], contexts: list[dict[str, Any]]) -> TrialConfig:
    """The TrialConfig of ``fields`` over the first context in which it is valid (an axis value may be
    valid only beside an arm); a ConfigError at the line of the offending field otherwise."""
    error: ConfigError | None = None
    for context in contexts:
        try:
            return TrialConfig.from_dict({**context, **fields})
        except ConfigError as exc:
            error = error or exc
    assert error is not None
    key = _offending_key(str(error), fields)
    named = key is not None and key not in keys  # an axis value's keys end in its index, and name its field
    raise ConfigError(f"{where.at(*keys, *([key] if named else []))}: {error}")


def _no_seed_field(where: Where, keys: tuple, fields: dict[str, Any]) -> None:
    if "seed" in fields:
        raise ConfigError(f"{where.at(*keys, 'seed')}: the seed field is set by the top-level seeds key; allowed: "
                          f"seeds: N (seeds 0..N-1) or seeds: [list]")


def _base_values(where: Where, base: dict) -> dict[str, Any]:
    _no_seed_field(where, ("base",), base)
    cfg = _config(where, ("base",), base, [{}])
    return {key: getattr(cfg, key) for key in base}


def _arms(where: Where, document: dict) -> list[dict]:
    arms = document.get("arms")
    if arms is None:
        return []
    if not isinstance(arms, list):
        raise where.refuse(("arms",), arms, "a list of field mappings, e.g. [{optimizer: adam, lr: 0.001}]")
    for index, arm in enumerate(arms):
        if not isinstance(arm, dict) or not arm:
            raise where.refuse(("arms", index), arm, "a non-empty mapping of TrialConfig fields")
        _no_seed_field(where, ("arms", index), arm)
    return arms


def _axes(where: Where, axes: dict, base: dict[str, Any], arms: list[dict]) -> dict[str, list[Any]]:
    """Each axis as a list of typed values; a value is judged beside the base, or beside an arm."""
    _no_seed_field(where, ("axes",), axes)
    contexts = [base] + [{**base, **arm} for arm in arms]
    typed: dict[str, list[Any]] = {}
    for axis, values in axes.items():
        if axis not in TrialConfig.field_names():
            _config(where, ("axes",), {axis: None}, [{}])  # the did-you-mean error, at the axis's line
        if not isinstance(values, list) or not values:
            raise where.refuse(("axes", axis), values, "a non-empty list of values, e.g. [1.0, 4.0]")
        typed[axis] = [getattr(_config(where, ("axes", axis, i), {axis: value}, contexts), axis)
                       for i, value in enumerate(values)]
        repeated = sorted({repr(v) for v in typed[axis] if typed[axis].count(v) > 1})
        if repeated:
            raise where.refuse(("axes", axis), values, f"distinct values (repeated: {', '.join(repeated)})")
    return typed


def _typed_arms(where: Where, arms: list[dict], base: dict[str, Any], axes: dict[str, list]) -> list[dict]:
    """Each arm's fields typed; an arm is judged beside the base, or beside the first value of each axis."""
    first_values = {axis: values[0] for axis, values in axes.items()}
    typed = []
    for index, arm in enumerate(arms):
        overlap = [key for key in arm if key in axes]
        if overlap:
            raise ConfigError(f"{where.at('arms', index, overlap[0])}: {overlap[0]} is also an axis; allowed: "
                              f"each field in the axes or in the arms, not both")
        cfg = _config(where, ("arms", index), arm, [base, {**base, **first_values}])
        typed.append({key: getattr(cfg, key) for key in arm})
    return typed


def _seeds(where: Where, seeds: Any) -> list[int]:
    allowed = f"a count >= 1 (seeds 0..N-1) or a non-empty list of distinct integers in [0, {SEED_LIMIT})"
    if _is_int(seeds) and seeds >= 1:
        return list(range(seeds))
    if isinstance(seeds, list) and seeds and all(_is_int(s) and 0 <= s < SEED_LIMIT for s in seeds):
        if len(set(seeds)) == len(seeds):
            return list(seeds)
    raise where.refuse(("seeds",), seeds, allowed)


def _search(where: Where, search: dict, base: dict[str, Any]) -> OptunaSpec:
    _refuse_unknown(where, search, SEARCH_KEYS, ("search",))
    space = _mapping(where, search, "space")
    if not space:
        raise where.refuse(("search", "space"), search.get("space"),
                           "a non-empty mapping of field: [kind, ...], e.g. temperature: [logfloat, 1.0, 16.0]")
    dims = {name: _search_dimension(where, name, dim, base) for name, dim in space.items()}
    defaults = OptunaSpec(space={})
    names = {key: search.get(key, list(getattr(defaults, key))) for key in ("metrics", "modes")}
    for key, values in names.items():
        values = [values] if isinstance(values, str) else values
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise where.refuse(("search", key), search[key], "a name or a non-empty list of names")
        names[key] = values
    for key in ("num_samples", "seed"):
        value = search.get(key, getattr(defaults, key))
        if not _is_int(value) or value < (1 if key == "num_samples" else 0):
            raise where.refuse(("search", key), value, "an integer >= 1" if key == "num_samples" else "an integer >= 0")
    return OptunaSpec(space=dims, metrics=tuple(names["metrics"]), modes=tuple(names["modes"]),
                      num_samples=search.get("num_samples", defaults.num_samples),
                      seed=search.get("seed", defaults.seed))


def _search_dimension(where: Where, name: str, dim: Any, base: dict[str, Any]) -> tuple:
    """``[kind, low, high]`` or ``[choice, [values]]``, its values typed as the field is."""
    keys = ("search", "space", name)
    if name not in TrialConfig.field_names():
        _config(where, ("search", "space"), {name: None}, [{}])
    kind = dim[0] if isinstance(dim, list) and dim else None
    if kind == "choice" and len(dim) == 2 and isinstance(dim[1], list) and dim[1]:
        values = [getattr(_config(where, keys, {name: value}, [base]), name) for value in dim[1]]
        return ("choice", values)
    if kind in SEARCH_KINDS and kind != "choice" and len(dim) == 3 and all(_is_number(v) for v in dim[1:]):
        low, high = (getattr(_config(where, keys, {name: value}, [base]), name) for value in dim[1:])
        if low < high:
            return (kind, low, high)
    raise where.refuse(keys, dim, "[float|logfloat|int, low, high] with low < high, or [choice, [values]]")


# --- writing ----------------------------------------------------------------------------------------


def study_document(study: Study, named: tuple[str, ...] = ()) -> dict[str, Any]:
    """The study file of ``study``, in the layout's key order: its base as the fields of ``named`` and those
    that differ from TrialConfig's defaults, seeds as a count when they are 0..N-1, its scheduler and resources."""
    defaults = TrialConfig().to_dict()
    base = {key: value for key, value in study.base.to_dict().items()
            if key != "seed" and (key in named or value != defaults[key])}
    document: dict[str, Any] = {"name": study.name, "base": base}
    if study.axes:
        document["axes"] = {axis: list(values) for axis, values in study.axes.items()}
    if study.arms:
        document["arms"] = [dict(arm) for arm in study.arms]
    seeds = list(study.seeds)
    document["seeds"] = len(seeds) if seeds == list(range(len(seeds))) else seeds
    if study.search is not None:
        search = study.search
        document["search"] = {
            "space": {name: list(dim) for name, dim in search.space.items()},
            "metrics": list(search.metrics), "modes": list(search.modes), "num_samples": search.num_samples,
            "seed": search.seed,
        }
    document["scheduler"] = study.scheduler
    if study.scheduler == "asha":
        document["asha_grace_epochs"] = study.asha_grace_epochs
    document["cpus_per_trial"] = study.cpus_per_trial
    document["gpus_per_trial"] = study.gpus_per_trial
    return document


def _yaml_flow(value: Any) -> str:
    """One value in YAML's flow style, quoted where YAML would read it as another type."""
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False).strip()
    return yaml.safe_dump([value], default_flow_style=True, width=1 << 30).strip()[1:-1]


def _yaml_block(value: Any, indent: str) -> list[str]:
    """Mappings that hold mappings, and lists of mappings, as blocks; everything else in flow style."""
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict) and item or isinstance(item, list) and item and isinstance(item[0], dict):
                lines += [f"{indent}{key}:", *_yaml_block(item, indent + "  ")]
            else:
                lines.append(f"{indent}{key}: {_yaml_flow(item)}")
    else:
        lines += [f"{indent}- {_yaml_flow(item)}" for item in value]
    return lines


def to_yaml(document: dict[str, Any], header: list[str] = ()) -> str:
    return "\n".join([*(f"# {line}" for line in header), *_yaml_block(document, "")]) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise ValueError(f"TOML has no value for {value!r}")


def to_toml(document: dict[str, Any], header: list[str] = ()) -> str:
    """Top-level values, then a table per mapping (``[search.space]`` nested), then ``[[arms]]``; a None
    value is left out (TOML has no null: an absent key takes its default)."""
    lines = [f"# {line}" for line in header]

    def table(name: str, mapping: dict[str, Any], array: bool = False) -> None:
        scalars = {key: value for key, value in mapping.items() if not isinstance(value, dict) and value is not None}
        lines.extend(["", f"[[{name}]]" if array else f"[{name}]"] if name else [])
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in scalars.items())
        for key, value in mapping.items():
            if isinstance(value, dict) and key != "arms":
                table(f"{name}.{key}" if name else key, value)

    table("", {key: value for key, value in document.items() if key != "arms"})
    for arm in document.get("arms", []):
        table("arms", arm, array=True)
    return "\n".join(lines) + "\n"
