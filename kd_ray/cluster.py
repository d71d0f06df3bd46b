"""Offline checks of a Ray cluster launcher config (``kd-ray validate-cluster``).

Ray's own checks first: the JSON schema shipped in the ray wheel, then ``prepare_config`` and
``validate_config`` (a private Ray API, which is why the project pins ray). Then kd_ray's own
rules: the head runs no trials, the dashboard stays on localhost, Ray's version matches ours.
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any


class ClusterConfigError(ValueError):
    """A cluster config that Ray or kd_ray would refuse."""


def _ray_schema() -> dict:
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as handle:
        return json.load(handle)


def load_cluster_config(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as handle:
            config = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ClusterConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ClusterConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise ClusterConfigError(f"{path}: a cluster config is a YAML mapping, got {type(config).__name__}")
    return config


def validate_cluster_config(config: dict[str, Any], path: str = "cluster.yaml") -> list[str]:
    """Raise ClusterConfigError on the first problem; return notes on what was checked."""
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        jsonschema.validate(config, _ray_schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ClusterConfigError(f"{path}: field '{where}': {exc.message}") from None
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except Exception as exc:  # Ray raises ValueError, KeyError, RuntimeError or schema errors
        message = getattr(exc, "message", None) or str(exc)
        raise ClusterConfigError(f"{path}: Ray refuses the config: {message}") from None

    notes = ["Ray's schema and validate_config: ok"]
    head = config.get("head_node_type")
    head_resources = config.get("available_node_types", {}).get(head, {}).get("resources", {})
    if head_resources.get("CPU") != 0:
        raise ClusterConfigError(
            f"{path}: available_node_types/{head}/resources must set CPU: 0 so the head runs no "
            f"trials; got {head_resources!r}"
        )
    notes.append("head runs no trials (CPU: 0): ok")
    starts = " ".join(config.get("head_start_ray_commands", []))
    host = re.search(r"--dashboard-host[= ](\S+)", starts)
    if host is None or host.group(1) not in ("127.0.0.1", "localhost"):
        raise ClusterConfigError(
            f"{path}: head_start_ray_commands must keep the dashboard on localhost "
            f"(--dashboard-host=127.0.0.1); reach it with `ray dashboard {os.path.basename(path)}`"
        )
    notes.append("dashboard on localhost: ok")
    run_options = " ".join((config.get("docker") or {}).get("run_options", []))
    commands = " ".join(config.get("head_start_ray_commands", []) + config.get("worker_start_ray_commands", []))
    if "RAY_AUTH_MODE=token" not in run_options and "RAY_AUTH_MODE=token" not in commands:
        raise ClusterConfigError(
            f"{path}: enable Ray's token authentication on every node: add '--env RAY_AUTH_MODE=token' to "
            f"docker/run_options (or export it in the start commands) and mount ~/.ray/auth_token"
        )
    notes.append("token authentication on: ok")
    image = (config.get("docker") or {}).get("image", "")
    pinned = re.search(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)", image)
    setup = " ".join(config.get("setup_commands", []))
    pip_pin = re.search(r"ray(?:\[[a-z,]+\])?==(\d+\.\d+\.\d+)", setup)
    version = pinned.group(1) if pinned else pip_pin.group(1) if pip_pin else None
    if version is None:
        raise ClusterConfigError(
            f"{path}: pin Ray's version (docker image rayproject/ray:{ray.__version__}-py311-gpu, or "
            f"ray[tune]=={ray.__version__} in setup_commands)"
        )
    if version != ray.__version__:
        raise ClusterConfigError(
            f"{path}: the cluster runs Ray {version} but this machine has Ray {ray.__version__}; they must match"
        )
    notes.append(f"Ray pinned to {version}, matching this machine: ok")
    return notes
