"""E6 (paper Fig. 10): ensemble size m at temperature 1.

Larger ensembles: teacher accuracy up, test agreement up, student accuracy up but saturating
(finding 7). Members are stored one by one, so the m = 5 teacher reuses the members of m = 3.
"""

import sys

from kd_ray.study.cli import study_main


def main(argv: list[str] | None = None) -> int:
    return study_main("ensemble_size", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
