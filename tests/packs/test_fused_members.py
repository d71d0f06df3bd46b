"""Teacher members trained fused (kd_ray.packs.members) against the same members trained alone."""

from __future__ import annotations

import pytest
import torch

from kd_ray.config import TrialConfig
from kd_ray.packs.members import (
    can_fuse_members,
    ensure_members_fused,
    member_groups,
    train_members_fused,
)
from kd_ray.train.teachers import (
    LOGITS,
    WEIGHTS,
    NeededMember,
    TeacherStore,
    member_key,
    needed_members,
    train_member,
)

CPU = torch.device("cpu")


def members_of(teacher_split: str, teacher_epochs: int, arch: str = "mlp") -> list[NeededMember]:
    """2 replicates x 2 members: per-seed teachers, so each replicate has its own streams (and, under
    ``half``, its own training half D0, of the same size)."""
    cfgs = [TrialConfig(dataset="mnist1d", teacher_arch=arch, teacher_split=teacher_split,
                        teacher_epochs=teacher_epochs, teacher_members=2, seed=seed, device="cpu")
            for seed in (0, 1)]
    return [NeededMember(cfg, member, "reference") for cfg in cfgs for member in (0, 1)]


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("teacher_split", ["full", "half"])
def test_fused_members_train_as_each_trained_alone(mnist1d_arrays, teacher_split):
    # One epoch: weights and logits agree to float32 rounding. (Later, an occasional batch whose batch-norm
    # channel has almost no variance amplifies rounding, as it amplifies any 1e-7 nudge of a lone member.)
    members = members_of(teacher_split, teacher_epochs=1)
    fused = train_members_fused(members, mnist1d_arrays, CPU)
    assert len(fused) == len(members)
    for needed, (weights, logits, metrics) in zip(members, fused):
        alone_weights, alone_logits, alone_metrics = train_member(needed.cfg, needed.member, mnist1d_arrays, CPU)
        for part in ("initial", "final"):
            assert weights[part].keys() == alone_weights[part].keys()
            for name, value in alone_weights[part].items():
                assert weights[part][name].shape == value.shape and weights[part][name].dtype == value.dtype
                assert relative_gap(weights[part][name], value) < 1e-4, (needed, part, name)
        for split in ("test", "train"):
            assert logits[split].shape == alone_logits[split].shape
            assert relative_gap(logits[split], alone_logits[split]) < 1e-4, (needed, split)
        assert set(alone_metrics) <= set(metrics) and metrics["fused_members"] == len(members)
        assert metrics["test_acc"] == pytest.approx(alone_metrics["test_acc"], abs=0.01)
    # Under half, the replicates train on different halves: their members' logits are not one another's.
    assert relative_gap(fused[0][1]["test"], fused[2][1]["test"]) > 1e-2


def test_fused_members_reach_the_accuracy_of_lone_members(mnist1d_arrays):
    members = members_of("full", teacher_epochs=3)
    fused = train_members_fused(members, mnist1d_arrays, CPU)
    for needed, (_, _, metrics) in zip(members, fused):
        _, _, alone = train_member(needed.cfg, needed.member, mnist1d_arrays, CPU)
        assert abs(metrics["test_acc"] - alone["test_acc"]) <= 0.01, needed
        assert metrics["test_acc"] > 0.3  # well above chance (0.1) after 3 epochs


def test_fused_members_are_stored_under_todays_keys(mnist1d_arrays, tmp_path):
    store = TeacherStore(tmp_path / "teachers")
    members = members_of("half", teacher_epochs=1)
    messages: list[str] = []
    keys = ensure_members_fused(members, store, mnist1d_arrays, CPU, progress=messages.append)
    assert keys == [member_key(m.cfg, m.member, m.role) for m in members]
    assert sorted(store.keys()) == sorted(keys)
    for needed, key in zip(members, keys):
        assert store.verify(key) == []
        assert store.manifest(key)["spec"] == needed.cfg.teacher_spec(needed.member, needed.role)
        assert set(store.load(key, WEIGHTS)) == {"initial", "final"}
        assert set(store.load(key, LOGITS)) == {"test", "train"}
    assert any("fused (4)" in message for message in messages), messages
    # A second call finds every member stored and trains nothing.
    messages.clear()
    assert ensure_members_fused(members, store, mnist1d_arrays, CPU, progress=messages.append) == keys
    assert messages == []


def test_members_that_cannot_fuse_train_alone_and_say_why(mnist1d_arrays, tmp_path):
    mlp, conv = members_of("full", 1)[:2], members_of("full", 1, arch="conv1d")[:2]
    reason = can_fuse_members([m.cfg for m in mlp + conv])
    assert reason is not None and "teacher_arch" in reason and "'conv1d'" in reason and "'mlp'" in reason
    reason = can_fuse_members([m.cfg for m in conv])
    assert reason is not None and "teacher_arch='conv1d'" in reason and "plain MLP" in reason
    assert can_fuse_members([m.cfg for m in mlp]) is None
    with pytest.raises(ValueError, match="teacher_arch='conv1d'"):
        train_members_fused(conv, mnist1d_arrays, CPU)

    groups, refused = member_groups(mlp + conv)
    assert sorted(len(g) for g in groups) == [1, 1, 2]  # the MLPs fused, each conv1d member alone
    assert list(refused.values()) == [can_fuse_members([conv[0].cfg])]

    store = TeacherStore(tmp_path / "teachers")
    messages: list[str] = []
    keys = ensure_members_fused(conv, store, mnist1d_arrays, CPU, progress=messages.append)
    assert all(store.verify(key) == [] for key in keys)
    assert not any("fused" in message for message in messages), messages
    metrics = store.manifest(keys[0])["metrics"]
    assert "fused_members" not in metrics and metrics["test_acc"] > 0


def test_groups_fill_the_cluster_slots_and_stay_within_the_group_size():
    members = members_of("full", 1) * 5  # 20 members of one fuse key
    groups, refused = member_groups(members, tasks_at_least=1, max_group=16)
    assert refused == {} and [len(g) for g in groups] == [10, 10]
    groups, _ = member_groups(members, tasks_at_least=6, max_group=16)
    assert len(groups) >= 6 and sum(len(g) for g in groups) == 20 and max(len(g) for g in groups) <= 4
    groups, _ = member_groups(members[:2], tasks_at_least=8)
    assert [len(g) for g in groups] == [1, 1]  # no more groups than members


def test_prepare_teachers_stores_every_member_on_ray(ray_local, tmp_path):
    from kd_ray.study import Study
    from kd_ray.study.runner import prepare_teachers

    base = TrialConfig(dataset="mnist1d", teacher_members=3, teacher_epochs=1, epochs=1, device="cpu")
    study = Study("fused_teachers", base=base, seeds=[0, 1], storage=str(tmp_path), verbose=0)
    configs = study.validate()
    prepare_teachers(study.plan(), configs)
    store = TeacherStore(study.teacher_store)
    needed = needed_members(configs)
    assert len(needed) == 6  # 2 seeds x 3 members, per-seed teachers
    assert sorted(store.keys()) == sorted(needed)
    for key in needed:
        assert store.verify(key) == []
        assert store.manifest(key)["metrics"]["fused_members"] == 3  # two slots: two groups of three
