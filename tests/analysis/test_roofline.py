import pytest
import torch.nn as nn

from efficientml.analysis import profile
from efficientml.analysis.roofline import (Roofline, arithmetic_intensity, bandwidth_utilization,
                                           flops_utilization, layer_rooflines)
from efficientml.core.errors import ConfigError


def test_roofline_numbers():
    roof = Roofline(peak_flops=100e12, bandwidth=2e12)
    assert roof.ridge_point == 50
    assert roof.attainable(10) == 20e12 and roof.bound(10) == "memory"
    assert roof.attainable(100) == 100e12 and roof.bound(100) == "compute"
    assert arithmetic_intensity(1000, 500) == 4
    assert flops_utilization(50e12, 1.0, 100e12) == 1.0
    assert bandwidth_utilization(1e12, 1.0, 2e12) == 0.5
    with pytest.raises(ConfigError):
        Roofline(0, 1)


def test_layer_rooflines_of_a_linear():
    # batch 1: 64·32 MACs over (64·32 weights + 32 bias + 64 in + 32 out)·4 bytes
    p = profile(nn.Linear(64, 32), (1, 64))
    (row,) = layer_rooflines(p, Roofline(1e12, 1e11))
    assert row.bytes == (64 * 32 + 32 + 64 + 32) * 4
    assert row.intensity == pytest.approx(2 * 64 * 32 / row.bytes)
    assert row.bound == "memory"
