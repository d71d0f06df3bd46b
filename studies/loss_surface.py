"""E9 (paper Fig. 6c): the distillation loss surface on the plane through the teacher, the student's
initial weights and the final student.

One self-distillation trial of the initialization study's recipe (group norm, m = 1, tau = 1): the
teacher from the teacher store, the student trained and kept at its start and its end, then the
distillation loss and the train agreement on a grid over the plane. Writes
<storage>/<name>/loss_surface.parquet and loss_surface.png. Optimization, not the loss, keeps the
student from its teacher when the final student sits in a basin apart from the teacher's.

    python studies/loss_surface.py                    # local: mnist1d MLPs, seconds
    python studies/loss_surface.py --preset paper     # PreResNet-20 with GroupNorm on CIFAR-100, one GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kd_ray.config import EXIT_BAD_INPUT, ConfigError, parse_set
from kd_ray.loss_surface import PRESETS, check_config, preset_config, run
from kd_ray.progress import printer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="local",
                        help="local: mnist1d MLPs on a CPU (default); paper: PreResNet-20 on CIFAR-100")
    parser.add_argument("--grid", type=int, default=None, help="grid points per axis (default: the preset's)")
    parser.add_argument("--margin", type=float, default=None,
                        help="how far the grid reaches beyond the three points, a fraction of their span")
    parser.add_argument("--storage", default="results", help="local directory (default ./results)")
    parser.add_argument("--name", default="loss_surface", help="the output goes to <storage>/<name>/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrialConfig field")
    parser.add_argument("--data-dir", help="dataset cache directory")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    grid = preset.grid if args.grid is None else args.grid
    margin = preset.margin if args.margin is None else args.margin
    try:
        cfg = preset_config(args.preset, parse_set(args.set))
        check_config(cfg, grid, margin)
    except ConfigError as exc:
        print(f"loss_surface: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from kd_ray.data.datasets import DataError
    from kd_ray.train.teachers import TeacherStoreError

    try:
        result = run(cfg, Path(args.storage) / args.name, grid, margin, data_dir=args.data_dir,
                     progress=None if args.quiet else printer("loss_surface"))
    except (DataError, TeacherStoreError) as exc:
        print(f"loss_surface: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    points = ", ".join(f"{name} ({a:.3g}, {b:.3g})" for name, (a, b) in result.plane.points.items())
    print(f"plane: {points}")
    for name, (a, b) in result.plane.points.items():
        row = result.table[(result.table["a"] == a) & (result.table["b"] == b)].iloc[0]
        print(f"{name}: distillation loss {row['loss']:.4f}, train agreement {row['agreement']:.4f}")
    print(f"table: {result.table_path}")
    print(f"figure: {result.figure_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
