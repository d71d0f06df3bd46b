"""The command line shared by every ``studies/*.py`` script.

A study script defines its presets (a base TrialConfig and its axes or arms) and calls
``study_main``; the flags, validation, exit codes and the closing summary live here.
Exit codes: 0 done, 1 some trials failed, 2 bad input (nothing ran), 3 interrupted (partial).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from kd_ray.config import ConfigError, TrialConfig, parse_set

EXIT_BAD_INPUT, EXIT_PARTIAL = 2, 3

# The paper's CIFAR-100 recipes (PAPER.md): PreResNet-56 ensembles, 200 teacher / 300 student epochs.
PAPER_BASE: dict[str, Any] = dict(
    dataset="cifar100", teacher_arch="preresnet56", student_arch="preresnet56", teacher_members=5,
    teacher_epochs=200, teacher_lr=0.1, teacher_batch_size=256, epochs=300, batch_size=128, lr=0.05,
    weight_decay=1e-4, eval_every=25, device="auto",
)
# Laptop scale: mnist1d with small MLPs, a teacher around 77% test accuracy (far from 100%, as
# CIFAR-100 teachers are), seconds per trial on one CPU core.
LOCAL_BASE: dict[str, Any] = dict(dataset="mnist1d", teacher_arch="mlp", student_arch="mlp")


@dataclass
class Preset:
    base: dict[str, Any]
    axes: dict[str, list[Any]] = field(default_factory=dict)
    arms: list[dict[str, Any]] = field(default_factory=list)
    seeds: int = 2
    gpus_per_trial: float = 0.0


def drop_extra_data_if_not_generative(preset: Preset, args: argparse.Namespace) -> Preset:
    """Leave out an ``extra_data`` axis when the chosen dataset cannot generate samples (CIFAR)."""
    from kd_ray.data import DATASET_INFO

    dataset = args.dataset or preset.base["dataset"]
    axes = dict(preset.axes)
    if dataset in DATASET_INFO and not DATASET_INFO[dataset].can_generate and "extra_data" in axes:
        print(f"{dataset} cannot generate extra in-domain samples; the extra_data axis is left out")
        axes.pop("extra_data")
    return Preset(preset.base, axes, preset.arms, preset.seeds, preset.gpus_per_trial)


def parse_seeds(text: str) -> list[int]:
    """``3`` means seeds 0, 1, 2; ``4,7`` means seeds 4 and 7."""
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        count = int(text)
    except ValueError:
        raise ConfigError(f"--seeds={text!r} must be a count (3) or a comma list (0,1,2)") from None
    if count < 1:
        raise ConfigError(f"--seeds={text!r} must be at least 1")
    return list(range(count))


def study_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("local", "paper"), default="local",
                        help="local: embedded data, small nets, minutes on a laptop CPU (default); paper: CIFAR-100 recipes for a GPU cluster")
    parser.add_argument("--dataset", help="override the preset's dataset (mnist1d, digits, cifar10, cifar100)")
    parser.add_argument("--seeds", default=None, help="number of seeds (3) or a list (0,1,2); default: the preset's")
    parser.add_argument("--storage", default="results", help="local directory or URI (s3://, gs://) shared by all nodes (default ./results)")
    parser.add_argument("--name", help="study name (default: the script's); tables go to <storage>/<name>/")
    parser.add_argument("--address", help="Ray cluster address ('auto' inside a cluster); default: start a local Ray")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=None, help="GPUs per trial, fractional to pack trials (default: 0 local, 1 paper)")
    parser.add_argument("--max-concurrent", type=int, default=None, help="max trials at once (default: CPUs / cpus-per-trial)")
    parser.add_argument("--scheduler", choices=("fifo", "asha"), default="fifo", help="asha stops weak trials early")
    parser.add_argument("--num-samples", type=int, default=None, help="trials of an Optuna search (default: the preset's)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted study without re-running finished trials")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrialConfig field for every trial")
    parser.add_argument("--data-dir", help="dataset cache directory on each node")
    parser.add_argument("--retrain-teachers", action="store_true",
                        help="delete the study's teacher members from the store and train them again (the fix for a corrupted store)")
    parser.add_argument("--quiet", action="store_true", help="less Ray Tune output")
    return parser


def build_study(name: str, preset: Preset, args: argparse.Namespace, search=None):
    """The Study for these flags; raises ConfigError for bad input."""
    from kd_ray.study import Study

    overrides = parse_set(args.set)
    base_values = {**preset.base, **({"dataset": args.dataset} if args.dataset else {}), **overrides}
    base = TrialConfig.from_dict(base_values)
    # A flag overrides an axis or arm field too: the axis collapses to the one value given.
    axes = {k: v for k, v in preset.axes.items() if k not in overrides and not (k == "dataset" and args.dataset)}
    arms = [{k: v for k, v in arm.items() if k not in overrides} for arm in preset.arms]
    arms = [arm for i, arm in enumerate(arms) if arm and arm not in arms[:i]]
    seeds = parse_seeds(args.seeds) if args.seeds else list(range(preset.seeds))
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else preset.gpus_per_trial
    return Study(
        name=args.name or name, base=base, axes=axes, arms=arms, seeds=seeds, search=search,
        scheduler=args.scheduler, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=gpus,
        max_concurrent_trials=args.max_concurrent, storage=args.storage, resume=args.resume,
        address=args.address, data_dir=args.data_dir, retrain_teachers=args.retrain_teachers,
        verbose=0 if args.quiet else 1,
    )


def study_main(
    name: str,
    description: str,
    presets: dict[str, Preset],
    argv: list[str] | None = None,
    adapt: Callable[[Preset, argparse.Namespace], Preset] | None = None,
    search: Callable[[argparse.Namespace], Any] | None = None,
) -> int:
    """Parse flags, build and validate the study, run it, print the summary and write the report."""
    args = study_parser(description).parse_args(argv)
    try:
        preset = presets[args.preset]
        if adapt is not None:
            preset = adapt(preset, args)
        study = build_study(name, preset, args, search(args) if search else None)
        study.validate()
    except ConfigError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from kd_ray.data import DataError
    from kd_ray.teachers import TeacherStoreError

    try:
        result = study.run()
    except (ConfigError, DataError, TeacherStoreError) as exc:
        # Problems found once the study looks at its storage, data and cluster: an existing study,
        # a corrupted teacher store, missing data, too few cluster resources. No trial ran.
        print(f"{name}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if result.partial:
        return EXIT_PARTIAL
    from kd_ray import analysis

    by = list(study.axes) + sorted({k for arm in study.arms for k in arm}) or None
    print(analysis.format_summary(result.trials, by=by))
    if "://" not in result.study_dir:
        report = analysis.report(result.study_dir, by=by)
        print(f"report: {report}")
    failed = int((result.trials["status"] != "TERMINATED").sum())
    return 1 if failed else 0
