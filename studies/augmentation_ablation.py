"""E3 (paper Fig. 3, 5 right, 11): augmentation policy x temperature.

Heavier augmentation feeds the student inputs beyond the teacher's training data: train agreement on
the augmented distillation data falls while test agreement holds or rises (findings 4, 5, 10).
Policies the dataset cannot take (colour on grayscale, rotations on 1-D signals) are left out.
"""

import sys

from kd_ray.augment import check_policy
from kd_ray.data import DATASET_INFO
from kd_ray.study_cli import LOCAL_BASE, PAPER_BASE, Preset, study_main

PAPER_POLICIES = ["baseline", "rotation", "vflip", "colorjitter", "combaug", "mixup", "noise"]
PRESETS = {
    # digits: 8x8 images, so the image policies apply; MLPs keep a trial to seconds.
    "local": Preset(base={**LOCAL_BASE, "dataset": "digits", "epochs": 30},
                    axes={"augmentation": PAPER_POLICIES, "temperature": [1.0, 4.0]}, seeds=2),
    "paper": Preset(base=PAPER_BASE, axes={"augmentation": PAPER_POLICIES, "temperature": [1.0, 4.0]},
                    seeds=3, gpus_per_trial=1.0),
}


def keep_applicable_policies(preset: Preset, args) -> Preset:
    """Drop the policies the chosen dataset cannot take, so one script serves every dataset."""
    dataset = args.dataset or preset.base["dataset"]
    if dataset not in DATASET_INFO:
        return preset  # the config validation names the bad dataset
    kind = DATASET_INFO[dataset].kind
    applicable = []
    for policy in preset.axes["augmentation"]:
        try:
            check_policy(policy, kind)
            applicable.append(policy)
        except ValueError:
            print(f"augmentation_ablation: leaving out '{policy}' ({dataset} is {kind} data)")
    return Preset(preset.base, {**preset.axes, "augmentation": applicable}, preset.arms, preset.seeds, preset.gpus_per_trial)


def main(argv=None) -> int:
    return study_main("augmentation_ablation", __doc__, PRESETS, argv, adapt=keep_applicable_policies)


if __name__ == "__main__":
    sys.exit(main())
