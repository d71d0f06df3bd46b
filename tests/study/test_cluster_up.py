"""cluster-onprem.yaml for real: an SSH server on the loopback plays the lab's head machine, Ray's own
``ray up -y`` starts the cluster from a copy of the file pointed at 127.0.0.1, ``ray submit`` runs a small
study on it with ``--address auto``, its tables are read with pyarrow, ``ray down -y`` takes the cluster
down, and no Ray process of the cluster is left.

The test copy differs from the shipped file only where a test must: the head is 127.0.0.1 with no
workers, the SSH account and key are the test's, Ray listens on the loopback (``--node-ip-address``),
and the setup commands check this machine's environment instead of pip-installing into it. The node's
home is a temporary directory (set through ``authorized_keys``): its ``~/.bashrc`` puts this Python's
``ray`` on the login shell's PATH, as a lab machine's would. sshd runs in its own PID namespace, so the
``ray stop`` that ``ray up`` and ``ray down`` run on the node sees only the cluster's own processes.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from kd_ray.study.cluster import load_cluster_config, validate_cluster_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses Linux PID namespaces and /proc")]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # where this Python's `ray` lives
SSH_PORT = 22  # Ray's SSH command runner always connects to port 22
SEEDS = 2


def _missing_tools() -> list[str]:
    tools = {"sshd": shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)}
    tools.update({name: shutil.which(name) for name in ("ssh", "ssh-keygen", "rsync", "unshare")})
    return [name for name, path in tools.items() if path is None]


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _processes_in_namespace(namespace: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process in the PID namespace ``namespace``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "pid") != namespace:
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        found.append((int(entry.name), cmdline))
    return found


def _is_ray(cmdline: str) -> bool:
    program = cmdline.split(" ", 1)[0]
    return (Path(program).name in ("raylet", "gcs_server", "ray") or cmdline.startswith("ray::")
            or "/site-packages/ray/" in cmdline)


def _run(argv: list[str], env: dict[str, str], timeout: float, log: Path) -> str:
    with open(log, "w") as out:
        done = subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    text = log.read_text()
    assert done.returncode == 0, f"{' '.join(argv[:3])} exited {done.returncode}:\n{text[-4000:]}"
    return text


@pytest.fixture(scope="module")
def loopback_node():
    """An sshd on 127.0.0.1:22 in a PID namespace of its own, accepting a key generated here for the
    current user, whose sessions get a temporary home; yields the paths, stops sshd after the module."""
    missing = _missing_tools()
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install openssh-server rsync)")
    if os.geteuid() != 0:
        pytest.skip("sshd on port 22, which Ray's SSH runner always uses, needs root")
    if _port_open(SSH_PORT):
        pytest.skip("something already listens on 127.0.0.1:22")
    # Short: Ray's session sockets live under the node's RAY_TMPDIR, and a socket path has 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="kdr"))
    node_home, client_home = root / "node", root / "client"
    for directory in (node_home, client_home):
        directory.mkdir()
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
    (root / "authorized_keys").write_text(f'environment="HOME={node_home}" {(root / "user_key.pub").read_text()}')
    # What a lab machine's ~/.bashrc does: Ray runs every command through `bash --login` after it.
    (node_home / ".bashrc").write_text(f'export PATH="{BIN}:$PATH"\nexport RAY_TMPDIR="{root / "node-tmp"}"\n')
    (root / "node-tmp").mkdir()
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    sshd_log = open(root / "sshd.log", "w")
    sshd = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
         shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", "/dev/null", "-h", str(root / "host_key"),
         "-o", f"ListenAddress=127.0.0.1:{SSH_PORT}", "-o", f"AuthorizedKeysFile={root / 'authorized_keys'}",
         "-o", "PermitRootLogin=prohibit-password", "-o", "PasswordAuthentication=no",
         "-o", "KbdInteractiveAuthentication=no", "-o", "UsePAM=no", "-o", "PermitUserEnvironment=yes",
         "-o", "StrictModes=no", "-o", f"PidFile={root / 'sshd.pid'}"],
        stdout=sshd_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not _port_open(SSH_PORT):
            if sshd.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"sshd could not start: {(root / 'sshd.log').read_text()[-1000:]}")
            time.sleep(0.2)
        sshd_child = next(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                          and f"PPid:\t{sshd.pid}\n" in (p / "status").read_text())
        yield {"root": root, "key": root / "user_key", "node_home": node_home, "client_home": client_home,
               "namespace": os.readlink(f"/proc/{sshd_child}/ns/pid")}
    finally:
        # unshare ignores SIGTERM while it waits; killed, it kills sshd (--kill-child), the namespace's
        # first process, and with it every process of the namespace.
        sshd.kill()
        sshd.wait(timeout=30)
        sshd_log.close()
        shutil.rmtree(root, ignore_errors=True)


def test_ray_up_submit_a_study_and_ray_down_on_the_loopback(loopback_node):
    node, root = loopback_node, loopback_node["root"]
    user = getpass.getuser()
    login = subprocess.run(["ssh", "-i", str(node["key"]), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                            "-o", "UserKnownHostsFile=/dev/null", f"{user}@127.0.0.1", "echo $HOME"],
                           capture_output=True, text=True, timeout=60)
    assert login.stdout.strip() == str(node["node_home"]), login.stderr

    # The Ray CLI on the "laptop": its own home (the token) and Ray temp directory (the cluster's state).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(node["client_home"]), RAY_TMPDIR=str(root / "client-tmp"), TMPDIR=str(root / "client-tmp"))
    (root / "client-tmp").mkdir()
    _run([str(BIN / "ray"), "get-auth-token", "--generate"], env, 120, root / "token.log")
    assert (node["client_home"] / ".ray" / "auth_token").is_file()

    config = load_cluster_config(str(REPO / "cluster-onprem.yaml"))
    config["cluster_name"] = "kd-ray-loopback-test"
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": user, "ssh_private_key": str(node["key"])}
    config["max_workers"] = 0
    # The pinned Ray is this machine's already (pip finds it satisfied); kd_ray is installed here too, so
    # instead of installing the copied checkout over it, check that the node's Python imports it.
    installs = [c for c in config["setup_commands"] if "-e ~/kd-ray" in c]
    assert len(installs) == 1, config["setup_commands"]
    config["setup_commands"] = [c if c not in installs else "python -c 'import kd_ray'"
                                for c in config["setup_commands"]]
    config["head_start_ray_commands"] = [
        f"{c} --node-ip-address=127.0.0.1" if "ray start" in c else c for c in config["head_start_ray_commands"]]
    test_config = root / "cluster-test.yaml"
    test_config.write_text(yaml.safe_dump(config, sort_keys=False))
    validate_cluster_config(config, str(test_config))  # the copy is still a config kd_ray accepts

    storage = root / "storage"
    try:
        _run([str(BIN / "ray"), "up", "-y", "--no-config-cache", str(test_config)], env, 600, root / "up.log")
        ray_processes = [p for p in _processes_in_namespace(node["namespace"]) if _is_ray(p[1])]
        assert any("raylet" in cmd for _, cmd in ray_processes), ray_processes
        submitted = _run(
            [str(BIN / "ray"), "submit", str(test_config), str(REPO / "studies" / "ensemble_size.py"), "--",
             "--address", "auto", "--storage", str(storage), "--seeds", str(SEEDS), "--set", "teacher_members=1",
             "--set", "teacher_epochs=2", "--set", "epochs=2", "--set", "eval_every=1"],
            env, 600, root / "submit.log")
        assert "ensemble_size: 2 trials" in submitted and "wrote " in submitted, submitted[-3000:]
    finally:
        down = subprocess.run([str(BIN / "ray"), "down", "-y", str(test_config)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert down.returncode == 0, (down.stdout + down.stderr)[-3000:]

    trials = pq.read_table(storage / "ensemble_size" / "trials.parquet")
    assert trials.num_rows == SEEDS
    assert set(trials.column("status").to_pylist()) == {"TERMINATED"}
    assert sorted(trials.column("seed").to_pylist()) == list(range(SEEDS))
    assert all(0.0 <= a <= 1.0 for a in trials.column("test_agreement").to_pylist())
    epochs = pq.read_table(storage / "ensemble_size" / "epochs.parquet")
    assert epochs.num_rows == 2 * SEEDS  # two evaluations per trial
    # The study's driver joined the cluster `ray up` started (no Ray of its own): one Ray session on the
    # node, and the driver's log is in it.
    sessions = sorted((root / "node-tmp" / "ray").glob("session_2*"))
    assert len(sessions) == 1, sessions
    assert list((sessions[0] / "logs").glob("python-core-driver-*.log"))

    deadline = time.monotonic() + 30
    while (left := [p for p in _processes_in_namespace(node["namespace"]) if _is_ray(p[1])]):
        assert time.monotonic() < deadline, f"Ray processes of the cluster left after ray down: {left}"
        time.sleep(1)
