"""Offline checks of a Ray cluster launcher config (``kd-ray validate-cluster``).

Ray's own checks first: the JSON schema shipped in the ray wheel, then ``prepare_config`` and
``validate_config`` (a private Ray API, which is why the project pins ray). Then kd_ray's own
rules: the head of a cloud cluster runs no trials, the dashboard stays on localhost, token
authentication is on, Ray's version matches ours. A ``local`` provider (machines a lab already has,
``cluster-onprem.yaml``) names its machines and SSH account instead of node types, and mounts the
token on every node.
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
    _check_with_ray(config, path)
    local = config["provider"]["type"] == "local"
    return [
        "Ray's schema and validate_config: ok",
        _check_head(config, path, local),
        _check_dashboard(config, path),
        _check_token_authentication(config, path, local),
        _check_ray_version(config, path),
    ]


def _check_with_ray(config: dict[str, Any], path: str) -> None:
    """Ray's JSON schema, then Ray's own prepare_config and validate_config, in kd_ray's words."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        jsonschema.validate(config, _ray_schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ClusterConfigError(f"{path}: field '{where}': {exc.message}") from None
    if config["provider"]["type"] == "local":
        # Before Ray's prepare_config, which aborts on these with a log line of its own.
        check_local_provider(config, path)
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except Exception as exc:  # Ray raises ValueError, KeyError, RuntimeError or schema errors
        message = getattr(exc, "message", None) or str(exc)
        raise ClusterConfigError(f"{path}: Ray refuses the config: {message}") from None


def _check_head(config: dict[str, Any], path: str, local: bool) -> str:
    """The head of a cloud cluster runs no trials; a local provider's head runs trials too."""
    if local:
        workers = config["provider"]["worker_ips"]
        return (f"local provider: head {config['provider']['head_ip']} and {len(workers)} workers over SSH "
                f"as {config['auth']['ssh_user']}; the head runs trials too: ok")
    head = config.get("head_node_type")
    head_resources = config.get("available_node_types", {}).get(head, {}).get("resources", {})
    if head_resources.get("CPU") != 0:
        raise ClusterConfigError(
            f"{path}: available_node_types/{head}/resources must set CPU: 0 so the head runs no "
            f"trials; got {head_resources!r}"
        )
    return "head runs no trials (CPU: 0): ok"


def _check_dashboard(config: dict[str, Any], path: str) -> str:
    starts = " ".join(config.get("head_start_ray_commands", []))
    host = re.search(r"--dashboard-host[= ](\S+)", starts)
    if host is None or host.group(1) not in ("127.0.0.1", "localhost"):
        raise ClusterConfigError(
            f"{path}: head_start_ray_commands must keep the dashboard on localhost "
            f"(--dashboard-host=127.0.0.1); reach it with `ray dashboard {os.path.basename(path)}`"
        )
    return "dashboard on localhost: ok"


def _check_token_authentication(config: dict[str, Any], path: str, local: bool) -> str:
    """Ray's token authentication on every node, and on a local provider the token mounted on each."""
    docker = config.get("docker") or {}
    if local and not docker:
        # Without docker no run option carries the mode: each `ray start` sets it itself.
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            ray_starts = [c for c in config.get(key, []) if "ray start" in c]
            if not ray_starts or any("RAY_AUTH_MODE=token" not in c for c in ray_starts):
                raise ClusterConfigError(
                    f"{path}: {key}: every 'ray start' must run with Ray's token authentication: begin it "
                    f"with 'export RAY_AUTH_MODE=token; '"
                )
    else:
        run_options = " ".join(docker.get("run_options", []))
        commands = " ".join(config.get("head_start_ray_commands", []) + config.get("worker_start_ray_commands", []))
        if "RAY_AUTH_MODE=token" not in run_options and "RAY_AUTH_MODE=token" not in commands:
            raise ClusterConfigError(
                f"{path}: enable Ray's token authentication on every node: add '--env RAY_AUTH_MODE=token' to "
                f"docker/run_options (or export it in the start commands) and mount ~/.ray/auth_token"
            )
    if local and not any(target.rstrip("/").endswith(".ray/auth_token") for target in config.get("file_mounts") or {}):
        raise ClusterConfigError(
            f"{path}: file_mounts must copy the shared token to every node: add "
            f"'~/.ray/auth_token: ~/.ray/auth_token' (create it once with `ray get-auth-token --generate`)"
        )
    return "token authentication on: ok"


def _check_ray_version(config: dict[str, Any], path: str) -> str:
    """The cluster's Ray, pinned by its docker image or a pip pin, is this machine's."""
    import ray

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
    return f"Ray pinned to {version}, matching this machine: ok"


def check_local_provider(config: dict[str, Any], path: str) -> None:
    """The machines and the SSH account of a ``local`` provider config, in kd_ray's words."""
    provider = config["provider"]
    for field in ("available_node_types", "head_node_type"):
        if field in config:
            raise ClusterConfigError(
                f"{path}: field '{field}' is not used with provider type 'local': Ray makes the one node type "
                f"from provider/head_ip and provider/worker_ips; remove it"
            )
    head = provider.get("head_ip")
    if not isinstance(head, str) or not head.strip():
        raise ClusterConfigError(f"{path}: provider/head_ip must name the head machine (an IP or host name); "
                                 f"got {head!r}")
    workers = provider.get("worker_ips")
    if not isinstance(workers, list) or not all(isinstance(w, str) and w.strip() for w in workers):
        raise ClusterConfigError(f"{path}: provider/worker_ips must be a list of the worker machines' IPs or "
                                 f"host names ([] for a head alone); got {workers!r}")
    if head in workers or len(set(workers)) != len(workers):
        raise ClusterConfigError(f"{path}: provider/worker_ips must list each machine once and not the head "
                                 f"({head}); got {workers!r}")
    user = (config.get("auth") or {}).get("ssh_user")
    if not isinstance(user, str) or not user.strip():
        raise ClusterConfigError(f"{path}: auth/ssh_user must name the account kd_ray runs as on every machine; "
                                 f"got {user!r}")
