"""E5 (paper Fig. 9): ensemble size m x temperature tau.

For a confident teacher tau = 4 agrees better than tau = 1, and tau in {4, 8, 16} is similar
(finding 8); larger ensembles raise agreement (finding 7).
"""

import sys

from kd_ray.study_cli import LOCAL_BASE, PAPER_BASE, Preset, study_main

PRESETS = {
    "local": Preset(base=LOCAL_BASE, axes={"teacher_members": [1, 3, 5], "temperature": [1.0, 4.0, 8.0, 16.0]}, seeds=2),
    # The paper runs this grid with ResNet-20 on a subsampled CIFAR-100.
    "paper": Preset(base={**PAPER_BASE, "teacher_arch": "preresnet20", "student_arch": "preresnet20", "distill_fraction": 0.5},
                    axes={"teacher_members": [1, 3, 5], "temperature": [1.0, 4.0, 8.0, 16.0]}, seeds=3, gpus_per_trial=1.0),
}


def main(argv=None) -> int:
    return study_main("temperature_sweep", __doc__, PRESETS, argv)


if __name__ == "__main__":
    sys.exit(main())
