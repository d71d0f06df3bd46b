"""A user's dataset: a .npz file or a function returning the arrays, checked before any compute and read as
any dataset (dataset_info, load_arrays, the splits)."""

from __future__ import annotations

import numpy as np
import pytest

from kd_ray.config import ConfigError, TrialConfig
from kd_ray.data.datasets import dataset_info, load_arrays
from kd_ray.data.splits import split_indices


def arrays(n_train=60, n_test=20, shape=(5,), classes=3, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {"x_train": rng.normal(size=(n_train, *shape)).astype(np.float32),
            "y_train": np.arange(n_train) % classes, "x_test": rng.normal(size=(n_test, *shape)).astype(np.float32),
            "y_test": np.arange(n_test) % classes}


def test_an_npz_file_is_a_dataset(tmp_path):
    path = tmp_path / "mine.npz"
    np.savez(path, **arrays(), num_classes=4)
    info = dataset_info(str(path))
    # Feature vectors become one-channel signals; num_classes is the file's, not the largest label + 1.
    assert (info.input_shape, info.num_classes, info.kind, info.train_size, info.can_generate) == ((1, 5), 4,
                                                                                                  "signal", 60, False)
    loaded = load_arrays(str(path))
    assert loaded.x_train.dtype == np.float32 and loaded.x_train.shape == (60, 1, 5) and loaded.y_test.dtype == np.int64
    teacher, distill = split_indices(loaded.y_train, teacher_split="half", distill_split="holdout",
                                     distill_fraction=0.5, data_seed=0, seed=0, val_fraction=0.1)
    assert not set(teacher) & set(distill)


def test_a_function_is_a_dataset_and_images_keep_their_kind(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(
        "import numpy as np\n"
        "def images():\n"
        "    rng = np.random.default_rng(1)\n"
        "    return {'x_train': rng.random((30, 1, 6, 6)), 'y_train': np.arange(30) % 2,\n"
        "            'x_test': rng.random((10, 1, 6, 6)), 'y_test': np.arange(10) % 2}\n")
    monkeypatch.chdir(tmp_path)
    info = dataset_info("mydata.py:images")
    assert (info.input_shape, info.num_classes, info.kind) == ((1, 6, 6), 2, "gray")
    cfg = TrialConfig(dataset="mydata.py:images", augmentation="mixup")
    assert cfg.teacher_spec()["data_version"].startswith("sha256:")


@pytest.mark.parametrize("change, match", [
    (lambda a: a.pop("y_test"), "key 'y_test' is missing"),
    (lambda a: a.update(y_train=a["y_train"][:-1]), "y_train holds 59 labels but x_train 60 inputs"),
    (lambda a: a.update(x_test=np.zeros((20, 6), np.float32)), r"x_test has inputs of shape \[1, 6\]"),
    (lambda a: a.update(y_train=a["y_train"] + 0.5), "y_train has shape .* of float64; allowed: integer"),
    (lambda a: a.update(y_test=a["y_test"] - 1), r"labels span \[-1, 2\]"),
    (lambda a: a.update(num_classes=2), r"labels span \[0, 2\] with num_classes=2"),
    (lambda a: a.update(x_train=np.full((60, 5), np.nan, np.float32)), "x_train holds NaN"),
    (lambda a: a.update(x_train=np.zeros((60, 2, 3, 3, 3), np.float32)), "x_train has inputs of shape"),
])
def test_a_bad_npz_is_refused_in_one_line_naming_the_file_and_the_key(tmp_path, change, match):
    raw = arrays()
    change(raw)
    path = tmp_path / "bad.npz"
    np.savez(path, **raw)
    with pytest.raises(ConfigError, match=match) as info:
        dataset_info(str(path))
    assert str(info.value).startswith(f"dataset={str(path)!r}") and "\n" not in str(info.value)


def test_a_missing_or_unreadable_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="there is no file"):
        load_arrays(str(tmp_path / "none.npz"))
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ConfigError, match="is not a readable .npz"):
        load_arrays(str(tmp_path / "text.npz"))
    with pytest.raises(ConfigError, match="dataset='nothing' is not allowed"):
        TrialConfig(dataset="nothing")


def test_the_data_hash_follows_the_file_bytes(tmp_path):
    path = tmp_path / "mine.npz"
    np.savez(path, **arrays())
    cfg = TrialConfig(dataset=str(path))
    first = cfg.teacher_key()
    np.savez(path, **arrays(seed=1))
    assert TrialConfig(dataset=str(path)).teacher_key() != first
