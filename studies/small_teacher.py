"""E2 (paper Fig. 2): a teacher trained on very few examples, distilled on much more in-domain data.

The teacher sees a stratified 5% of the training set (200 mnist1d signals). The student is distilled
on those same 200 (``train``), on the whole training set (``both``), and with generated in-domain
samples added. With enough distillation data the student should match such a simple teacher almost
perfectly (finding 2: test agreement >= 99%).
"""

import sys

from kd_ray.study_cli import study_main


def main(argv: list[str] | None = None) -> int:
    return study_main("small_teacher", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
