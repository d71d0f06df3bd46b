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
- ``spec``: ``Study``, ``OptunaSpec``; ``presets``: every study's grids; ``cli``: the study scripts' flags.
"""

from kd_ray.study.spec import TRACKERS, OptunaSpec, Study, spec_differences

__all__ = ["TRACKERS", "OptunaSpec", "Study", "spec_differences"]
