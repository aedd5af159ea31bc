import pytest
import torch

from efficientml.core.errors import ConfigError, ShapeError
from efficientml.quant.grid import GridSpec, fake_quantize, quantize
from efficientml.quant.linear import vsquant


def test_asymmetric_round_trip_within_half_step():
    x = torch.rand(1000) * 5 - 1
    qt = quantize(x, GridSpec(bits=8, symmetric=False, granularity="tensor", signed=False))
    assert qt.q.min() >= 0 and qt.q.max() <= 255
    err = (qt.dequantize() - x).abs().max()
    assert err <= qt.scale.max() / 2 + 1e-6
    # r = S(q − Z): zero is exactly representable
    assert fake_quantize(torch.tensor([0.0, 4.0, -1.0]), GridSpec(8, False, "tensor", signed=False))[0] == 0


def test_per_channel_beats_per_tensor():
    w = torch.randn(16, 64) * torch.logspace(-2, 0, 16).unsqueeze(1)
    e_t = (fake_quantize(w, GridSpec(4, granularity="tensor")) - w).pow(2).mean()
    e_c = (fake_quantize(w, GridSpec(4, granularity="channel")) - w).pow(2).mean()
    e_g = (fake_quantize(w, GridSpec(4, granularity="group", group_size=16)) - w).pow(2).mean()
    assert e_g < e_c < e_t / 2


def test_group_size_must_divide():
    with pytest.raises(ShapeError, match="group size 48 does not divide the 64 inputs"):
        quantize(torch.randn(8, 64), GridSpec(4, granularity="group", group_size=48))


def test_bad_bits():
    with pytest.raises(ConfigError, match="1 to 16 bits, got 0"):
        GridSpec(bits=0)


def test_vsquant_two_level_scales():
    torch.manual_seed(0)
    w = torch.randn(32, 128) * torch.rand(32, 128).pow(3)
    vs = vsquant(w, bits=4, vector_size=16, scale_bits=4)
    assert vs.vector_scale.dtype == torch.uint8 and int(vs.vector_scale.max()) <= 15
    e_vs = (vs.dequantize() - w).pow(2).mean()
    e_ch = (fake_quantize(w, GridSpec(4, granularity="channel", narrow=True)) - w).pow(2).mean()
    assert e_vs < 0.8 * e_ch
    assert vs.storage_bits() == 32 * 128 * 4 + 32 * 8 * 4 + 32 * 32


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200000,), 0.3)
    spec = GridSpec(8, granularity="tensor", rounding="stochastic")
    q = quantize(torch.cat([x, torch.tensor([127.0])]), spec, generator=torch.Generator().manual_seed(0))
    assert abs(q.dequantize()[:-1].mean().item() - 0.3) < 0.01
