"""A teacher store damaged from outside, through the real command lines: a member directory copied over
another (a mistaken rsync) keeps intact files that match their checksums, and is refused for its
address. See docs/reliability.md, "Teacher store".
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from kd_ray.config import TrialConfig
from kd_ray.train.teachers import TeacherStore, member_key

REPO = Path(__file__).resolve().parents[2]
# Two 2-epoch teacher members and a 1-epoch student: seconds on a CPU.
TRIAL_SETS = {"teacher_members": 2, "teacher_epochs": 2, "epochs": 1, "eval_every": 1, "batch_size": 256,
              "temperature": 4}
SETS = [arg for key, value in TRIAL_SETS.items() for arg in ("--set", f"{key}={value}")]


def _kd_ray(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "kd-ray"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "kd_ray.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_member_copied_over_another_is_refused_by_verify_trial_and_study(tmp_path: Path) -> None:
    store = TeacherStore(tmp_path / "teachers")  # where a study with --storage tmp_path keeps its teachers
    trial = ["trial", *SETS, "--store", store.root, "--quiet"]
    trained = _kd_ray(*trial, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    cfg = TrialConfig.from_dict(TRIAL_SETS)
    a, b = member_key(cfg, 0), member_key(cfg, 1)
    assert store.keys() == sorted([a, b])

    # The mistaken rsync: member 0's directory lands at member 1's address.
    shutil.rmtree(store.member_path(b))
    subprocess.run(["cp", "-r", store.member_path(a), store.member_path(b)], check=True)
    sits, belongs = store.member_path(b), store.member_path(a)
    fix = f"kd-ray teachers verify --store {store.uri} --delete-bad"

    verified = _kd_ray("teachers", "verify", "--store", store.root, cwd=tmp_path)
    assert verified.returncode == 1, verified.stdout + verified.stderr
    out = _lines(verified.stdout)
    bad = next(line for line in out if line.startswith(f"{b}: BAD"))
    assert f"sits at {sits} " in bad and f"belongs at {belongs} " in bad and fix in bad
    assert f"{a}: ok" in out and out[-1] == "2 members checked, 1 bad"

    listed = _kd_ray("teachers", "list", "--store", store.root, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert next(line for line in _lines(listed.stdout) if line.startswith(b)).startswith(f"{b}  BAD: ")
    assert "member=0" in next(line for line in _lines(listed.stdout) if line.startswith(a))

    # A trial that needs member 1: one line, exit 2, nothing trained or deleted.
    refused = _kd_ray(*trial, cwd=tmp_path)
    err = _lines(refused.stderr)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert len(err) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert err[0].startswith("kd-ray: error: ") and sits in err[0] and belongs in err[0]
    assert fix in err[0] and "--retrain-teachers" in err[0]
    assert refused.stdout == ""

    # A study refuses it before Ray starts, and writes no study directory.
    study = subprocess.run(
        [sys.executable, str(REPO / "studies" / "temperature_sweep.py"), *SETS, "--seeds", "1", "--quiet",
         "--storage", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    err = _lines(study.stderr)
    assert study.returncode == 2, study.stderr[-2000:]
    assert len(err) == 1 and "Traceback" not in study.stderr, study.stderr
    assert sits in err[0] and belongs in err[0] and fix in err[0]
    assert not (tmp_path / "temperature_sweep").exists()
    assert store.keys() == sorted([a, b]) and store.manifest(b)["key"] == a  # reported, never silently deleted

    # The fix: --delete-bad removes the copy; the next trial trains member 1 again, at its own address.
    deleted = _kd_ray("teachers", "verify", "--store", store.root, "--delete-bad", cwd=tmp_path)
    assert deleted.returncode == 0 and f"{b}: deleted" in deleted.stdout, deleted.stdout + deleted.stderr
    assert store.keys() == [a] and store.check(a) == []
    again = _kd_ray(*trial, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert store.manifest(b)["key"] == b and store.manifest(b)["spec"]["member"] == 1 and store.check(b) == []
