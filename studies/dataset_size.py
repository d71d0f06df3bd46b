"""E1 / E2 / E4 (paper Fig. 1, 2, 4, 5): how much and which data the student is distilled on.

The teacher is trained on a seeded half D0 of the training set. The student is distilled on D0
(``train``), on the unseen half D1 (``holdout``) or on both, on a fraction of that split, and,
where the dataset can generate them (mnist1d), with extra in-domain samples added.
More distillation data raises test agreement (finding 3); D0 gives the better student accuracy
but lower agreement than D1, and D0 u D1 is best on both (finding 9).
"""

import sys

from kd_ray.study.cli import study_main


def main(argv: list[str] | None = None) -> int:
    return study_main("dataset_size", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
