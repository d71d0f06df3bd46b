"""Bad input refused before any Ray work or compute, corrupted teacher stores and data, concurrent
teacher training, and the security rules. No test here starts Ray.

Every study script and ``kd-ray trial`` must refuse a bad specification with exit code 2 and one line
on stderr that names the field, the value and what is allowed.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from kd_ray import cli
from kd_ray.config import TrialConfig
from kd_ray.data.datasets import CIFAR_ARCHIVES, DATASET_VERSIONS
from kd_ray.train.teachers import LOGITS, MANIFEST, WEIGHTS, TeacherStore

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.stem for p in (REPO / "studies").glob("*.py") if not p.name.startswith("_"))
# reproduce runs the other scripts; loss_surface evaluates one trial's loss plane (its own flags, tested
# in tests/test_loss_surface.py).
STUDY_SCRIPTS = [name for name in SCRIPTS if name not in ("reproduce", "loss_surface")]
CLIS = [*STUDY_SCRIPTS, "kd-ray trial"]


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


GPUS = _local_gpus()

# (id, TrialConfig fields to set, what the one error line must contain). ``dataset`` goes through
# ``--dataset`` for the study scripts (their presets adapt to it) and ``--set`` for ``kd-ray trial``.
SPEC_CASES = [
    ("unknown-key", {"temprature": "4"}, ["'temprature'", "did you mean 'temperature'"]),
    ("temperature-0", {"temperature": "0"}, ["temperature=0", "(0, inf)"]),
    ("temperature-negative", {"temperature": "-2"}, ["temperature=-2", "(0, inf)"]),
    ("alpha-above-1", {"alpha": "1.5"}, ["alpha=1.5", "[0, 1]"]),
    ("alpha-negative", {"alpha": "-0.1"}, ["alpha=-0.1", "[0, 1]"]),
    ("fraction-0", {"distill_fraction": "0"}, ["distill_fraction=0", "(0, 1]"]),
    ("fraction-above-1", {"distill_fraction": "1.5"}, ["distill_fraction=1.5", "(0, 1]"]),
    ("lambda-above-1", {"init_lambda": "1.5"}, ["init_lambda=1.5", "[0, 1]"]),
    ("lambda-negative", {"init_lambda": "-0.5"}, ["init_lambda=-0.5", "[0, 1]"]),
    ("members-0", {"teacher_members": "0"}, ["teacher_members=0", "[1, inf)"]),
    ("epochs-0", {"epochs": "0"}, ["epochs=0", "[1, inf)"]),
    ("batch-size-0", {"batch_size": "0"}, ["batch_size=0", "[1, inf)"]),
    ("epochs-not-a-number", {"epochs": "ten"}, ["epochs='ten'", "an integer"]),
    ("unknown-dataset", {"dataset": "mnist2d"},
     ["dataset='mnist2d'", "did you mean 'mnist1d'", "mnist1d, digits, mnist, cifar10, cifar100, mnist_full"]),
    ("unknown-student-arch", {"student_arch": "resnet9000"}, ["student_arch='resnet9000'", "known archs: mlp"]),
    ("unknown-teacher-arch", {"teacher_arch": "mlpp"}, ["teacher_arch='mlpp'", "did you mean 'mlp'", "known archs"]),
    ("unknown-augmentation", {"augmentation": "colorjiter"},
     ["augmentation='colorjiter'", "did you mean 'colorjitter'", "choose one of"]),
    ("unknown-optimizer", {"optimizer": "adamw"}, ["optimizer='adamw'", "choose one of: sgd, adam"]),
    ("colorjitter-on-1d-data", {"dataset": "mnist1d", "augmentation": "colorjitter"},
     ["augmentation='colorjitter'", "dataset='mnist1d'", "signal data", "supports: rgb"]),
    ("colorjitter-on-grayscale", {"dataset": "digits", "augmentation": "colorjitter"},
     ["augmentation='colorjitter'", "dataset='digits'", "gray data", "supports: rgb"]),
    ("interpolate-across-archs", {"init": "interpolate", "student_arch": "conv1d"},
     ["init='interpolate'", "student_arch == teacher_arch", "student_arch='conv1d'"]),
    ("holdout-without-half-teacher", {"distill_split": "holdout", "teacher_split": "full"},
     ["distill_split='holdout'", "needs teacher_split='half'", "got teacher_split='full'"]),
]
# A study whose nets take images refuses 1-D data for its architecture before any augmentation rule.
NEEDLES_INSTEAD = {
    ("augmentation_convnet", "colorjitter-on-1d-data"): ["dataset='mnist1d'", "takes images"],
    # LeNet-5 takes images of at least 28x28: neither mnist1d's signals nor digits' 8x8 images.
    ("small_teacher", "colorjitter-on-1d-data"): ["teacher_arch='lenet5'", "dataset='mnist1d'", "takes images"],
    ("small_teacher", "colorjitter-on-grayscale"): ["teacher_arch='lenet5'", "dataset='digits'", "H, W >= 28"],
}
MALFORMED_SET = [
    ("set-without-equals", ["--set", "temperature"], ["'temperature'", "key=value"]),
    ("set-without-key", ["--set", "=4"], ["'=4'", "key=value"]),
]
# Flags of the study scripts only.
STUDY_FLAG_CASES = [
    ("more-gpus-than-this-machine", ["--gpus-per-trial", str(GPUS + 1)],
     [f"gpus_per_trial={GPUS + 1}", f"this machine has {GPUS} GPUs", "--address"]),
    ("fractional-gpu-without-a-gpu", ["--gpus-per-trial", "0.25"], ["gpus_per_trial=0.25", "GPUs"]),
    ("max-concurrent-0", ["--max-concurrent", "0"], ["max_concurrent_trials=0", ">= 1"]),
    ("cpus-per-trial-0", ["--cpus-per-trial", "0"], ["cpus_per_trial=0", "> 0"]),
    ("seeds-0", ["--seeds", "0"], ["--seeds='0'", "at least 1"]),
]


def argv_for(cli_name: str, settings: dict[str, str]) -> list[str]:
    argv = []
    for key, value in settings.items():
        if key == "dataset" and cli_name != "kd-ray trial":
            argv += ["--dataset", value]
        else:
            argv += ["--set", f"{key}={value}"]
    return argv


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"kd_ray_reliability_input_{name}", REPO / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refuse_in_process(cli_name: str, argv: list[str], tmp_path: Path, capsys) -> str:
    """Run one CLI in this process on bad input; check exit 2, one stderr line, nothing started."""
    import ray

    storage, store, data = tmp_path / "storage", tmp_path / "teachers", tmp_path / "data"
    capsys.readouterr()
    started = time.perf_counter()
    if cli_name == "kd-ray trial":
        code = cli.main(["trial", *argv, "--store", str(store), "--data-dir", str(data), "--quiet"])
        prefix = "kd-ray: error: "
    else:
        code = load_script(cli_name).main([*argv, "--storage", str(storage), "--data-dir", str(data), "--quiet"])
        prefix = f"{cli_name}: error: "
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), lines[0]
    assert not ray.is_initialized(), "Ray was started for a specification that should have been refused"
    for path in (storage, store, data):
        assert not path.exists(), f"{path} was created for a refused specification"
    assert elapsed < 20
    return lines[0]


@pytest.mark.parametrize("case_id, settings, needles", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
@pytest.mark.parametrize("cli_name", CLIS)
def test_bad_spec_is_refused_by_every_cli(cli_name, case_id, settings, needles, tmp_path, capsys):
    line = refuse_in_process(cli_name, argv_for(cli_name, settings), tmp_path, capsys)
    for needle in NEEDLES_INSTEAD.get((cli_name, case_id), needles):
        assert needle in line, (needle, line)


@pytest.mark.parametrize("case_id, argv, needles", MALFORMED_SET, ids=[c[0] for c in MALFORMED_SET])
@pytest.mark.parametrize("cli_name", CLIS)
def test_malformed_set_is_refused_by_every_cli(cli_name, case_id, argv, needles, tmp_path, capsys):
    line = refuse_in_process(cli_name, argv, tmp_path, capsys)
    for needle in needles:
        assert needle in line, (needle, line)


@pytest.mark.parametrize("case_id, argv, needles", STUDY_FLAG_CASES, ids=[c[0] for c in STUDY_FLAG_CASES])
@pytest.mark.parametrize("cli_name", STUDY_SCRIPTS)
def test_bad_study_flags_are_refused_by_every_study_script(cli_name, case_id, argv, needles, tmp_path, capsys):
    if case_id == "fractional-gpu-without-a-gpu" and GPUS:
        pytest.skip("this machine has a GPU")
    line = refuse_in_process(cli_name, argv, tmp_path, capsys)
    for needle in needles:
        assert needle in line, (needle, line)


@pytest.mark.skipif(GPUS > 0, reason="this machine has a GPU")
def test_kd_ray_trial_refuses_cuda_without_a_gpu(tmp_path, capsys):
    line = refuse_in_process("kd-ray trial", ["--set", "device=cuda"], tmp_path, capsys)
    assert "device='cuda'" in line and "no CUDA device" in line and "device=cpu or auto" in line


def _kd_ray() -> list[str]:
    script = Path(sys.executable).parent / "kd-ray"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kd_ray.cli"]


# One case per command line, each run as its own process: the console script and the script files
# themselves refuse before any Ray work.
SUBPROCESS_CASES = [
    ("augmentation_ablation", ["--dataset", "mnist1d", "--set", "augmentation=colorjitter"],
     ["colorjitter", "signal data"]),
    ("dataset_size", ["--set", "teacher_split=full"], ["distill_split='holdout'", "teacher_split='half'"]),
    ("ensemble_size", ["--set", "teacher_members=0"], ["teacher_members=0", "[1, inf)"]),
    ("initialization", ["--set", "teacher_arch=mlpp"], ["teacher_arch='mlpp'", "did you mean 'mlp'"]),
    ("optuna_search", ["--set", "temprature=4"], ["'temprature'", "did you mean 'temperature'"]),
    ("temperature_sweep", ["--gpus-per-trial", str(GPUS + 1)], [f"gpus_per_trial={GPUS + 1}", "GPUs"]),
    ("training_duration", ["--set", "lr"], ["'lr'", "key=value"]),
    ("kd-ray trial", ["--set", "alpha=2"], ["alpha=2", "[0, 1]"]),
    ("kd-ray trial", ["--set", "dataset=digits", "--set", "augmentation=colorjitter"], ["colorjitter", "gray data"]),
]


def _subprocess_cases() -> list[tuple[str, list[str], list[str]]]:
    """SUBPROCESS_CASES, plus an out-of-range temperature for any study script added since."""
    covered = {name for name, _, _ in SUBPROCESS_CASES}
    return SUBPROCESS_CASES + [(name, ["--set", "temperature=0"], ["temperature=0", "(0, inf)"])
                               for name in STUDY_SCRIPTS if name not in covered]


def test_every_cli_refuses_as_its_own_process(tmp_path):
    cases = _subprocess_cases()
    assert {name for name, _, _ in cases} == set(CLIS)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    procs = []
    for i, (name, argv, needles) in enumerate(cases):
        where = tmp_path / str(i)
        if name == "kd-ray trial":
            command = [*_kd_ray(), "trial", *argv, "--store", str(where / "teachers"),
                       "--data-dir", str(where / "data")]
        else:
            command = [sys.executable, str(REPO / "studies" / f"{name}.py"), *argv, "--storage", str(where / "storage"),
                       "--data-dir", str(where / "data")]
        procs.append((name, needles, where, subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                                             stderr=subprocess.PIPE, text=True)))
    for name, needles, where, proc in procs:
        out, err = proc.communicate(timeout=180)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, out[-2000:], err[-2000:])
        assert len(lines) == 1, (name, err)
        assert lines[0].startswith("kd-ray: error:" if name == "kd-ray trial" else f"{name}: error:"), lines[0]
        for needle in needles:
            assert needle in lines[0], (name, needle, lines[0])
        assert "Ray" not in out, (name, out)  # no Ray instance was started
        assert not where.exists() or not any(where.iterdir()), (name, list(where.iterdir()))


# --- bad input to kd-ray's other commands --------------------------------------------------------------


def _command_inputs(root: Path) -> dict[str, Path]:
    """What the cases below point at: a real study, a directory without tables, a table that is not
    Parquet, a plain file, YAML that does not parse, a YAML list, a binary file, trials tables without
    a status column and with a metric stored as text."""
    from kd_ray import tables

    study = root / "study"
    rows = [{"study": "study", "trial_id": f"t{i}", "status": "TERMINATED", "dataset": "mnist1d", "seed": i,
             "temperature": t, "test_agreement": 0.8 + i / 100, "test_acc": 0.5} for i, t in enumerate([1.0, 4.0] * 2)]
    tables.write_study_tables(str(study), rows, [])
    (root / "no_tables").mkdir()
    (root / "not_parquet").mkdir()
    (root / "not_parquet" / "trials.parquet").write_bytes(b"not a parquet file")
    (root / "a_file").write_text("x")
    (root / "bad.yaml").write_text("head_node_type: [head\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    # Trials tables analysis cannot use: no status column; test_agreement written as text.
    import pandas as pd

    for name, drop, as_text in (("no_status", ["status"], []), ("text_metric", [], ["test_agreement"])):
        (root / name).mkdir()
        frame = pd.DataFrame(rows).drop(columns=drop)
        frame[as_text] = frame[as_text].astype(str)
        frame.to_parquet(root / name / "trials.parquet", index=False)
    return {"study": study, "no_tables": root / "no_tables", "not_parquet": root / "not_parquet",
            "a_file": root / "a_file", "bad_yaml": root / "bad.yaml", "list_yaml": root / "list.yaml",
            "binary_yaml": root / "binary.yaml", "missing": root / "missing",
            "no_status": root / "no_status", "text_metric": root / "text_metric"}


# (id, argv with {name} for the paths above, the line's prefix, what the line must contain)
COMMAND_CASES = [
    ("analyze-missing-path", ["analyze", "{missing}"], "kd-ray analyze: error:", ["{missing}", "no trials.parquet"]),
    ("analyze-no-tables", ["analyze", "{no_tables}"], "kd-ray analyze: error:", ["no trials.parquet"]),
    ("analyze-not-parquet", ["analyze", "{not_parquet}"], "kd-ray analyze: error:", ["trials.parquet", "Parquet"]),
    ("analyze-unknown-by", ["analyze", "{study}", "--by", "temprature"], "kd-ray analyze: error:",
     ["temprature", "temperature"]),
    ("analyze-negative-n-boot", ["analyze", "{study}", "--n-boot", "-5"], "kd-ray analyze: error:",
     ["--n-boot=-5", ">= 0"]),
    ("analyze-out-is-a-file", ["analyze", "{study}", "--out", "{a_file}"], "kd-ray analyze: error:",
     ["--out {a_file}", "not a directory"]),
    ("analyze-no-status-column", ["analyze", "{no_status}"], "kd-ray analyze: error:",
     ["{no_status}/trials.parquet: column 'status' is missing", "TERMINATED, ERROR, DIVERGED, STOPPED"]),
    ("analyze-metric-as-text", ["analyze", "{text_metric}"], "kd-ray analyze: error:",
     ["column 'test_agreement' has type ", "string; it must hold numbers"]),
    ("teachers-list-missing-store", ["teachers", "list", "--store", "{missing}"], "kd-ray teachers: error:",
     ["--store {missing}", "no such directory"]),
    ("teachers-verify-store-is-a-file", ["teachers", "verify", "--store", "{a_file}"], "kd-ray teachers: error:",
     ["--store {a_file}", "not a directory"]),
    ("teachers-unknown-uri-scheme", ["teachers", "list", "--store", "nosuch://bucket/teachers"],
     "kd-ray teachers: error:", ["nosuch://bucket/teachers"]),
    ("validate-cluster-missing", ["validate-cluster", "{missing}"], "kd-ray: error:", ["{missing}", "no such file"]),
    ("validate-cluster-directory", ["validate-cluster", "{no_tables}"], "kd-ray: error:", ["{no_tables}", "directory"]),
    ("validate-cluster-bad-yaml", ["validate-cluster", "{bad_yaml}"], "kd-ray: error:",
     ["{bad_yaml}", "not valid YAML"]),
    ("validate-cluster-a-list", ["validate-cluster", "{list_yaml}"], "kd-ray: error:", ["{list_yaml}", "mapping"]),
    ("validate-cluster-binary", ["validate-cluster", "{binary_yaml}"], "kd-ray: error:",
     ["{binary_yaml}", "not a text"]),
    ("trial-unknown-uri-scheme", ["trial", "--store", "nosuch://bucket/teachers", "--quiet"], "kd-ray: error:",
     ["--store nosuch://bucket/teachers"]),
    ("trial-data-dir-is-a-file", ["trial", "--data-dir", "{a_file}", "--quiet"], "kd-ray: error:",
     ["--data-dir {a_file}", "not a directory"]),
]


@pytest.mark.parametrize("case_id, argv, prefix, needles", COMMAND_CASES, ids=[c[0] for c in COMMAND_CASES])
def test_bad_input_to_every_kd_ray_command_is_one_line_and_exit_2(case_id, argv, prefix, needles, tmp_path, capsys):
    paths = {name: str(path) for name, path in _command_inputs(tmp_path).items()}
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    code = cli.main([arg.format(**paths) for arg in argv])  # an uncaught exception fails the test here
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    for needle in needles:
        assert needle.format(**paths) in lines[0], (needle, lines[0])
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written


def test_bad_input_to_kd_ray_commands_is_one_line_as_their_own_processes(tmp_path):
    """The console script itself: no traceback, exit 2, one line, for one case of each command."""
    paths = {name: str(path) for name, path in _command_inputs(tmp_path).items()}
    chosen = ["analyze-not-parquet", "teachers-unknown-uri-scheme", "validate-cluster-binary",
              "trial-data-dir-is-a-file"]
    procs = []
    for case_id, argv, prefix, _ in COMMAND_CASES:
        if case_id in chosen:
            command = [*_kd_ray(), *(arg.format(**paths) for arg in argv)]
            procs.append((case_id, prefix, subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                                                            stderr=subprocess.PIPE, text=True)))
    assert len(procs) == len(chosen)
    for case_id, prefix, proc in procs:
        out, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (case_id, err)
        assert len(lines) == 1 and lines[0].startswith(prefix), (case_id, err)
        assert "Traceback" not in out + err


# --- teacher store ---------------------------------------------------------------------------------

# The one-trial temperature_sweep and the kd-ray trial below both distil from this teacher.
TINY_TEACHER = dict(dataset="mnist1d", teacher_arch="mlp", student_arch="mlp", teacher_epochs=2, teacher_members=1)
SWEEP_ARGS = ["--set", "teacher_members=1", "--set", "teacher_epochs=2", "--set", "epochs=1", "--set", "eval_every=1",
              "--set", "batch_size=256", "--set", "temperature=4", "--seeds", "1", "--quiet"]


def train_member(cfg: TrialConfig, store: TeacherStore, member: int = 0) -> str:
    import torch

    from kd_ray.data.datasets import load_arrays
    from kd_ray.train.teachers import ensure_members

    [key] = ensure_members(cfg, store, load_arrays(cfg.dataset), torch.device("cpu"), members=[member])
    return key


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))  # same size, different bytes


@pytest.mark.parametrize("damage, name", [(_truncate, WEIGHTS), (_flip, LOGITS), (_truncate, MANIFEST)],
                         ids=["truncated-weights", "flipped-logits", "truncated-manifest"])
def test_a_corrupted_teacher_is_refused_before_ray_with_the_fix(damage, name, tmp_path, capsys):
    import ray

    store = TeacherStore(tmp_path / "teachers")
    key = train_member(TrialConfig(**TINY_TEACHER), store)
    path = Path(store.member_path(key)) / name
    damage(path)
    capsys.readouterr()
    code = load_script("temperature_sweep").main([*SWEEP_ARGS, "--storage", str(tmp_path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1, err
    assert str(path) in err[0]
    assert f"kd-ray teachers verify --store {store.uri} --delete-bad" in err[0] and "--retrain-teachers" in err[0]
    assert not ray.is_initialized()
    assert not (tmp_path / "temperature_sweep").exists()
    assert store.has(key)  # reported, not silently deleted

    # kd-ray teachers verify names the bad file; --delete-bad removes the member.
    assert cli.main(["teachers", "verify", "--store", str(store.root)]) == 1
    out = capsys.readouterr().out
    assert f"{key}: BAD" in out and name in out
    assert cli.main(["teachers", "verify", "--store", str(store.root), "--delete-bad"]) == 0
    assert store.keys() == []


def test_kd_ray_trial_refuses_a_corrupted_teacher_and_retrains_it(tmp_path):
    store = TeacherStore(tmp_path / "teachers")
    cfg = TrialConfig(**TINY_TEACHER)
    key = train_member(cfg, store)
    weights = Path(store.member_path(key)) / WEIGHTS
    _flip(weights)
    corrupted = weights.read_bytes()
    args = ["trial", "--set", "teacher_members=1", "--set", "teacher_epochs=2", "--set", "epochs=1",
            "--set", "batch_size=256", "--store", str(store.root), "--quiet"]

    bad = subprocess.run([*_kd_ray(), *args], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2, bad.stderr
    assert len(lines) == 1 and str(weights) in lines[0], bad.stderr
    assert "checksum mismatch" in lines[0] and "--retrain-teachers" in lines[0]

    good = subprocess.run([*_kd_ray(), *args, "--retrain-teachers"], capture_output=True, text=True, timeout=180,
                          cwd=tmp_path)
    assert good.returncode == 0, good.stderr[-2000:]
    assert "status TERMINATED" in good.stdout
    assert store.keys() == [key] and store.verify(key) == []
    assert weights.read_bytes() != corrupted  # the member was written anew


def test_kd_ray_teachers_list_shows_what_is_stored(tmp_path):
    store = TeacherStore(tmp_path / "teachers")
    keys = [train_member(TrialConfig(**TINY_TEACHER), store, member) for member in (0, 1)]
    listed = subprocess.run([*_kd_ray(), "teachers", "list", "--store", str(store.root)], capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == f"teacher store {store.root}: 2 members"
    for member, key in enumerate(keys):
        line = next(line for line in lines if line.startswith(key))
        acc = store.manifest(key)["metrics"]["test_acc"]
        assert "mnist1d" in line and "mlp" in line and f"member={member}" in line and "epochs=2" in line
        assert f"test_acc={acc:.4f}" in line
    _truncate(Path(store.member_path(keys[1])) / MANIFEST)
    listed = subprocess.run([*_kd_ray(), "teachers", "list", "--store", str(store.root)], capture_output=True,
                            text=True, timeout=120)
    bad = next(line for line in listed.stdout.splitlines() if line.startswith(keys[1]))
    assert "BAD" in bad and MANIFEST in bad


CONCURRENT = """
import sys, time
from pathlib import Path
import torch
from kd_ray.config import TrialConfig
from kd_ray.data.datasets import load_arrays
from kd_ray.train.teachers import TeacherStore, ensure_members

store, go = TeacherStore(sys.argv[1]), Path(sys.argv[2])
cfg = TrialConfig(dataset="mnist1d", teacher_arch="mlp", teacher_members=1, teacher_epochs=30)
arrays = load_arrays("mnist1d")
Path(sys.argv[3]).touch()  # ready
while not go.exists():
    time.sleep(0.01)
keys = ensure_members(cfg, store, arrays, torch.device("cpu"), progress=lambda message: print(message, flush=True))
print("KEYS", *keys, flush=True)
"""


def test_two_processes_training_the_same_teacher_leave_one_sound_member(tmp_path):
    store_root, go = tmp_path / "teachers", tmp_path / "go"
    script = tmp_path / "ensure.py"
    script.write_text(CONCURRENT)
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(store_root), str(go), str(flag)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for flag in ready]
    deadline = time.monotonic() + 120
    while not all(flag.exists() for flag in ready):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()  # both call ensure_members for the same member now
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    store = TeacherStore(store_root)
    keys = {line.split()[1] for out, _ in outputs for line in out.splitlines() if line.startswith("KEYS")}
    assert len(keys) == 1 and store.keys() == sorted(keys)
    [key] = keys
    assert store.verify(key) == []
    trained = [out for out, _ in outputs if f"stored as {key}" in out]
    assert len(trained) == 1  # the lock let one train; the other found the member when it got the lock
    leftovers = [p.name for p in (store_root / "members").iterdir() if p.name != key]
    assert leftovers == []  # no staging directory left behind


# --- data --------------------------------------------------------------------------------------------


def test_missing_dataset_without_network_says_where_to_put_it(tmp_path):
    data = tmp_path / "data"
    env = dict(os.environ)
    # No network: every connection goes to a proxy port that nothing listens on.
    env.update(http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    proc = subprocess.run([*_kd_ray(), "trial", "--set", "dataset=cifar10", "--data-dir", str(data),
                           "--store", str(tmp_path / "teachers"), "--quiet"],
                          capture_output=True, text=True, timeout=180, env=env)
    archive = CIFAR_ARCHIVES["cifar10"]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert f"place it at {data / archive.filename}" in lines[0]
    assert archive.url in lines[0] and archive.md5 in lines[0] and "KD_RAY_DATA" in lines[0]
    assert list(data.iterdir()) == []  # no partial download left
    assert not (tmp_path / "teachers").exists()


def test_a_dataset_with_the_wrong_checksum_is_an_error_never_used(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    spec = CIFAR_ARCHIVES["cifar100"]
    archive = data / spec.filename
    archive.write_bytes(os.urandom(4096))
    actual = hashlib.md5(archive.read_bytes()).hexdigest()
    code = cli.main(["trial", "--set", "dataset=cifar100", "--data-dir", str(data), "--store", str(tmp_path / "t"),
                     "--quiet"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert str(archive) in lines[0] and f"md5 {actual}, expected {spec.md5}" in lines[0]
    assert sorted(p.name for p in data.iterdir()) == [spec.filename]  # no cache built from it
    assert hashlib.md5(archive.read_bytes()).hexdigest() == actual  # and the file is left for the user
    assert not (tmp_path / "t").exists()


# --- security ----------------------------------------------------------------------------------------


def _calls(tree: ast.AST, module: str, function: str) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == function and isinstance(node.func.value, ast.Name) and node.func.value.id == module]


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    return None


def test_every_checkpoint_load_is_weights_only_and_no_pickle_is_read():
    sources = sorted((REPO / "kd_ray").rglob("*.py")) + sorted((REPO / "studies").glob("*.py"))
    torch_loads = 0
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "torch", "load"):
            torch_loads += 1
            assert _keyword(call, "weights_only") is True, f"{path}:{call.lineno}: torch.load without weights_only=True"
        for call in _calls(tree, "np", "load") + _calls(tree, "numpy", "load"):
            assert _keyword(call, "allow_pickle") is False, f"{path}:{call.lineno}: np.load without allow_pickle=False"
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in ("pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"), \
                    f"{path}:{node.lineno}: imports {name}"
            if isinstance(node, ast.Attribute) and node.attr in ("load", "loads") and isinstance(node.value, ast.Name):
                assert node.value.id not in ("pickle", "cloudpickle", "dill"), f"{path}:{node.lineno}"
    assert torch_loads >= 2  # the teacher store and the trial checkpoint


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a tampered cache file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_in_a_data_cache_file_is_never_unpickled(tmp_path):
    from kd_ray.data.datasets import load_arrays

    cache = tmp_path / "data"
    cache.mkdir()
    marker = tmp_path / "pwned"
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(marker)
    fields = ("x_train", "y_train", "x_test", "y_test", "raw_mean", "raw_std")
    path = cache / f"mnist1d_v{DATASET_VERSIONS['mnist1d']}.npz"  # where the mnist1d arrays are cached
    with open(path, "wb") as handle:
        np.savez(handle, **{name: payload for name in fields})
    arrays = load_arrays("mnist1d", cache)
    assert not marker.exists()
    assert arrays.x_train.dtype == np.float32 and arrays.x_train.shape == (4000, 1, 40)
    assert arrays.y_train.dtype == np.int64 and set(np.unique(arrays.y_train)) == set(range(10))
    with np.load(path, allow_pickle=False) as npz:  # the cache was rebuilt without objects
        assert npz["x_train"].dtype == np.float32
    # The planted file did carry code: an unpickling reader would have run it.
    with open(tmp_path / "planted.npz", "wb") as handle:
        np.savez(handle, x=payload)
    np.load(tmp_path / "planted.npz", allow_pickle=True)["x"]
    assert marker.is_dir()


def test_cluster_keeps_the_dashboard_on_localhost_and_the_readme_says_how_to_reach_it():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    every_command = " ".join(str(c) for key, value in config.items() if key.endswith("_commands") for c in value or [])
    assert "0.0.0.0" not in every_command
    readme = (REPO / "README.md").read_text()
    assert "ray dashboard cluster.yaml" in readme
    assert "RAY_AUTH_MODE" in readme and "token" in readme.lower()
    doc = (REPO / "docs" / "reliability.md").read_text()
    assert "ray dashboard cluster.yaml" in doc and "RAY_AUTH_MODE=token" in doc and "ray get-auth-token" in doc


# --- sizes judged against the data the trial will meet ---------------------------------------------

# (kd-ray trial's --set arguments, what the one error line must say). Each once crashed in a batch norm
# layer or stalled in the fast path's timing; now each is refused before any compute.
SIZE_CASES = [
    # mnist1d's 4,000 training examples less the 400 of the validation split.
    (["batch_size=1"], ["batch_size=1", "student_arch='mlp'", "norm='batch'", "allowed: 2 <= batch_size <= 3600"]),
    (["distill_fraction=1e-9"], ["distill_fraction=1e-09", "leaves 1 of the 3600 examples",
                                 "allowed: distill_fraction >= 0.000556"]),
    (["batch_size=10000000000", "precision=auto"],
     ["batch_size=10000000000", "3600 training examples of dataset='mnist1d'", "allowed: 2 <= batch_size <= 3600"]),
]


def test_sizes_the_data_cannot_meet_are_refused_as_their_own_processes(tmp_path):
    for i, (sets, needles) in enumerate(SIZE_CASES):  # one after another, each timed alone
        where = tmp_path / str(i)
        command = [*_kd_ray(), "trial", *(arg for value in sets for arg in ("--set", value)),
                   "--store", str(where / "teachers"), "--data-dir", str(where / "data")]
        started = time.monotonic()
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - started
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2, (sets, done.stdout[-2000:], done.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("kd-ray: error: "), (sets, done.stderr)
        for needle in needles:
            assert needle in lines[0], (sets, needle, lines[0])
        assert "Traceback" not in done.stdout + done.stderr
        assert elapsed < 20, (sets, elapsed)  # refused before any data, teacher or timing
        assert not where.exists() or not any(where.iterdir()), (sets, list(where.iterdir()))


def test_a_last_batch_of_one_sample_trains_as_its_own_process(tmp_path):
    # mnist's 3,600 training images beside the validation split at batch 3,599, for the teacher and the
    # student: the sample left over joins the batch before it, one step of all 3,600 per epoch (it used to
    # end in a batch norm traceback).
    sets = ["dataset=mnist", "batch_size=3599", "teacher_batch_size=3599", "teacher_members=1", "teacher_epochs=1",
            "epochs=1", "eval_every=1"]
    command = [*_kd_ray(), "trial", *(arg for value in sets for arg in ("--set", value)), "--json",
               "--store", str(tmp_path / "teachers"), "--data-dir", str(tmp_path / "data")]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    import json  # the result's last line

    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "TERMINATED" and result["epochs_completed"] == 1
    assert result["student_steps"] == 1 and result["teacher_steps"] == 1
    for metric in ("test_acc", "test_agreement", "train_agreement", "teacher_test_acc"):
        assert 0.0 <= result[metric] <= 1.0, metric
    assert result["test_nll"] > 0 and result["test_kl"] >= 0
