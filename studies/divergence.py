"""The divergence the student minimises against its teacher: loss x temperature.

Forward KL (kl, teacher first: mass-covering), reverse KL (student first: mode-seeking), their mean
(symmetric_kl), the generalised Jensen-Shannon divergence (jsd, teacher weight jsd_beta), the soft
cross-entropy (soft_ce: kl's objective, a null pair with it) and the mean squared error of centred logits
(mse_logits: no temperature), each at tau 1 and 4 (kd_ray.train.losses defines each). Not a study of the
paper: it asks which divergence the student agrees with its teacher best under.
"""

import sys

from kd_ray.study.cli import study_main


def main(argv: list[str] | None = None) -> int:
    return study_main("divergence", __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
