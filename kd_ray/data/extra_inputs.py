"""Extra distillation inputs: ``extra_data`` samples beyond the distillation split, from ``extra_source``.

- ``generator``: mnist1d's own generator (``datasets.generate_extra``): perfect in-domain samples, the
  best a generative model could do.
- ``gmm``: synthetic samples from a class-conditional Gaussian mixture fitted to the teacher's own
  training inputs (the paper's E1 adds GAN samples). A mixture rather than a small VAE: it is fitted
  by EM in about a second with no training recipe of its own to tune, it is deterministic given its
  seed, and on standardised 1-D signals or small images it gives samples that look like the data
  on average but are blurred and imperfect, as a GAN's are. Each replicate fits and samples with its
  own stream, so the synthetic set is part of what a replicate redraws.
- ``ood``: out-of-domain inputs for mnist1d (the paper adds SVHN to CIFAR): scikit-learn's 8x8
  handwritten digits, each image read row by row as a 64-sample signal, resampled to mnist1d's
  length and put on the train set's scale (mean 0, sd 1). They have no labels that mean anything
  for mnist1d, so they carry the label -1 and need alpha = 0.
- ``npz``: a user's file (``extra_path``), e.g. GAN samples for CIFAR: an array ``x`` of float32
  ``[N, *input_shape]`` on the dataset's scale (images in [0, 1]) and optionally ``y``, int64 ``[N]``
  labels (absent: -1, unlabelled, alpha must be 0). The first ``extra_data`` rows are used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kd_ray.config import ConfigError, TrialConfig, seed_stream
from kd_ray.data.datasets import Arrays, DataError, DatasetInfo, dataset_info, generate_extra, load_arrays

UNLABELLED = -1
GMM_COMPONENTS = 4  # per class, fewer where a class has few examples (at least GMM_MIN_PER_COMPONENT each)
GMM_MIN_PER_COMPONENT = 20
GMM_FULL_COVARIANCE_MAX_DIM = 128  # above it, diagonal covariances (a full one would not be estimable)
GMM_REG_COVAR = 1e-3  # added to the covariance diagonal, in units of the standardised inputs' variance


def extra_inputs(cfg: TrialConfig, arrays: Arrays, teacher_idx: np.ndarray,
                 data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``cfg.extra_data`` extra inputs ``(x float32 [n, *input_shape], y int64 [n])`` of a trial."""
    n = cfg.extra_data
    info = dataset_info(cfg.dataset)
    if cfg.extra_source == "generator":
        return generate_extra(cfg.dataset, n, data_dir)
    if cfg.extra_source == "gmm":
        return gmm_samples(arrays.x_train[teacher_idx], arrays.y_train[teacher_idx], n, info,
                           seed_stream("extra_samples", cfg.seed))
    if cfg.extra_source == "ood":
        return ood_signals(n, info, seed_stream("extra_samples", cfg.seed), data_dir)
    return read_extra_npz(cfg.extra_path, n, info)


def gmm_samples(x: np.ndarray, y: np.ndarray, n: int, info: DatasetInfo, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of per-class Gaussian mixtures fitted to ``(x, y)``, classes in the proportions of ``y``."""
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    per_class = rng.multinomial(n, counts / counts.sum())
    flat = x.reshape(len(x), -1).astype(np.float64)
    covariance = "full" if flat.shape[1] <= GMM_FULL_COVARIANCE_MAX_DIM else "diag"
    xs, ys = [], []
    for label, count, wanted in zip(classes, counts, per_class):
        if wanted == 0:
            continue
        components = int(max(1, min(GMM_COMPONENTS, count // GMM_MIN_PER_COMPONENT)))
        mixture = GaussianMixture(components, covariance_type=covariance, reg_covar=GMM_REG_COVAR,
                                  random_state=int(rng.integers(2**31)))
        mixture.fit(flat[y == label])
        mixture.random_state = int(rng.integers(2**31))  # sampling draws from a stream of its own
        samples, _ = mixture.sample(int(wanted))
        xs.append(samples)
        ys.append(np.full(int(wanted), label, np.int64))
    order = rng.permutation(n)
    samples = np.concatenate(xs)[order].reshape(n, *info.input_shape)
    if info.kind != "signal":
        samples = np.clip(samples, 0.0, 1.0)  # images stay in [0, 1]
    return samples.astype(np.float32), np.concatenate(ys)[order]


def ood_pool(info: DatasetInfo, data_dir: str | Path | None = None) -> np.ndarray:
    """Every out-of-domain signal there is for mnist1d: digits' images as signals, on the train scale."""
    digits = load_arrays("digits", data_dir)
    images = np.concatenate([digits.x_train, digits.x_test]).reshape(-1, 64).astype(np.float64)
    length = info.input_shape[-1]
    positions = np.linspace(0, 63, length)
    signals = np.stack([np.interp(positions, np.arange(64), row) for row in images])
    signals = (signals - signals.mean()) / signals.std()
    return signals.reshape(-1, *info.input_shape).astype(np.float32)


def ood_signals(n: int, info: DatasetInfo, seed: int,
                data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    pool = ood_pool(info, data_dir)
    if n > len(pool):
        raise ConfigError(f"extra_data={n} with extra_source='ood' is more than the {len(pool)} out-of-domain "
                          f"inputs there are; allowed: 0 to {len(pool)}")
    pick = np.random.default_rng(seed).choice(len(pool), size=n, replace=False)
    return pool[pick], np.full(n, UNLABELLED, np.int64)


def read_extra_npz(path: str | Path, n: int, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` rows of a user's extra-input file, checked against the dataset's layout."""
    path = Path(path).expanduser()
    layout = (f"an .npz with x: float32 [N, {', '.join(map(str, info.input_shape))}] on {info.name}'s scale "
              "and optionally y: int64 [N]")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz:
                raise DataError(f"extra_path={str(path)!r} has no array 'x'; expected {layout}")
            x = npz["x"]
            y = npz["y"] if "y" in npz else None
    except (OSError, ValueError) as exc:
        raise DataError(f"extra_path={str(path)!r} cannot be read ({exc}); expected {layout}") from None
    if x.ndim != 1 + len(info.input_shape) or tuple(x.shape[1:]) != info.input_shape:
        raise DataError(f"extra_path={str(path)!r}: x has shape {x.shape}; expected {layout}")
    if len(x) < n:
        raise DataError(f"extra_path={str(path)!r} holds {len(x)} inputs, fewer than extra_data={n}")
    if y is None:
        y = np.full(len(x), UNLABELLED, np.int64)
    elif y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= info.num_classes:
        raise DataError(f"extra_path={str(path)!r}: y must hold {len(x)} integer labels in [0, {info.num_classes}); "
                        f"got shape {y.shape}, dtype {y.dtype}")
    return x[:n].astype(np.float32), y[:n].astype(np.int64)


def check_extra_inputs(cfg: TrialConfig) -> None:
    """Refuse, before any compute, extra inputs that cannot be had: a bad file, too many OOD inputs,
    unlabelled inputs with a hard-label loss."""
    if cfg.extra_data == 0:
        return
    info = dataset_info(cfg.dataset)
    if cfg.extra_source == "npz":
        try:
            _, y = read_extra_npz(cfg.extra_path, cfg.extra_data, info)
        except DataError as exc:
            raise ConfigError(str(exc)) from None
        if cfg.alpha > 0 and (y == UNLABELLED).any():
            raise ConfigError(f"alpha={cfg.alpha} needs labels, and extra_path={cfg.extra_path!r} has no 'y': "
                              "use alpha=0 or add the labels")
    if cfg.extra_source == "ood":
        available = len(ood_pool(info))
        if cfg.extra_data > available:
            raise ConfigError(f"extra_data={cfg.extra_data} with extra_source='ood' is more than the {available} "
                              f"out-of-domain inputs there are; allowed: 0 to {available}")
