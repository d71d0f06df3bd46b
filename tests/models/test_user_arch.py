"""A user's architecture: a factory named by module:function or file.py:function, built with its JSON args,
checked before any compute, its stages for CKA, and whether a pack can widen it."""

from __future__ import annotations

import textwrap

import pytest
import torch

from kd_ray.config import ConfigError, TrialConfig
from kd_ray.models.archs import build_model, check_user_model, stage_modules
from kd_ray.packs.wide import can_widen, unwidened_students

FACTORIES = textwrap.dedent('''
    import math
    from torch import nn

    def plain(input_shape, num_classes, hidden=8):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                             nn.Linear(hidden, num_classes))

    class Gate(nn.Module):
        def __init__(self, features, num_classes):
            super().__init__()
            self.linear = nn.Linear(features, num_classes)
        def forward(self, x):
            return self.linear(x.flatten(1)) * 2

    def gated(input_shape, num_classes):
        return Gate(math.prod(input_shape), num_classes)

    def wrong_width(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes + 1))

    def not_a_module(input_shape, num_classes):
        return 3

    def fails(input_shape, num_classes):
        raise RuntimeError("no GPU here")

    NOT_CALLABLE = 1
''')


@pytest.fixture
def factories(tmp_path, monkeypatch) -> str:
    (tmp_path / "factories.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    return "factories.py"


def test_a_factory_builds_with_its_args_by_file_or_by_module(factories, monkeypatch, tmp_path):
    model = build_model(f"{factories}:plain", (1, 40), 10, args='{"hidden": 16}')
    assert model[1].out_features == 16
    assert model(torch.zeros(3, 1, 40)).shape == (3, 10)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_model("factories:plain", (1, 40), 10)[1].out_features == 8
    assert stage_modules(model) == []  # names no stages: its CKA columns are NaN


@pytest.mark.parametrize("reference, args, match", [
    ("missing.py:plain", "", "there is no file"),
    ("no_such_module_xyz:plain", "", "not on the Python path"),
    ("factories.py:nothing", "", "no callable 'nothing'"),
    ("factories.py:NOT_CALLABLE", "", "no callable 'NOT_CALLABLE'"),
    ("factories.py:plain", '{"width": 3}', "failed to build .*unexpected keyword argument 'width'"),
    ("factories.py:fails", "", "failed to build .*no GPU here"),
    ("factories.py:not_a_module", "", "returned int, not a torch.nn.Module"),
    ("factories.py:wrong_width", "", r"gave shape \[2, 11\].*allowed: float logits of shape \[2, 10\]"),
])
def test_a_bad_factory_is_refused_in_one_line_naming_the_field(factories, reference, args, match):
    with pytest.raises(ConfigError, match=match) as info:
        check_user_model(reference, (1, 40), 10, args, "student_arch")
    assert str(info.value).startswith(f"student_arch={reference!r}") and "\n" not in str(info.value)


def test_the_config_checks_the_syntax_and_the_args():
    with pytest.raises(ConfigError, match="student_arch='model.py:' does not name a function"):
        TrialConfig(student_arch="model.py:")
    with pytest.raises(ConfigError, match="is not JSON"):
        TrialConfig(student_arch="m:f", student_arch_args="{hidden: 3}")
    with pytest.raises(ConfigError, match="teacher_arch_args=.* is read only by a user's factory"):
        TrialConfig(teacher_arch_args='{"hidden": 3}')
    with pytest.raises(ConfigError, match="init='teacher_init' needs student_arch == teacher_arch"):
        TrialConfig(student_arch="m:f", teacher_arch="m:f", student_arch_args={"a": 1}, init="teacher_init")
    cfg = TrialConfig.from_dict({"student_arch": "m:f", "student_arch_args": {"b": 1, "a": [1, 2]}})
    assert cfg.student_arch_args == '{"a": [1, 2], "b": 1}'
    assert TrialConfig(student_arch="m:f", student_arch_args="{}").student_arch_args == ""
    assert hash(cfg) == hash(TrialConfig.from_dict(cfg.to_dict()))


def test_a_pack_widens_a_plain_factory_and_refuses_a_custom_module(factories):
    plain = build_model(f"{factories}:plain", (1, 40), 10)
    assert can_widen(plain, torch.randn(4, 1, 40)) is None
    assert "Gate" in can_widen(build_model(f"{factories}:gated", (1, 40), 10))
    configs = [TrialConfig(student_arch=f"{factories}:{name}") for name in ("plain", "gated")] + [TrialConfig()]
    assert list(unwidened_students(configs)) == [(f"{factories}:gated", "", "mnist1d")]
