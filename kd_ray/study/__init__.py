"""Studies: many trials on Ray Tune, their specification, presets and command line.

``Study`` (``spec``) is the specification and its validation, and imports no Ray; it hands the runner a
``RunPlan`` of plain values. Every module of this folder may import Ray; nothing outside it does.
Submodules, each importing only those listed before it:

- ``plan``: ``RunPlan``, ``StudyResult`` and the keys a trial's parameter travels under (no Ray);
- ``storage``: a study's name, storage, lock and state (no Ray);
- ``cluster``: cluster-launcher configs checked offline;
- ``live_tables``, ``guards``: the tables as trials finish; a local Ray's settings, signals, storage faults;
- ``console``: progress lines and trackers; ``pack_trials``: packs on Ray Tune; ``search``: all of Optuna
  (the searcher, its sampler, its journal);
- ``runner``: teachers as Ray tasks, the Tuner, the tables;
- ``spec``: ``Study``, ``OptunaSpec``; ``presets``: every study's grids; ``files``: studies as YAML or TOML
  files; ``cli``: the study scripts' flags and ``kd-ray study``.

``trainable(...)`` gives the trainable a study runs, for ``ray.tune.Tuner.restore`` of a stored study.
"""

from kd_ray.study.spec import TRACKERS, OptunaSpec, Study, spec_differences

__all__ = ["TRACKERS", "OptunaSpec", "Study", "spec_differences", "trainable"]


def trainable(store_uri: str | None = None, data_dir: str | None = None, cpus_per_trial: float = 1,
              gpus_per_trial: float = 0, predictions_dir: str | None = None):
    """The Ray Tune trainable every study runs, with its resources, for Ray Tune's own API:
    ``tune.Tuner.restore(study_dir, trainable=kd_ray.study.trainable(...)).get_results()``. ``store_uri``: the
    study's teacher store (``<storage>/teachers``; None: ``$KD_RAY_TEACHERS``); ``data_dir``: the data cache
    (None: ``$KD_RAY_DATA``); ``predictions_dir``: where trials with ``save_predictions`` write theirs (a study
    passes ``<study_dir>/predictions``; None: they write none)."""
    # Deferred and downward: Ray loads only for a caller that asks for the trainable, not for planning a study.
    from kd_ray.study.runner import distillation_trainable

    return distillation_trainable(store_uri, data_dir, cpus_per_trial, gpus_per_trial, predictions_dir)

