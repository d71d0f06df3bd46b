"""The Optuna samplers a search hands Ray Tune survive its pickling of the searcher."""

import pickle

import optuna
from ray.tune.search.optuna import OptunaSearch

from kd_ray.study.search import PicklableNSGAIISampler

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
