"""The Optuna samplers a search hands Ray Tune survive its pickling of the searcher; a search and ASHA select
trials on the validation split, never on test metrics."""

import pickle
from dataclasses import replace

import optuna
import pytest
from ray.tune.search.optuna import OptunaSearch

from kd_ray.config import ConfigError, TrialConfig
from kd_ray.study import OptunaSpec, Study
from kd_ray.study.presets import OPTUNA_PRESETS, STUDIES
from kd_ray.study.search import PicklableNSGAIISampler
from kd_ray.tables import SELECTION_METRICS

SPACE = {"temperature": optuna.distributions.FloatDistribution(1.0, 8.0)}


def _points(sampler, count: int) -> list[float]:
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    points = []
    for _ in range(count):
        trial = study.ask(SPACE)
        points.append(trial.params["temperature"])
        study.tell(trial, [trial.params["temperature"], -trial.params["temperature"]])
    return points


def test_the_nsga2_sampler_pickles_and_samples_as_before():
    # Ray Tune pickles the searcher into its experiment state (tuner.pkl, searcher-state): with
    # Optuna 5.1 the plain NSGA-II sampler holds a thread lock and cannot be pickled at all.
    sampler = PicklableNSGAIISampler(seed=7)
    copy = pickle.loads(pickle.dumps(sampler))
    assert _points(copy, 12) == _points(PicklableNSGAIISampler(seed=7), 12)


def test_ray_tune_s_optuna_searcher_with_the_nsga2_sampler_pickles():
    searcher = OptunaSearch(space=SPACE, metric=["a", "b"], mode=["max", "max"],
                            sampler=PicklableNSGAIISampler(seed=0))
    restored = pickle.loads(pickle.dumps(searcher))
    assert restored.suggest("trial-0")["temperature"] >= 1.0


# --- what a search and ASHA select on: the validation split, never the test set ---------------------------------------

def _tiny(**changes) -> TrialConfig:
    return TrialConfig(**{**dict(dataset="mnist1d", teacher_arch="mlp", student_arch="mlp", teacher_epochs=2,
                                 teacher_members=1, epochs=2, eval_every=1, batch_size=256, device="cpu"), **changes})


def _preset_search(**changes) -> Study:
    search = STUDIES["optuna_search"].search("local", None, 2)
    return Study(name="search", base=TrialConfig.from_dict(OPTUNA_PRESETS["local"].base),
                 search=replace(search, **changes))


def test_the_search_preset_and_asha_select_on_validation_metrics(tmp_path):
    study = _preset_search()
    assert study.search.metrics == ("val_agreement", "val_acc") and study.base.val_fraction > 0
    assert study.plan().metrics == ("val_agreement", "val_acc")
    grid = Study(name="g", base=_tiny(), axes={"temperature": [1.0, 4.0]}, scheduler="asha", storage=str(tmp_path))
    assert (grid.plan().metrics, grid.plan().modes) == (("val_agreement",), ("max",))  # what ASHA stops a grid on
    assert set(SELECTION_METRICS) == {"val_acc", "val_nll", "val_ece", "val_agreement", "val_kl", "val_top5_overlap",
                                      "val_jsd", "val_agreement_teacher_right", "val_agreement_teacher_wrong"}


@pytest.mark.parametrize("metrics", [("test_agreement", "val_acc"), ("val_agreement", "test_acc"),
                                     ("train_agreement", "val_acc")])
def test_a_search_preset_refuses_an_objective_off_the_validation_split(tmp_path, metrics):
    import ray

    ray_was_running = ray.is_initialized()
    study = replace(_preset_search(metrics=metrics), storage=str(tmp_path))
    study.validate()  # a trial metric: only what the search selects on is refused
    with pytest.raises(ConfigError) as info:
        study.run()
    message = str(info.value)
    bad = next(m for m in metrics if not m.startswith("val_"))
    assert message.startswith(f"search metric={bad!r} is not allowed") and "\n" not in message, message
    assert message.endswith("allowed: " + ", ".join(SELECTION_METRICS)), message
    assert SELECTION_METRICS[:5] == ("val_acc", "val_nll", "val_ece", "val_agreement", "val_kl")
    if not ray_was_running:
        assert not ray.is_initialized(), "Ray was started for a search that is refused"


@pytest.mark.parametrize("study, needle", [
    (dict(search=OptunaSpec(space={"temperature": ("logfloat", 1, 8)}, metrics=("test_agreement",)),
          scheduler="asha"), "search metric='test_agreement' is not allowed"),
    (dict(search=OptunaSpec(space={"temperature": ("logfloat", 1, 8)}, metrics=("val_agreement",)),
          base=_tiny(val_fraction=0.0)), "val_fraction=0.0 with a search leaves no validation data"),
    (dict(axes={"temperature": [1.0, 4.0]}, scheduler="asha", base=_tiny(val_fraction=0.0)),
     "val_fraction=0.0 with scheduler='asha' leaves no validation data"),
    (dict(axes={"val_fraction": [0.1, 0.0]}, scheduler="asha"), "val_fraction=0.0 with scheduler='asha'"),
    (dict(search=OptunaSpec(space={"val_fraction": ("float", 0.05, 0.2)}, metrics=("val_agreement",))),
     "search space val_fraction=('float', 0.05, 0.2) is not allowed"),
], ids=["asha-search-on-test", "search-without-val", "asha-without-val", "asha-axis-without-val", "search-over-val"])
def test_a_selection_without_validation_data_is_refused(tmp_path, study, needle):
    spec = Study(name="refused", storage=str(tmp_path), **{"base": _tiny(), **study})
    spec.validate()
    with pytest.raises(ConfigError) as info:
        spec.plan()
    assert str(info.value).startswith(needle) and "\n" not in str(info.value), str(info.value)


def test_a_grid_without_a_scheduler_runs_without_validation_data(tmp_path):
    plan = Study(name="g", base=_tiny(val_fraction=0.0), axes={"temperature": [1.0, 4.0]}, storage=str(tmp_path)).plan()
    assert plan.base.val_fraction == 0.0  # nothing is selected: the val_* columns are NaN
