"""Growing a study with more seeds on --resume, on a real local Ray: a finished 2-seed grid grown to 3
seeds (a trial per config, and packed) keeps its rows as they were, runs only the new seed's trials in a
Ray Tune experiment of their own and gives them the rows a 3-seed study run from the start gives; a
growth cut off before its experiment saved any state is finished by --resume. Removing a seed, growing
an Optuna search or an ASHA study, and any other change are refused before any compute, exit 2 from the
command line, nothing written."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from pathlib import Path

import pandas as pd
import pytest

from kd_ray.config import ConfigError, TrialConfig
from kd_ray.study import OptunaSpec, Study
from kd_ray.study.storage import LOCKS_DIR, SPEC_FILE
from kd_ray.tables import METRICS, read_completeness

REPO = Path(__file__).resolve().parents[2]
TINY = dict(dataset="mnist1d", teacher_arch="mlp", student_arch="mlp", teacher_epochs=2, teacher_members=1,
            epochs=2, eval_every=1, batch_size=256, device="cpu", precision="fp32")
# Two temperatures a seed, one Ray Tune trial at a time: a pack is then one seed's two students, the same
# pack whether the seed runs in the first study or in a growth (no pack is cut to fill idle CPUs).
GRID = dict(base=TrialConfig(**TINY), axes={"temperature": [1.0, 4.0]}, max_concurrent_trials=1, verbose=0)
BY_ARM = ["seed", "temperature"]
SAME_IN_EVERY_RUN = [*METRICS, "epochs_completed", "student_steps", "teacher_steps", "teacher_key", "config_json"]


def trial_dirs(experiment_dir: Path) -> list[Path]:
    return sorted(p for p in experiment_dir.iterdir() if p.is_dir() and p.name.startswith(("_trainable", "pack")))


def result_logs(experiment_dir: Path) -> dict[str, str]:
    return {d.name: (d / "result.json").read_text() for d in trial_dirs(experiment_dir)}


def files_and_digests(storage: Path) -> dict[str, str]:
    """Every file of a storage and its digest, but the study locks, which each run rewrites."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(storage.rglob("*"))
            if p.is_file() and p.relative_to(storage).parts[0] != LOCKS_DIR}


def by_arm(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(BY_ARM).reset_index(drop=True)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    """One storage for the module's studies, so they share its teacher store."""
    return tmp_path_factory.mktemp("growth_storage")


@pytest.fixture(scope="module", params=["off", "auto"], ids=["alone", "packed"])
def grown(request, ray_local, storage):
    """A finished 2-seed study, its tables and result logs then; the same study grown to 3 seeds; and a
    3-seed study run from the start."""
    pack = request.param
    name = f"grown_{pack}"
    study_dir = storage / name
    Study(name=name, seeds=[0, 1], storage=str(storage), pack=pack, **GRID).run()
    before = {
        "trials": pd.read_parquet(study_dir / "trials.parquet"),
        "epochs": pd.read_parquet(study_dir / "epochs.parquet"),
        "logs": result_logs(study_dir),
    }
    result = Study(name=name, seeds=[0, 1, 2], storage=str(storage), pack=pack, resume=True, **GRID).run()
    reference = Study(name=f"from_start_{pack}", seeds=[0, 1, 2], storage=str(storage), pack=pack, **GRID).run()
    return study_dir, pack, before, result, reference


def test_a_grown_study_keeps_its_rows_and_runs_only_the_new_seed(grown):
    study_dir, pack, before, result, _ = grown
    assert (result.partial, result.finished, result.expected) == (False, 6, 6)
    assert read_completeness(str(study_dir)).state == "complete"
    trials = pd.read_parquet(study_dir / "trials.parquet")
    epochs = pd.read_parquet(study_dir / "epochs.parquet")
    assert len(trials) == 6 and trials["trial_id"].is_unique and (trials["status"] == "TERMINATED").all()
    assert sorted(zip(trials["seed"], trials["temperature"])) == [(s, t) for s in (0, 1, 2) for t in (1.0, 4.0)]
    assert len(epochs) == 6 * 2 and set(epochs["trial_id"]) == set(trials["trial_id"])

    # The stored seeds' rows, every value as it was: not run again, not rewritten.
    old = trials[trials["trial_id"].isin(before["trials"]["trial_id"])]
    pd.testing.assert_frame_equal(old.sort_values("trial_id").reset_index(drop=True),
                                  before["trials"].sort_values("trial_id").reset_index(drop=True))
    old_epochs = epochs[epochs["trial_id"].isin(before["trials"]["trial_id"])]
    pd.testing.assert_frame_equal(old_epochs.sort_values(["trial_id", "epoch"]).reset_index(drop=True),
                                  before["epochs"].sort_values(["trial_id", "epoch"]).reset_index(drop=True))
    assert result_logs(study_dir) == before["logs"]

    # The new seed ran as an experiment of its own, in the study's growth folder; the spec holds all seeds.
    growth = study_dir / "grown-1"
    assert len(trial_dirs(growth)) == (2 if pack == "off" else 1)
    new = trials[trials["seed"] == 2]
    assert set(new["pack_id"]) == {d.name for d in trial_dirs(growth)} or pack == "off"
    spec = json.loads((study_dir / SPEC_FILE).read_text())
    assert spec["seeds"] == [0, 1, 2] and spec["growths"] == [{"folder": "grown-1", "seeds": [2]}]
    if pack == "auto":
        [listed] = json.loads((growth / "packs.json").read_text())
        assert sorted(s["temperature"] for s in listed["students"]) == [1.0, 4.0]
        assert {s["seed"] for s in listed["students"]} == {2}


def test_the_new_seed_s_rows_are_those_of_a_study_run_with_it_from_the_start(grown):
    study_dir, _, _, result, reference = grown
    mine, theirs = by_arm(result.trials), by_arm(reference.trials)
    assert mine[BY_ARM].equals(theirs[BY_ARM])
    for column in SAME_IN_EVERY_RUN:
        if mine[column].dtype.kind == "f":
            assert mine[column].to_numpy() == pytest.approx(theirs[column].to_numpy(), abs=1e-6, nan_ok=True), column
        else:
            assert mine[column].tolist() == theirs[column].tolist(), column


def test_resuming_a_grown_study_with_its_seeds_in_any_order_runs_nothing_again(grown, storage):
    study_dir, pack, _, _, _ = grown
    trials = pd.read_parquet(study_dir / "trials.parquet")
    logs = {path: result_logs(path) for path in (study_dir, study_dir / "grown-1")}
    again = Study(name=study_dir.name, seeds=[2, 1, 0], storage=str(storage), pack=pack, resume=True, **GRID).run()
    assert (again.partial, again.finished, again.expected) == (False, 6, 6)
    assert {path: result_logs(path) for path in logs} == logs
    pd.testing.assert_frame_equal(pd.read_parquet(study_dir / "trials.parquet"), trials)
    assert json.loads((study_dir / SPEC_FILE).read_text())["seeds"] == [0, 1, 2]


def test_a_growth_cut_off_before_its_experiment_saved_state_is_finished_by_resume(ray_local, storage):
    """A driver lost as the growth's Tuner started: the spec already holds the new seed (it is recorded
    before the growth runs), its folder holds a cut-off tuner.pkl and no saved state. --resume with the
    grown seeds runs the new seed from the start; one without them is refused, naming it."""
    name = "cut_off"
    study_dir = storage / name
    Study(name=name, seeds=[0], storage=str(storage), pack="off", **GRID).run()
    before = result_logs(study_dir)
    spec = json.loads((study_dir / SPEC_FILE).read_text())
    spec.update(seeds=[0, 1], growths=[{"folder": "grown-1", "seeds": [1]}])
    (study_dir / SPEC_FILE).write_text(json.dumps(spec))
    (study_dir / "grown-1").mkdir()
    (study_dir / "grown-1" / "tuner.pkl").write_bytes(b"")

    with pytest.raises(ConfigError, match=r"lack the stored seeds \[1\]"):
        Study(name=name, seeds=[0], storage=str(storage), pack="off", resume=True, **GRID).run()
    result = Study(name=name, seeds=[0, 1], storage=str(storage), pack="off", resume=True, **GRID).run()
    assert (result.partial, result.finished, result.expected) == (False, 4, 4)
    assert sorted(zip(result.trials["seed"], result.trials["temperature"])) == [(0, 1.0), (0, 4.0), (1, 1.0), (1, 4.0)]
    assert result_logs(study_dir) == before
    assert len(trial_dirs(study_dir / "grown-1")) == 2


# --- refused before any compute --------------------------------------------------------------------------


def stored_study(storage: Path, name: str, **study) -> Path:
    """A study directory as a first run leaves it once Ray Tune saved its state: its spec and a saved state
    (its content is not read before a resume is refused)."""
    study_dir = storage / name
    study_dir.mkdir(parents=True)
    spec = Study(name=name, storage=str(storage), **study).spec()
    (study_dir / SPEC_FILE).write_text(json.dumps(spec))
    (study_dir / "experiment_state-2025-01-01_00-00-00.json").write_text("{}")
    return study_dir


@pytest.mark.parametrize("stored, requested, needles", [
    (dict(seeds=[0, 1]), dict(seeds=[0]), ["seeds [0] lack the stored seeds [1]", "cannot be removed"]),
    (dict(seeds=[0, 1]), dict(seeds=[1, 2]), ["seeds [1, 2] lack the stored seeds [0]"]),
    (dict(seeds=[0], search=OptunaSpec(space={"temperature": ("logfloat", 1, 8)}, num_samples=2)),
     dict(seeds=[0, 1], search=OptunaSpec(space={"temperature": ("logfloat", 1, 8)}, num_samples=2)),
     ["add [1] to the Optuna search", "allowed: the stored seeds [0]"]),
    (dict(seeds=[0], scheduler="asha", axes={"temperature": [1.0, 4.0]}),
     dict(seeds=[0, 1], scheduler="asha", axes={"temperature": [1.0, 4.0]}),
     ["add [1] to a study under scheduler asha", "allowed: the stored seeds [0]"]),
    (dict(seeds=[0]), dict(seeds=[0, 1], base=TrialConfig(**{**TINY, "epochs": 3})),
     ["--resume asks for another study", "epochs: stored 2, requested 3", "seeds: stored [0], requested [0, 1]"]),
    (dict(seeds=[0, 1]), dict(seeds=[1, 0], base=TrialConfig(**{**TINY, "epochs": 3})),
     ["--resume asks for another study", "epochs: stored 2, requested 3"]),
], ids=["a-seed-removed", "a-seed-swapped", "optuna-grown", "asha-grown", "grown-and-changed", "reordered-and-changed"])
def test_a_resume_that_removes_a_seed_or_grows_what_cannot_grow_is_refused(tmp_path, stored, requested, needles):
    import ray

    ray_was_running = ray.is_initialized()
    base = TrialConfig(**TINY)
    study_dir = stored_study(tmp_path, "refused", base=base, **stored)
    before = files_and_digests(tmp_path)
    with pytest.raises(ConfigError) as info:
        Study(name="refused", storage=str(tmp_path), resume=True, verbose=0, **{"base": base, **requested}).run()
    line = str(info.value)
    assert "\n" not in line and str(study_dir / SPEC_FILE) in line, line
    for needle in needles:
        assert needle in line, (needle, line)
    if sorted(stored["seeds"]) == sorted(requested["seeds"]):
        assert "seeds:" not in line, line  # the stored seeds in another order are the same seeds
    assert files_and_digests(tmp_path) == before
    if not ray_was_running:
        assert not ray.is_initialized(), "Ray was started for a resume that is refused"


# --- the command line ------------------------------------------------------------------------------------

ARGS = ["--set", "teacher_members=1", "--set", "teacher_epochs=2", "--set", "epochs=2", "--set", "eval_every=1",
        "--set", "batch_size=256", "--set", "temperature=4", "--max-concurrent", "1", "--quiet", "--pack", "off"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"kd_ray_growth_{name}", REPO / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_command_line_grows_with_seeds_and_refuses_a_removal_with_exit_2(ray_local, tmp_path, capsys):
    script = load_script("temperature_sweep")
    storage = ["--storage", str(tmp_path)]

    def run(*extra: str) -> tuple[int, list[str]]:
        capsys.readouterr()
        code = script.main([*ARGS, *storage, *extra])
        err = capsys.readouterr().err
        return code, [line for line in err.splitlines() if line.startswith("temperature_sweep: error:")]

    assert run("--seeds", "2") == (0, [])
    study_dir = tmp_path / "temperature_sweep"
    before = files_and_digests(tmp_path)
    removals = (("1", "seeds [0] lack the stored seeds [1]"), ("0,2", "seeds [0, 2] lack the stored seeds [1]"))
    for seeds, needle in removals:
        started = time.perf_counter()
        code, errors = run("--seeds", seeds, "--resume")
        assert code == 2 and len(errors) == 1 and needle in errors[0], errors
        assert time.perf_counter() - started < 20
    code, errors = run("--seeds", "3", "--set", "lr=0.5", "--resume")
    assert code == 2 and len(errors) == 1, errors
    assert "lr: stored " in errors[0] and "seeds: stored [0, 1], requested [0, 1, 2]" in errors[0], errors
    assert files_and_digests(tmp_path) == before

    assert run("--seeds", "3", "--resume") == (0, [])
    trials = pd.read_parquet(study_dir / "trials.parquet")
    assert sorted(trials["seed"]) == [0, 1, 2] and (trials["status"] == "TERMINATED").all()
    assert (study_dir / "report.md").is_file()
    logs = [p for p in before if p.endswith(("/result.json", "/progress.csv"))]
    assert len(logs) == 4  # the two stored trials' logs, unchanged: they did not run again
    after = files_and_digests(tmp_path)
    assert {p: after[p] for p in logs} == {p: before[p] for p in logs}
