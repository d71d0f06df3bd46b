"""The Ray a study starts on this machine, with the environment as a user has it (no RAY_AUTH_MODE):
it listens on the loopback only and refuses a driver without the token made for the run; SIGTERM and
SIGHUP stop the study as Ctrl-C does, and --resume finishes it with complete tables.

The study runs as a subprocess in its own session, so every Ray process it starts is found by the
session id: its listening sockets are read from /proc, and whatever is left is killed at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from processes import (
    command_line,
    environment,
    is_loopback,
    kill_session,
    listening_sockets,
    session_processes,
    wait_for,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads processes and sockets from /proc"),
]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "studies" / "temperature_sweep.py"
EPOCHS, EVERY = 60, 10
# Four temperatures, one trial each, run one at a time; each trial checkpoints every 10 epochs.
ARGS = ["--set", "teacher_members=1", "--set", "teacher_epochs=2", "--set", f"epochs={EPOCHS}",
        "--set", f"eval_every={EVERY}", "--set", "batch_size=256", "--seeds", "1", "--max-concurrent", "1", "--quiet",
        "--pack", "off"]  # a Ray Tune trial per config, one after another (packs: tests/packs/test_packs_on_ray.py)
# What a user's shell may hold that would change what kd_ray decides: none of it here.
RAY_SETTINGS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
INTRUDER = "import ray; ray.init(address='{address}'); print('CONNECTED', ray.cluster_resources().get('CPU'))"


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RAY_SETTINGS}
    env["HOME"] = str(home)  # no ~/.ray/auth_token of the machine's user is found, or written
    return env


@pytest.fixture
def start(tmp_path):
    """Start study drivers in their own sessions; kill what is left of each session at the end."""
    started = []

    def run(argv: list[str], log: Path) -> subprocess.Popen:
        out = open(log, "w")
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *argv], cwd=tmp_path, env=clean_env(tmp_path / "home"),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started.append((proc, out))
        return proc

    yield run
    for proc, out in started:
        kill_session(proc.pid)
        out.close()


def checkpoints(study_dir: Path) -> int:
    return len(list(study_dir.glob("_trainable*/checkpoint_*/state.pt")))


def test_a_local_study_s_ray_is_closed_to_others_and_sigterm_or_sighup_stop_it_for_resume(tmp_path, start):
    home, storage = tmp_path / "home", tmp_path / "storage"
    home.mkdir()
    study_dir = storage / "temperature_sweep"
    argv = [*ARGS, "--storage", str(storage)]

    # 1. The default study, mid-trial: every listening socket of its processes is on the loopback.
    log1 = tmp_path / "run1.log"
    first = start(argv, log1)
    wait_for(lambda: checkpoints(study_dir), 240, "a first checkpoint", first, log1)
    pids = session_processes(first.pid)
    sockets = listening_sockets(pids)
    names = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= set(names.values()), names  # the study's own Ray, found
    open_to_network = [(names[pid], address, port) for pid, address, port in sockets if not is_loopback(address)]
    assert not open_to_network, f"listening beyond the loopback: {open_to_network}"
    assert "token authentication on, with a token made for this run" in log1.read_text()

    # The token lives in the environment of the study's Ray processes, never in a file.
    gcs_pid, gcs_port = next((pid, port) for pid, _, port in sockets if names[pid] == "gcs_server")
    ray_env = environment(gcs_pid)
    token = ray_env["RAY_AUTH_TOKEN"]
    assert ray_env["RAY_AUTH_MODE"] == "token" and len(token) == 64
    assert not (home / ".ray").exists()
    assert not any(token in p.read_text(errors="replace") for p in storage.rglob("*.json") if p.is_file())

    # 2. Drivers from another process: a wrong token and no token are refused; the run's token gets in.
    address = f"127.0.0.1:{gcs_port}"
    intruders = {}
    for name, settings in {"wrong token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
                           "auth disabled": {"RAY_AUTH_MODE": "disabled"},
                           "the run's token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}}.items():
        # As a driver on this machine must: take 127.0.0.1 as it is (Ray would map it to the machine's
        # network address, where nothing of the study listens), and give up after 3 s, not 20.
        env = {**clean_env(home), **settings, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "RAY_NUM_REDIS_GET_RETRIES": "3"}
        intruders[name] = subprocess.Popen([sys.executable, "-c", INTRUDER.format(address=address)], env=env,
                                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = {name: proc.communicate(timeout=120) for name, proc in intruders.items()}
    for name in ("wrong token", "auth disabled"):
        out, err = outputs[name]
        assert intruders[name].returncode != 0 and "CONNECTED" not in out, (name, out, err[-2000:])
        assert "InvalidAuthToken" in err or "Authentication" in err, (name, err[-2000:])  # refused for the token
    out, err = outputs["the run's token"]
    assert intruders["the run's token"].returncode == 0 and "CONNECTED" in out, err[-2000:]

    # 3. SIGTERM (kill's default): the study stops as for Ctrl-C, partial, exit 3, no traceback.
    assert first.poll() is None, "the study ended before it was stopped"
    first.send_signal(signal.SIGTERM)
    assert first.wait(120) == 3, log1.read_text()[-3000:]
    text = log1.read_text()
    assert "received SIGTERM" in text and "is PARTIAL" in text and "--resume" in text
    assert "Traceback" not in text, text[-3000:]
    done_first = checkpoints(study_dir)

    # 4. --resume, then SIGHUP (the terminal closed) once it has checkpointed again: the same.
    log2 = tmp_path / "run2.log"
    second = start([*argv, "--resume"], log2)
    wait_for(lambda: checkpoints(study_dir) > done_first, 240, "a checkpoint of the resumed run", second, log2)
    second.send_signal(signal.SIGHUP)
    assert second.wait(120) == 3, log2.read_text()[-3000:]
    text = log2.read_text()
    assert "received SIGHUP" in text and "is PARTIAL" in text and "Traceback" not in text, text[-3000:]

    # 5. --resume to the end: four trials, every evaluation once.
    log3 = tmp_path / "run3.log"
    third = start([*argv, "--resume"], log3)
    assert third.wait(400) == 0, log3.read_text()[-3000:]
    trials = pd.read_parquet(study_dir / "trials.parquet")
    epochs = pd.read_parquet(study_dir / "epochs.parquet")
    assert len(trials) == 4 and trials["trial_id"].is_unique
    assert (trials["status"] == "TERMINATED").all(), trials[["status", "error"]]
    assert (trials["epochs_completed"] == EPOCHS).all()
    for trial_id, rows in epochs.groupby("trial_id"):
        assert list(rows["epoch"]) == list(range(EVERY, EPOCHS + 1, EVERY)), trial_id
    assert set(epochs["trial_id"]) == set(trials["trial_id"])
    assert not (home / ".ray").exists()  # no run wrote a token file
    for proc in (first, second, third):  # each driver's raylet ended with it
        wait_for(lambda proc=proc: not [p for p in session_processes(proc.pid) if "raylet" in command_line(p)], 30,
                 "the raylets of the finished drivers to exit")
