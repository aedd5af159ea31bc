import shutil

import pytest
import torch

from efficientml.core.errors import DataNotFoundError
from efficientml.data.cifar_samples import (CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, load_cifar_samples,
                                            normalize_images, sample_files)


def test_images_and_labels_from_names():
    x, y = load_cifar_samples()
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0
    assert y.tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]
    assert [CIFAR10_CLASSES[i] for i in y[:4]] == ["cat", "ship", "ship", "airplane"]
    # CIFAR-10 test image 0 (a cat) starts with the RGB pixel (158, 112, 49)
    assert (x[0, :, 0, 0] * 255).round().tolist() == [158.0, 112.0, 49.0]
    assert (x * 255).round().sum().item() == 7_387_458


def test_normalization():
    x, _ = load_cifar_samples()
    xn, _ = load_cifar_samples(normalize=True)
    torch.testing.assert_close(xn[:, 1], (x[:, 1] - CIFAR10_MEAN[1]) / CIFAR10_STD[1])
    torch.testing.assert_close(normalize_images(x, (0.5,) * 3, (0.5,) * 3), x * 2 - 1)


def test_explicit_folder(tmp_path):
    for p in sample_files()[:3]:
        shutil.copy(p, tmp_path / p.name)
    x, y = load_cifar_samples(tmp_path)
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [3, 8, 8]
    with pytest.raises(DataNotFoundError, match="no cifar10_"):
        load_cifar_samples(tmp_path / "empty")
