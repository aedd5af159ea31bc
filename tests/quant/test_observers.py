import pytest
import torch

from efficientml.core.errors import ConfigError
from efficientml.quant.observers import make_observer


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(100000, generator=g))
    x[:5] = 40.0                                          # rare outliers
    return x


def test_minmax_and_ema():
    x = _data()
    o = make_observer("minmax")
    o.update(x[:50000]), o.update(x[50000:])
    assert o.range() == (0.0, 40.0)
    e = make_observer("ema")
    for _ in range(3):
        e.update(torch.ones(10))
    assert e.range() == (1.0, 1.0)


@pytest.mark.parametrize("name", ["percentile", "mse", "kl"])
def test_clipping_observers_clip_outliers(name):
    o = make_observer(name, bits=4 if name == "mse" else 8)   # at 8 bits MSE rightly keeps 5 outliers
    x = _data()
    for chunk in x.split(10000):
        o.update(chunk)
    lo, hi = o.range()
    assert lo == 0.0 and 2.0 < hi < 20.0, (name, hi)


def test_histogram_range_grows():
    o = make_observer("percentile", percentile=100.0)
    o.update(torch.rand(1000))
    o.update(torch.rand(1000) * 10)
    assert 9.0 < o.range()[1] <= 10.0 + 1e-3


def test_no_data_is_an_error():
    with pytest.raises(ConfigError, match="saw no data"):
        make_observer("kl").range()
