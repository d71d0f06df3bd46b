"""The ``kd-ray`` command: trial | study | analyze | teachers | validate-cluster.

Every bad input is reported as one line on stderr with exit code 2, before any compute starts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from kd_ray.atomic import is_uri
from kd_ray.config import EXIT_BAD_INPUT, ConfigError, TrialConfig, parse_set
from kd_ray.progress import printer


def _fail(message: str, command: str = "") -> int:
    # One line, whatever the error: a YAML parser's message, say, spans several.
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"kd-ray{' ' + command if command else ''}: error: {line}", file=sys.stderr)
    return EXIT_BAD_INPUT


def format_trial_table(result: dict[str, Any]) -> str:
    """Teacher and student side by side: accuracy, NLL, ECE, then the fidelity metrics."""
    rows = [
        ("test accuracy", result.get("teacher_test_acc"), result.get("test_acc")),
        ("test NLL", result.get("teacher_test_nll"), result.get("test_nll")),
        ("test ECE", result.get("teacher_test_ece"), result.get("test_ece")),
        ("test agreement", None, result.get("test_agreement")),
        ("test KL(t||s)", None, result.get("test_kl")),
        ("train agreement", None, result.get("train_agreement")),
        ("train KL(t||s)", None, result.get("train_kl")),
        ("aug-train agreement", None, result.get("aug_train_agreement")),
    ]
    if result.get("control_test_agreement") is not None:
        rows.append(("control test agreement", None, result["control_test_agreement"]))

    def cell(value: Any) -> str:
        if value is None:
            return ""
        return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"

    lines = [f"{'metric':<24}{'teacher':>10}{'student':>10}", "-" * 44]
    lines += [f"{name:<24}{cell(t):>10}{cell(s):>10}" for name, t, s in rows]
    lines.append(
        f"status {result['status']}, {result['epochs_completed']} epochs, {result['train_time_s']:.1f} s, "
        f"teacher {result['teacher_key']}, device {result['device_name']}"
    )
    if result.get("error"):
        lines.append(f"reason: {result['error']}")
    return "\n".join(lines)


def cmd_trial(args: argparse.Namespace) -> int:
    try:
        cfg = TrialConfig.from_dict(parse_set(args.set or []))
        from kd_ray.train.setup import check_runnable
        from kd_ray.train.trial import run_trial

        check_runnable(cfg)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.data_dir and Path(args.data_dir).exists() and not Path(args.data_dir).is_dir():
        return _fail(f"--data-dir {args.data_dir}: a file, not a directory")
    predictions_dir = None
    if cfg.save_predictions:
        from kd_ray.tables import PREDICTIONS_DIR

        predictions_dir = args.predictions_dir or PREDICTIONS_DIR  # ./predictions by default
        if not is_uri(predictions_dir) and Path(predictions_dir).exists() and not Path(predictions_dir).is_dir():
            return _fail(f"--predictions-dir {predictions_dir}: a file, not a directory")
    elif args.predictions_dir:
        return _fail(f"--predictions-dir {args.predictions_dir}: predictions are written only with "
                     "--set save_predictions=true")
    if args.store:
        from kd_ray.train.teachers import TeacherStore

        try:
            TeacherStore(args.store)  # an unknown URI scheme fails here, before any compute
        except (OSError, ValueError) as exc:
            return _fail(f"--store {args.store}: {exc}")
        if not is_uri(args.store) and Path(args.store).exists() and not Path(args.store).is_dir():
            return _fail(f"--store {args.store}: a file, not a directory")
    progress = None if args.quiet else printer(stderr=True)
    if progress:
        progress(f"trial: {cfg.to_json()}")
    from kd_ray.data.datasets import DataError
    from kd_ray.tables import TERMINATED
    from kd_ray.train.teachers import TeacherStoreError

    try:
        result = run_trial(cfg, store=args.store, data_dir=args.data_dir, progress=progress,
                           retrain_teachers=args.retrain_teachers, predictions_dir=predictions_dir)
    except (DataError, TeacherStoreError) as exc:
        return _fail(str(exc))
    if progress and predictions_dir and result["status"] == TERMINATED:
        from kd_ray.train.predictions import default_trial_id, predictions_path

        progress(f"per-example predictions: {predictions_path(predictions_dir, default_trial_id(cfg))}")
    print(format_trial_table(result))
    if args.json:
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}
        print(json.dumps(clean, sort_keys=True))
    return 0 if result["status"] == TERMINATED else 1


def cmd_teachers(args: argparse.Namespace) -> int:
    from kd_ray.train.teachers import TeacherStore, TeacherStoreError, default_store

    try:
        store = TeacherStore(args.store or default_store())
        # A store named on the command line must be there: a typo would otherwise list 0 members.
        if args.store and store.local and not Path(store.root).is_dir():
            found = "a file, not a directory" if Path(store.root).exists() else "no such directory"
            return _fail(f"--store {args.store}: {found}; the store is the directory that holds members/ "
                         f"(the default: {default_store()})", "teachers")
        keys = store.keys()
    except (OSError, ValueError) as exc:  # an unknown URI scheme, a bucket that cannot be reached
        return _fail(f"--store {args.store}: {exc}", "teachers")
    if args.action == "list":
        print(f"teacher store {store.uri}: {len(keys)} members")
        for key in keys:
            try:
                manifest = store.manifest(key)
            except TeacherStoreError as exc:
                print(f"{key}  BAD: {exc}")
                continue
            misplaced = store.misplaced(key, manifest)  # the manifest is read already: the check is free
            if misplaced:
                print(f"{key}  BAD: {misplaced}")
                continue
            spec = manifest["spec"]
            print(
                f"{key}  {spec['dataset']:<9} {spec['teacher_arch']:<14} split={spec['teacher_split']:<4} "
                f"seed={spec['teacher_seed']} member={spec['member']} epochs={spec['teacher_epochs']} "
                f"test_acc={manifest['metrics'].get('test_acc', float('nan')):.4f}"
            )
        return 0
    bad = 0
    for key in keys:
        problems = store.verify(key)
        if problems:
            bad += 1
            print(f"{key}: BAD: {'; '.join(problems)}")
            if args.delete_bad:
                store.delete(key)
                print(f"{key}: deleted; it is trained again when next needed")
        else:
            print(f"{key}: ok")
    print(f"{len(keys)} members checked, {bad} bad")
    return 1 if bad and not args.delete_bad else 0


def cmd_validate_cluster(args: argparse.Namespace) -> int:
    from kd_ray.study.cluster import ClusterConfigError, load_cluster_config, validate_cluster_config

    try:
        notes = validate_cluster_config(load_cluster_config(args.path), args.path)
    except ClusterConfigError as exc:
        return _fail(str(exc))
    except OSError as exc:  # a directory, an unreadable file
        return _fail(f"{args.path}: cannot read it: {exc.strerror or exc}")
    except UnicodeDecodeError:
        return _fail(f"{args.path}: not a text file (a cluster config is YAML)")
    for note in notes:
        print(note)
    print(f"{args.path}: valid")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """``study run FILE``: a study file's study, with a script's exit codes; ``study show [NAME]``: a built-in
    study as a study file on stdout, or the list of them."""
    from kd_ray.study.cli import show_study, study_file_main, study_listing

    if args.action == "run":
        return study_file_main(args)
    if args.name is None:
        print(study_listing())
        return 0
    try:
        print(show_study(args.name, args.preset, args.format, args.dataset), end="")
    except ConfigError as exc:
        return _fail(str(exc), "study")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    # Deferred: pandas, scipy and matplotlib load only for this command.
    from kd_ray import analysis

    by = None if args.by is None else [c.strip() for c in args.by.split(",") if c.strip()]
    if args.n_boot < 0:
        return _fail(f"--n-boot={args.n_boot} must be >= 0 (0: no bootstrap intervals)", "analyze")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        return _fail(f"--out {args.out}: a file, not a directory (report.md and figures/ go into it)", "analyze")
    try:
        directories = analysis.study_dirs(args.paths)
        path = analysis.report(directories, by=by, out_dir=args.out, n_boot=args.n_boot, seed=args.seed)
        # report has said on stderr what loading changed; the same tables are read again quietly.
        trials = analysis.load_trials(directories, verbose=False)
    # No tables there, a file that is not Parquet, a required column missing or mistyped, --out unwritable.
    except (OSError, ValueError) as error:
        return _fail(str(error), "analyze")
    print(analysis.format_summary(trials, by=by, verbose=False))
    print(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    trial = sub.add_parser(
        "trial", help="run one distillation trial (no Ray needed)",
        description="Train (or load) a teacher ensemble, distil one student, print its fidelity and "
        "generalization metrics. Every TrialConfig field can be set with --set key=value.",
        epilog="fields and defaults: " + ", ".join(f"{k}={v}" for k, v in TrialConfig().to_dict().items()),
    )
    trial.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a TrialConfig field, e.g. --set temperature=1 (repeatable)")
    trial.add_argument("--json", action="store_true",
                       help="print the final metrics as one JSON object on the last line")
    trial.add_argument("--store",
                       help="teacher store: directory or URI (default $KD_RAY_TEACHERS or ~/.cache/kd_ray/teachers)")
    trial.add_argument("--data-dir", help="dataset cache directory (default $KD_RAY_DATA or ~/.cache/kd_ray/data)")
    trial.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    trial.add_argument("--retrain-teachers", action="store_true",
                       help="delete and train again the trial's teacher members")
    trial.add_argument("--predictions-dir",
                       help="with --set save_predictions=true: where the final student's per-example predictions "
                            "go, as <dir>/<trial_id>.parquet (default ./predictions)")
    trial.set_defaults(func=cmd_trial)

    add_study_command(sub)

    teachers = sub.add_parser("teachers", help="list or verify the teacher store")
    teachers.add_argument("action", choices=("list", "verify"))
    teachers.add_argument("--store", help="teacher store: directory or URI")
    teachers.add_argument("--delete-bad", action="store_true",
                          help="with verify: delete members that fail their checksum or sit at another's address")
    teachers.set_defaults(func=cmd_teachers)

    cluster = sub.add_parser("validate-cluster", help="check a Ray cluster launcher config offline")
    cluster.add_argument("path", help="cluster YAML, e.g. cluster.yaml")
    cluster.set_defaults(func=cmd_validate_cluster)

    analyze = sub.add_parser(
        "analyze", help="summaries, correlations, figures and report.md for study tables",
        description="Summarize trial tables, correlate fidelity with generalization, draw the figures "
        "and write report.md next to the tables.",
    )
    analyze.add_argument("paths", nargs="+", metavar="PATH", help="study directories (<storage>/<study>/) or globs")
    analyze.add_argument("--by", default=None,
                         help="comma-separated factor columns defining the arms (default: the config columns that "
                         "vary, seeds excluded; '' for one arm)")
    analyze.add_argument("--out", default=None, type=Path,
                         help="directory for report.md and figures/ (default: next to the tables)")
    analyze.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for correlation CIs")
    analyze.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    analyze.set_defaults(func=cmd_analyze)
    return parser


def add_study_command(sub: Any) -> None:
    """``kd-ray study run FILE [flags]`` and ``kd-ray study show [NAME]``."""
    from kd_ray.study.cli import add_file_run_flags

    study = sub.add_parser(
        "study", help="run a study from a YAML or TOML file, or print a built-in study as one",
        description="Studies as files (docs/study-files.md): `kd-ray study show temperature_sweep > sweep.yaml`, "
        "edit it, `kd-ray study run sweep.yaml`. Exit codes as the studies/*.py scripts'.",
    )
    actions = study.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="run the study a YAML or TOML file describes",
                             description="Run a study file's study on Ray Tune, as a studies/*.py script runs its "
                             "preset: the same tables, summary, report and exit codes.")
    add_file_run_flags(run)
    run.set_defaults(func=cmd_study)
    show = actions.add_parser("show", help="print a built-in study as a study file (no NAME: list them)")
    show.add_argument("name", nargs="?", metavar="NAME", help="a built-in study (kd-ray study show lists them)")
    show.add_argument("--preset", choices=("local", "paper"), default="local",
                      help="the preset to print (default local)")
    show.add_argument("--format", choices=("yaml", "toml"), default="yaml", help="the file format (default yaml)")
    show.add_argument("--dataset", help="fit the preset to this dataset, as the study's script does")
    show.set_defaults(func=cmd_study)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage already; keep its code
        return int(exc.code or 0)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
