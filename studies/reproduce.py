"""Run every study at its local preset and report which of the paper's findings hold.

    python studies/reproduce.py                       # 10 seeds per arm, as docs/reproduction.md
    python studies/reproduce.py --seeds 3 --storage results/quick --out /tmp/reproduction.md  # a quick look

The loss-surface trial of E9 runs too (one trial, to <storage>/loss_surface/). Each study's tables
and figures go to <storage>/<study>/; the verdicts, decided by the rules in
the claims of kd_ray/findings/ (stated in the document), go to docs/reproduction.md together with the figures
and the paper-preset plan (commands, trial counts, GPU-hour estimates). Rerunning resumes: finished
studies are not run again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from kd_ray.study.presets import REPRODUCTION
from kd_ray.tables import COMPLETE, TRIALS_FILE, read_completeness

HERE = Path(__file__).resolve().parent
LOSS_SURFACE_STUDY = "loss_surface"
RUNS_FILE = "reproduce_runs.json"  # each study's wall time and exit code in the last run, for --report-only


def run_studies(storage: Path, seeds: int, extra: list[str]) -> dict[str, dict]:
    """Run each study of the reproduction (resuming any that are already there); returns wall time
    and exit code per study. Ray starts only once a study has something left to run."""
    import ray

    from kd_ray.study.cli import study_main
    from kd_ray.study.guards import local_ray_settings

    runs, started_ray = {}, False
    settings = contextlib.ExitStack()  # the local Ray's settings, restored after it stops
    try:
        for name in REPRODUCTION:
            completeness = read_completeness(str(storage / name))
            # A partial study's tables exist too (they fill as trials finish): only a complete one is skipped.
            if (storage / name / TRIALS_FILE).exists() and (completeness is None or completeness.state == COMPLETE):
                print(f"reproduce: {name} already complete in {storage / name}")
                runs[name] = {"wall_s": None, "exit": 0}
                continue
            if not started_ray:
                # As a study's own: on the loopback only, with a token made for the run.
                settings.enter_context(local_ray_settings())
                ray.init(address="local", include_dashboard=False, log_to_driver=False)  # never a stray cluster
                started_ray = True
            argv = ["--storage", str(storage), "--seeds", str(seeds), "--quiet"] + extra
            if (storage / name).exists():
                argv.append("--resume")
            print(f"reproduce: running {name} {' '.join(argv)}", flush=True)
            started = time.perf_counter()
            code = study_main(name, argv=argv)
            runs[name] = {"wall_s": time.perf_counter() - started, "exit": code}
            print(f"reproduce: {name} finished with exit code {code} in {runs[name]['wall_s']:.0f} s", flush=True)
    finally:
        if started_ray:
            ray.shutdown()
        settings.close()
    return runs


def run_loss_surface(storage: Path) -> dict:
    """E9: one trial's loss plane at the local preset (a trial, not a grid: Ray is not needed)."""
    from kd_ray import loss_surface
    from kd_ray.tables import LOSS_SURFACE_FILE

    out = storage / LOSS_SURFACE_STUDY
    if (out / LOSS_SURFACE_FILE).exists():
        print(f"reproduce: {LOSS_SURFACE_STUDY} already complete in {out}")
        return {"wall_s": None, "exit": 0}
    preset = loss_surface.PRESETS["local"]
    print(f"reproduce: running {LOSS_SURFACE_STUDY}", flush=True)
    started = time.perf_counter()
    loss_surface.run(loss_surface.preset_config("local"), out, preset.grid, preset.margin)
    return {"wall_s": time.perf_counter() - started, "exit": 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds per arm (default 10)")
    parser.add_argument("--storage", default="results/reproduction", help="where the study tables go")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "reproduction.md"), help="the document to write")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every study")
    parser.add_argument("--report-only", action="store_true",
                        help="skip running; write the document from existing tables")
    args = parser.parse_args(argv)
    if args.seeds < 3:
        print("reproduce: error: --seeds must be at least 3 (confidence intervals need replicates)", file=sys.stderr)
        return 2
    storage = Path(args.storage).resolve()
    extra = [x for pair in (("--set", s) for s in args.set) for x in pair]
    runs_file = storage / RUNS_FILE
    if args.report_only:
        # The document's Runs table says how each study was last run, by the run that ran it.
        runs = json.loads(runs_file.read_text()) if runs_file.is_file() else {}
    else:
        runs = run_studies(storage, args.seeds, extra)
        runs[LOSS_SURFACE_STUDY] = run_loss_surface(storage)
        storage.mkdir(parents=True, exist_ok=True)
        runs_file.write_text(json.dumps(runs, indent=1))

    from kd_ray import reproduction

    out = Path(args.out)
    reproduction.write_document(storage, out, runs, args.seeds, figures_dir=out.parent / "figures" / "reproduction")
    print(f"reproduce: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
