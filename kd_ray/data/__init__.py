"""Data: the datasets as arrays, how a trial splits them, augmentation and extra inputs.

Submodules, each importing only those listed before it:

- ``archives``: downloads checked by md5, and ``DataError``, the one error for data a user must fix;
- ``mnist``: the offline MNIST subset and the MNIST/EMNIST archives;
- ``datasets``: ``DATASET_INFO`` (shape, classes, train size of each dataset) and ``load_arrays``;
- ``splits``: the teacher's and the student's index sets (D0, D1, fractions);
- ``augment``: the augmentation policies, batched on the device;
- ``extra_inputs``: extra distillation inputs (generated, a Gaussian mixture, out-of-domain, a file).
"""

from kd_ray.data.archives import DataError
from kd_ray.data.datasets import DATASET_INFO, DatasetInfo, load_arrays

__all__ = ["DATASET_INFO", "DataError", "DatasetInfo", "load_arrays"]
