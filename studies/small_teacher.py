"""E2 (paper Fig. 2): a teacher trained on very few examples, distilled on much more in-domain data.

The teacher sees a stratified 5% of the training set (200 mnist1d signals). The student is distilled
on those same 200 (``train``), on the whole training set (``both``), and with generated in-domain
samples added. With enough distillation data the student should match such a simple teacher almost
perfectly (finding 2: test agreement >= 99%).
"""

import sys

from kd_ray.study_cli import LOCAL_BASE, PAPER_BASE, Preset, drop_extra_data_if_not_generative, study_main

# 600 epochs of 200 examples are as many optimizer steps as the full teacher's 30 epochs of 4000.
RECIPE = {"teacher_fraction": 0.05, "teacher_members": 1, "teacher_epochs": 600}
PRESETS = {
    "local": Preset(base={**LOCAL_BASE, **RECIPE}, axes={"distill_split": ["train", "both"], "extra_data": [0, 8000]}, seeds=2),
    "paper": Preset(base={**PAPER_BASE, **RECIPE, "teacher_epochs": 4000}, axes={"distill_split": ["train", "both"]}, seeds=3, gpus_per_trial=1.0),
}


def main(argv=None) -> int:
    return study_main("small_teacher", __doc__, PRESETS, argv, adapt=drop_extra_data_if_not_generative)


if __name__ == "__main__":
    sys.exit(main())
