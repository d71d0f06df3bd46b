"""E5 (paper Fig. 9): ensemble size m x temperature tau.

For a confident teacher tau = 4 agrees better than tau = 1, and tau in {4, 8, 16} is similar
(finding 8); larger ensembles raise agreement (finding 7).
"""

import sys

from kd_ray.study.cli import study_main


def main(argv: list[str] | None = None) -> int:
    return study_main("temperature_sweep", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
