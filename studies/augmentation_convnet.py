"""E12 (paper Fig. 13): the augmentation study on a convnet without normalisation layers.

The policies of E3 again, on a network with no BatchNorm (VGG-16 without BN in the paper, m = 5), so
what augmentation does to agreement on the augmented data (finding 5) is seen apart from batch
statistics. Locally a small convnet (norm none) on digits' 8x8 images, with the policies grayscale
images take, at tau = 4.
"""

import sys

from kd_ray.study.cli import study_main


def main(argv: list[str] | None = None) -> int:
    return study_main("augmentation_convnet", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
