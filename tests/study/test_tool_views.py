"""What Ray Tune's and Optuna's own tools show of a study, on a real local Ray: a trial's Ray Tune config is its
whole flat TrialConfig (ExperimentAnalysis, a restored Tuner's results, params.json); a pack's final report
labels each student and reports no mean under a metric's own name; one pack_id in trials.parquet, packs.json,
the pack's config and its directory; an Optuna search's journal names its objectives and links each Optuna
trial to its row; and every row says when it began and ended."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pandas as pd
import pytest

import kd_ray.study
from kd_ray.config import TrialConfig
from kd_ray.study import OptunaSpec, Study
from kd_ray.study.storage import OPTUNA_JOURNAL

TINY = dict(dataset="mnist1d", teacher_arch="mlp", student_arch="mlp", teacher_epochs=2, teacher_members=1,
            epochs=2, eval_every=1, batch_size=256, device="cpu", precision="fp32")
ARMS = [{"augmentation": "mixup"}, {"augmentation": "baseline"}]  # the base's is baseline


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    """One storage for the module's studies, so they share its teacher store."""
    return tmp_path_factory.mktemp("tool_views")


def run(storage: Path, name: str, **study) -> tuple[Path, pd.DataFrame, tuple[datetime.datetime, datetime.datetime]]:
    """Run a study; its directory, its trials table and the time window it ran in."""
    began = now()
    result = Study(name=name, base=TrialConfig(**TINY), storage=str(storage), verbose=0, **study).run()
    assert not result.partial
    return Path(result.study_dir), pd.read_parquet(Path(result.study_dir) / "trials.parquet"), (began, now())


def check_times(trials: pd.DataFrame, epochs: pd.DataFrame, window: tuple[datetime.datetime, datetime.datetime]):
    """Each row began and ended within the study's run, in that order, its evaluations in between."""
    began, ended = (pd.Timestamp(t) for t in window)
    for column in ("started_at", "ended_at"):
        assert str(trials[column].dtype).startswith("datetime64") and str(trials[column].dt.tz) == "UTC", column
        assert trials[column].notna().all() and trials[column].between(began, ended).all(), column
    assert (trials["started_at"] < trials["ended_at"]).all()
    assert str(epochs["timestamp"].dt.tz) == "UTC" and epochs["timestamp"].notna().all()
    spans = epochs.merge(trials[["trial_id", "started_at", "ended_at"]], on="trial_id")
    assert (spans["started_at"] <= spans["timestamp"]).all() and (spans["timestamp"] <= spans["ended_at"]).all()


@pytest.fixture(scope="module")
def arms(ray_local, storage):
    """Two explicit arms (augmentation) x two temperatures, a Ray Tune trial each."""
    return run(storage, "arms", arms=ARMS, axes={"temperature": [1.0, 4.0]}, seeds=[0], pack="off")


def test_each_trial_s_ray_tune_config_is_its_flat_config(arms):
    from ray import tune

    study_dir, trials, _ = arms
    analysis = tune.ExperimentAnalysis(str(study_dir))
    frame = analysis.dataframe()
    assert sorted(zip(frame["config/augmentation"], frame["config/temperature"])) == sorted(
        (arm["augmentation"], t) for arm in ARMS for t in (1.0, 4.0))
    assert not any(column.startswith("config/arm") for column in frame.columns)
    rows = trials.set_index("trial_id")
    for trial in analysis.trials:
        assert set(trial.config) == set(TrialConfig.field_names())
        row = rows.loc[trial.trial_id]
        assert (trial.config["augmentation"], trial.config["temperature"]) == (row["augmentation"], row["temperature"])
        params = json.loads((Path(trial.local_path) / "params.json").read_text())
        assert params == trial.config
        # The directory names the values that tell the trials apart.
        assert f"augmentation={row['augmentation']}" in Path(trial.local_path).name
    # Ray Tune's trials in the study's order: the arms first, then the temperatures.
    ordered = sorted(analysis.trials, key=lambda t: t.trial_id)
    assert [(t.config["augmentation"], t.config["temperature"]) for t in ordered] == [
        ("mixup", 1.0), ("mixup", 4.0), ("baseline", 1.0), ("baseline", 4.0)]


def test_a_tuner_restored_with_the_public_trainable_reads_every_trial(arms, storage):
    from ray import tune

    study_dir, trials, _ = arms
    trainable = kd_ray.study.trainable(store_uri=str(storage / "teachers"))
    results = tune.Tuner.restore(str(study_dir), trainable=trainable).get_results()
    assert len(results) == len(trials) and not results.errors
    rows = trials.set_index("trial_id")
    for result in results:
        row = rows.loc[result.metrics["trial_id"]]
        assert result.config["augmentation"] == row["augmentation"]
        assert result.metrics["final"] and result.metrics["test_agreement"] == pytest.approx(row["test_agreement"])
    best = results.get_best_result(metric="val_agreement", mode="max")
    assert best.metrics["val_agreement"] == pytest.approx(trials["val_agreement"].max())


def test_a_lone_trial_s_row_says_which_ray_trial_ran_it_and_when(arms):
    study_dir, trials, window = arms
    assert (trials["pack_id"] == trials["trial_id"]).all() and (trials["ray_trial_id"] == trials["trial_id"]).all()
    assert trials["optuna_trial_number"].isna().all()
    check_times(trials, pd.read_parquet(study_dir / "epochs.parquet"), window)


@pytest.fixture(scope="module")
def packed(ray_local, storage):
    """Two seeds x two temperatures, two Ray Tune trials at once: a pack of two students per seed (the planner
    gives each slot its share of the study, and a seed's students are kept together)."""
    return run(storage, "packed", axes={"temperature": [1.0, 4.0]}, seeds=[0, 1], max_concurrent_trials=2)


def test_a_pack_labels_each_student_and_reports_no_mean_as_a_metric(packed):
    from ray import tune

    study_dir, trials, _ = packed
    assert len(trials) == 4 and (trials["pack_size"] == 2).all()
    rows = trials.set_index("trial_id")
    analysis = tune.ExperimentAnalysis(str(study_dir))
    frame = analysis.dataframe()
    assert len(analysis.trials) == 2
    assert "test_agreement" not in frame.columns and "pack_mean/test_agreement" in frame.columns
    seen = set()
    for trial in analysis.trials:
        final = trial.last_result
        for index, student in enumerate(trial.config["pack"]["students"]):
            labels = final["students"][str(index)]
            row = rows.loc[labels["trial_id"]]
            seen.add(labels["trial_id"])
            assert (labels["temperature"], labels["seed"]) == (student["temperature"], student["seed"])
            assert (row["temperature"], row["seed"]) == (labels["temperature"], labels["seed"])
            assert labels["test_agreement"] == pytest.approx(row["test_agreement"])
            # As Ray Tune's dataframe shows it: one column per student and label.
            shown = frame.set_index("trial_id").loc[trial.trial_id]
            assert shown[f"students/{index}/temperature"] == row["temperature"]
        means = final["pack_mean"]
        assert means["test_agreement"] == pytest.approx(rows.loc[rows["ray_trial_id"] == trial.trial_id,
                                                                 "test_agreement"].mean())
    assert seen == set(trials["trial_id"])


def test_ranking_a_packed_study_by_a_metric_fails_loudly(packed, storage):
    from ray import tune

    study_dir, _, _ = packed
    results = tune.Tuner.restore(str(study_dir), trainable=kd_ray.study.trainable(str(storage / "teachers")))
    with pytest.raises(RuntimeError):
        results.get_results().get_best_result(metric="test_agreement", mode="max")


def test_one_pack_id_in_the_tables_packs_json_the_config_and_the_directory(packed):
    from ray import tune

    study_dir, trials, window = packed
    listed = [pack["pack_id"] for pack in json.loads((study_dir / "packs.json").read_text())]
    assert sorted(listed) == ["pack0000", "pack0001"] == sorted(trials["pack_id"].unique())
    for trial in tune.ExperimentAnalysis(str(study_dir)).trials:
        pack_id = trial.config["pack"]["pack_id"]
        assert Path(trial.local_path).name == pack_id
        mine = trials[trials["pack_id"] == pack_id]
        assert len(mine) == 2 and (mine["ray_trial_id"] == trial.trial_id).all()
        assert mine["started_at"].nunique() == 1  # the pack's start
    check_times(trials, pd.read_parquet(study_dir / "epochs.parquet"), window)


def _journal(study_dir: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(study_dir / OPTUNA_JOURNAL)))
    [name] = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.parametrize("pack", ["off", "auto"], ids=["a_point_per_trial", "packed"])
def test_an_optuna_search_names_its_objectives_and_links_each_trial_to_its_row(ray_local, storage, pack):
    metrics = ("val_agreement", "val_acc")
    search = OptunaSpec(space={"temperature": ("logfloat", 1.0, 8.0)}, metrics=metrics, modes=("max", "max"),
                        num_samples=4, seed=2)
    study_dir, trials, window = run(storage, f"search_{pack}", search=search, pack=pack)
    assert len(trials) == 4 and (trials["pack_size"] == (1 if pack == "off" else 2)).all()
    study = _journal(study_dir)
    assert study.metric_names == list(metrics)
    optuna_trials = study.get_trials()
    assert sorted(t.number for t in optuna_trials) == sorted(trials["optuna_trial_number"]) == [0, 1, 2, 3]
    rows = trials.set_index("optuna_trial_number")
    for trial in optuna_trials:
        row = rows.loc[trial.number]
        assert trial.params["temperature"] == pytest.approx(row["temperature"])
        assert trial.values == pytest.approx([row[m] for m in metrics])
        assert trial.user_attrs["kd_ray_trial_id"] == row["trial_id"]
        assert trial.user_attrs["ray_trial_id"] == row["ray_trial_id"]
    check_times(trials, pd.read_parquet(study_dir / "epochs.parquet"), window)


@pytest.mark.parametrize("pack", ["auto", "off"])
def test_a_study_s_predictions_are_found_by_its_rows_trial_ids(ray_local, storage, pack):
    """save_predictions in a study: a file per row under <study>/predictions, named by the row's trial_id (a
    packed student's too), whose top-1 columns give the row's test agreement."""
    from kd_ray.analysis import load_predictions

    name = f"predictions_{pack}"
    base = TrialConfig(**{**TINY, "save_predictions": True})
    result = Study(name=name, base=base, axes={"temperature": [1.0, 4.0]}, seeds=[0], storage=str(storage),
                   verbose=0, pack=pack, max_concurrent_trials=1).run()  # one slot: both students in one pack
    assert not result.partial
    trials = pd.read_parquet(Path(result.study_dir) / "trials.parquet")
    assert (trials["pack_size"] > 1).all() == (pack == "auto")
    predictions = load_predictions(result.study_dir)
    assert set(predictions["trial_id"]) == set(trials["trial_id"])
    test = predictions[predictions["split"] == "test"]
    agreement = (test["teacher_top1_class"] == test["student_top1_class"]).groupby(test["trial_id"]).mean()
    for row in trials.itertuples():
        assert agreement[row.trial_id] == pytest.approx(row.test_agreement, abs=1e-6)  # the row's is float32
