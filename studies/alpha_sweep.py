"""E15 (paper Fig. 14) with the independent-student control (paper section 3.2).

The label weight alpha in {0, .1, .3, .5, .7} for a 3-member ensemble at temperature 1: raising alpha
does not raise agreement (finding 14). Every trial also distils the same recipe from an independent
ensemble and reports that student's agreement with the reference teacher (`control_test_agreement`):
the gap to `test_agreement` is the knowledge transferred (finding 15).
"""

import sys

from kd_ray.study.cli import study_main


def main(argv: list[str] | None = None) -> int:
    return study_main("alpha_sweep", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
