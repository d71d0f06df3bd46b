"""Tests for kd_ray.data.datasets: loaders, caches, CIFAR parsing from tiny archives, split bookkeeping."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest

from kd_ray.config import DATASETS, ConfigError
from kd_ray.data import datasets as data
from kd_ray.data.datasets import DATASET_INFO, DataError, generate_extra, load_arrays


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # No test may write to the home directory, even one that forgets to pass cache_dir.
    cache = tmp_path / "kd_ray_data"
    monkeypatch.setenv("KD_RAY_DATA", str(cache))
    return cache


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated mnist1d cache shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("mnist1d_cache")
    load_arrays("mnist1d", cache_dir=root)
    return root


def test_dataset_info_matches_config_names() -> None:
    assert tuple(DATASET_INFO) == DATASETS
    assert DATASET_INFO["mnist1d"].input_shape == (1, 40)
    assert DATASET_INFO["digits"].input_shape == (1, 8, 8)
    assert DATASET_INFO["cifar100"].num_classes == 100
    assert [n for n, i in DATASET_INFO.items() if i.can_generate] == ["mnist1d"]


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KD_RAY_DATA", str(tmp_path / "x"))
    assert data.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("KD_RAY_DATA")
    assert data.default_cache_dir() == Path.home() / ".cache" / "kd_ray" / "data"


# --- mnist1d -----------------------------------------------------------------------------------


def test_mnist1d_shapes_dtypes_labels(mnist1d_cache: Path) -> None:
    arrays = load_arrays("mnist1d", cache_dir=mnist1d_cache)
    assert arrays.x_train.shape == (4000, 1, 40) and arrays.x_test.shape == (10_000, 1, 40)
    assert arrays.x_train.dtype == np.float32 and arrays.y_train.dtype == np.int64
    assert arrays.y_test.dtype == np.int64
    assert set(np.unique(arrays.y_train)) == set(range(10))
    assert np.array_equal(np.bincount(arrays.y_test), np.full(10, 1000))  # 1000 test samples per class
    # The test set is on the train scale: standardised with the same raw statistics.
    assert abs(float(arrays.x_test.mean()) - float(arrays.x_train.mean())) < 0.02
    assert abs(float(arrays.x_test.std()) / float(arrays.x_train.std()) - 1.0) < 0.02
    train_rows = {row.tobytes() for row in arrays.x_train}
    assert not any(row.tobytes() in train_rows for row in arrays.x_test)


def test_mnist1d_matches_package_and_leaves_global_rng_alone(tmp_path: Path, mnist1d_cache: Path) -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    np.random.seed(123)
    random.seed(456)
    np_before = np.random.get_state()
    py_before = random.getstate()

    fresh = load_arrays("mnist1d", cache_dir=tmp_path / "fresh")
    extra_x, _ = generate_extra("mnist1d", 30, cache_dir=tmp_path / "fresh")

    np_after = np.random.get_state()
    assert np_before[0] == np_after[0] and np.array_equal(np_before[1], np_after[1])
    assert np_before[2:] == np_after[2:]
    assert random.getstate() == py_before
    assert len(extra_x) == 30

    # Deterministic: a second independent generation gives identical arrays.
    cached = load_arrays("mnist1d", cache_dir=mnist1d_cache)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(fresh, field), getattr(cached, field))

    state = np.random.get_state()
    official = make_dataset(get_dataset_args())
    np.random.set_state(state)
    # The train set is the package's default one, sample for sample.
    np.testing.assert_allclose(fresh.x_train[:, 0], official["x"], atol=1e-6)
    assert np.array_equal(fresh.y_train, official["y"])
    # The test set is the generator's own draw with TEST_SEED, on the default set's scale.
    args = get_dataset_args()
    args.num_samples, args.seed = data.MNIST1D_TEST_SIZE, data.TEST_SEED
    state = np.random.get_state()
    test_set = make_dataset(args)
    np.random.set_state(state)
    # make_dataset standardises what it generated with its own statistics; undo the difference.
    assert np.array_equal(np.concatenate([test_set["y"], test_set["y_test"]]), fresh.y_test)
    own_scale = (fresh.x_test[:, 0] - fresh.x_test.mean()) / fresh.x_test.std()
    np.testing.assert_allclose(own_scale, np.concatenate([test_set["x"], test_set["x_test"]]), atol=1e-4)


def test_mnist1d_cache_written_and_reused(mnist1d_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = list(mnist1d_cache.glob("mnist1d_v*.npz"))
    assert len(files) == 1
    assert not list(mnist1d_cache.glob("*.tmp"))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated although the cache exists")

    import mnist1d.data

    monkeypatch.setattr(mnist1d.data, "make_dataset", refuse)
    monkeypatch.setattr(data, "_mnist1d_raw", refuse)
    arrays = load_arrays("mnist1d", cache_dir=mnist1d_cache)
    assert arrays.x_train.shape == (4000, 1, 40)


def test_mnist1d_corrupt_cache_is_rebuilt(tmp_path: Path, mnist1d_cache: Path) -> None:
    root = tmp_path / "corrupt"
    root.mkdir()
    [cached] = mnist1d_cache.glob("mnist1d_v*.npz")  # the name the cache of the base arrays goes under
    (root / cached.name).write_bytes(b"not a zip file")
    arrays = load_arrays("mnist1d", cache_dir=root)
    assert np.load(root / cached.name, allow_pickle=False)["x_train"].shape == (4000, 1, 40)  # rebuilt
    reference = load_arrays("mnist1d", cache_dir=mnist1d_cache)
    assert np.array_equal(arrays.x_train, reference.x_train)


def test_generate_extra(mnist1d_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 1003
    x, y = generate_extra("mnist1d", n, cache_dir=mnist1d_cache)
    assert x.shape == (n, 1, 40) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int64
    assert set(np.unique(y)) == set(range(10))

    base = load_arrays("mnist1d", cache_dir=mnist1d_cache)
    base_rows = {row.tobytes() for row in np.concatenate([base.x_train, base.x_test])}
    assert not any(row.tobytes() in base_rows for row in x)
    # Same scale as train: standardised with the base set's raw statistics, not their own.
    assert abs(float(x.mean()) - float(base.x_train.mean())) < 0.1
    assert abs(float(x.std()) / float(base.x_train.std()) - 1.0) < 0.1

    # Cached by n: a second call does not generate.
    monkeypatch.setattr(data, "_mnist1d_raw", lambda args: (_ for _ in ()).throw(AssertionError("regenerated")))
    x2, y2 = generate_extra("mnist1d", n, cache_dir=mnist1d_cache)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert len(list(mnist1d_cache.glob(f"mnist1d_extra_*_n{n}_*.npz"))) == 1

    empty_x, empty_y = generate_extra("mnist1d", 0, cache_dir=mnist1d_cache)
    assert empty_x.shape == (0, 1, 40) and empty_y.shape == (0,)


def test_generate_extra_refuses_other_datasets_and_bad_n() -> None:
    with pytest.raises(ConfigError, match="cannot generate"):
        generate_extra("digits", 10)
    with pytest.raises(ConfigError):
        generate_extra("mnist1d", -1)


def test_unknown_dataset() -> None:
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_arrays("mnist2d")


# --- digits ------------------------------------------------------------------------------------


def test_digits() -> None:
    arrays = load_arrays("digits")
    assert arrays.x_train.shape[1:] == (1, 8, 8) and arrays.x_test.shape[1:] == (1, 8, 8)
    assert len(arrays.x_train) + len(arrays.x_test) == 1797
    assert len(arrays.x_test) == 360
    assert arrays.x_train.dtype == np.float32 and arrays.y_train.dtype == np.int64
    assert arrays.x_train.min() >= 0.0 and arrays.x_train.max() <= 1.0
    assert arrays.x_train.max() == 1.0
    assert set(np.unique(arrays.y_test)) == set(range(10))
    again = load_arrays("digits")
    assert np.array_equal(arrays.x_train, again.x_train) and np.array_equal(arrays.y_test, again.y_test)


# --- cifar -------------------------------------------------------------------------------------


def _records(labels: list[tuple[int, ...]], first_pixel_values: list[int]) -> bytes:
    """Binary CIFAR records: label bytes then 3072 pixels (channel-major, row-major)."""
    out = bytearray()
    for label, value in zip(labels, first_pixel_values):
        pixels = np.full(3072, 7, dtype=np.uint8)
        pixels[0] = value  # channel 0, row 0, column 0
        pixels[1024 + 32 * 2 + 5] = 200  # channel 1, row 2, column 5
        out += bytes(label) + pixels.tobytes()
    return bytes(out)


def _write_tar(path: Path, members: dict[str, bytes]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.md5(path.read_bytes()).hexdigest()


def _cifar10_members() -> dict[str, bytes]:
    members = {}
    for i in range(1, 6):
        labels = [(i,), (9,)]
        members[f"cifar-10-batches-bin/data_batch_{i}.bin"] = _records(labels, [10 * i, 255])
    members["cifar-10-batches-bin/test_batch.bin"] = _records([(3,), (0,), (1,)], [0, 51, 102])
    return members


def _cifar100_members() -> dict[str, bytes]:
    return {
        "cifar-100-binary/train.bin": _records([(19, 99), (0, 42), (5, 7)], [1, 2, 3]),
        "cifar-100-binary/test.bin": _records([(3, 64)], [255]),
    }


def _point_archive(monkeypatch: pytest.MonkeyPatch, name: str, md5: str, url: str | None = None) -> None:
    archive = data.CIFAR_ARCHIVES[name]
    changes = {"md5": md5} if url is None else {"md5": md5, "url": url}
    monkeypatch.setitem(data.CIFAR_ARCHIVES, name, dataclasses.replace(archive, **changes))


def test_cifar10_parses_official_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    md5 = _write_tar(root / "cifar-10-binary.tar.gz", _cifar10_members())
    _point_archive(monkeypatch, "cifar10", md5)

    arrays = load_arrays("cifar10", cache_dir=root, download=False)
    assert arrays.x_train.shape == (10, 3, 32, 32) and arrays.x_test.shape == (3, 3, 32, 32)
    assert arrays.x_train.dtype == np.float32 and arrays.y_train.dtype == np.int64
    assert arrays.y_train.tolist() == [1, 9, 2, 9, 3, 9, 4, 9, 5, 9]
    assert arrays.y_test.tolist() == [3, 0, 1]
    assert arrays.x_train[4, 0, 0, 0] == pytest.approx(30 / 255)
    assert arrays.x_train[1, 0, 0, 0] == 1.0
    assert arrays.x_test[1, 0, 0, 0] == pytest.approx(0.2)
    assert arrays.x_test[0, 1, 2, 5] == pytest.approx(200 / 255)
    assert arrays.x_test[0, 2, 2, 5] == pytest.approx(7 / 255)

    # The parsed cache is reused even once the archive is gone.
    (root / "cifar-10-binary.tar.gz").unlink()
    again = load_arrays("cifar10", cache_dir=root, download=False)
    assert np.array_equal(arrays.x_train, again.x_train) and np.array_equal(arrays.y_test, again.y_test)


def test_cifar100_uses_fine_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    md5 = _write_tar(root / "cifar-100-binary.tar.gz", _cifar100_members())
    _point_archive(monkeypatch, "cifar100", md5)

    arrays = load_arrays("cifar100", cache_dir=root, download=False)
    assert arrays.y_train.tolist() == [99, 42, 7] and arrays.y_test.tolist() == [64]
    assert arrays.x_train.shape == (3, 3, 32, 32) and arrays.x_test.shape == (1, 3, 32, 32)
    assert arrays.x_train[2, 0, 0, 0] == pytest.approx(3 / 255)
    assert arrays.x_test[0, 0, 0, 0] == 1.0
    assert arrays.x_train[0, 1, 2, 5] == pytest.approx(200 / 255)


def test_cifar_md5_mismatch_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    archive = root / "cifar-10-binary.tar.gz"
    md5 = _write_tar(archive, _cifar10_members())
    _point_archive(monkeypatch, "cifar10", md5)
    corrupted = bytearray(archive.read_bytes())
    corrupted[len(corrupted) // 2] ^= 0xFF
    archive.write_bytes(bytes(corrupted))

    with pytest.raises(DataError, match="md5") as excinfo:
        load_arrays("cifar10", cache_dir=root, download=False)
    assert str(archive) in str(excinfo.value)
    assert not list(root.glob("*.npz"))


def test_cifar_absent_without_download_names_path_and_url(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    with pytest.raises(DataError) as excinfo:
        load_arrays("cifar100", cache_dir=root, download=False)
    message = str(excinfo.value)
    assert str(root / "cifar-100-binary.tar.gz") in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz" in message
    assert "03b5dce01913d631647c71ecec9e9cb8" in message


def test_cifar_download_verifies_and_places_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "mirror" / "cifar-10-binary.tar.gz"
    md5 = _write_tar(source, _cifar10_members())
    _point_archive(monkeypatch, "cifar10", md5, url=source.as_uri())
    root = tmp_path / "cache"

    arrays = load_arrays("cifar10", cache_dir=root)
    assert (root / "cifar-10-binary.tar.gz").read_bytes() == source.read_bytes()
    assert arrays.y_test.tolist() == [3, 0, 1]

    # A download with the wrong checksum is discarded, never kept.
    _point_archive(monkeypatch, "cifar100", "0" * 32, url=source.as_uri())
    with pytest.raises(DataError, match="md5"):
        load_arrays("cifar100", cache_dir=root)
    assert not (root / "cifar-100-binary.tar.gz").exists()
    assert not list(root.glob(".*.tmp"))  # nor its temporary file


def test_cifar_download_failure_names_path_and_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = (tmp_path / "nowhere" / "cifar-10-binary.tar.gz").as_uri()
    _point_archive(monkeypatch, "cifar10", "0" * 32, url=missing)
    root = tmp_path / "cache"
    with pytest.raises(DataError) as excinfo:
        load_arrays("cifar10", cache_dir=root)
    assert missing in str(excinfo.value) and str(root / "cifar-10-binary.tar.gz") in str(excinfo.value)


def test_cifar_truncated_member_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    members = _cifar100_members()
    members["cifar-100-binary/test.bin"] = members["cifar-100-binary/test.bin"][:-1]
    md5 = _write_tar(root / "cifar-100-binary.tar.gz", members)
    _point_archive(monkeypatch, "cifar100", md5)
    with pytest.raises(DataError, match="records"):
        load_arrays("cifar100", cache_dir=root, download=False)
