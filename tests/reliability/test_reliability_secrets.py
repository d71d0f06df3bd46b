"""Secrets in the environment of a study that starts its own Ray reach no file that another local user
can read, and no command line.

Left to itself, Ray makes its temp directory (/tmp/ray) world-writable and its logs world-readable,
its runtime env agent logs every runtime env with its environment variables, Ray Tune copies AWS
credentials from the driver's environment into each trial's runtime env, and Ray hands that runtime
env to each new worker on its command line, which every local user reads in /proc.

The study runs as a subprocess in its own session, as a user's shell would start it, with fake AWS
credentials planted in its environment. While it runs, the command lines of its processes are read
from /proc; afterwards every file it and its Ray wrote is read: the private directory the driver
names, Ray's default temp directory, the storage and the home directory.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from processes import command_line, environment, kill_session, session_processes

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads command lines from /proc"),
]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "studies" / "temperature_sweep.py"
# Four temperatures of one seed, packed into one Ray Tune trial: a real study, kept short.
ARGS = ["--set", "teacher_members=1", "--set", "teacher_epochs=2", "--set", "epochs=2", "--set", "eval_every=1",
        "--set", "batch_size=256", "--seeds", "1", "--max-concurrent", "1", "--quiet"]
# What a user's shell may hold that would change what kd_ray decides: none of it here.
RAY_SETTINGS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_TMPDIR")
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
FILES_LINE = re.compile(r"Ray: its files and logs in (\S+), a directory only you can enter")
TRAINABLE_TITLE = "ray::ImplicitFunc"  # the process title of a Ray Tune function trainable's worker


def protected(path: Path) -> bool:
    """No other user (root aside) can read ``path``: it is this user's and grants group and others
    nothing, or a directory above it is, and they cannot enter it to reach anything below."""
    me = os.getuid()
    for item in (path, *path.parents):
        info = item.stat()
        if info.st_uid == me and stat.S_IMODE(info.st_mode) & 0o077 == 0:
            return True
    return False


def files_holding(roots: list[Path], needles: list[bytes]) -> list[Path]:
    """Every regular file below ``roots`` (symbolic links not followed) that holds one of ``needles``."""
    found = []
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = Path(folder) / name
                if path.is_symlink() or not path.is_file():
                    continue  # a link is read where it points, a socket holds no text
                if any(needle in path.read_bytes() for needle in needles):
                    found.append(path)
    return found


def test_secrets_in_a_local_study_s_environment_reach_no_file_or_command_line_another_user_can_read(tmp_path):
    home, storage, log = tmp_path / "home", tmp_path / "storage", tmp_path / "study.log"
    home.mkdir()
    planted = {name: f"kdray-fake-{name.lower()}-{secrets.token_hex(16)}" for name in CREDENTIALS}
    env = {k: v for k, v in os.environ.items() if k not in RAY_SETTINGS}
    env.update(planted, HOME=str(home))  # a fresh home: no ~/.ray of the machine's user is read or written

    # 1. The study, its processes' command lines read every 50 ms while it runs.
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, str(SCRIPT), *ARGS, "--storage", str(storage)], cwd=tmp_path,
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    private = None
    try:
        on_command_line, trainable_envs = {}, []
        deadline = time.monotonic() + 400
        while driver.poll() is None and time.monotonic() < deadline:
            for pid in session_processes(driver.pid):
                line = command_line(pid)
                if any(value in line for value in planted.values()):
                    on_command_line[pid] = line[:400]
                if line.startswith(TRAINABLE_TITLE):
                    try:
                        trainable_envs.append(environment(pid))
                    except OSError:
                        pass  # it ended in between
            time.sleep(0.05)
        assert driver.poll() == 0, f"the study failed or hung:\n{log.read_text()[-3000:]}"
        text = log.read_text()
        match = FILES_LINE.search(text)
        assert match, text[-3000:]
        ray_dir = Path(match.group(1))
        private = ray_dir.parent
    finally:
        kill_session(driver.pid)

    try:
        # 2. The study succeeded: four trials, each to its last epoch.
        trials = pd.read_parquet(storage / "temperature_sweep" / "trials.parquet")
        assert len(trials) == 4 and (trials["status"] == "TERMINATED").all(), trials[["status", "error"]]
        assert (trials["epochs_completed"] == 2).all()

        # 3. No command line of the study's processes ever held a credential; the trainable's worker has
        # them all the same, in its environment (which only this user and root read), as S3 storage needs.
        assert not on_command_line, f"credentials on a command line: {on_command_line}"
        assert trainable_envs, f"no {TRAINABLE_TITLE} process was seen"
        assert all(trainable_env.get(name) == value for trainable_env in trainable_envs
                   for name, value in planted.items()), "the trainable's worker lacks the credentials"

        # 4. Ray wrote its session below the directory the driver named: this user's, mode 0700, and
        # nothing of this driver's in Ray's default temp directory (a session is named after its driver's pid).
        info = private.stat()
        assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700, oct(info.st_mode)
        sessions = list(ray_dir.glob(f"session_*_{driver.pid}"))
        assert len(sessions) == 1 and (sessions[0] / "logs" / "raylet.out").is_file(), list(ray_dir.glob("*"))
        default_ray = Path(os.environ.get("TMPDIR") or "/tmp") / "ray"
        strays = list(default_ray.glob(f"session_*_{driver.pid}")) if default_ray.is_dir() else []
        assert not strays, f"Ray wrote outside the private directory: {strays}"
        # Ray's runtime env agent logged the trial's runtime env, and no credential is in it.
        agent_log = (sessions[0] / "logs" / "runtime_env_agent.log").read_text()
        assert "Creating runtime env" in agent_log
        assert not any(value in agent_log for value in planted.values())

        # 5. Every file that holds a credential, wherever the study and its Ray wrote, is out of other users' reach.
        needles = [value.encode() for value in planted.values()]
        holding = files_holding([private, storage, home, *strays], needles)
        exposed = [(str(path), oct(stat.S_IMODE(path.stat().st_mode))) for path in holding if not protected(path)]
        assert not exposed, f"credentials in files other users can read: {exposed}"
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)  # the study keeps it for its logs; the test needs it no more


def test_the_local_ray_settings_give_a_private_temp_dir_and_restore_ray_s_own_afterwards(monkeypatch, tmp_path):
    from ray.tune.execution import class_cache

    from kd_ray.study.guards import local_ray_settings

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # the user's choice: the private directory goes below it
    propagated = class_cache.ENV_VARS_TO_PROPAGATE
    assert "AWS_SECRET_ACCESS_KEY" in propagated  # Ray Tune's own list, which the settings narrow
    with local_ray_settings():
        private = Path(os.environ["RAY_TMPDIR"])
        assert private.parent == tmp_path and private.name.startswith("kd_ray-")
        assert stat.S_IMODE(private.stat().st_mode) == 0o700 and private.stat().st_uid == os.getuid()
        # Only the AWS credentials stop being copied; Ray Tune's and Ray Train's own settings still are.
        assert class_cache.ENV_VARS_TO_PROPAGATE == {name for name in propagated if not name.startswith("AWS_")}
    assert os.environ["RAY_TMPDIR"] == str(tmp_path)
    assert class_cache.ENV_VARS_TO_PROPAGATE is propagated
    assert private.is_dir()  # kept, for Ray's logs
