"""The packer: which configs of a study share a pack, and how packs are cut. Pure: no torch, no Ray."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from kd_ray.config import TrialConfig
from kd_ray.packs.plan import PACK_LIMIT, STUDENT_FIELDS, describe_packs, plan_packs, share_key


def grid(**axes) -> list[TrialConfig]:
    names = list(axes)
    return [TrialConfig.from_dict(dict(zip(names, values))) for values in itertools.product(*axes.values())]


def trial_indices(packs) -> list[tuple[int, ...]]:
    return [pack.trial_indices for pack in packs]


def test_student_fields_share_a_pack_and_the_rest_do_not():
    base = TrialConfig(norm="group")
    for name, value in [("temperature", 8.0), ("alpha", 0.5), ("init", "interpolate"), ("init_lambda", 0.3),
                        ("lr", 0.2), ("weight_decay", 0.0), ("optimizer", "adam"), ("lr_schedule", "constant"),
                        ("epochs", 7), ("teacher_members", 5), ("loss", "reverse_kl"), ("jsd_beta", 0.3)]:
        assert share_key(base.replace(**{name: value})) == share_key(base), name
    assert set(STUDENT_FIELDS) == {"temperature", "alpha", "init", "init_lambda", "lr", "weight_decay", "optimizer",
                                   "lr_schedule", "epochs", "teacher_members", "loss", "jsd_beta"}
    # The replicate, the policy, the data and the batch shape decide the teacher or the batch stream.
    for name, value in [("seed", 1), ("augmentation", "mixup"), ("distill_fraction", 0.5), ("batch_size", 64),
                        ("student_arch", "mlp4"), ("teacher_arch", "mlp4"), ("dataset", "digits"), ("steps", 100),
                        ("teacher_epochs", 5), ("mixup_alpha", 0.5), ("eval_every", 2), ("control", True)]:
        assert share_key(base.replace(**{name: value})) != share_key(base), name
    assert share_key(base.replace(compile=True)) is None  # a compiled student is never packed


def test_a_temperature_by_ensemble_grid_packs_per_seed_in_order():
    configs = grid(seed=[0, 1], teacher_members=[1, 3, 5], temperature=[1.0, 4.0])
    packs = plan_packs(configs)
    assert trial_indices(packs) == [tuple(range(0, 6)), tuple(range(6, 12))]
    assert [p.pack_id for p in packs] == ["pack0000", "pack0001"]
    assert {configs[i].seed for i in packs[1].trial_indices} == {1}
    assert describe_packs(packs) == "12 students in 2 Ray Tune trials (packs: 2 of 6)"


def test_packs_are_capped_and_split_evenly():
    configs = grid(temperature=[float(t) for t in range(1, 11)])
    assert [p.size for p in plan_packs(configs, max_size=4)] == [4, 3, 3]
    assert [p.size for p in plan_packs(configs, max_size=1)] == [1] * 10
    assert [p.size for p in plan_packs(grid(temperature=[float(t) for t in range(1, 41)]))] == [20, 20]
    assert [p.size for p in plan_packs(grid(temperature=[float(t) for t in range(1, 2 * PACK_LIMIT + 1)]))] == [
        PACK_LIMIT, PACK_LIMIT]


def test_packs_are_halved_until_every_slot_has_one():
    configs = grid(temperature=[1.0, 4.0, 8.0, 16.0])
    assert trial_indices(plan_packs(configs, min_packs=2)) == [(0, 1), (2, 3)]
    assert trial_indices(plan_packs(configs, min_packs=3)) == [(0,), (1,), (2, 3)]
    assert trial_indices(plan_packs(configs, min_packs=9)) == [(0,), (1,), (2,), (3,)]  # no pack is cut below one


def test_configs_that_share_nothing_stay_alone():
    configs = grid(seed=[0, 1, 2]) + [TrialConfig(compile=True), TrialConfig(compile=True)]
    packs = plan_packs(configs)
    assert trial_indices(packs) == [(0,), (1,), (2,), (3,), (4,)]


@pytest.mark.parametrize("max_size, min_packs", [(0, 1), (1, 0)])
def test_bad_limits_are_refused(max_size, min_packs):
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_packs([TrialConfig()], max_size=max_size, min_packs=min_packs)


def test_the_packer_imports_neither_torch_nor_ray():
    code = "import sys, kd_ray.packs.plan; assert not {'torch', 'ray'} & set(sys.modules), sorted(sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
