"""docs/reproduction.md: the verdict on each of the paper's findings, and the paper-preset plan.

The verdicts come from ``findings.evaluate`` over the local-preset tables; nothing is decided by
hand. The plan counts each study's paper-preset trials and estimates GPU-hours from the FLOPs of
the models (counted by torch's FlopCounterMode), the data sizes and epochs, at a stated sustained
GPU throughput; replace it with the per-epoch times of a first real run (``epochs.parquet``).
"""

from __future__ import annotations

import functools
import itertools
import time
from pathlib import Path

import pandas as pd

from kd_ray import analysis, findings
from kd_ray.atomic import write_bytes, write_text
from kd_ray.config import TrialConfig
from kd_ray.presets import REPRODUCTION, STUDIES
from kd_ray.provenance import versions

SUSTAINED_GPU_FLOPS = 10e12  # assumed: an A10G (g5) training small CIFAR ResNets in bf16, ~8% of its peak
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000


@functools.lru_cache(maxsize=None)
def _flops_per_image(arch: str, train: bool) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from kd_ray.models import build_model

    model = build_model(arch, (3, 32, 32), 100)
    x = torch.rand(2, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        if train:
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops() / 2


def paper_plan() -> list[dict]:
    """Per study of the reproduction: the command, the number of trials and a FLOP-based GPU-hour estimate."""
    # Deferred: the teacher module imports torch, which writing the verdicts does not need.
    from kd_ray.teachers import needed_members

    rows = []
    for name in REPRODUCTION:
        study = STUDIES[name]
        preset = study.presets["paper"]
        if study.adapt is not None:
            preset = study.adapt(preset, None)
        grid = [dict(zip(preset.axes, values)) for values in itertools.product(*preset.axes.values())] or [{}]
        arms = preset.arms or [{}]
        configs = [TrialConfig.from_dict({**preset.base, **arm, **point}) for arm in arms for point in grid]
        trials = len(configs) * preset.seeds
        gpu_seconds = 0.0
        for cfg in configs:
            fraction = cfg.distill_fraction * (0.5 if cfg.teacher_split == "half" else 1.0)
            images = CIFAR_TRAIN * fraction * cfg.epochs
            per_image = _flops_per_image(cfg.student_arch, True) + cfg.teacher_members * _flops_per_image(
                cfg.teacher_arch, False
            )
            factor = 2 if cfg.control else 1
            gpu_seconds += preset.seeds * factor * images * per_image / SUSTAINED_GPU_FLOPS
        # Every member once, control members included: the store shares them between trials and seeds.
        members = needed_members(configs)
        for member in members.values():
            teacher = member.cfg
            images = CIFAR_TRAIN * (0.5 if teacher.teacher_split == "half" else 1.0) * teacher.teacher_fraction
            gpu_seconds += images * teacher.teacher_epochs * _flops_per_image(teacher.teacher_arch, True) / (
                SUSTAINED_GPU_FLOPS
            )
        rows.append({
            "study": name, "trials": trials, "teacher members": len(members), "GPU-hours (est.)": gpu_seconds / 3600,
            "command": f"python studies/{name}.py --preset paper --address auto --storage s3://BUCKET/kd "
                       f"--gpus-per-trial {preset.gpus_per_trial:g}",
        })
    return rows


def _copy_figure(storage: Path, study: str, figure: str | None, figures_dir: Path) -> str | None:
    if figure is None:
        return None
    source = storage / study / "figures" / figure
    if not source.exists():
        return None
    target = figures_dir / f"{study}__{figure}"
    write_bytes(target, source.read_bytes())
    return target.name


def _provenance(storage: Path) -> str:
    frames = [analysis.load_trials(d) for d in sorted(storage.iterdir()) if (d / analysis.TRIALS_FILE).exists()]
    if not frames:
        return "no tables found"
    trials = pd.concat(frames, ignore_index=True)
    shas = ", ".join(sorted(set(trials["git_sha"].dropna().astype(str))))
    devices = ", ".join(sorted(set(trials["device_name"].dropna().astype(str))))
    usable = int(trials["usable"].sum())
    hours = trials["train_time_s"].sum() / 3600
    return (f"{len(trials)} trials ({usable} usable) in {len(frames)} studies; {hours:.2f} trial-hours; "
            f"git {shas}; devices {devices}; torch {trials['torch_version'].dropna().iloc[0]}, "
            f"ray {trials['ray_version'].dropna().iloc[0]}")


def write_document(storage: Path, out: Path, runs: dict, seeds: int, figures_dir: Path) -> None:
    results = findings.judge_findings(storage)
    rel = Path("figures") / figures_dir.name
    lines = [
        "# Reproduction at laptop scale",
        "",
        "Every study of `studies/` run at its `local` preset (mnist1d with MLPs; digits 8×8 images for the",
        f"augmentation policies), {seeds} seeds per arm, by `python studies/reproduce.py`. The verdicts below are",
        "computed by `kd_ray/findings.py` from the trial tables; none is set by hand.",
        "",
        "## The rule",
        "",
        "Each arm's metric is summarised by its mean over seeds and the 95% t-interval of that mean. A",
        "finding that claims a difference **holds** when the intervals of the two arms do not overlap and the",
        "difference points the claimed way, **does not hold** when they do not overlap and it points the other",
        "way, and is **inconclusive** when they overlap. A finding that claims *no* difference (\"does not help\",",
        "\"does not change\") holds unless the claimed-absent gain is clearly there. A finding with several parts",
        "holds only if every part holds. Findings 1, 12 and 15 add stated thresholds (99% agreement; the",
        "largest adjacent jump in λ at least half of the whole rise; control agreement at least 90% of the real",
        "student's).",
        "",
        "## Scale and difficulty",
        "",
        "The paper's CIFAR-100 teachers reach about 70–77% accuracy, so fidelity is far from perfect. The local",
        "preset is chosen to sit in the same regime, not to make verdicts agree with the paper: an MLP on",
        "mnist1d (1-D signals, 4,000 training examples) reaches about 77% test accuracy, against about 99% for",
        "a 1-D convnet, on which agreement is near 100% everywhere and the effects vanish. The augmentation",
        "ablation needs images and uses digits (8×8, 1,437 training images), where even an MLP teacher is above",
        "95%: its agreement effects are compressed near 100% and its verdicts are weaker evidence.",
        "",
        "## Verdicts",
        "",
        "| # | finding | study | verdict |",
        "|---|---|---|---|",
    ]
    for finding, verdict in results:
        lines.append(f"| {finding.number} | {finding.claim} | {finding.study or '—'} | **{verdict.verdict}** |")
    counts = pd.Series([v.verdict for _, v in results]).value_counts()
    lines += ["", "Totals: " + ", ".join(f"{k}: {v}" for k, v in counts.items()) + ".", ""]
    for finding, verdict in results:
        lines += [f"### Finding {finding.number}: {verdict.verdict}", "", finding.claim, ""]
        if finding.study is None or verdict.verdict == findings.NOT_COVERED:
            lines += [f"Not covered: {verdict.evidence[0] if verdict.evidence else finding.why_not_covered}.", ""]
            continue
        lines += [f"- Study: `{finding.study}`; setting: {finding.setting}.", f"- Rule: {finding.rule}.",
                  "- Measured (mean ± sd over seeds):"]
        lines += [f"  - {item}" for item in verdict.evidence]
        figure = _copy_figure(storage, finding.study, finding.figure, figures_dir)
        if figure:
            lines += ["", f"![{finding.study}]({rel / figure})"]
        lines.append("")
    lines += ["## Runs", "", "| study | wall time | exit code |", "|---|---|---|"]
    for name, run in runs.items():
        wall = "resumed/complete" if run["wall_s"] is None else f"{run['wall_s'] / 60:.1f} min"
        lines.append(f"| {name} | {wall} | {run['exit']} |")
    lines += ["", f"Provenance: {_provenance(storage)}. Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
              f"by kd_ray {versions()['kd_ray_version']}.", ""]
    plan = paper_plan()
    total = sum(row["GPU-hours (est.)"] for row in plan)
    lines += [
        "## The paper preset on a GPU cluster",
        "",
        "CIFAR-100, PreResNet-56 ensembles (PreResNet-20 where the paper uses it), the paper's recipes. Start the",
        "cluster with `ray up cluster.yaml`, then submit each command with `ray submit cluster.yaml ... --`.",
        "GPU-hours are estimated from the models' FLOPs (student forward + backward and every teacher member's",
        "forward per image, plus training each teacher member once) at an assumed sustained "
        f"{SUSTAINED_GPU_FLOPS / 1e12:.0f}",
        "TFLOP/s per GPU; no GPU was available to measure per-epoch times, so read these as planning figures and",
        "replace them with the `train_time_s` per epoch of the first trials of a real run.",
        "",
        "| study | trials | teacher members | GPU-hours (est.) | command |",
        "|---|---|---|---|---|",
    ]
    for row in plan:
        lines.append(f"| {row['study']} | {row['trials']} | {row['teacher members']} | "
                     f"{row['GPU-hours (est.)']:.0f} | `{row['command']}` |")
    lines += ["", f"Total: about {total:.0f} GPU-hours.", ""]
    write_text(out, "\n".join(lines))
