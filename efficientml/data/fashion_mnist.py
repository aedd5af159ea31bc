"""Fashion-MNIST (Zalando, MIT): 60,000 train + 10,000 test 28×28 grayscale images, IDX format, gzip.

Files are found by :mod:`efficientml.data.paths` (explicit root → EFFICIENTML_DATA → ../shared/data →
/usr/share/datasets/fashion-mnist → download with checksum)."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import torch

from efficientml.core.errors import CheckpointError, ConfigError
from efficientml.data.loader import ImageTensors, TensorLoader
from efficientml.data.paths import resolve

MEAN, STD = (0.2860,), (0.3530,)
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
_URL = "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{}"
FILES = {
    "train": (("train-images-idx3-ubyte.gz",
               "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
              ("train-labels-idx1-ubyte.gz",
               "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056")),
    "test": (("t10k-images-idx3-ubyte.gz",
              "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
             ("t10k-labels-idx1-ubyte.gz",
              "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05")),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its declared shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise CheckpointError(f"{str(path)!r} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise CheckpointError(f"{str(path)!r} is truncated: {body.size} bytes for shape {dims}")
    return body.reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> ImageTensors:
    if split not in FILES:
        raise ConfigError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    (img_name, img_sha), (lbl_name, lbl_sha) = FILES[split]
    paths = [resolve(f"fashion-mnist/{name}", explicit=root, url=_URL.format(name), sha256=sha,
                     system_key="fashion-mnist") for name, sha in ((img_name, img_sha), (lbl_name, lbl_sha))]
    images = torch.from_numpy(read_idx(paths[0]).copy()).unsqueeze(1)   # (N, 1, 28, 28) uint8
    labels = torch.from_numpy(read_idx(paths[1]).astype(np.int64))      # (N,)
    if labels.ndim != 1 or len(labels) != len(images):
        raise CheckpointError(f"{str(paths[1])!r} holds {tuple(labels.shape)} labels for {len(images)} images "
                              f"in {str(paths[0])!r}; expected one label per image")
    if len(labels) and int(labels.max()) >= len(CLASSES):
        i = int(labels.argmax())
        raise CheckpointError(f"{str(paths[1])!r} has label {int(labels[i])} at index {i}; Fashion-MNIST labels "
                              f"are 0 to {len(CLASSES) - 1}")
    return ImageTensors(images, labels, MEAN, STD, CLASSES)


def fashion_mnist_loaders(batch_size: int = 128, augment: bool = True, pad_to: int | None = None,
                          train_subset: int | None = None, test_subset: int | None = None,
                          root: str | os.PathLike | None = None, seed: int = 0,
                          eval_batch_size: int = 512, test_only: bool = False) -> tuple[TensorLoader | None, TensorLoader]:
    """(train, test) loaders; train is shuffled and (optionally) augmented with crops and flips.
    ``test_only``: train is None and its files are not needed (evaluation)."""
    test = load_fashion_mnist("test", root)  # first: `eval --data-root` names the test file it misses
    if test_only:
        return None, TensorLoader(test.subset(test_subset, seed) if test_subset else test, eval_batch_size,
                                  shuffle=False, pad_to=pad_to)
    train = load_fashion_mnist("train", root)
    if train_subset:
        train = train.subset(train_subset, seed)
    if test_subset:
        test = test.subset(test_subset, seed)
    return (TensorLoader(train, batch_size, shuffle=True, augment=augment, pad_to=pad_to, seed=seed),
            TensorLoader(test, eval_batch_size, shuffle=False, pad_to=pad_to))
