"""The command line shared by every ``studies/*.py`` script, and by ``kd-ray study run | show``.

A study script names its study; ``study_main`` takes that study's presets from ``kd_ray.study.presets``
and holds the flags, validation, exit codes and the closing summary. ``study_file_main`` builds the study
from a study file (``kd_ray.study.files``) instead, then runs and reports it the same way
(``run_and_report``); ``show_study`` writes a built-in study as such a file. ``--set`` gives a field one
value; ``--grid key=v1,v2`` makes it an axis that replaces the axis of that name and is crossed with the
others and the arms (``apply_grid``).
Exit codes: 0 done, 1 some trials failed, 2 bad input (nothing ran), 3 interrupted (partial),
4 the storage failed (out of space, read-only, gone): the study stopped; fix it and rerun with --resume,
5 Ray failed: it did not start, or its head was lost mid-study; restart it and rerun with --resume.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import sys

from kd_ray.atomic import is_uri
from kd_ray.config import DATASETS, EXIT_BAD_INPUT, EXIT_RAY, ConfigError, TrialConfig, parse_set
from kd_ray.packs.plan import PACK_MODES
from kd_ray.study.files import read_study_file, study_document, to_toml, to_yaml
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
                        help="auto (default): trials that share a student network train as one Ray Tune trial, one "
                        "teacher pass per step for all their students (MLP students of other seeds, policies or "
                        "data too, each fed its own batches); off: one trial per config")
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
    add_grid_flag(parser, "the preset's")
    parser.add_argument("--quiet", action="store_true", help="less Ray Tune output")
    return parser


# --- --set and --grid: what the flags make of a preset's (or a file's) base, axes and arms ---------------


def parse_grid(expressions: list[str]) -> dict[str, list[str]]:
    """``--grid key=v1,v2,...`` (repeatable) as {key: [values as text]}; values are typed later."""
    grid: dict[str, list[str]] = {}
    for expr in expressions:
        key, sep, text = expr.partition("=")
        key = key.strip()
        values = [value.strip() for value in text.split(",") if value.strip()]
        if not sep or not key or not values:
            raise ConfigError(f"--grid expects key=v1,v2,... with at least one value, got {expr!r}")
        if key == "seed":
            raise ConfigError(f"--grid {expr!r}: seeds are set by --seeds; allowed: --seeds 3 (seeds 0, 1, 2) or "
                              f"--seeds 0,4,7, and --grid on any other TrialConfig field")
        if key not in TrialConfig.field_names():
            try:
                TrialConfig.from_dict({key: None})
            except ConfigError as exc:  # the did-you-mean error, named as the flag's
                raise ConfigError(f"--grid {key}: {exc}") from None
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice; allowed: each key once, with all its values "
                              f"(--grid {key}=v1,v2,...)")
        grid[key] = values
    return grid


def apply_sets(base_values: dict, axes: dict, arms: list[dict], sets: list[str],
               dataset: str | None = None) -> tuple[TrialConfig, dict, list[dict], dict]:
    """The base with ``--dataset`` and ``--set`` applied, and the axes and arms without the fields they
    set: a flag overrides an axis or arm field too, and the axis collapses to the one value given.
    Returns the base, axes, arms and the --set values."""
    overrides = parse_set(sets)
    base = TrialConfig.from_dict({**base_values, **({"dataset": dataset} if dataset else {}), **overrides})
    if "epochs" in overrides and "steps" not in overrides and base.steps > 0:
        raise ConfigError(
            f"epochs={overrides['epochs']} would be ignored: this preset fixes steps={base.steps} (one optimizer-step "
            "budget for every arm); set --set steps=N instead, or --set steps=0 to train by epochs"
        )
    axes = {k: v for k, v in axes.items() if k not in overrides and not (k == "dataset" and dataset)}
    arms = [{k: v for k, v in arm.items() if k not in overrides} for arm in arms]
    arms = [arm for i, arm in enumerate(arms) if arm and arm not in arms[:i]]
    return base, axes, arms, overrides


def apply_grid(grids: list[str], base: TrialConfig, axes: dict, arms: list[dict], fixed: dict[str, str],
               source: str) -> tuple[dict, str | None]:
    """The axes with each ``--grid`` axis in: it replaces the axis of its name (``source``'s, e.g. "the
    preset's") and is crossed with the others and the arms. A field an arm sets, or one of ``fixed`` (field:
    the flag that gives it one value), is refused. Returns the axes and the line that says what the grid
    became (None without --grid)."""
    grid = parse_grid(grids)
    if not grid:
        return axes, None
    armed = sorted({key for arm in arms for key in arm})
    typed: dict[str, list] = {}
    for key, texts in grid.items():
        if key in fixed:
            raise ConfigError(f"--grid {key} is also given one value by {fixed[key]}; allowed: one of them (--set "
                              f"for one value, --grid for several)")
        if key in armed:
            raise ConfigError(f"--grid {key}: an arm of this study sets {key}; allowed: --grid on a field no arm sets "
                              f"(the arms set {', '.join(armed)})")
        typed[key] = [grid_value(key, text, base, arms) for text in texts]
        repeated = sorted({repr(v) for v in typed[key] if typed[key].count(v) > 1})
        if repeated:
            raise ConfigError(f"--grid {key}={','.join(texts)} repeats {', '.join(repeated)}; allowed: distinct values")
    crossed = {**axes, **typed}  # a replaced axis keeps its place; a new one comes last
    return crossed, grid_line(axes, typed, crossed, arms, source)


def grid_value(key: str, text: str, base: TrialConfig, arms: list[dict]) -> object:
    """``text`` as the field's type, judged beside the base or beside an arm (a value may need one)."""
    error: ConfigError | None = None
    for context in [{}] + arms:
        try:
            return getattr(TrialConfig.from_dict({**base.to_dict(), **context, key: text}), key)
        except ConfigError as exc:
            error = error or exc
    raise ConfigError(f"--grid {key}={text}: {error}")


def grid_line(axes: dict, typed: dict, crossed: dict, arms: list[dict], source: str) -> str:
    """E.g. "grid: temperature [1.0, 4.0] replaces the preset's [1.0, 4.0, 8.0, 16.0]; crossed with
    teacher_members [1, 3, 5]: 6 configs per seed"."""
    parts = [f"{key} {values} replaces {source} {axes[key]}" if key in axes else f"{key} {values} (a new axis)"
             for key, values in typed.items()]
    others = [f"{key} {values}" for key, values in crossed.items() if key not in typed]
    others += [f"{len(arms)} arms"] if arms else []
    configs = max(1, len(arms))
    for values in crossed.values():
        configs *= len(values)
    crossing = f"crossed with {', '.join(others)}" if others else "no other axis or arm"
    return f"grid: {'; '.join(parts)}; {crossing}: {configs} configs per seed"


# --- a study from a script's preset --------------------------------------------------------------------


def build_study(name: str, preset: Preset, args: argparse.Namespace, search=None):
    """The Study for a script's flags, and the line that says what --grid made of the grid (None without
    it); raises ConfigError for bad input."""
    from kd_ray.study.spec import Study

    base, axes, arms, overrides = apply_sets(preset.base, preset.axes, preset.arms, args.set, args.dataset)
    fixed = {key: f"--set {key}={value}" for key, value in overrides.items()}
    fixed.update({"dataset": f"--dataset {args.dataset}"} if args.dataset else {})
    axes, line = apply_grid(args.grid, base, axes, arms, fixed, "the preset's")
    seeds = parse_seeds(args.seeds) if args.seeds else list(range(preset.seeds))
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else preset.gpus_per_trial
    study = Study(
        name=args.name or name, base=base, axes=axes, arms=arms, seeds=seeds, search=search,
        scheduler=args.scheduler, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=gpus,
        max_concurrent_trials=args.max_concurrent, storage=args.storage, resume=args.resume,
        address=args.address, data_dir=args.data_dir, retrain_teachers=args.retrain_teachers,
        trackers=list(dict.fromkeys(args.log)), verbose=0 if args.quiet else 1, pack=args.pack,
    )
    return study, line


def preset_study(name: str, args: argparse.Namespace):
    """The study ``name`` of ``kd_ray.study.presets.STUDIES`` as a script's flags ask for it: the preset,
    fitted to ``--dataset``, its search if it has one. Returns the study and the --grid line."""
    study_presets = STUDIES[name]
    preset = study_presets.presets[args.preset]
    if study_presets.adapt is not None:
        preset = study_presets.adapt(preset, args.dataset)
    search = study_presets.search(args.preset, args.dataset, args.num_samples) if study_presets.search else None
    return build_study(name, preset, args, search)


# --- running a built study: the same for a script and a study file ----------------------------------


def run_and_report(label: str, study) -> int:
    """Run a validated study, print its summary and write its report; the exit code. ``label`` begins
    every error line (the script's name, or ``kd-ray study``)."""
    from kd_ray.data.datasets import DataError
    from kd_ray.study.runner import RayUnavailable
    from kd_ray.train.teachers import TeacherStoreError

    try:
        result = study.run()
    except (ConfigError, DataError, TeacherStoreError) as exc:
        # Problems found once the study looks at its storage, data and cluster: an existing study,
        # a resume that asks for another study, a corrupted teacher store, missing data, too few
        # cluster resources. No trial ran.
        print(f"{label}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RayUnavailable as exc:
        print(f"{label}: error: {exc}", file=sys.stderr)
        return EXIT_RAY
    except KeyboardInterrupt:
        # Ctrl-C (or SIGTERM, SIGHUP) outside Ray Tune's run, or a second one inside it.
        print(f"{label}: interrupted; {rerun_hint(study.study_dir)} to finish the study", file=sys.stderr)
        return EXIT_PARTIAL
    except Exception as exc:
        from kd_ray.study.guards import storage_error

        problem = storage_error(exc, study.study_dir)
        if problem is None:
            raise
        print(f"{label}: error: {problem.line_for(study.study_dir)}", file=sys.stderr)
        return EXIT_STORAGE
    if result.partial:
        return EXIT_PARTIAL
    return report(label, study, result)


def report(label: str, study, result) -> int:
    """The summary of a finished study on stdout and its report.md; 1 if some trials failed."""
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
            print(f"{label}: error: the tables are written, the report is not: {problem}", file=sys.stderr)
            return EXIT_STORAGE
        print(f"report: {report_path}")
    failed = int((result.trials["status"] != TERMINATED).sum())
    return 1 if failed else 0


def study_main(name: str, description: str | None = None, argv: list[str] | None = None) -> int:
    """Parse flags, build and validate the study ``name`` of ``kd_ray.study.presets.STUDIES``, run it, print
    the summary and write the report. ``description`` is the ``--help`` text (the script's docstring)."""
    args = study_parser(description).parse_args(argv)
    try:
        study, line = preset_study(name, args)
        study.validate()
    except ConfigError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if line:
        print(line)
    return run_and_report(name, study)


# --- a study from a file: kd-ray study run | show -----------------------------------------------------

FILE_LABEL = "kd-ray study"


def add_file_run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``kd-ray study run FILE``; a flag given replaces the file's value, one left out keeps it."""
    parser.add_argument("file", metavar="FILE", help="study file: .yaml, .yml or .toml (layout: docs/study-files.md)")
    parser.add_argument("--name", help="study name (default: the file's name: key); tables go to <storage>/<name>/")
    parser.add_argument("--storage", default=None,
                        help="local directory or URI (s3://, gs://) shared by all nodes (default: the file's, "
                        "else ./results)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted study, or grow it with more --seeds")
    parser.add_argument("--seeds", default=None, help="number of seeds (3) or a list (0,1,2); default: the file's")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrialConfig field for every trial (an axis or arm field collapses to it)")
    add_grid_flag(parser, "the file's")
    parser.add_argument("--log", action="append", default=[], choices=tuple(TRACKERS), metavar="TRACKER",
                        help=f"also log every trial to {', '.join(TRACKERS)} (repeatable; added to the file's)")
    parser.add_argument("--address", help="Ray cluster address ('auto' inside a cluster); default: start a local Ray")
    parser.add_argument("--pack", choices=PACK_MODES, default=None, help="auto or off (default: the file's, else auto)")
    parser.add_argument("--data-dir", help="dataset cache directory on each node")
    parser.add_argument("--retrain-teachers", action="store_true",
                        help="delete the study's teacher members from the store and train them again")
    parser.add_argument("--quiet", action="store_true", help="less Ray Tune output")


def add_grid_flag(parser: argparse.ArgumentParser, source: str) -> None:
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help=f"an axis of these values (repeatable): it replaces {source} axis of that name and is "
                        "crossed with the other axes and the arms; a field an arm or --set sets is refused")


def file_study(args: argparse.Namespace):
    """The Study that a study file and the flags of ``kd-ray study run`` ask for, and the --grid line."""
    from kd_ray.study.spec import Study

    spec_file = read_study_file(args.file)
    name = args.name or spec_file.name
    if not name:
        raise ConfigError(f"{args.file}: the study has no name; allowed: a top-level name: key in the file, or "
                          f"--name NAME")
    base, axes, arms, overrides = apply_sets(spec_file.base, spec_file.axes, spec_file.arms, args.set)
    fixed = {key: f"--set {key}={value}" for key, value in overrides.items()}
    axes, line = apply_grid(args.grid, base, axes, arms, fixed, "the file's")
    settings = dict(spec_file.settings)
    flags = {"storage": args.storage, "pack": args.pack}
    settings.update({key: value for key, value in flags.items() if value is not None})
    settings["trackers"] = list(dict.fromkeys([*settings.get("trackers", []), *args.log]))
    seeds = parse_seeds(args.seeds) if args.seeds else spec_file.seeds or [0]
    study = Study(
        name=name, base=base, axes=axes, arms=arms, seeds=seeds, search=spec_file.search, resume=args.resume,
        address=args.address, data_dir=args.data_dir, retrain_teachers=args.retrain_teachers,
        verbose=0 if args.quiet else 1, **settings,
    )
    return study, line


def study_file_main(args: argparse.Namespace) -> int:
    """``kd-ray study run FILE``: the study file's study, run as a script runs its preset's; the same exit codes."""
    try:
        study, line = file_study(args)
    except ConfigError as exc:
        print(f"{FILE_LABEL}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        study.validate()
    except ConfigError as exc:  # a rule across fields or trials: the file, not one line of it
        print(f"{FILE_LABEL}: error: {args.file}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if line:
        print(line)
    return run_and_report(FILE_LABEL, study)


def show_study(name: str, preset: str = "local", file_format: str = "yaml", dataset: str | None = None) -> str:
    """The built-in study ``name`` as a study file, with a header that says how to run it; ConfigError for an
    unknown study."""
    if name not in STUDIES:
        close = difflib.get_close_matches(name, list(STUDIES), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"study {name!r} is not a built-in study; {hint}allowed: {', '.join(STUDIES)}")
    argv = ["--preset", preset, *(["--dataset", dataset] if dataset else [])]
    # The preset's notes on what it leaves out for the dataset go to stderr: stdout is the file.
    with contextlib.redirect_stdout(sys.stderr):
        study, _ = preset_study(name, study_parser(None).parse_args(argv))
    header = [
        f"The built-in study {name}, as python studies/{name}.py {' '.join(argv)} runs it.",
        "Run it with: kd-ray study run FILE   (--set KEY=VALUE and --grid KEY=V1,V2 change it there).",
        "Layout: docs/study-files.md. Fields the base leaves out keep TrialConfig's defaults (kd-ray trial --help).",
    ]
    # The base as the preset writes it (its fields, at their defaults too), and whatever the flags changed.
    named = (*STUDIES[name].presets[preset].base, "dataset")
    document = study_document(study, named)
    return to_toml(document, header) if file_format == "toml" else to_yaml(document, header)


def study_listing() -> str:
    """One line per built-in study: its name and what its local preset varies."""
    lines = []
    for name, study_presets in STUDIES.items():
        local = study_presets.presets["local"]
        if study_presets.search is not None:
            varies = "an Optuna search"
        else:
            armed = sorted({key for arm in local.arms for key in arm})
            varies = " x ".join([*local.axes, *([f"arms of {', '.join(armed)}"] if armed else [])])
        lines.append(f"{name:<24} {varies}")
    lines.append("kd-ray study show NAME [--preset local|paper] [--format yaml|toml] prints one as a study file")
    return "\n".join(lines)
