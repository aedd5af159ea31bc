import time

import pytest
import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError
from efficientml.quant.kmeans import (KMeansConfig, KMeansLinear, kmeans_1d, kmeans_quantize,
                                      kmeans_quantize_tensor, strip_kmeans)


def test_kmeans_recovers_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([-3.0, -1.0, 0.5, 2.0])
    x = centers[torch.randint(0, 4, (20000,), generator=g)] + 0.01 * torch.randn(20000, generator=g)
    c, labels = kmeans_1d(x, 4)
    torch.testing.assert_close(c.sort().values, centers, atol=0.01, rtol=0)
    assert float((c[labels] - x).abs().max()) < 0.06


def test_kmeans_is_fast_on_millions():
    x = torch.randn(2_000_000)
    t0 = time.perf_counter()
    c, labels = kmeans_1d(x, 16, iters=10)
    assert time.perf_counter() - t0 < 60          # seconds on one shared core
    assert labels.shape == x.shape and c.numel() == 16


def test_pruning_aware_zeros_stay_zero_and_storage():
    w = torch.randn(64, 32)
    w[w.abs() < 0.5] = 0
    cb = kmeans_quantize_tensor(w, 3, prune_aware=True)
    dec = cb.decode()
    assert bool((dec[w == 0] == 0).all()) and bool((cb.labels[w == 0] == -1).all())
    assert bool((dec[w != 0] != 0).all())
    assert cb.storage_bits() == 3 * w.numel() + 32 * 8            # N·M + 32·2^N


def test_centroid_gradient_is_grouped_sum():
    torch.manual_seed(0)
    lin = nn.Linear(16, 4)
    cb = kmeans_quantize_tensor(lin.weight, 2)
    km = KMeansLinear.from_linear(lin, cb)
    x = torch.randn(8, 16)
    km(x).sum().backward()
    w = km.kmeans_weight().detach().requires_grad_(True)
    torch.nn.functional.linear(x, w, km.bias).sum().backward()
    expected = torch.zeros(4).index_add_(0, km.labels.flatten(), w.grad.flatten())
    torch.testing.assert_close(km.centroids.grad, expected)


def test_kmeans_model_and_strip():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(2, 1, 8, 8)
    books = kmeans_quantize(m, KMeansConfig(bits=2, layer_bits={"3": 3}))
    assert books["0"].bits == 2 and books["3"].bits == 3
    y = m(x)
    strip_kmeans(m)
    assert type(m[0]) is nn.Conv2d and len(m[3].weight.unique()) <= 8
    torch.testing.assert_close(m(x), y)


def test_bad_bits():
    with pytest.raises(ConfigError, match="1 to 8 bits, got 9"):
        KMeansConfig(bits=9)
