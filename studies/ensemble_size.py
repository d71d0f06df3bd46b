"""E6 (paper Fig. 10): ensemble size m at temperature 1.

Larger ensembles: teacher accuracy up, test agreement up, student accuracy up but saturating
(finding 7). Members are stored one by one, so the m = 5 teacher reuses the members of m = 3.
"""

import sys

from kd_ray.study_cli import LOCAL_BASE, PAPER_BASE, Preset, study_main

PRESETS = {
    "local": Preset(base={**LOCAL_BASE, "temperature": 1.0}, axes={"teacher_members": [1, 2, 3, 5, 8]}, seeds=2),
    "paper": Preset(base={**PAPER_BASE, "temperature": 1.0}, axes={"teacher_members": [1, 2, 3, 5, 8, 12]}, seeds=3, gpus_per_trial=1.0),
}


def main(argv=None) -> int:
    return study_main("ensemble_size", __doc__, PRESETS, argv)


if __name__ == "__main__":
    sys.exit(main())
