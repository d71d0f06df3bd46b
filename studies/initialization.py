"""E8 / E10 (paper Fig. 6b, Table 1): how the student is initialised.

``interpolate``: theta = lambda * theta_teacher + (1 - lambda) * theta_random, for a sweep of lambda;
agreement jumps from the random-init level to ~100% past a threshold (finding 12). ``teacher_init``:
the teacher's *initial* weights, against ``random``; final agreement does not change (finding 13).
Layer-normalised networks (norm=group), so a network's function is fixed by its weights.
"""

import sys

from kd_ray.study.cli import study_main


def main(argv: list[str] | None = None) -> int:
    return study_main("initialization", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
