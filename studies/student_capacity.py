"""E11 (paper Fig. 12): student depth and width around the teacher's.

A deeper or wider student raises agreement only a little (finding 16): capacity is not what keeps a
student from matching its teacher. Locally an MLP teacher (2 hidden layers of 256) and students of 1, 2
and 4 layers at half, the same and double width; the paper preset distils R20 into R20 / R56 and R56
into R56 / R110.
"""

import sys

from kd_ray.study.cli import study_main


def main(argv: list[str] | None = None) -> int:
    return study_main("student_capacity", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
