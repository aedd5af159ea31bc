import pytest
import torch

from efficientml.core.errors import ConfigError
from efficientml.llm.compress import GPTQConfig
from efficientml.llm.compress.gptq import HessianAccumulator, gptq_quantize
from efficientml.llm.compress.rtn import WeightQuantSpec, fake_quantize


def _layer():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    mix = torch.randn(128, 128, generator=g) / 8 + torch.eye(128)
    x = torch.randn(2048, 128, generator=g) @ mix  # correlated inputs: what GPTQ exploits
    x[:, :4] *= 10
    h = HessianAccumulator(128)
    for xb in x.split(256):
        h.add(xb)
    return w, x, h.value()


@pytest.mark.parametrize("spec,kw", [(WeightQuantSpec(4, 32), {}), (WeightQuantSpec(3, None, True), {}),
                                     (WeightQuantSpec(4, 32), {"act_order": True, "static_groups": True}),
                                     (WeightQuantSpec(3, None), {"act_order": True})])
def test_gptq_reconstruction_error_below_rtn(spec, kw):
    w, x, H = _layer()
    qw = gptq_quantize(w, H, spec, block_size=32, **kw)
    err_gptq = (x @ (qw.dequantize() - w).t()).pow(2).mean().item()
    err_rtn = (x @ (fake_quantize(w, spec) - w).t()).pow(2).mean().item()
    assert err_gptq < 0.8 * err_rtn
    assert int(qw.codes.max()) <= spec.qmax  # codes on the grid the packed format stores


def test_hessian_matches_definition():
    x = torch.randn(100, 8)
    h = HessianAccumulator(8)
    h.add(x[:30])
    h.add(x[30:])
    torch.testing.assert_close(h.value(), 2 * x.t() @ x / 100)


def test_act_order_with_groups_needs_static_groups():
    with pytest.raises(ConfigError, match="static_groups"):
        GPTQConfig(4, 128, act_order=True)
