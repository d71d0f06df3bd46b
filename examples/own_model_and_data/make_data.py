"""Write data.npz beside this file: a 3-class problem of 20 features from scikit-learn's make_classification.

The layout kd_ray reads: x_train, y_train, x_test, y_test (x float32 [N, *shape], y integer class indices
in [0, C)) and an optional num_classes. ``arrays`` returns the same dict, for ``--set dataset=...:arrays``.
"""

import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import make_classification

TRAIN, TEST = 1000, 500


def arrays() -> dict:
    x, y = make_classification(n_samples=TRAIN + TEST, n_features=20, n_informative=8, n_redundant=4,
                               n_classes=3, class_sep=1.0, random_state=0)
    mean, std = x[:TRAIN].mean(0), x[:TRAIN].std(0)  # standardised with the train split's statistics
    x = ((x - mean) / std).astype(np.float32)
    y = y.astype(np.int64)
    return {"x_train": x[:TRAIN], "y_train": y[:TRAIN], "x_test": x[TRAIN:], "y_test": y[TRAIN:],
            "num_classes": np.int64(3)}


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("data.npz")
    np.savez(path, **arrays())
    print(f"wrote {path}")
