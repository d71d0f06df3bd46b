"""E3 (paper Fig. 3, 5 right, 11): augmentation policy x temperature.

Heavier augmentation feeds the student inputs beyond the teacher's training data: train agreement on
the augmented distillation data falls while test agreement holds or rises (findings 4, 5, 10).
Policies the dataset cannot take (colour on grayscale, rotations on 1-D signals) are left out.
The paper's OOD policy is an arm of its own locally: out-of-domain inputs (scikit-learn's digits
images read as 1-D signals) join every baseline batch at 1 : 4, and do not help (finding 10).
"""

import sys

from kd_ray.study.cli import study_main


def main(argv: list[str] | None = None) -> int:
    return study_main("augmentation_ablation", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
