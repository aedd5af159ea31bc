import torch

from efficientml import apply
from efficientml.llm.compress import SmoothQuantConfig
from efficientml.llm.compress.awq import apply_scale
from efficientml.llm.compress.mappings import scaling_groups
from efficientml.llm.kernels.qlinear import W8A8Linear, quantize_act_per_token
from efficientml.llm.compress.smoothquant import smoothing_scale

from ..conftest import tiny_model


def _sqnr(ref, out):
    return 10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()).item()


def test_smoothing_preserves_outputs(ids):
    m = tiny_model(outliers=True)
    with torch.no_grad():
        ref = m(ids)
        for block in m.model.layers:
            for g in scaling_groups(m):
                if g.prev_is_norm:
                    lin = [block.get_submodule(n).weight for n in g.linears]
                    act = torch.rand(lin[0].shape[1]) * 10 + 0.1
                    apply_scale(block, g, smoothing_scale(act, lin, 0.5))
        torch.testing.assert_close(m(ids), ref, rtol=1e-4, atol=1e-4)


def test_w8a8_linear_close_to_fp():
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    q = W8A8Linear.from_linear(lin, "dynamic", backend="float")
    with torch.no_grad():
        assert _sqnr(lin(x), q(x)) > 30
    xq, s = quantize_act_per_token(x.reshape(-1, 64))
    assert xq.dtype == torch.int8 and s.shape == (35, 1)


def test_smoothing_helps_w8a8_with_outliers(ids, calib):
    ref = tiny_model(outliers=True)
    with torch.no_grad():
        y = ref(ids)
    sq = {}
    for smooth in (False, True):
        for act in ("dynamic", "static"):
            m = tiny_model(outliers=True)
            apply(m, SmoothQuantConfig(alpha=0.5, smooth=smooth, act=act), calib=calib, inplace=True, progress=False)
            assert sum(isinstance(x, W8A8Linear) for x in m.modules()) == 14
            with torch.no_grad():
                sq[smooth, act] = _sqnr(y, m(ids))
    assert sq[True, "static"] > sq[False, "static"]
    assert sq[True, "dynamic"] > 25


def test_w8a8_weights_are_the_shared_grid():
    """W8A8 weights come from quant.grid: equal to round(w / s), s = absmax per row / 127."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    m = W8A8Linear.from_linear(lin)
    w = lin.weight.detach().float()
    s = w.abs().amax(1, keepdim=True) / 127.0
    assert torch.equal(m.weight_scale, s)
    assert torch.equal(m.weight, torch.round(w / s).clamp(-127, 127).to(torch.int8))
