"""E7 (paper Fig. 6a): optimizer x training duration, self-distillation.

Layer-normalised networks (norm=group, one group), weight decay 0, alpha 0, temperature 1. Longer
training raises train agreement only slightly and Adam is not better than SGD (finding 11).
"""

import sys

from kd_ray.study_cli import LOCAL_BASE, PAPER_BASE, Preset, study_main

RECIPE = {"norm": "group", "weight_decay": 0.0, "temperature": 1.0, "teacher_members": 1}
PRESETS = {
    "local": Preset(base={**LOCAL_BASE, **RECIPE}, axes={"epochs": [20, 60, 180]},
                    arms=[{"optimizer": "sgd", "lr": 0.05}, {"optimizer": "adam", "lr": 1e-3}], seeds=2),
    "paper": Preset(base={**PAPER_BASE, **RECIPE, "teacher_arch": "preresnet20", "student_arch": "preresnet20"},
                    axes={"epochs": [300, 1000, 5000]},
                    arms=[{"optimizer": "sgd", "lr": 0.05}, {"optimizer": "adam", "lr": 1e-3}], seeds=3, gpus_per_trial=1.0),
}


def main(argv=None) -> int:
    return study_main("training_duration", __doc__, PRESETS, argv)


if __name__ == "__main__":
    sys.exit(main())
