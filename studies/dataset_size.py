"""E1 / E2 / E4 (paper Fig. 1, 2, 4, 5): how much and which data the student is distilled on.

The teacher is trained on a seeded half D0 of the training set. The student is distilled on D0
(``train``), on the unseen half D1 (``holdout``) or on both, on a fraction of that split, and,
where the dataset can generate them (mnist1d), with extra in-domain samples added.
More distillation data raises test agreement (finding 3); D0 gives the better student accuracy
but lower agreement than D1, and D0 u D1 is best on both (finding 9).
"""

import sys

from kd_ray.study_cli import LOCAL_BASE, PAPER_BASE, Preset, drop_extra_data_if_not_generative, study_main

AXES = {"distill_split": ["train", "holdout", "both"], "distill_fraction": [0.25, 1.0], "extra_data": [0, 8000]}
PRESETS = {
    "local": Preset(base={**LOCAL_BASE, "teacher_split": "half"}, axes=AXES, seeds=2),
    "paper": Preset(base={**PAPER_BASE, "teacher_split": "half", "teacher_members": 3, "temperature": 4.0},
                    axes={"distill_split": ["train", "holdout", "both"], "distill_fraction": [0.25, 0.5, 1.0]},
                    seeds=3, gpus_per_trial=1.0),
}


def main(argv=None) -> int:
    return study_main("dataset_size", __doc__, PRESETS, argv, adapt=drop_extra_data_if_not_generative)


if __name__ == "__main__":
    sys.exit(main())
