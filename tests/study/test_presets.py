"""Tests for kd_ray.study.presets: the registry every study script, the reproduction and its plan read."""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kd_ray.config import TrialConfig
from kd_ray.study import OptunaSpec, presets
from kd_ray.study.presets import (
    OOD_ARM,
    REPRODUCTION,
    STUDIES,
    Preset,
    drop_extra_data_if_not_generative,
    keep_applicable_policies,
)

REPO = Path(__file__).resolve().parents[2]


def _configs(preset: Preset) -> list[TrialConfig]:
    grid = [dict(zip(preset.axes, values)) for values in itertools.product(*preset.axes.values())] or [{}]
    return [TrialConfig.from_dict({**preset.base, **arm, **point}) for arm in preset.arms or [{}] for point in grid]


def _load_reproduce():
    spec = importlib.util.spec_from_file_location("kd_ray_reproduce_script", REPO / "studies" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(STUDIES))
def test_every_study_has_a_local_and_a_paper_preset_of_valid_configs(name):
    study = STUDIES[name]
    assert set(study.presets) == {"local", "paper"}
    local, paper = study.presets["local"], study.presets["paper"]
    assert local.gpus_per_trial == 0 and paper.gpus_per_trial == 1.0
    assert local.seeds >= 1 and paper.seeds >= local.seeds
    assert TrialConfig.from_dict(local.base).dataset in ("mnist1d", "digits", "mnist")  # no download, no GPU
    # E2's paper setting is MNIST's (a LeNet-5 teacher); every other study's is CIFAR-100.
    assert TrialConfig.from_dict(paper.base).dataset == ("mnist_full" if name == "small_teacher" else "cifar100")
    for preset in (local, paper):
        configs = _configs(preset)
        assert len(set(configs)) == len(configs) >= 1  # every arm x axis point is its own trial
        assert not set(preset.axes) & {k for arm in preset.arms for k in arm}
    if study.search is not None:
        for preset_name in ("local", "paper"):
            search = study.search(preset_name, None, None)
            assert isinstance(search, OptunaSpec) and search.num_samples >= 1
            for field_name in search.space:
                assert field_name in TrialConfig.field_names()


def test_the_registry_is_in_the_order_of_the_reproduction():
    assert REPRODUCTION == ("augmentation_ablation", "temperature_sweep", "dataset_size", "synthetic_data",
                            "training_duration", "initialization", "ensemble_size", "alpha_sweep", "small_teacher",
                            "student_capacity", "augmentation_convnet")
    assert list(STUDIES)[: len(REPRODUCTION)] == list(REPRODUCTION)
    # The search and the divergence study judge no finding of the paper.
    assert [name for name in STUDIES if name not in REPRODUCTION] == ["divergence", "optuna_search"]
    # loss_surface.py evaluates one trial's loss plane, not a grid of trials: it has its own presets.
    scripts = sorted(p.stem for p in (REPO / "studies").glob("*.py") if p.stem not in ("reproduce", "loss_surface"))
    assert scripts == sorted(STUDIES)


def test_the_capacity_study_varies_depth_and_width_around_the_teacher():
    from kd_ray.data.datasets import DATASET_INFO
    from kd_ray.models.archs import check_arch

    capacity = STUDIES["student_capacity"]
    local, paper = capacity.presets["local"], capacity.presets["paper"]
    assert local.base["teacher_arch"] == "mlp" and local.base["teacher_members"] == 1
    assert "student_arch" not in local.base  # the axis decides it
    students = local.axes["student_arch"]
    assert len(students) == len(set(students)) == 6 and "mlp" in students  # the teacher-sized student
    assert {"mlp1", "mlp4", "mlp2-w2", "mlp4-w2", "mlp1-w2"} <= set(students)
    for arch in students:
        check_arch(arch, DATASET_INFO[local.base["dataset"]].input_shape)
    assert [(arm["teacher_arch"], arm["student_arch"]) for arm in paper.arms] == [
        ("preresnet20", "preresnet20"), ("preresnet20", "preresnet56"),
        ("preresnet56", "preresnet56"), ("preresnet56", "preresnet110")]
    assert TrialConfig.from_dict(paper.base).teacher_members == local.base["teacher_members"]
    assert "student_capacity" in REPRODUCTION and "augmentation_convnet" in STUDIES


def test_the_divergence_study_crosses_every_loss_with_two_temperatures_outside_the_reproduction():
    from kd_ray.config import LOSSES

    study = STUDIES["divergence"]
    local, paper = study.presets["local"], study.presets["paper"]
    assert not study.in_reproduction and "divergence" not in REPRODUCTION
    for preset in (local, paper):
        assert preset.axes == {"loss": list(LOSSES), "temperature": [1.0, 4.0]} and preset.seeds == 3
        assert not preset.arms
        configs = _configs(preset)
        assert sorted({cfg.loss for cfg in configs}) == sorted(LOSSES) and len(configs) == 2 * len(LOSSES)
    assert local.base == presets.LOCAL_BASE and paper.base == presets.PAPER_BASE
    assert TrialConfig.from_dict(paper.base).dataset == "cifar100"


def test_the_small_teacher_sees_200_inputs_and_every_arm_the_same_step_budget():
    from kd_ray.data.splits import split_indices
    from kd_ray.train.setup import check_runnable, data_sizes

    study = STUDIES["small_teacher"]
    local, paper = study.presets["local"], study.presets["paper"]
    train_sizes = {"mnist": 4_000, "mnist1d": 4_000, "mnist_full": 60_000}
    for preset in (local, paper):
        configs = _configs(preset)
        assert len({c.steps for c in configs}) == 1 and configs[0].steps > 0  # same optimizer steps for every arm
        for cfg in configs:
            y = np.repeat(np.arange(10), train_sizes[cfg.dataset] // 10)
            teacher_idx, _ = split_indices(y, teacher_split=cfg.teacher_split, distill_split="train",
                                           distill_fraction=1.0, data_seed=0, seed=0, val_fraction=cfg.val_fraction,
                                           teacher_fraction=cfg.teacher_fraction)
            assert len(teacher_idx) == data_sizes(cfg).teacher == 200
            check_runnable(cfg, check_device=False)
    lenet = [c for c in _configs(local) if c.dataset == "mnist"]
    assert {(c.teacher_arch, c.student_arch) for c in lenet} == {("lenet5", "lenet5")}
    assert sorted(c.distill_split for c in lenet) == ["both", "train"]
    # The large in-domain arm: 200 mnist1d signals for the teacher, over 200x as many for the student.
    (large,) = [c for c in _configs(local) if c.dataset == "mnist1d"]
    assert data_sizes(large).distill == 200 + 40_000 and large.extra_source == "generator"
    assert [(c.distill_dataset, c.distill_split, c.distill_fraction) for c in _configs(paper)] == [
        ("", "both", 1.0), ("emnist_digits", "train", 0.25), ("emnist_digits", "train", 0.5),
        ("emnist_digits", "train", 1.0)]


def test_the_convnet_augmentation_study_has_no_normalisation_layers(capsys):
    convnet = STUDIES["augmentation_convnet"]
    local, paper = convnet.presets["local"], convnet.presets["paper"]
    assert (local.base["dataset"], local.base["student_arch"], local.base["norm"]) == ("digits", "smallcnn", "none")
    assert (paper.base["teacher_arch"], paper.base["student_arch"], paper.base["norm"]) == ("vgg16", "vgg16", "none")
    assert TrialConfig.from_dict(paper.base).teacher_members == 5
    assert convnet.adapt is keep_applicable_policies
    assert keep_applicable_policies(local, None).axes == local.axes  # digits takes every local policy
    assert capsys.readouterr().out == ""
    assert "colorjitter" in paper.axes["augmentation"] and "colorjitter" not in local.axes["augmentation"]
    assert "rotation" not in keep_applicable_policies(local, "mnist1d").axes["augmentation"]


def test_adapters_fit_a_preset_to_the_chosen_dataset(capsys):
    ablation = STUDIES["augmentation_ablation"].presets["local"]
    on_signals = keep_applicable_policies(ablation, None)  # the local preset's mnist1d: 1-D signals
    policies = [arm["augmentation"] for arm in on_signals.arms if "extra_source" not in arm]
    assert policies == ["baseline", "reversal", "amplitude", "combaug1d", "mixup", "noise"]
    assert [arm for arm in on_signals.arms if "extra_source" in arm] == [OOD_ARM]  # mnist1d has OOD inputs
    assert on_signals.axes == ablation.axes and on_signals.base is ablation.base
    assert "leaving out augmentation 'rotation' (mnist1d is signal data)" in capsys.readouterr().out
    on_gray = keep_applicable_policies(ablation, "digits")
    policies = [arm["augmentation"] for arm in on_gray.arms]
    assert "reversal" not in policies and "rotation" in policies and OOD_ARM not in on_gray.arms
    out = capsys.readouterr().out
    assert "leaving out augmentation 'reversal' (digits is gray data)" in out
    assert "leaving out the arm of extra_source 'ood' (only for mnist1d)" in out
    assert keep_applicable_policies(STUDIES["augmentation_ablation"].presets["paper"], None).axes == (
        STUDIES["augmentation_ablation"].presets["paper"].axes  # CIFAR-100 takes every policy
    )
    assert keep_applicable_policies(ablation, "not-a-dataset") is ablation  # validation names it later

    sizes = STUDIES["dataset_size"].presets["local"]
    assert "extra_data" in drop_extra_data_if_not_generative(sizes, None).axes
    assert "extra_data" not in drop_extra_data_if_not_generative(sizes, "cifar10").axes
    assert "extra_data" in sizes.axes  # the registry's preset is never changed in place
    assert "cifar10 cannot generate extra in-domain samples" in capsys.readouterr().out


def test_the_optuna_search_follows_dataset_and_num_samples():
    search = STUDIES["optuna_search"].search
    assert search("local", None, None).num_samples == 16 and search("paper", None, None).num_samples == 64
    assert search("local", None, 3).num_samples == 3
    assert "rotation" not in search("local", None, None).space["augmentation"][1]  # mnist1d: 1-D signals
    assert "rotation" in search("local", "digits", None).space["augmentation"][1]
    assert search("local", "digits", None).metrics == ("val_agreement", "val_acc")  # selected on validation data


def test_the_paper_plan_reads_the_registry_and_counts_control_members():
    from kd_ray.reproduction import paper_plan

    plan = {row["study"]: row for row in paper_plan()}
    assert list(plan) == list(REPRODUCTION)
    alpha = STUDIES["alpha_sweep"].presets["paper"]
    assert alpha.base["control"]
    # Reference and control members, for each seed's own teacher.
    assert plan["alpha_sweep"]["teacher members"] == 2 * alpha.base["teacher_members"] * alpha.seeds
    assert plan["alpha_sweep"]["trials"] == len(alpha.axes["alpha"]) * alpha.seeds
    sizes = STUDIES["ensemble_size"].presets["paper"]
    assert plan["ensemble_size"]["teacher members"] == 12 * sizes.seeds  # a seed's 12 hold its smaller ensembles
    assert all(row["GPU-hours (est.)"] > 0 and f"studies/{name}.py" in row["command"] for name, row in plan.items())


def test_reproduce_runs_the_registry_studies_and_skips_finished_ones(tmp_path, capsys):
    import ray

    from kd_ray.tables import write_study_tables

    for name in REPRODUCTION:
        write_study_tables(str(tmp_path / name), [], [], expected=0)  # complete: every expected trial is in
    runs = _load_reproduce().run_studies(tmp_path, 3, [])
    assert list(runs) == list(REPRODUCTION)
    assert all(run == {"wall_s": None, "exit": 0} for run in runs.values())
    assert not ray.is_initialized()  # nothing was left to run, so Ray was never started
    assert f"reproduce: small_teacher already complete in {tmp_path / 'small_teacher'}" in capsys.readouterr().out


def test_no_study_script_is_loaded_by_file_path():
    for path in (REPO / "kd_ray" / "reproduction.py", REPO / "studies" / "reproduce.py"):
        text = path.read_text()
        assert "spec_from_file_location" not in text and "importlib" not in text, path
    assert "REPRODUCTION" in (REPO / "studies" / "reproduce.py").read_text()


def test_the_plan_needs_only_the_installed_package(tmp_path):
    """As from a non-editable install: the package alone, no studies/ beside it."""
    package = Path(presets.__file__).parents[1]
    shutil.copytree(package, tmp_path / "kd_ray", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import kd_ray, kd_ray.reproduction as r; assert kd_ray.__file__.startswith(%r); "
            "print(len(r.paper_plan()))" % str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == str(len(REPRODUCTION))
