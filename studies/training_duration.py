"""E7 (paper Fig. 6a): optimizer x training duration, self-distillation.

Layer-normalised networks (norm=group, one group), weight decay 0, alpha 0, temperature 1. Longer
training raises train agreement only slightly and Adam is not better than SGD (finding 11).
"""

import sys

from kd_ray.study.cli import study_main


def main(argv: list[str] | None = None) -> int:
    return study_main("training_duration", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
