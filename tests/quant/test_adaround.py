import pytest
import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError
from efficientml.quant.adaround import AdaRoundConfig, adaround_layer, reconstruction_error
from efficientml.quant.grid import fake_quantize
from efficientml.quant.rounding import weight_spec


@pytest.mark.parametrize("bits", [4, 3])
def test_adaround_beats_rtn_reconstruction(bits):
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x = torch.randn(128, 32) @ torch.randn(32, 32) * 0.3       # correlated inputs: rounding choices matter
    w_ada = adaround_layer(lin, x, AdaRoundConfig(bits=bits, iters=100))
    w_rtn = fake_quantize(lin.weight, weight_spec(bits))
    assert reconstruction_error(lin, x, w_ada) < 0.95 * reconstruction_error(lin, x, w_rtn)
    # still on the grid: every weight rounded down or up from W/s
    s = lin.weight.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
    q = w_ada / s
    assert torch.allclose(q, q.round(), atol=1e-4)
    assert bool(((q.round() - torch.floor(lin.weight / s)).abs() <= 1).all())


def test_adaround_conv_and_errors():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    w = adaround_layer(conv, torch.randn(8, 3, 6, 6), AdaRoundConfig(bits=4, iters=10))
    assert w.shape == conv.weight.shape
    with pytest.raises(ConfigError, match="2 to 8 weight bits, got 1"):
        AdaRoundConfig(bits=1)
    with pytest.raises(ConfigError, match="calibration inputs"):
        adaround_layer(conv, torch.randn(0, 3, 6, 6), AdaRoundConfig(iters=1))
