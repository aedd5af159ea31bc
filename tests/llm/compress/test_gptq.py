import pytest
import torch

from efficientml import apply
from efficientml.core.errors import ConfigError
from efficientml.llm.compress import GPTQConfig
from efficientml.llm.compress.gptq import gptq_quantize
from efficientml.llm.compress.stats import HessianAccumulator
from efficientml.quant.grid import fake_quantize, qparams, weight_grid


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


@pytest.mark.parametrize("spec,kw", [(weight_grid(4, 32), {}), (weight_grid(3, None, True), {}),
                                     (weight_grid(4, 32), {"act_order": True, "static_groups": True}),
                                     (weight_grid(3, None), {"act_order": True})])
def test_gptq_reconstruction_error_below_rtn(spec, kw):
    w, x, H = _layer()
    qw = gptq_quantize(w, H, spec, block_size=32, **kw)
    err_gptq = (x @ (qw.dequantize() - w).t()).pow(2).mean().item()
    err_rtn = (x @ (fake_quantize(w, spec) - w).t()).pow(2).mean().item()
    assert err_gptq < 0.8 * err_rtn
    assert int(qw.codes.max()) <= spec.code_max  # codes on the grid the packed format stores


@pytest.mark.parametrize("n", [8, 1100])  # 1100: accumulated as a block upper triangle, mirrored on read
def test_hessian_matches_definition(n):
    x = torch.randn(100, n)
    h = HessianAccumulator(n)
    h.add(x[:30])
    h.add(x[30:])
    ref = 2 * x.t() @ x / 100
    torch.testing.assert_close(h.value(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.value(inplace=True), ref, rtol=1e-5, atol=1e-5)


def test_weighted_rows_count_more_without_diluting_the_others():
    x = torch.randn(100, 16)
    h = HessianAccumulator(16)
    h.add(x)
    h.add_extra(x[:10], 4.0)
    ref = 2 * (x.t() @ x + 4.0 * x[:10].t() @ x[:10]) / 100
    torch.testing.assert_close(h.value(), ref, rtol=1e-5, atol=1e-5)


def test_act_order_with_groups_needs_static_groups():
    with pytest.raises(ConfigError, match="static_groups"):
        GPTQConfig(4, 128, act_order=True)


def _sequential_gptq(w, H, spec, damp=0.01):
    """Textbook GPTQ: one column at a time, no lazy blocks, group qparams from the updated weights."""
    W, H = w.clone(), H.clone()
    n, gs = W.shape[1], spec.group_len(W.shape[1])
    H.diagonal().add_(damp * H.diag().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # H⁻¹ = UᵀU
    Q = torch.zeros_like(W)
    for i in range(n):
        if i % gs == 0:
            s, z = qparams(W[:, i:i + gs], spec.replace(group_size=None))
            s, z = s[:, 0], z[:, 0].float()
        Q[:, i] = (torch.round(W[:, i] / s + z).clamp(0, spec.code_max) - z) * s
        W[:, i:] -= ((W[:, i] - Q[:, i]) / U[i, i])[:, None] * U[i, i:][None, :]
    return Q


@pytest.mark.parametrize("spec", [weight_grid(4, 64), weight_grid(3, 32), weight_grid(3, 128),
                                  weight_grid(4, None, True)])
def test_lazy_blocks_equal_sequential_gptq(spec):
    """Groups of 32/64 straddle blocks of 48 columns: a group's qparams must see the block's pending updates."""
    w, x, H = _layer()
    qw = gptq_quantize(w, H, spec, block_size=48)
    torch.testing.assert_close(qw.dequantize(), _sequential_gptq(w, H, spec), rtol=0, atol=1e-5)


def test_gptq_beats_rtn_on_a_model(calib, ids):
    """End to end on a tiny model: GPTQ's logits are closer to the fp logits than RTN's (plain GPTQ; the
    default sink share too — a random model has no attention sink to protect, so it gains less)."""
    from efficientml.llm.compress import RTNConfig

    from ..conftest import tiny_model

    with torch.no_grad():
        ref = tiny_model(outliers=True)(ids)
    errs = {}
    for name, conf in {"rtn": RTNConfig(3, 32), "gptq": GPTQConfig(3, 32, sink_share=0.0),
                       "gptq_fp": GPTQConfig(3, 32, propagate="fp", sink_share=0.0),
                       "gptq_sink": GPTQConfig(3, 32)}.items():
        m = tiny_model(outliers=True)
        apply(m, conf, calib=calib, inplace=True, progress=False)
        with torch.no_grad():
            errs[name] = (m(ids) - ref).pow(2).mean().item()
    assert errs["gptq"] < 0.8 * errs["rtn"]
    assert errs["gptq_fp"] < 0.8 * errs["rtn"]
    assert errs["gptq_sink"] < errs["rtn"]


def test_mse_grid_with_an_identity_hessian_is_rtn_on_that_grid():
    """With H = I nothing is pushed onto later columns, so GPTQ's codes are round-to-nearest on its grid:
    the min/max grid or the weight-MSE one (quant.grid.qparams_mse) as ``grid`` says."""
    from efficientml.quant.grid import qparams_mse, quantize_codes

    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    w[0, 0] = 9.0
    spec = weight_grid(3, 64)
    for grid, fn in (("minmax", qparams), ("mse", qparams_mse)):
        qw = gptq_quantize(w, torch.eye(128), spec, grid=grid)
        s, z = fn(w, spec)
        assert torch.equal(qw.scale, s) and torch.equal(qw.zero, z)
        assert torch.equal(qw.codes, quantize_codes(w, s, z, spec))
    with pytest.raises(ConfigError, match="grid"):
        GPTQConfig(grid="percentile")
