"""The command line shared by every ``studies/*.py`` script.

A study script names its study; ``study_main`` takes that study's presets from ``kd_ray.study.presets``
and holds the flags, validation, exit codes and the closing summary.
Exit codes: 0 done, 1 some trials failed, 2 bad input (nothing ran), 3 interrupted (partial),
4 the storage failed (out of space, read-only, gone): the study stopped; fix it and rerun with --resume,
5 Ray failed: it did not start, or its head was lost mid-study; restart it and rerun with --resume.
"""

from __future__ import annotations

import argparse
import sys

from kd_ray.atomic import is_uri
from kd_ray.config import DATASETS, EXIT_BAD_INPUT, EXIT_RAY, ConfigError, TrialConfig, parse_set
from kd_ray.packs.plan import PACK_MODES
from kd_ray.study.presets import STUDIES, Preset
from kd_ray.study.spec import TRACKERS
from kd_ray.study.storage import rerun_hint
from kd_ray.tables import TERMINATED

EXIT_PARTIAL = 3
EXIT_STORAGE = 4


def parse_seeds(text: str) -> list[int]:
    """``3`` means seeds 0, 1, 2; ``4,7`` means seeds 4 and 7."""
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]  # repeats are refused by Study.validate
        count = int(text)
    except ValueError:
        raise ConfigError(f"--seeds={text!r} must be a count (3) or a comma list (0,1,2)") from None
    if count < 1:
        raise ConfigError(f"--seeds={text!r} must be at least 1")
    return list(range(count))


def study_parser(description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("local", "paper"), default="local",
                        help="local: embedded data, small nets, minutes on a laptop CPU (default); "
                        "paper: CIFAR-100 recipes for a GPU cluster")
    parser.add_argument("--dataset", help=f"override the preset's dataset ({', '.join(DATASETS)})")
    parser.add_argument("--seeds", default=None,
                        help="number of seeds (3) or a list (0,1,2); default: the preset's. With --resume, more seeds "
                        "than stored grow the study: only the new seeds' trials run")
    parser.add_argument("--storage", default="results",
                        help="local directory or URI (s3://, gs://) shared by all nodes (default ./results)")
    parser.add_argument("--name", help="study name (default: the script's); tables go to <storage>/<name>/")
    parser.add_argument("--address", help="Ray cluster address ('auto' inside a cluster); default: start a local Ray")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=None,
                        help="GPUs per trial, fractional to pack trials (default: 0 local, 1 paper)")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="max trials at once (default: CPUs / cpus-per-trial)")
    parser.add_argument("--scheduler", choices=("fifo", "asha"), default="fifo", help="asha stops weak trials early")
    parser.add_argument("--pack", choices=PACK_MODES, default="auto",
                        help="auto (default): trials that share a teacher, data and batch stream train as one Ray "
                        "Tune trial, one teacher pass for all their students; off: one trial per config")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="trials of an Optuna search (default: the preset's)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted study without re-running finished trials, or grow a study "
                        "with more --seeds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrialConfig field for every trial")
    parser.add_argument("--data-dir", help="dataset cache directory on each node")
    parser.add_argument("--retrain-teachers", action="store_true",
                        help="delete the study's teacher members from the store and train them again "
                        "(the fix for a corrupted store)")
    parser.add_argument("--log", action="append", default=[], choices=tuple(TRACKERS), metavar="TRACKER",
                        help=f"also log every trial to an experiment tracker ({', '.join(TRACKERS)}); repeatable. "
                        "TensorBoard events are written always; mlflow and wandb need their extra "
                        "(pip install 'kd-ray[mlflow]')")
    parser.add_argument("--quiet", action="store_true", help="less Ray Tune output")
    return parser


def build_study(name: str, preset: Preset, args: argparse.Namespace, search=None):
    """The Study for these flags; raises ConfigError for bad input."""
    from kd_ray.study.spec import Study

    overrides = parse_set(args.set)
    base_values = {**preset.base, **({"dataset": args.dataset} if args.dataset else {}), **overrides}
    base = TrialConfig.from_dict(base_values)
    if "epochs" in overrides and "steps" not in overrides and base.steps > 0:
        raise ConfigError(
            f"epochs={overrides['epochs']} would be ignored: this preset fixes steps={base.steps} (one optimizer-step "
            "budget for every arm); set --set steps=N instead, or --set steps=0 to train by epochs"
        )
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
        trackers=list(dict.fromkeys(args.log)), verbose=0 if args.quiet else 1, pack=args.pack,
    )


def study_main(name: str, description: str | None = None, argv: list[str] | None = None) -> int:
    """Parse flags, build and validate the study ``name`` of ``kd_ray.study.presets.STUDIES``, run it, print
    the summary and write the report. ``description`` is the ``--help`` text (the script's docstring)."""
    study_presets = STUDIES[name]
    args = study_parser(description).parse_args(argv)
    try:
        preset = study_presets.presets[args.preset]
        if study_presets.adapt is not None:
            preset = study_presets.adapt(preset, args.dataset)
        search = study_presets.search(args.preset, args.dataset, args.num_samples) if study_presets.search else None
        study = build_study(name, preset, args, search)
        study.validate()
    except ConfigError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from kd_ray.data.datasets import DataError
    from kd_ray.study.runner import RayUnavailable
    from kd_ray.train.teachers import TeacherStoreError

    try:
        result = study.run()
    except (ConfigError, DataError, TeacherStoreError) as exc:
        # Problems found once the study looks at its storage, data and cluster: an existing study,
        # a resume that asks for another study, a corrupted teacher store, missing data, too few
        # cluster resources. No trial ran.
        print(f"{name}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RayUnavailable as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return EXIT_RAY
    except KeyboardInterrupt:
        # Ctrl-C (or SIGTERM, SIGHUP) outside Ray Tune's run, or a second one inside it.
        print(f"{name}: interrupted; {rerun_hint(study.study_dir)} to finish the study", file=sys.stderr)
        return EXIT_PARTIAL
    except Exception as exc:
        from kd_ray.study.guards import storage_error

        problem = storage_error(exc, study.study_dir)
        if problem is None:
            raise
        print(f"{name}: error: {problem.line_for(study.study_dir)}", file=sys.stderr)
        return EXIT_STORAGE
    if result.partial:
        return EXIT_PARTIAL
    from kd_ray import analysis

    by = list(study.axes) + sorted({k for arm in study.arms for k in arm}) or None
    print(analysis.format_summary(result.trials, by=by))
    if not is_uri(result.study_dir):
        try:
            report_path = analysis.report(result.study_dir, by=by)
        except OSError as exc:
            from kd_ray.study.guards import storage_error

            problem = storage_error(exc, result.study_dir)
            if problem is None:
                raise
            # The tables are written; only the report is missing: --resume writes it again.
            print(f"{name}: error: the tables are written, the report is not: {problem}", file=sys.stderr)
            return EXIT_STORAGE
        print(f"report: {report_path}")
    failed = int((result.trials["status"] != TERMINATED).sum())
    return 1 if failed else 0
