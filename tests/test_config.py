"""TrialConfig: defaults, coercion, validation messages, teacher identity, hashing, round trips."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from typing import Any

import pytest

from kd_ray import config
from kd_ray.config import DEFAULT_LR, ConfigError, TrialConfig, content_hash, parse_set

# The flat field names every interface shares; a rename would break tables and study scripts.
DESIGN_FIELDS = (
    "dataset", "teacher_split", "distill_split", "distill_fraction", "extra_data", "teacher_arch",
    "teacher_members", "teacher_epochs", "student_arch", "temperature", "alpha", "augmentation",
    "mixup_alpha", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "lr_schedule", "init",
    "init_lambda", "seed", "eval_every", "device",
)


def error_message(**changes: Any) -> str:
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_dict(changes)
    return str(info.value)


# --- defaults and field names -------------------------------------------------------------------

def test_defaults_are_valid() -> None:
    cfg = TrialConfig()
    assert cfg.alpha == 0.0  # pure distillation by default
    assert cfg.lr == DEFAULT_LR[cfg.optimizer]
    assert TrialConfig.from_dict({}) == cfg


def test_design_field_names_exist() -> None:
    names = TrialConfig.field_names()
    missing = [name for name in DESIGN_FIELDS if name not in names]
    assert missing == []
    assert len(names) == len(set(names))


def test_dataset_names_match_data_registry() -> None:
    from kd_ray.data.datasets import DATASET_INFO

    assert config.DATASETS == tuple(DATASET_INFO)
    assert config.NUM_CLASSES == {name: info.num_classes for name, info in DATASET_INFO.items()}


def test_norm_names_match_model_registry() -> None:
    from kd_ray.models.archs import NORMS

    assert config.NORMS == tuple(NORMS)


# --- coercion -----------------------------------------------------------------------------------

def test_from_dict_coerces_strings() -> None:
    cfg = TrialConfig.from_dict(
        {"temperature": "4", "epochs": "7", "control": "true", "compile": "off", "alpha": " 0.25 "}
    )
    assert cfg.temperature == 4.0 and isinstance(cfg.temperature, float)
    assert cfg.epochs == 7 and isinstance(cfg.epochs, int)
    assert cfg.control is True
    assert cfg.compile is False
    assert cfg.alpha == 0.25


@pytest.mark.parametrize("text", ["none", "None", ""])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_lr_none_means_optimizer_default(text: str, optimizer: str) -> None:
    cfg = TrialConfig.from_dict({"optimizer": optimizer, "lr": text})
    assert cfg.lr == DEFAULT_LR[optimizer]
    assert TrialConfig(optimizer=optimizer, lr=None).lr == DEFAULT_LR[optimizer]


def test_explicit_lr_is_kept() -> None:
    assert TrialConfig.from_dict({"optimizer": "adam", "lr": "0.02"}).lr == 0.02


@pytest.mark.parametrize(
    ("key", "text"), [("epochs", "four"), ("epochs", "4.5"), ("temperature", "hot"), ("control", "maybe")]
)
def test_uncoercible_strings_raise(key: str, text: str) -> None:
    message = error_message(**{key: text})
    assert key in message
    assert text in message


@pytest.mark.parametrize(("key", "value"), [("epochs", True), ("epochs", 2.0), ("temperature", "4"), ("control", 1)])
def test_wrong_types_given_directly_raise(key: str, value: Any) -> None:
    # The constructor does not coerce; only from_dict does.
    with pytest.raises(ConfigError, match=key):
        TrialConfig(**{key: value})


# --- unknown keys and choices -------------------------------------------------------------------

def test_unknown_key_suggests_closest_field() -> None:
    message = error_message(temprature=4)
    assert "temprature" in message
    assert re.search(r"did you mean '?temperature'?", message)


def test_unknown_key_without_close_match_still_names_it() -> None:
    message = error_message(zzqx=1)
    assert "zzqx" in message
    assert "did you mean" not in message


def test_unknown_dataset_lists_allowed_values() -> None:
    message = error_message(dataset="cifar")
    assert "dataset" in message and "'cifar'" in message
    for name in config.DATASETS:
        assert name in message


def test_unknown_optimizer_suggests_adam() -> None:
    message = error_message(optimizer="adamw")
    assert "optimizer" in message and "adamw" in message
    assert re.search(r"did you mean '?adam'?", message)
    assert "sgd" in message


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("teacher_split", "quarter", config.TEACHER_SPLITS),
        ("distill_split", "test", config.DISTILL_SPLITS),
        ("init", "zeros", config.INITS),
        ("lr_schedule", "step", config.LR_SCHEDULES),
        ("norm", "layer", config.NORMS),
        ("teacher_sharing", "per_replicate", config.TEACHER_SHARINGS),
    ],
)
def test_other_choices_list_allowed_values(key: str, value: str, allowed: tuple[str, ...]) -> None:
    message = error_message(**{key: value})
    assert key in message and value in message
    for name in allowed:
        assert name in message


def test_device_choices() -> None:
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert TrialConfig(device=device).device == device
    message = error_message(device="tpu")
    assert "device" in message and "tpu" in message


# --- ranges -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("temperature", 0.0, "(0, inf)"),
        ("temperature", -1.0, "(0, inf)"),
        ("alpha", -0.1, "[0, 1]"),
        ("alpha", 1.5, "[0, 1]"),
        ("distill_fraction", 0.0, "(0, 1]"),
        ("distill_fraction", 1.5, "(0, 1]"),
        ("init_lambda", -0.5, "[0, 1]"),
        ("init_lambda", 1.01, "[0, 1]"),
        ("teacher_members", 0, "[1, inf)"),
        ("epochs", 0, "[1, inf)"),
        ("batch_size", 0, "[1, inf)"),
        ("eval_every", 0, "[1, inf)"),
        ("lr", 0.0, "(0, inf)"),
        ("weight_decay", -1e-4, "[0, inf)"),
        ("mixup_alpha", 0.0, "(0, inf)"),
        ("extra_data", -5, "[0, inf)"),
        ("steps", -1, "[0, inf)"),
        ("seed", -1, "[0, 4294967295]"),
        ("data_seed", 2**32, "[0, 4294967295]"),
        ("teacher_seed", -3, "[0, 4294967295]"),
    ],
)
def test_out_of_range_names_field_value_and_range(key: str, value: float, allowed: str) -> None:
    message = error_message(**{key: value})
    assert f"{key}={value!r}" in message
    assert allowed in message


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("temperature", math.inf, "(0, inf)"),
        ("temperature", math.nan, "(0, inf)"),
        ("alpha", math.nan, "[0, 1]"),
        ("distill_fraction", math.nan, "(0, 1]"),
        ("lr", math.inf, "(0, inf)"),
        ("weight_decay", math.inf, "[0, inf)"),
        ("init_lambda", -math.inf, "[0, 1]"),
    ],
)
def test_non_finite_numbers_raise(key: str, value: float, allowed: str) -> None:
    message = error_message(**{key: value})
    assert key in message
    assert repr(value) in message
    assert allowed in message


def test_non_finite_strings_raise() -> None:
    assert "temperature" in error_message(temperature="inf")
    assert "alpha" in error_message(alpha="nan")


@pytest.mark.parametrize(
    ("key", "value"),
    [("temperature", 1e-3), ("alpha", 0.0), ("alpha", 1.0), ("distill_fraction", 1.0),
     ("distill_fraction", 0.01), ("init_lambda", 0.0), ("init_lambda", 1.0), ("teacher_members", 1),
     ("epochs", 1), ("eval_every", 1), ("weight_decay", 0.0), ("steps", 0), ("steps", 1), ("seed", 2**32 - 1)],
)
def test_range_edges_that_are_allowed(key: str, value: float) -> None:
    assert getattr(TrialConfig.from_dict({key: value}), key) == value


# --- incompatible combinations ------------------------------------------------------------------

def test_holdout_distillation_needs_half_teacher() -> None:
    message = error_message(distill_split="holdout", teacher_split="full")
    assert "holdout" in message and "teacher_split" in message and "half" in message
    assert TrialConfig(distill_split="holdout", teacher_split="half").distill_split == "holdout"


def test_extra_data_only_where_samples_can_be_made() -> None:
    message = error_message(dataset="digits", extra_data=100, teacher_arch="smallcnn", student_arch="smallcnn")
    assert "extra_data" in message and "digits" in message
    assert TrialConfig(dataset="mnist1d", extra_data=100).extra_data == 100
    assert TrialConfig(dataset="digits", extra_data=0).extra_data == 0


def test_interpolate_needs_same_arch() -> None:
    message = error_message(init="interpolate", teacher_arch="conv1d", student_arch="mlp", norm="group")
    assert "interpolate" in message and "student_arch" in message and "mlp" in message


def test_interpolate_rejects_batch_norm() -> None:
    message = error_message(init="interpolate", norm="batch")
    assert "interpolate" in message and "norm" in message and "batch" in message
    for norm in ("group", "none"):
        assert TrialConfig(init="interpolate", norm=norm).init == "interpolate"


def test_teacher_init_needs_same_arch() -> None:
    message = error_message(init="teacher_init", teacher_arch="conv1d", student_arch="mlp")
    assert "teacher_init" in message and "student_arch" in message


# --- parse_set ----------------------------------------------------------------------------------

def test_parse_set_splits_key_value() -> None:
    values = parse_set(["temperature=3", " alpha = 0.5 ", "device=cuda:0", "lr="])
    assert values == {"temperature": "3", "alpha": "0.5", "device": "cuda:0", "lr": ""}
    cfg = TrialConfig.from_dict(values)
    assert (cfg.temperature, cfg.alpha, cfg.device, cfg.lr) == (3.0, 0.5, "cuda:0", DEFAULT_LR["sgd"])


@pytest.mark.parametrize("expr", ["temperature", "=3", " =3", ""])
def test_parse_set_rejects_malformed(expr: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_set([expr])
    assert "key=value" in str(info.value)


# --- teacher identity ---------------------------------------------------------------------------

TEACHER_CHANGES: list[tuple[str, Any]] = [
    ("teacher_arch", "conv1d"),
    ("teacher_epochs", 31),
    ("teacher_seed", 1),
    ("teacher_lr", 0.1),
    ("teacher_batch_size", 64),
    ("norm", "group"),
    ("dataset", "digits"),
    ("data_seed", 1),
    ("teacher_split", "half"),
    ("teacher_members", 5),
]

STUDENT_CHANGES: list[tuple[str, Any]] = [
    ("temperature", 1.0),
    ("alpha", 0.5),
    ("augmentation", "mixup"),
    ("mixup_alpha", 0.2),
    ("epochs", 3),
    ("lr", 0.2),
    ("steps", 500),
    ("student_arch", "conv1d"),
    ("optimizer", "adam"),
    ("batch_size", 32),
    ("weight_decay", 0.0),
    ("lr_schedule", "constant"),
    ("distill_split", "both"),
    ("distill_fraction", 0.5),
    ("extra_data", 1000),
    ("eval_every", 1),
    ("device", "cpu"),
    ("control", True),
    ("compile", True),
]


def test_teacher_key_format_and_determinism() -> None:
    key = TrialConfig().teacher_key()
    assert re.fullmatch(r"[0-9a-f]{16}", key)
    assert TrialConfig().teacher_key() == key
    assert key == content_hash(TrialConfig().teacher_spec())


@pytest.mark.parametrize(("key", "value"), TEACHER_CHANGES, ids=[k for k, _ in TEACHER_CHANGES])
def test_teacher_key_changes_with_teacher_fields(key: str, value: Any) -> None:
    base = TrialConfig()
    changed = base.replace(**{key: value})
    assert getattr(changed, key) != getattr(base, key)
    assert changed.teacher_key() != base.teacher_key()


@pytest.mark.parametrize(("key", "value"), STUDENT_CHANGES, ids=[k for k, _ in STUDENT_CHANGES])
def test_teacher_key_ignores_student_fields(key: str, value: Any) -> None:
    base = TrialConfig()
    changed = base.replace(**{key: value})
    assert getattr(changed, key) != getattr(base, key)
    assert changed.teacher_key() == base.teacher_key()


def test_teacher_key_control_role_names_an_independent_ensemble() -> None:
    cfg = TrialConfig()
    assert cfg.teacher_key("control") != cfg.teacher_key()
    assert cfg.teacher_spec(0, "control") != cfg.teacher_spec(0)
    with pytest.raises(ValueError, match="role"):
        cfg.teacher_key("reference ")


def test_per_seed_teachers_vary_with_the_seed_and_shared_ones_do_not() -> None:
    per_seed = [TrialConfig(seed=seed) for seed in range(5)]
    assert len({cfg.teacher_key() for cfg in per_seed}) == 5
    assert [cfg.teacher_spec(0)["replicate"] for cfg in per_seed] == [0, 1, 2, 3, 4]
    shared = [TrialConfig(seed=seed, teacher_sharing="shared") for seed in range(5)]
    assert len({cfg.teacher_key() for cfg in shared}) == 1
    assert shared[0].teacher_spec(0)["replicate"] is None
    # The shared ensemble is none of the per-seed ones, replicate 0's included.
    assert shared[0].teacher_key() not in {cfg.teacher_key() for cfg in per_seed}


def test_teacher_key_stable_across_processes() -> None:
    cfg = TrialConfig(teacher_arch="mlp", teacher_members=4, norm="group", data_seed=3, temperature=2.0)
    code = (
        "from kd_ray.config import TrialConfig\n"
        "cfg = TrialConfig(teacher_arch='mlp', teacher_members=4, norm='group', data_seed=3, temperature=2.0)\n"
        "print(cfg.teacher_key(), cfg.teacher_key('control'))\n"
    )
    expected = f"{cfg.teacher_key()} {cfg.teacher_key('control')}"
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


def test_teacher_spec_differs_by_member() -> None:
    cfg = TrialConfig()
    specs = [cfg.teacher_spec(member) for member in range(cfg.teacher_members)]
    hashes = {content_hash(spec) for spec in specs}
    assert len(hashes) == cfg.teacher_members
    assert [spec["member"] for spec in specs] == [0, 1, 2]
    assert content_hash(cfg.teacher_spec(0)) != cfg.teacher_key()


def test_member_spec_is_shared_between_ensemble_sizes() -> None:
    # Member i does not depend on how many members the ensemble has, so stored members are reused.
    small, large = TrialConfig(teacher_members=2), TrialConfig(teacher_members=5)
    assert small.teacher_spec(1) == large.teacher_spec(1)
    assert small.teacher_key() != large.teacher_key()


def test_member_spec_changes_with_teacher_fields_only() -> None:
    base = TrialConfig()
    assert base.replace(teacher_seed=7).teacher_spec(0) != base.teacher_spec(0)
    assert base.replace(temperature=1.5, steps=100).teacher_spec(0) == base.teacher_spec(0)
    # The seed names the replicate, whose own ensemble a per-seed teacher is; shared ignores it.
    assert base.replace(seed=3).teacher_spec(0) != base.teacher_spec(0)
    shared = base.replace(teacher_sharing="shared")
    assert shared.replace(seed=3).teacher_spec(0) == shared.teacher_spec(0)


# --- frozen, hashable, replace, JSON ------------------------------------------------------------

def test_frozen_and_hashable() -> None:
    cfg = TrialConfig(temperature=2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.temperature = 3.0  # type: ignore[misc]
    assert hash(cfg) == hash(TrialConfig(temperature=2.0))
    assert len({cfg, TrialConfig(temperature=2.0), TrialConfig(temperature=3.0)}) == 2
    assert {cfg: "a"}[TrialConfig.from_dict({"temperature": "2"})] == "a"


def test_replace_returns_new_validated_config() -> None:
    cfg = TrialConfig()
    changed = cfg.replace(temperature="8", alpha=0.5)
    assert (changed.temperature, changed.alpha) == (8.0, 0.5)
    assert (cfg.temperature, cfg.alpha) == (4.0, 0.0)
    with pytest.raises(ConfigError, match="alpha"):
        cfg.replace(alpha=2.0)
    with pytest.raises(ConfigError, match="temprature"):
        cfg.replace(temprature=2.0)


@pytest.mark.parametrize(
    "cfg",
    [
        TrialConfig(),
        TrialConfig(
            dataset="digits", teacher_arch="lenet5", student_arch="smallcnn", teacher_split="half",
            distill_split="holdout", distill_fraction=0.25, temperature=0.5, alpha=0.3,
            augmentation="mixup", optimizer="adam", lr=3e-4, init_lambda=0.0, control=True, seed=11,
        ),
        TrialConfig(init="interpolate", norm="none", init_lambda=0.4, extra_data=500),
    ],
)
def test_json_round_trip(cfg: TrialConfig) -> None:
    text = cfg.to_json()
    restored = TrialConfig.from_dict(json.loads(text))
    assert restored == cfg
    assert restored.to_json() == text
    assert restored.teacher_key() == cfg.teacher_key()
    assert set(json.loads(text)) == set(TrialConfig.field_names())
