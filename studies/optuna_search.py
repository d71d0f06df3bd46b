"""Multi-objective Optuna search: maximise test agreement and test accuracy together.

Searches temperature, alpha, augmentation, mixup alpha, learning rate and the distillation fraction
with NSGA-II; the Pareto front of fidelity against accuracy is the paper's question. The Optuna
study is kept in <storage>/<name>/optuna.journal for optuna.load_study and optuna-dashboard.
"""

import sys

from kd_ray.augment import check_policy
from kd_ray.data import DATASET_INFO
from kd_ray.study import OptunaSpec
from kd_ray.study_cli import LOCAL_BASE, PAPER_BASE, Preset, study_main

PRESETS = {
    "local": Preset(base=LOCAL_BASE, seeds=1),
    "paper": Preset(base=PAPER_BASE, seeds=1, gpus_per_trial=1.0),
}
SAMPLES = {"local": 16, "paper": 64}


def search_space(args) -> OptunaSpec:
    dataset = args.dataset or PRESETS[args.preset].base["dataset"]
    kind = DATASET_INFO[dataset].kind if dataset in DATASET_INFO else "signal"
    policies = []
    for policy in ("none", "baseline", "mixup", "cutmix", "rotation", "combaug"):
        try:
            check_policy(policy, kind)
            policies.append(policy)
        except ValueError:
            pass
    return OptunaSpec(
        space={
            "temperature": ("logfloat", 1.0, 16.0),
            "alpha": ("float", 0.0, 0.7),
            "augmentation": ("choice", policies),
            "mixup_alpha": ("float", 0.2, 2.0),
            "lr": ("logfloat", 0.01, 0.2),
            "distill_fraction": ("float", 0.25, 1.0),
        },
        metrics=("test_agreement", "test_acc"), modes=("max", "max"), num_samples=SAMPLES[args.preset] if args.num_samples is None else args.num_samples,
    )


def main(argv=None) -> int:
    return study_main("optuna_search", __doc__, PRESETS, argv, search=search_space)


if __name__ == "__main__":
    sys.exit(main())
