"""scikit-learn's handwritten digits (UCI optdigits test set): 1,797 grayscale 8×8 images, 10 classes,
pixel values 0–16. Small enough to train a model in seconds on a CPU.

The train/test split is a permutation seeded by ``seed``, so it is the same on every machine.
scikit-learn is imported only when the data is loaded (``pip install 'efficientml[data]'``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from efficientml.core.config import check_choice, check_range
from efficientml.core.lazy import optional_import

NUM_SAMPLES = 1797
# Statistics of all 1,797 images after scaling pixels to [0, 1] (divided by 16).
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760


def load_digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0,
                normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 8, 8) float32 in [0, 1] (or standardized) and labels (N,) int64.

    ``split`` is "train", "test" or "all"; the test part is ``int(1797 * test_fraction)`` images
    (359 at 0.2) chosen by a permutation seeded with ``seed``.
    """
    check_choice("split", split, {"train", "test", "all"})
    check_range("test_fraction", test_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
    datasets = optional_import("sklearn.datasets", "data", "the digits dataset")
    bunch = datasets.load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    if normalize:
        x = (x - DIGITS_MEAN) / DIGITS_STD
    if split == "all":
        return x, y
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    n_test = int(len(y) * test_fraction)
    idx = order[:n_test] if split == "test" else order[n_test:]
    return x[idx], y[idx]


def digits_dataset(split: str = "train", test_fraction: float = 0.2, seed: int = 0,
                   normalize: bool = False) -> TensorDataset:
    """:func:`load_digits` as a ``TensorDataset`` of (image, label) pairs."""
    return TensorDataset(*load_digits(split, test_fraction, seed, normalize))
