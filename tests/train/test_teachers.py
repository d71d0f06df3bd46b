"""Tests for kd_ray.train.teachers: the content-addressed store, its integrity checks, member sharing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_ray.config import TrialConfig, content_hash
from kd_ray.data.splits import split_indices, val_indices
from kd_ray.models.ensembles import ensemble_log_probs
from kd_ray.train import teachers
from kd_ray.train.metrics import accuracy
from kd_ray.train.teachers import (
    LOGITS,
    MANIFEST,
    WEIGHTS,
    TeacherStore,
    TeacherStoreError,
    check_stored_members,
    delete_members,
    ensure_members,
    load_ensemble,
    member_key,
    member_steps,
    needed_members,
    teacher_indices,
)


def _member(seed: int = 0) -> tuple[dict, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    weights = {
        "initial": {"w": torch.randn(3, 4, generator=g), "n": torch.tensor(7)},
        "final": {"w": torch.randn(3, 4, generator=g), "n": torch.tensor(9)},
    }
    logits = {"test": torch.randn(5, 10, generator=g), "train": torch.randn(8, 10, generator=g)}
    return weights, logits, {"test_acc": 0.5 + seed / 100}


def _spec(name: str) -> dict:
    return {"dataset": "mnist1d", "name": name}


def _key(name: str) -> str:
    """The address of the test member ``name``: the hash of its spec, as ``member_key`` makes it."""
    return content_hash(_spec(name))


ABC, OTHER, GOOD, BAD, K1, K2 = (_key(name) for name in ("abc", "other", "good", "bad", "k1", "k2"))


def _save(store: TeacherStore, name: str, seed: int = 0) -> tuple[dict, dict, dict]:
    """Store the test member ``name`` (weights drawn from ``seed``) at its address ``_key(name)``."""
    weights, logits, metrics = _member(seed)
    store.save(_key(name), _spec(name), weights, logits, metrics)
    return weights, logits, metrics


def _assert_nested_equal(a, b) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_nested_equal(a[k], b[k])
    else:
        assert torch.equal(a, b)


def _visible(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) if path.exists() else []


def _first_weight(state: dict[str, torch.Tensor]) -> str:
    return next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)


# --- the store ---------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    store = TeacherStore(tmp_path)
    weights, logits, _ = _save(store, "abc")
    _assert_nested_equal(store.load(ABC, WEIGHTS), weights)
    _assert_nested_equal(store.load(ABC, LOGITS), logits)
    member = tmp_path / "members" / ABC
    assert sorted(os.listdir(member)) == sorted([WEIGHTS, LOGITS, MANIFEST])
    files = store.manifest(ABC)["files"]
    for name in (WEIGHTS, LOGITS):
        assert files[name] == hashlib.sha256((member / name).read_bytes()).hexdigest()


def test_has_keys_manifest(tmp_path: Path) -> None:
    store = TeacherStore(tmp_path)
    assert not store.has(K2) and store.keys() == []
    _save(store, "k2", seed=2)
    _save(store, "k1", seed=1)
    assert store.has(K1) and store.has(K2) and not store.has("k3")
    assert store.keys() == sorted([K1, K2])
    manifest = store.manifest(K2)
    assert manifest["key"] == K2
    assert manifest["spec"] == _spec("k2")
    assert manifest["metrics"] == {"test_acc": 0.52}
    assert manifest["torch_version"] == torch.__version__
    assert store.verify(K1) == [] and store.verify(K2) == []


def test_missing_member_raises(tmp_path: Path) -> None:
    with pytest.raises(TeacherStoreError, match="nope"):
        TeacherStore(tmp_path).load("nope", WEIGHTS)


def test_corrupted_file_is_refused(tmp_path: Path) -> None:
    store = TeacherStore(tmp_path)
    _, logits, _ = _save(store, "abc")
    path = tmp_path / "members" / ABC / WEIGHTS
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TeacherStoreError) as info:
        store.load(ABC, WEIGHTS)
    message = str(info.value)
    assert str(path) in message
    assert "kd-ray teachers verify" in message
    # The other file of the member is unaffected.
    _assert_nested_equal(store.load(ABC, LOGITS), logits)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    store = TeacherStore(tmp_path)
    _save(store, "abc")
    path = tmp_path / "members" / ABC / LOGITS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TeacherStoreError) as info:
        store.load(ABC, LOGITS)
    assert str(path) in str(info.value)
    assert "kd-ray teachers verify" in str(info.value)


def test_truncated_manifest_is_refused(tmp_path: Path) -> None:
    store = TeacherStore(tmp_path)
    _save(store, "abc")
    path = tmp_path / "members" / ABC / MANIFEST
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(TeacherStoreError) as info:
        store.load(ABC, WEIGHTS)
    assert str(path) in str(info.value)
    assert "kd-ray teachers verify" in str(info.value)
    problems = store.verify(ABC)
    assert len(problems) == 1 and MANIFEST in problems[0]  # one problem of the member, reported once


def test_verify_reports_problems(tmp_path: Path) -> None:
    store = TeacherStore(tmp_path)
    _save(store, "good", seed=1)
    _save(store, "bad", seed=2)
    path = tmp_path / "members" / BAD / WEIGHTS
    path.write_bytes(path.read_bytes()[:-10])
    assert store.verify(GOOD) == []
    problems = store.verify(BAD)
    assert len(problems) == 1
    assert WEIGHTS in problems[0] and "checksum" in problems[0]
    store.delete(BAD)
    assert store.keys() == [GOOD]


def _copy_over(store: TeacherStore, source: str, target: str) -> None:
    """A mistaken rsync: member ``source``'s directory replaces member ``target``'s."""
    shutil.rmtree(store.member_path(target))
    shutil.copytree(store.member_path(source), store.member_path(target))


def test_a_member_copied_over_another_is_refused_naming_both_addresses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kd_ray import cli

    store = TeacherStore(tmp_path)
    weights, _, _ = _save(store, "abc", seed=0)
    _save(store, "other", seed=1)
    _copy_over(store, ABC, OTHER)
    # Every file still matches its checksum: only the address gives the copy away.
    assert store.has(OTHER) and store.manifest(OTHER)["key"] == ABC
    sits, belongs = store.member_path(OTHER), store.member_path(ABC)
    fix = f"kd-ray teachers verify --store {store.uri} --delete-bad"

    for name in (WEIGHTS, LOGITS):
        with pytest.raises(TeacherStoreError) as info:
            store.load(OTHER, name)
        message = str(info.value)
        assert f"sits at {sits} " in message and f"belongs at {belongs} " in message
        assert fix in message and "--retrain-teachers" in message and "\n" not in message
    problems = store.check(OTHER)
    assert len(problems) == 1 and sits in problems[0] and belongs in problems[0]
    assert store.verify(OTHER) == problems
    with pytest.raises(TeacherStoreError, match=f"belongs at {belongs} "):
        check_stored_members(store, [ABC, OTHER])
    assert store.check(ABC) == [] and store.verify(ABC) == []  # the original is sound and untouched
    _assert_nested_equal(store.load(ABC, WEIGHTS), weights)

    assert cli.main(["teachers", "verify", "--store", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    bad = next(line for line in out.splitlines() if line.startswith(f"{OTHER}: BAD"))
    assert sits in bad and belongs in bad and fix in bad
    assert f"{ABC}: ok" in out and out.splitlines()[-1] == "2 members checked, 1 bad"
    assert cli.main(["teachers", "verify", "--store", str(tmp_path), "--delete-bad"]) == 0
    assert f"{OTHER}: deleted" in capsys.readouterr().out
    assert store.keys() == [ABC] and not os.path.exists(sits)
    check_stored_members(store, [ABC, OTHER])  # the misplaced copy is gone; OTHER is trained again when needed


def _edit_spec(manifest: dict) -> None:
    manifest["spec"]["name"] = "other"  # the key still names the directory, the spec another member


def _drop_key(manifest: dict) -> None:
    del manifest["key"]


@pytest.mark.parametrize("edit, expected", [(_edit_spec, "belongs at"), (_drop_key, "records no key or no spec")],
                         ids=["spec-of-another-member", "no-key"])
def test_a_manifest_that_does_not_match_its_address_is_refused(tmp_path: Path, edit, expected: str) -> None:
    store = TeacherStore(tmp_path)
    _save(store, "abc")
    path = tmp_path / "members" / ABC / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(TeacherStoreError, match=expected):
        store.load(ABC, WEIGHTS)
    [problem] = store.check(ABC)
    assert expected in problem and str(path.parent) in problem and "--delete-bad" in problem
    if edit is _edit_spec:
        assert f"belongs at {store.member_path(OTHER)} " in problem  # where the spec's hash puts it


def test_save_refuses_a_key_that_is_not_the_hash_of_the_spec(tmp_path: Path) -> None:
    store = TeacherStore(tmp_path)
    weights, logits, metrics = _member()
    with pytest.raises(ValueError, match=ABC):
        store.save(OTHER, _spec("abc"), weights, logits, metrics)
    assert store.keys() == []


class _FsyncCrash(RuntimeError):
    pass


@pytest.mark.parametrize("fail_at", [1, 2, 3])  # during weights.pt, logits.pt, manifest.json
def test_interrupted_save_leaves_no_partial_member(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    store = TeacherStore(tmp_path)
    _save(store, "other", seed=1)
    calls = {"n": 0}
    real_fsync = os.fsync

    def crashing_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise _FsyncCrash("disk went away")
        real_fsync(fd)

    monkeypatch.setattr(teachers.os, "fsync", crashing_fsync)
    with pytest.raises(_FsyncCrash):
        _save(store, "abc")
    assert calls["n"] == fail_at
    monkeypatch.undo()

    assert not store.has(ABC)
    assert store.keys() == [OTHER]
    assert _visible(tmp_path / "members") == [OTHER]
    with pytest.raises(TeacherStoreError):
        store.load(ABC, WEIGHTS)
    # A later save of the same member succeeds and is whole.
    weights, logits, _ = _save(store, "abc")
    assert store.keys() == sorted([ABC, OTHER])
    _assert_nested_equal(store.load(ABC, WEIGHTS), weights)
    _assert_nested_equal(store.load(ABC, LOGITS), logits)


def test_leftover_directory_without_manifest_is_not_a_member(tmp_path: Path) -> None:
    store = TeacherStore(tmp_path)
    leftover = tmp_path / "members" / ABC
    leftover.mkdir(parents=True)
    (leftover / WEIGHTS).write_bytes(b"half a file")
    assert not store.has(ABC) and store.keys() == []
    weights, _, _ = _save(store, "abc")
    assert store.keys() == [ABC]
    _assert_nested_equal(store.load(ABC, WEIGHTS), weights)


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what an untrusted checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_loads_are_weights_only(tmp_path: Path) -> None:
    store = TeacherStore(tmp_path / "store")
    _save(store, "abc")
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"final": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, buffer)
    data = buffer.getvalue()
    member = tmp_path / "store" / "members" / ABC
    (member / WEIGHTS).write_bytes(data)
    manifest = json.loads((member / MANIFEST).read_text())
    manifest["files"][WEIGHTS] = hashlib.sha256(data).hexdigest()  # the checksum matches
    (member / MANIFEST).write_text(json.dumps(manifest))

    with pytest.raises(TeacherStoreError) as info:
        store.load(ABC, WEIGHTS)
    assert WEIGHTS in str(info.value)
    assert not marker.exists()
    assert store.verify(ABC) and not marker.exists()
    # The file really does carry code: an unrestricted unpickler runs it.
    torch.load(io.BytesIO(data), weights_only=False)
    assert marker.is_dir()


# --- training and sharing ----------------------------------------------------------------------


def test_members_are_shared_across_ensemble_sizes(
    base_cfg, session_store, mnist1d_arrays, shared_teacher, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert shared_teacher == [member_key(base_cfg, m) for m in range(base_cfg.teacher_members)]
    assert all(session_store.has(k) for k in shared_teacher)

    def no_training(*args, **kwargs):
        raise AssertionError("train_member called for a member already in the store")

    monkeypatch.setattr(teachers, "train_member", no_training)
    one = base_cfg.replace(teacher_members=1)
    keys = ensure_members(one, session_store, mnist1d_arrays, torch.device("cpu"))
    assert keys == shared_teacher[:1]
    assert one.teacher_key() != base_cfg.teacher_key()  # the ensembles differ, their members do not


def test_larger_ensemble_trains_only_missing_members(
    base_cfg, session_store, mnist1d_arrays, shared_teacher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(session_store.root, tmp_path / "store")
    store = TeacherStore(tmp_path / "store")
    trained: list[tuple[int, float]] = []

    def fake_train(cfg, member, *args, **kwargs):
        trained.append((member, cfg.teacher_lr))
        return _member(member)

    monkeypatch.setattr(teachers, "train_member", fake_train)
    cpu = torch.device("cpu")
    three = base_cfg.replace(teacher_members=3)
    keys = ensure_members(three, store, mnist1d_arrays, cpu)
    assert trained == [(2, base_cfg.teacher_lr)]
    assert keys[:2] == shared_teacher and store.has(keys[2])
    assert store.manifest(keys[2])["spec"] == three.teacher_spec(2)
    # A field that decides the weights makes new members.
    other = base_cfg.replace(teacher_members=1, teacher_lr=0.01)
    ensure_members(other, store, mnist1d_arrays, cpu)
    assert trained[-1] == (0, 0.01)
    assert member_key(other, 0) not in shared_teacher


def test_trained_member_is_accurate_and_consistent(
    base_cfg, session_store, mnist1d_arrays, shared_teacher
) -> None:
    y_test = torch.as_tensor(mnist1d_arrays.y_test)
    for member, key in enumerate(shared_teacher):
        manifest = session_store.manifest(key)
        assert manifest["spec"] == base_cfg.teacher_spec(member)
        assert manifest["metrics"]["test_acc"] > 0.5  # chance is 0.1
        logits = session_store.load(key, LOGITS)
        assert logits["test"].shape == (len(y_test), 10)
        assert logits["train"].shape == (len(mnist1d_arrays.y_train), 10)
        assert logits["test"].dtype == torch.float32
        assert accuracy(logits["test"], y_test) == pytest.approx(manifest["metrics"]["test_acc"])
        weights = session_store.load(key, WEIGHTS)
        assert weights["initial"].keys() == weights["final"].keys()
        name = _first_weight(weights["final"])
        assert not torch.equal(weights["initial"][name], weights["final"][name])
    # Different members start from different seeds.
    w0, w1 = (session_store.load(k, WEIGHTS)["initial"][name] for k in shared_teacher)
    assert not torch.equal(w0, w1)

    ensemble = load_ensemble(base_cfg, session_store, torch.device("cpu"))
    assert ensemble.key == base_cfg.teacher_key()
    assert ensemble.test_logits.shape == (base_cfg.teacher_members, len(y_test), 10)
    # The cached logits are what the stored weights compute.
    x_test = torch.as_tensor(mnist1d_arrays.x_test)
    torch.testing.assert_close(
        ensemble.log_probs(x_test), ensemble_log_probs(ensemble.test_logits), atol=1e-4, rtol=1e-4
    )
    assert accuracy(ensemble_log_probs(ensemble.test_logits), y_test) > 0.5


# --- which members, on which data ---------------------------------------------------------------


def _labels(n: int = 400) -> np.ndarray:
    return np.random.default_rng(0).permutation(np.arange(n) % 10).astype(np.int64)


def test_teacher_indices_follow_the_teacher_fields_alone() -> None:
    y = _labels()
    full = teacher_indices(TrialConfig(), y)
    val = val_indices(y, val_fraction=TrialConfig().val_fraction, data_seed=0)
    assert len(val) == 40 and np.array_equal(np.union1d(full, val), np.arange(len(y)))
    assert not np.isin(val, full).any()  # the teacher never trains on a validation example
    assert np.array_equal(teacher_indices(TrialConfig(val_fraction=0.0), y), np.arange(len(y)))
    half = TrialConfig(teacher_split="half", data_seed=3)
    d0 = teacher_indices(half, y)
    assert len(d0) == (len(y) - 40) // 2 and d0.dtype == np.int64 and np.all(np.diff(d0) > 0)
    # The student's distillation split, fraction and seed never move the teacher's data.
    for student in ({"distill_split": "holdout"}, {"distill_split": "both", "distill_fraction": 0.25, "seed": 7}):
        assert np.array_equal(teacher_indices(half.replace(**student), y), d0)
        split_teacher, _ = split_indices(
            y, teacher_split="half", distill_split=student["distill_split"],
            distill_fraction=student.get("distill_fraction", 1.0), data_seed=3, seed=student.get("seed", 0),
            val_fraction=half.val_fraction,
        )
        assert np.array_equal(split_teacher, d0)
    assert not np.array_equal(teacher_indices(half.replace(data_seed=4), y), d0)
    small = teacher_indices(TrialConfig(teacher_fraction=0.05, val_fraction=0.0), y)
    assert len(small) == 20 and np.array_equal(np.bincount(y[small]), np.full(10, 2))


def test_the_validation_split_is_part_of_a_teacher_s_identity() -> None:
    base = TrialConfig()
    y = _labels()
    for other in (base.replace(val_fraction=0.0), base.replace(val_fraction=0.2)):
        # Another validation split trains the teacher on other examples: another member, another ensemble.
        assert not np.array_equal(teacher_indices(other, y), teacher_indices(base, y))
        assert member_key(other, 0) != member_key(base, 0) and other.teacher_key() != base.teacher_key()
    assert base.teacher_spec(0)["val_fraction"] == base.val_fraction


def test_needed_members_share_members_and_add_the_control() -> None:
    base = TrialConfig(teacher_members=3)
    members = needed_members([base, base.replace(teacher_members=1), base.replace(temperature=1.0)])
    assert list(members) == [member_key(base, m) for m in range(3)]  # one ensemble of 3 holds the one of 1
    assert [(n.member, n.role) for n in members.values()] == [(0, "reference"), (1, "reference"), (2, "reference")]
    control = needed_members([base.replace(teacher_members=2, control=True)])
    assert [(n.member, n.role) for n in control.values()] == [(0, "reference"), (1, "reference"), (0, "control"),
                                                               (1, "control")]
    other_teacher = needed_members([base.replace(teacher_members=2), base.replace(teacher_members=2, teacher_epochs=3)])
    assert len(other_teacher) == 4


def test_needed_members_follow_the_teacher_sharing() -> None:
    # A study's grid: two ensemble sizes and two temperatures (arms), three seeds.
    grid = [TrialConfig(teacher_members=m, temperature=t, seed=s) for m in (1, 3) for t in (1.0, 4.0) for s in range(3)]
    per_seed = needed_members(grid)
    # Each replicate has its own members 0..2 (the ensemble of 1 is member 0 of the ensemble of 3).
    assert len(per_seed) == 3 * 3
    assert sorted((n.cfg.seed, n.member) for n in per_seed.values()) == [(s, m) for s in range(3) for m in range(3)]
    for needed in per_seed.values():
        assert member_key(needed.cfg, needed.member) in per_seed
    shared = needed_members([cfg.replace(teacher_sharing="shared") for cfg in grid])
    assert len(shared) == 3 and not set(shared) & set(per_seed)
    with_control = needed_members([cfg.replace(control=True) for cfg in grid])
    assert len(with_control) == 2 * 3 * 3
    assert sum(n.role == "control" for n in with_control.values()) == 3 * 3


def test_member_steps_count_the_teachers_schedule() -> None:
    y = _labels(1000)
    cfg = TrialConfig(teacher_epochs=7, teacher_batch_size=128)
    # 900 left beside the validation split: 7 batches of 128, the 4 left over joining the last.
    assert member_steps(cfg, y) == 7 * 7
    assert member_steps(cfg.replace(teacher_split="half"), y) == 7 * 4  # 450: 3 batches of 128 and one of 66


def test_retrain_deletes_and_the_check_names_the_bad_file(tmp_path: Path) -> None:
    store = TeacherStore(tmp_path)
    _save(store, "good")
    _save(store, "bad", seed=1)
    weights = tmp_path / "members" / BAD / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-8])
    check_stored_members(store, [GOOD, "absent"])  # absent members are left to be trained
    with pytest.raises(TeacherStoreError, match=str(weights)):
        check_stored_members(store, [GOOD, BAD])
    delete_members(store, [BAD, "absent"])
    assert store.keys() == [GOOD]
    check_stored_members(store, [GOOD, BAD])


def test_ensure_members_with_retrain_trains_the_stored_members_again(
    base_cfg, session_store, mnist1d_arrays, shared_teacher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(session_store.root, tmp_path / "store")
    store = TeacherStore(tmp_path / "store")
    trained: list[int] = []

    def fake_train(cfg, member, *args, **kwargs):
        trained.append(member)
        return _member(member + 10)

    monkeypatch.setattr(teachers, "train_member", fake_train)
    assert ensure_members(base_cfg, store, mnist1d_arrays, torch.device("cpu"), members=[1], retrain=True) == [
        shared_teacher[1]
    ]
    assert trained == [1]
    assert store.manifest(shared_teacher[1])["metrics"] == _member(11)[2]  # the new member replaced the old
    assert store.manifest(shared_teacher[0]) == session_store.manifest(shared_teacher[0])  # the other is kept


def test_an_object_store_uri_writes_each_file_atomically(tmp_path: Path) -> None:
    """A ``scheme://`` store (here file://, the path object stores take) writes every file through a
    temporary name, the manifest last, and leaves no temporary file behind."""
    store = TeacherStore((tmp_path / "remote").as_uri())
    assert not store.local
    weights, logits, _ = _save(store, "abc")
    member = tmp_path / "remote" / "members" / ABC
    assert sorted(os.listdir(member)) == sorted([WEIGHTS, LOGITS, MANIFEST])
    _assert_nested_equal(store.load(ABC, WEIGHTS), weights)
    _assert_nested_equal(store.load(ABC, LOGITS), logits)
    assert store.keys() == [ABC] and store.verify(ABC) == []
