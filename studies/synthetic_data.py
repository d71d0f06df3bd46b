"""E1 (paper Fig. 1, 5 left): synthetic samples added to the distillation data.

Samples of a generative model fitted to the teacher's own training inputs join every batch at the
paper's 1 : 4 ratio of synthetic to real inputs, for a teacher of one member and an ensemble of three,
at tau = 1, as the number of synthetic samples grows. More in-domain distillation inputs raise test
agreement (finding 3). Locally the generative model is a class-conditional Gaussian mixture fitted to
the teacher's mnist1d training signals (kd_ray/data/extra_inputs.py says why a mixture); every arm takes
the same optimizer steps over the same batches of real inputs. The paper preset reads GAN samples that
you generate (the paper's GAN is not shipped): an .npz with x, float32 [N, 3, 32, 32] in [0, 1], and
optionally y, int64 [N]; by default cifar100_gan_samples.npz in the working directory, elsewhere with
--set extra_path=PATH.
"""

import sys

from kd_ray.study.cli import study_main


def main(argv: list[str] | None = None) -> int:
    return study_main("synthetic_data", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
