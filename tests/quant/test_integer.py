import pytest
import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError, UnsupportedError
from efficientml.models import build_model
from efficientml.quant.integer import IntegerConfig, convert_integer, fixed_point, fold_bn, rounding_shift


def _vgg():
    torch.manual_seed(0)
    m = build_model("vgg", width=0.25, in_channels=1).eval()
    for mod in m.modules():                                # non-trivial BN statistics to fold
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5), mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5), mod.bias.data.uniform_(-0.2, 0.2)
    return m


@pytest.fixture(scope="module")
def vgg_int8():
    m = _vgg()
    calib = [torch.randn(16, 1, 28, 28) for _ in range(2)]
    return m, convert_integer(m, calib, IntegerConfig(observer="minmax"))


def test_fixed_point_multiplier():
    m = torch.tensor([0.00123, 0.5, 0.7071, 1.9])
    m0, shift = fixed_point(m)
    assert bool(((m0 >= 2 ** 30) & (m0 < 2 ** 31)).all())
    acc = torch.tensor([[1000, -1000, 123456, -7]])
    exact = acc.double() * m.double()
    got = rounding_shift(acc, m0, shift)
    assert float((got.double() - exact).abs().max()) <= 0.5 + 1e-6


def test_fold_bn_matches_conv_bn():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8)
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    bn.eval()
    w, b = fold_bn(conv.weight, conv.bias, bn)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(nn.functional.conv2d(x, w, b), bn(conv(x)), atol=1e-5, rtol=1e-5)


def test_integer_model_within_one_lsb_of_float_emulation(vgg_int8):
    m, im = vgg_int8
    x = torch.randn(8, 1, 28, 28)
    per_layer = im.layer_lsb_differences(x)
    assert len(per_layer) == 10 and max(per_layer.values()) <= 1          # each step, same inputs
    end = (im.integer_output(x, "integer") - im.integer_output(x, "emulate")).abs().max()
    assert int(end) <= 1


def test_bn_folded_relu_fused_and_accurate(vgg_int8):
    m, im = vgg_int8
    rep = im.report()
    assert rep["steps"] == {"quantize_input": 1, "conv2d": 8, "maxpool": 4, "mean": 1, "linear": 1}
    x = torch.randn(8, 1, 28, 28)
    ref = m(x)
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (ref - im(x)).pow(2).sum())
    assert sqnr > 25


def test_fast_int8_kernels_agree_with_integer_reference(vgg_int8):
    _, im = vgg_int8
    x = torch.randn(8, 1, 28, 28)
    diff = (im.integer_output(x, "integer") - im.integer_output(x, "fast")).abs()
    assert int(diff.max()) <= 1 and float((diff == 0).float().mean()) > 0.9


def test_int32_bias_scale_and_int8_weights(vgg_int8):
    _, im = vgg_int8
    conv = next(i.step for i in im.program.instrs if i.step.kind == "conv2d")
    assert conv.w_q.abs().max() <= 127 and conv.b_q.dtype == torch.int32
    torch.testing.assert_close(conv.b_scale, conv.in_qp[0].scale * conv.w_scale)


class _WithSoftmax(nn.Module):          # softmax: no integer step (GELU is a table now)
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 8), nn.Softmax(dim=-1), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_unsupported_layer_error_and_skip_option():
    m = _WithSoftmax().eval()
    with pytest.raises(UnsupportedError, match=r"layer 'act' \(Softmax\) has no integer implementation"):
        convert_integer(m, [torch.randn(4, 8)])
    x = torch.randn(64, 8)
    im = convert_integer(m, [x], IntegerConfig(skip_unsupported=True))
    assert im.report()["float_layers"] == ["act (Softmax)"]
    with torch.no_grad():
        assert float((im(x) - m(x)).abs().max()) < 3 * im.output_qparams.scale


def test_calibration_without_data_is_an_error():
    with pytest.raises(ConfigError, match="calibration got no data"):
        convert_integer(_WithSoftmax(), [], IntegerConfig(skip_unsupported=True))


def test_config_validation():
    with pytest.raises(ConfigError, match="observer must be one of"):
        IntegerConfig(observer="median")
    with pytest.raises(ConfigError, match="2 to 8 bits, got 12"):
        IntegerConfig(weight_bits=12)
