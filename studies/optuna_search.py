"""Multi-objective Optuna search: maximise validation agreement and validation accuracy together.

Searches temperature, alpha, augmentation, mixup alpha, learning rate and the distillation fraction
with NSGA-II on the validation split held out of the train data (val_fraction); the test metrics
are only reported. The Pareto front of fidelity against accuracy is the paper's question. The Optuna
study is kept in <storage>/<name>/optuna.journal for optuna.load_study and optuna-dashboard.
"""

import sys

from kd_ray.study.cli import study_main


def main(argv: list[str] | None = None) -> int:
    return study_main("optuna_search", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
