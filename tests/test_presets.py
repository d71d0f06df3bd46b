"""Tests for kd_ray.presets: the registry every study script, the reproduction and its plan read."""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kd_ray import presets
from kd_ray.config import TrialConfig
from kd_ray.presets import REPRODUCTION, STUDIES, Preset, drop_extra_data_if_not_generative, keep_applicable_policies
from kd_ray.study import OptunaSpec
from kd_ray.teachers import CONTROL_SEED_OFFSET

REPO = Path(__file__).resolve().parent.parent


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
    assert TrialConfig.from_dict(local.base).dataset in ("mnist1d", "digits")  # no download, no GPU
    assert TrialConfig.from_dict(paper.base).dataset == "cifar100"
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
    assert REPRODUCTION == ("augmentation_ablation", "temperature_sweep", "dataset_size", "training_duration",
                            "initialization", "ensemble_size", "alpha_sweep", "small_teacher")
    assert list(STUDIES)[: len(REPRODUCTION)] == list(REPRODUCTION)
    assert [name for name in STUDIES if name not in REPRODUCTION] == ["optuna_search"]  # a search: no finding
    scripts = sorted(p.stem for p in (REPO / "studies").glob("*.py") if p.stem != "reproduce")
    assert scripts == sorted(STUDIES)


def test_adapters_fit_a_preset_to_the_chosen_dataset(capsys):
    ablation = STUDIES["augmentation_ablation"].presets["local"]
    on_gray = keep_applicable_policies(ablation, None)  # the local preset's digits: no colour
    assert on_gray.axes["augmentation"] == [p for p in ablation.axes["augmentation"] if p != "colorjitter"]
    assert "augmentation_ablation: leaving out 'colorjitter' (digits is gray data)" in capsys.readouterr().out
    on_signals = keep_applicable_policies(ablation, "mnist1d")
    assert "rotation" not in on_signals.axes["augmentation"] and "baseline" in on_signals.axes["augmentation"]
    assert on_signals.axes["temperature"] == ablation.axes["temperature"] and on_signals.base is ablation.base
    assert "leaving out 'rotation' (mnist1d is signal data)" in capsys.readouterr().out
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
    assert search("local", "digits", None).metrics == ("test_agreement", "test_acc")


def test_the_paper_plan_reads_the_registry_and_counts_control_members():
    from kd_ray.reproduction import paper_plan

    plan = {row["study"]: row for row in paper_plan()}
    assert list(plan) == list(REPRODUCTION)
    alpha = STUDIES["alpha_sweep"].presets["paper"]
    assert alpha.base["control"] and CONTROL_SEED_OFFSET > alpha.base["teacher_members"]
    assert plan["alpha_sweep"]["teacher members"] == 2 * alpha.base["teacher_members"]  # reference + control
    assert plan["alpha_sweep"]["trials"] == len(alpha.axes["alpha"]) * alpha.seeds
    assert plan["ensemble_size"]["teacher members"] == 12  # the ensemble of 12 holds every smaller one
    assert all(row["GPU-hours (est.)"] > 0 and f"studies/{name}.py" in row["command"] for name, row in plan.items())


def test_reproduce_runs_the_registry_studies_and_skips_finished_ones(tmp_path, capsys):
    import ray

    for name in REPRODUCTION:
        (tmp_path / name).mkdir()
        (tmp_path / name / "trials.parquet").touch()
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
    shutil.copytree(Path(presets.__file__).parent, tmp_path / "kd_ray", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import kd_ray, kd_ray.reproduction as r; assert kd_ray.__file__.startswith(%r); "
            "print(len(r.paper_plan()))" % str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == str(len(REPRODUCTION))
