"""E8 / E10 (paper Fig. 6b, Table 1): how the student is initialised.

``interpolate``: theta = lambda * theta_teacher + (1 - lambda) * theta_random, for a sweep of lambda;
agreement jumps from the random-init level to ~100% past a threshold (finding 12). ``teacher_init``:
the teacher's *initial* weights, against ``random``; final agreement does not change (finding 13).
Layer-normalised networks (norm=group), so a network's function is fixed by its weights.
"""

import sys

from kd_ray.study_cli import LOCAL_BASE, PAPER_BASE, Preset, study_main

LAMBDAS = [0.0, 0.25, 0.375, 0.5, 0.75, 0.875, 1.0]
ARMS = [{"init": "interpolate", "init_lambda": lam} for lam in LAMBDAS] + [{"init": "random"}, {"init": "teacher_init"}]
RECIPE = {"norm": "group", "temperature": 1.0, "teacher_members": 1}
PRESETS = {
    "local": Preset(base={**LOCAL_BASE, **RECIPE}, arms=ARMS, seeds=2),
    "paper": Preset(base={**PAPER_BASE, **RECIPE, "teacher_arch": "preresnet20", "student_arch": "preresnet20", "weight_decay": 0.0},
                    arms=ARMS, seeds=3, gpus_per_trial=1.0),
}


def main(argv=None) -> int:
    return study_main("initialization", __doc__, PRESETS, argv)


if __name__ == "__main__":
    sys.exit(main())
