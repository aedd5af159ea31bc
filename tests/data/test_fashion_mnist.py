import gzip

import pytest
import torch

from efficientml.core.errors import CheckpointError, DataNotFoundError
from efficientml.data import fashion_mnist_loaders, load_fashion_mnist
from efficientml.data.fashion_mnist import read_idx
from efficientml.data.loader import TensorLoader


def test_fashion_mnist_shapes_and_label_counts():
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    mean = train.images.float().div(255).mean().item()
    assert mean == pytest.approx(0.2860, abs=1e-3)


def test_loader_pads_and_augments_deterministically():
    tr, te = fashion_mnist_loaders(batch_size=64, pad_to=32, train_subset=256, test_subset=128,
                                  eval_batch_size=64)
    x, y = next(iter(te))
    assert x.shape == (64, 1, 32, 32) and len(te) == 2
    # padded border is black (normalized value of 0)
    assert torch.allclose(x[:, :, 0, :], torch.full_like(x[:, :, 0, :], -0.2860 / 0.3530), atol=1e-5)
    a = next(iter(TensorLoader(tr.data, 64, shuffle=True, augment=True, seed=1)))[0]
    b = next(iter(TensorLoader(tr.data, 64, shuffle=True, augment=True, seed=1)))[0]
    assert torch.equal(a, b)


def test_idx_errors(tmp_path):
    p = tmp_path / "bad-idx1-ubyte.gz"
    with gzip.open(p, "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 10, 1, 2]))  # says 10 items, has 2
    with pytest.raises(CheckpointError, match="truncated"):
        read_idx(p)


def test_missing_dataset_names_env_var(tmp_path, monkeypatch):
    import efficientml.data.paths as paths

    monkeypatch.setattr(paths, "data_roots", lambda: [tmp_path / "nothing"])
    monkeypatch.setattr(paths, "SYSTEM_DIRS", {})
    monkeypatch.setenv("EFFICIENTML_CACHE", str(tmp_path / "cache"))

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(paths.urllib.request, "urlopen", offline)
    with pytest.raises(DataNotFoundError, match="EFFICIENTML_DATA.*fashion-mnist/train-images-idx3-ubyte.gz"):
        load_fashion_mnist("train")
    assert not (tmp_path / "cache" / "fashion-mnist" / "train-images-idx3-ubyte.gz").exists()
