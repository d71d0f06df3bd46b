"""Multi-objective Optuna search: maximise test agreement and test accuracy together.

Searches temperature, alpha, augmentation, mixup alpha, learning rate and the distillation fraction
with NSGA-II; the Pareto front of fidelity against accuracy is the paper's question. The Optuna
study is kept in <storage>/<name>/optuna.journal for optuna.load_study and optuna-dashboard.
"""

import sys

from kd_ray.study.cli import study_main


def main(argv: list[str] | None = None) -> int:
    return study_main("optuna_search", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
