"""Study on a real local Ray: grid, explicit arms, Optuna (single- and multi-objective), ASHA and
resume, each writing real Parquet tables; and the validation that refuses a bad study before Ray."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

import kd_ray
from kd_ray.config import ConfigError, TrialConfig
from kd_ray.study import OptunaSpec, Study
from kd_ray.study.plan import RunPlan
from kd_ray.study.storage import OPTUNA_JOURNAL
from kd_ray.tables import EPOCHS_SCHEMA, PROVENANCE, TRIALS_SCHEMA
from kd_ray.train.teachers import TeacherStore, needed_members

# A tiny trial: mnist1d with small MLPs, a 2-epoch teacher, a 2-epoch student evaluated every epoch.
TINY = dict(dataset="mnist1d", teacher_arch="mlp", student_arch="mlp", teacher_epochs=2, teacher_members=1,
            epochs=2, eval_every=1, batch_size=256, device="cpu")
FRACTIONS = ("test_acc", "test_ece", "test_agreement", "train_agreement", "aug_train_agreement",
             "teacher_test_acc", "teacher_test_ece")
NON_NEGATIVE = ("test_nll", "test_kl", "train_kl", "teacher_test_nll")


def tiny(**changes) -> TrialConfig:
    return TrialConfig(**{**TINY, **changes})


def trial_dirs(study_dir: str) -> list[Path]:
    return sorted(p for p in Path(study_dir).iterdir() if p.is_dir() and p.name.startswith("_trainable"))


def check_metrics(trials: pd.DataFrame) -> None:
    for column in FRACTIONS:
        values = trials[column]
        assert values.notna().all(), column
        assert ((values >= 0) & (values <= 1)).all(), (column, list(values))
    for column in NON_NEGATIVE:
        values = trials[column]
        assert values.notna().all() and (values >= 0).all() and values.map(math.isfinite).all(), column
    assert (trials["train_time_s"] > 0).all()


# --- validation: before any Ray work (these tests run before the module's Ray fixture starts) ------


def _refused(tmp_path, match: str, **study) -> str:
    import ray

    ray_was_running = ray.is_initialized()
    s = Study(name=study.pop("name", "bad"), base=study.pop("base", tiny()), storage=str(tmp_path / "store"), **study)
    with pytest.raises(ConfigError, match=match) as info:
        s.run()
    if not ray_was_running:
        assert not ray.is_initialized(), "Ray was started for a study that validation should refuse"
    assert not (tmp_path / "store").exists(), "a refused study wrote to its storage"
    return str(info.value)


def test_unknown_axis_is_refused_with_a_suggestion(tmp_path):
    message = _refused(tmp_path, "temprature", axes={"temprature": [1.0, 4.0]})
    assert "did you mean 'temperature'" in message


@pytest.mark.parametrize(
    "axes, match",
    [
        ({"temperature": []}, "non-empty list"),
        ({"temperature": 4.0}, "non-empty list"),
        ({"temperature": [1.0, -4.0]}, "temperature"),
        ({"augmentation": ["baseline", "colorjitter"]}, "augmentation"),
        ({"optimizer": ["sgd", "adamw"]}, "optimizer"),
    ],
)
def test_bad_axis_values_are_refused(tmp_path, axes, match):
    _refused(tmp_path, match, axes=axes)


def test_optuna_with_axes_is_refused(tmp_path):
    search = OptunaSpec(space={"temperature": ("logfloat", 1, 8)}, num_samples=2)
    _refused(tmp_path, "axes and arms must be empty", axes={"alpha": [0.0, 0.5]}, search=search)
    _refused(tmp_path, "axes and arms must be empty", arms=[{"optimizer": "adam"}], search=search)


@pytest.mark.parametrize(
    "search, extra, match",
    [
        (OptunaSpec(space={"temperature": ("logfloat", 1, 8)}, metrics=("test_accuracy",)), {}, "test_accuracy"),
        (OptunaSpec(space={"temperature": ("logfloat", 1, 8)}, modes=("maximize",)), {}, "mode"),
        (OptunaSpec(space={"temperature": ("logfloat", 1, 8)}, metrics=("test_agreement", "test_acc")), {},
         "differ in length"),
        (OptunaSpec(space={"temperature": ("uniform", 1, 8)}), {}, "kind must be"),
        (OptunaSpec(space={"temperatur": ("float", 1, 8)}), {}, "did you mean 'temperature'"),
        (OptunaSpec(space={"temperature": ("float", 0, 8)}), {}, "temperature"),
        (OptunaSpec(space={"temperature": ("float", 1, 8)}, num_samples=0), {}, "num_samples"),
        (OptunaSpec(space={"temperature": ("float", 1, 8)}, metrics=("test_agreement", "test_acc"),
                    modes=("max", "max")), {"scheduler": "asha"}, "asha"),
    ],
)
def test_bad_search_is_refused(tmp_path, search, extra, match):
    _refused(tmp_path, match, search=search, **extra)


@pytest.mark.parametrize(
    "study, match",
    [
        ({"name": ""}, "study name"),
        ({"name": "a/b"}, "study name"),
        ({"seeds": []}, "seed"),
        ({"scheduler": "hyperband"}, "scheduler"),
        ({"cpus_per_trial": 0}, "cpus_per_trial"),
        ({"gpus_per_trial": -1}, "gpus_per_trial"),
        ({"gpus_per_trial": 1.5}, "gpus_per_trial"),
        ({"arms": [{}]}, "arm"),
        ({"arms": [{"temperature": 2.0}], "axes": {"temperature": [1.0]}}, "both an arm and an axis"),
        ({"arms": [{"optimiser": "adam"}]}, "did you mean 'optimizer'"),
        ({"base": tiny(device="cuda")}, "gpus_per_trial"),
    ],
)
def test_bad_study_is_refused(tmp_path, study, match):
    _refused(tmp_path, match, **study)


def test_configs_cross_arms_axes_and_seeds():
    s = Study(name="g", base=tiny(), axes={"temperature": [1.0, 4.0]},
              arms=[{"optimizer": "sgd", "lr": 0.05}, {"optimizer": "adam", "lr": 0.001}], seeds=[0, 1, 2])
    configs = s.validate()
    assert len(configs) == 2 * 2 * 3
    assert len(set(configs)) == 12
    combos = {(c.optimizer, c.lr, c.temperature, c.seed) for c in configs}
    assert combos == {(o, lr, t, seed) for o, lr in (("sgd", 0.05), ("adam", 0.001))
                      for t in (1.0, 4.0) for seed in (0, 1, 2)}
    assert all(c.epochs == 2 and c.teacher_epochs == 2 for c in configs)


def test_the_plan_hands_the_runner_plain_values(tmp_path):
    grid = Study(name="g", base=tiny(), axes={"temperature": [1.0, 4.0]}, arms=[{"optimizer": "adam"}],
                 seeds=[0, 3], storage=str(tmp_path), scheduler="asha", cpus_per_trial=0.5, retrain_teachers=True)
    plan = grid.plan()
    assert isinstance(plan, RunPlan)
    assert (plan.name, plan.study_dir, plan.teacher_store) == ("g", f"{tmp_path}/g", f"{tmp_path}/teachers")
    assert (plan.axes, plan.arms, plan.seeds) == ({"temperature": [1.0, 4.0]}, [{"optimizer": "adam"}], [0, 3])
    assert plan.search_space is None and plan.num_samples == 1
    assert (plan.metrics, plan.modes) == (("val_agreement",), ("max",))  # what ASHA stops a grid on
    assert (plan.scheduler, plan.cpus_per_trial, plan.retrain_teachers) == ("asha", 0.5, True)
    search = OptunaSpec(space={"temperature": ("logfloat", 1, 8)}, metrics=("val_acc",), modes=("min",),
                        num_samples=5, seed=9)
    plan = Study(name="s", base=tiny(), search=search, storage=str(tmp_path)).plan()
    assert plan.search_space == search.space and plan.num_samples == 5 and plan.search_seed == 9
    assert (plan.metrics, plan.modes) == (("val_acc",), ("min",))


def test_the_study_module_needs_no_ray_and_the_runner_never_imports_it():
    import ast
    import subprocess
    import sys

    code = ("import sys; from kd_ray.study import Study; Study(name='s').plan(); "
            "assert 'ray' not in sys.modules, 'planning a study imported Ray'")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
    runner = Path(kd_ray.__file__).parent / "study" / "runner.py"
    imported = set()
    for node in ast.walk(ast.parse(runner.read_text())):  # deferred and TYPE_CHECKING imports included
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not imported & {"kd_ray.study", "kd_ray.study.spec", "kd_ray.study.presets", "kd_ray.study.cli"}


# --- on a real local Ray --------------------------------------------------------------------------




@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> str:
    """One storage for the module's studies, so they share its teacher store."""
    return str(tmp_path_factory.mktemp("study_storage"))


def run_study(**kwargs):
    import ray

    result = Study(verbose=0, **kwargs).run()
    assert ray.is_initialized(), "the study shut down a Ray instance it did not start"
    return result


GRID_BASE = tiny(teacher_members=2)


@pytest.fixture(scope="module")
def grid(ray_local, storage):
    """A 2 temperatures x 2 seeds grid whose two teacher members are trained as Ray tasks, a Ray Tune
    trial per config (test_packs_on_ray runs it packed)."""
    return run_study(name="grid", base=GRID_BASE, axes={"temperature": [1.0, 4.0]}, seeds=[0, 1], storage=storage,
                     pack="off")


def test_grid_study_writes_trial_and_epoch_tables(grid, storage):
    import ray
    import torch

    base, result = GRID_BASE, grid
    study_dir = Path(storage) / "grid"
    assert result.study_dir == str(study_dir)
    assert (result.partial, result.finished, result.expected) == (False, 4, 4)

    trials_path, epochs_path = study_dir / "trials.parquet", study_dir / "epochs.parquet"
    assert pq.read_schema(trials_path).equals(TRIALS_SCHEMA, check_metadata=False)
    assert pq.read_schema(epochs_path).equals(EPOCHS_SCHEMA, check_metadata=False)
    trials = pd.read_parquet(trials_path)
    assert len(trials) == 4
    assert list(trials.columns) == TRIALS_SCHEMA.names
    assert (trials["status"] == "TERMINATED").all()
    assert trials["error"].isna().all()
    assert (trials["study"] == "grid").all()
    assert trials["trial_id"].is_unique
    assert len(trial_dirs(str(study_dir))) == 4
    assert set(zip(trials["temperature"], trials["seed"])) == {(1.0, 0), (1.0, 1), (4.0, 0), (4.0, 1)}
    assert (trials["epochs"] == 2).all() and (trials["epochs_completed"] == 2).all()
    assert (trials["teacher_members"] == 2).all() and (trials["batch_size"] == 256).all()
    assert trials["control_test_agreement"].isna().all()  # the control did not run
    check_metrics(trials)
    # One teacher per replicate (per-seed teachers): its test metrics are the same in every row of a seed.
    assert (trials.groupby("seed")["teacher_test_nll"].nunique() == 1).all()
    assert trials.groupby("seed")["teacher_test_nll"].first().nunique() == 2

    # provenance
    for column in PROVENANCE:
        assert trials[column].notna().all() and (trials[column] != "").all(), column
    assert (trials["teacher_key"] == [base.replace(seed=seed).teacher_key() for seed in trials["seed"]]).all()
    assert (trials["kd_ray_version"] == kd_ray.__version__).all()
    assert (trials["ray_version"] == ray.__version__).all()
    assert (trials["torch_version"] == torch.__version__).all()
    assert (trials["device_name"] == "cpu").all()
    assert trials["git_sha"].map(lambda s: isinstance(s, str) and len(s) > 0).all()
    for row in trials.itertuples():
        cfg = TrialConfig.from_dict(json.loads(row.config_json))
        assert (cfg.temperature, cfg.seed, cfg.epochs, cfg.teacher_members) == (row.temperature, row.seed, 2, 2)

    epochs = pd.read_parquet(epochs_path)
    assert len(epochs) == 4 * 2
    assert set(epochs["trial_id"]) == set(trials["trial_id"])
    assert all(sorted(group) == [1, 2] for _, group in epochs.groupby("trial_id")["epoch"])
    assert epochs["train_loss"].notna().all() and (epochs["train_loss"] > 0).all()
    assert epochs["lr"].notna().all() and (epochs["lr"] > 0).all() and (epochs["lr"] <= 0.05).all()
    # The final row of the trials table is the last evaluation of the epochs table.
    last = epochs[epochs["epoch"] == 2].set_index("trial_id")
    for row in trials.itertuples():
        assert last.loc[row.trial_id, "test_agreement"] == pytest.approx(row.test_agreement)
    # What run() returns is what it wrote.
    assert sorted(result.trials["trial_id"]) == sorted(trials["trial_id"])
    assert len(result.epochs) == 8

    # The teacher store under the storage holds exactly the two members of each replicate's ensemble.
    store = TeacherStore(Path(storage) / "teachers")
    assert set(store.keys()) == set(needed_members([base.replace(seed=seed) for seed in (0, 1)]))
    assert len(store.keys()) == 4


def test_second_study_reuses_teachers_and_arms_are_flat_columns(grid, storage, capsys):
    store = TeacherStore(Path(storage) / "teachers")
    base = GRID_BASE
    keys = store.keys()
    assert len(keys) == 4
    manifests = {k: os.stat(os.path.join(store.member_path(k), "manifest.json")).st_mtime_ns for k in keys}
    capsys.readouterr()

    arms = [{"optimizer": "sgd", "lr": 0.05}, {"optimizer": "adam", "lr": 0.001}]
    run_study(name="arms", base=base, arms=arms, seeds=[0], storage=storage)
    out = capsys.readouterr().out
    assert "2 members needed, 2 in the store" in out
    assert store.keys() == keys
    assert {k: os.stat(os.path.join(store.member_path(k), "manifest.json")).st_mtime_ns for k in keys} == manifests

    trials = pd.read_parquet(Path(storage) / "arms" / "trials.parquet")
    assert "arm" not in trials.columns
    assert len(trials) == 2
    assert sorted(zip(trials["optimizer"], trials["lr"])) == [("adam", 0.001), ("sgd", 0.05)]
    assert (trials["status"] == "TERMINATED").all()
    check_metrics(trials)
    for row in trials.itertuples():
        cfg = json.loads(row.config_json)
        assert (cfg["optimizer"], cfg["lr"]) == (row.optimizer, row.lr)
    epochs = pd.read_parquet(Path(storage) / "arms" / "epochs.parquet")
    adam_id = trials.loc[trials["optimizer"] == "adam", "trial_id"].item()
    assert (epochs.loc[epochs["trial_id"] == adam_id, "lr"] <= 0.001).all()


def _journal_study(study_dir: Path, name: str):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = study_dir / OPTUNA_JOURNAL
    assert journal.is_file()
    storage = JournalStorage(JournalFileBackend(str(journal)))
    names = optuna.study.get_all_study_names(storage)
    assert len(names) == 1 and names[0].startswith(name)
    return optuna.load_study(study_name=names[0], storage=storage)


@pytest.mark.parametrize("metrics", [("val_agreement",), ("val_agreement", "val_acc")], ids=["single", "multi"])
def test_optuna_search_writes_rows_and_a_loadable_journal(ray_local, storage, metrics):
    import optuna

    name = f"optuna_{len(metrics)}"
    search = OptunaSpec(space={"temperature": ("logfloat", 1, 8)}, metrics=metrics, modes=("max",) * len(metrics),
                        num_samples=3, seed=1)
    # A point per Ray Tune trial (a packed search over student fields: tests/packs/test_packs_on_ray.py).
    result = run_study(name=name, base=tiny(), search=search, storage=storage, pack="off")
    assert (result.partial, result.expected) == (False, 3)
    study_dir = Path(storage) / name
    trials = pd.read_parquet(study_dir / "trials.parquet")
    assert len(trials) == 3 == len(trial_dirs(str(study_dir)))
    assert (trials["status"] == "TERMINATED").all()
    assert trials["temperature"].between(1, 8).all()
    assert trials["temperature"].nunique() == 3  # sampled, not the base's 4.0 three times
    check_metrics(trials)
    assert len(pd.read_parquet(study_dir / "epochs.parquet")) == 3 * 2

    study = _journal_study(study_dir, name)
    assert len(study.directions) == len(metrics)
    assert all(d == optuna.study.StudyDirection.MAXIMIZE for d in study.directions)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 3
    assert sorted(t.params["temperature"] for t in complete) == pytest.approx(sorted(trials["temperature"]))
    # The values Optuna was told are the table's final metrics.
    table_values = sorted(tuple(row) for row in trials[list(metrics)].itertuples(index=False))
    told = sorted(tuple(t.values) for t in complete)
    assert len(told) == len(table_values)
    for got, want in zip(told, table_values):
        assert list(got) == pytest.approx(list(want))


def test_asha_runs_to_completion_with_valid_statuses(ray_local, storage):
    base = tiny(epochs=3)
    result = run_study(name="asha", base=base, axes={"temperature": [1.0, 2.0, 4.0, 8.0]}, seeds=[0],
                       scheduler="asha", asha_grace_epochs=1, storage=storage)
    assert not result.partial
    study_dir = Path(storage) / "asha"
    trials = pd.read_parquet(study_dir / "trials.parquet")
    epochs = pd.read_parquet(study_dir / "epochs.parquet")
    assert len(trials) == 4
    assert set(trials["status"]) <= {"TERMINATED", "STOPPED"}
    assert trials["epochs_completed"].between(1, 3).all()
    per_trial = epochs.groupby("trial_id").size()
    for row in trials.itertuples():
        assert per_trial[row.trial_id] == row.epochs_completed  # one epoch row per evaluation it ran
        assert 0 <= row.test_agreement <= 1
    finished = trials[trials["status"] == "TERMINATED"]
    # The best trial at the first rung is never cut, so at least one trial completes all epochs.
    assert len(finished) >= 1
    assert (finished["epochs_completed"] == 3).all()
    assert finished["error"].isna().all()
    assert (finished["teacher_key"] == base.teacher_key()).all()
    stopped = trials[trials["status"] == "STOPPED"]
    assert (stopped["epochs_completed"] < 3).all()
    assert stopped["error"].str.contains("stopped").all()


def _trial_files(study_dir: str) -> dict[str, tuple[int, str]]:
    """Each trial's result files: (line count, content). A re-run trial appends results."""
    out = {}
    for d in trial_dirs(study_dir):
        for name in ("progress.csv", "result.json"):
            text = (d / name).read_text()
            out[f"{d.name}/{name}"] = (len(text.splitlines()), text)
    return out


def test_resume_does_not_rerun_finished_trials_and_a_rerun_needs_resume(ray_local, storage):
    spec = dict(name="resume", base=tiny(), axes={"temperature": [1.0, 4.0]}, seeds=[0], storage=storage)
    first = run_study(**spec)
    study_dir = str(Path(storage) / "resume")
    files = _trial_files(study_dir)
    assert len(files) == 4 and all(lines >= 2 for lines, _ in files.values())
    dirs = [d.name for d in trial_dirs(study_dir)]
    trials = pd.read_parquet(Path(study_dir) / "trials.parquet")

    again = run_study(**spec, resume=True)
    assert (again.partial, again.finished, again.expected) == (False, 2, 2)
    assert [d.name for d in trial_dirs(study_dir)] == dirs
    assert _trial_files(study_dir) == files  # no trial wrote another result
    resumed = pd.read_parquet(Path(study_dir) / "trials.parquet")
    assert sorted(resumed["trial_id"]) == sorted(trials["trial_id"]) == sorted(first.trials["trial_id"])
    assert (resumed["status"] == "TERMINATED").all()
    cols = ["trial_id", "temperature", "test_agreement", "test_acc", "epochs_completed"]
    pd.testing.assert_frame_equal(resumed[cols].sort_values("trial_id").reset_index(drop=True),
                                  trials[cols].sort_values("trial_id").reset_index(drop=True))
    assert len(pd.read_parquet(Path(study_dir) / "epochs.parquet")) == 2 * 2

    mtime = os.stat(Path(study_dir) / "trials.parquet").st_mtime_ns
    with pytest.raises(ConfigError, match="--resume"):
        Study(verbose=0, **spec).run()
    assert os.stat(Path(study_dir) / "trials.parquet").st_mtime_ns == mtime
    assert _trial_files(study_dir) == files


def test_more_gpus_than_the_cluster_has_is_refused(ray_local, storage):
    with pytest.raises(ConfigError, match="gpus_per_trial=3") as info:
        Study(name="gpus", base=tiny(), gpus_per_trial=3, storage=storage, verbose=0).run()
    assert "0 GPUs" in str(info.value)
    assert not (Path(storage) / "gpus").exists()
    import ray

    assert ray.is_initialized()


def test_asha_with_a_step_budget_is_refused_before_ray():
    from kd_ray.config import ConfigError, TrialConfig
    from kd_ray.study import Study

    study = Study(name="asha_steps", base=TrialConfig(steps=100), scheduler="asha", storage="/tmp/never-written")
    with pytest.raises(ConfigError, match="scheduler='asha' stops trials by epoch, but steps is set"):
        study.validate()
