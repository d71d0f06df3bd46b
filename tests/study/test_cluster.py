"""cluster.yaml passes Ray's own offline validation; broken copies fail with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kd_ray.study.cluster import ClusterConfigError, load_cluster_config, validate_cluster_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


@pytest.fixture
def config() -> dict:
    return load_cluster_config(str(CLUSTER_YAML))


def test_shipped_cluster_yaml_is_valid(config):
    notes = validate_cluster_config(config, str(CLUSTER_YAML))
    assert any("validate_config: ok" in n for n in notes)
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


def _broken(config: dict, edit) -> dict:
    edit(config)
    return config


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c.__setitem__("max_workers", "eight"), "max_workers"),
        (lambda c: c.__setitem__("head_node_type", "nonexistent"), "head_node_type"),
        (lambda c: c.__setitem__("no_such_field", 1), "no_such_field"),
        (lambda c: c["available_node_types"]["head"].__setitem__("resources", {"CPU": 4}), "CPU: 0"),
        (lambda c: c.__setitem__("head_start_ray_commands", ["ray start --head --dashboard-host=0.0.0.0"]),
         "localhost"),
        (lambda c: c["docker"].__setitem__("image", "rayproject/ray:2.9.0-py311-gpu"), "2.9.0"),
        (lambda c: c["docker"].__setitem__("run_options", []), "RAY_AUTH_MODE=token"),
    ],
)
def test_broken_copies_fail_with_a_clear_message(config, edit, expected):
    with pytest.raises(ClusterConfigError, match=expected):
        validate_cluster_config(_broken(config, edit), "broken.yaml")


def test_cli_exit_codes(tmp_path, config):
    ok = subprocess.run([sys.executable, "-m", "kd_ray.cli", "validate-cluster", str(CLUSTER_YAML)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout
    config["available_node_types"]["head"]["resources"] = {"CPU": 8}
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    bad = subprocess.run([sys.executable, "-m", "kd_ray.cli", "validate-cluster", str(broken)],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "CPU: 0" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_not_yaml_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ClusterConfigError, match="mapping"):
        load_cluster_config(str(path))


ONPREM_YAML = CLUSTER_YAML.with_name("cluster-onprem.yaml")


def test_shipped_onprem_yaml_is_valid():
    notes = validate_cluster_config(load_cluster_config(str(ONPREM_YAML)), str(ONPREM_YAML))
    assert any("local provider" in n for n in notes) and any("token authentication on" in n for n in notes)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c.__setitem__("available_node_types", {"head": {"node_config": {}}}), "available_node_types"),
        (lambda c: c["provider"].pop("head_ip"), "provider/head_ip"),
        (lambda c: c["provider"].__setitem__("worker_ips", "198.51.100.11"), "provider/worker_ips"),
        (lambda c: c["provider"].__setitem__("worker_ips", ["198.51.100.10"]), "not the head"),
        (lambda c: c["auth"].pop("ssh_user"), "auth/ssh_user"),
        (lambda c: c.__setitem__("worker_start_ray_commands", ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"]),
         "worker_start_ray_commands.*RAY_AUTH_MODE=token"),
        (lambda c: c["file_mounts"].pop("~/.ray/auth_token"), "auth_token"),
        (lambda c: c.__setitem__("setup_commands", ["pip install -e ~/kd-ray"]), "pin Ray's version"),
    ],
)
def test_broken_onprem_copies_fail_with_a_clear_message(edit, expected):
    config = load_cluster_config(str(ONPREM_YAML))
    with pytest.raises(ClusterConfigError, match=expected):
        validate_cluster_config(_broken(config, edit), "broken-onprem.yaml")
