import torch
import torch.nn as nn

from efficientml.quant.binary import (BinaryLayer, binarize, binarize_model, pack_signs, sign_matmul,
                                      twn_weight, xnor_linear, xnor_popcount_matmul)


def test_popcount_equals_pm1_matmul():
    g = torch.Generator().manual_seed(0)
    for k in (8, 61, 256):                            # includes padding bits
        a, b = torch.randn(17, k, generator=g), torch.randn(9, k, generator=g)
        got = xnor_popcount_matmul(pack_signs(a), pack_signs(b), k)
        assert torch.equal(got, sign_matmul(a, b).to(torch.int32))


def test_xnor_linear_matches_scaled_sign_matmul():
    torch.manual_seed(0)
    layer = BinaryLayer(nn.Linear(40, 6), "xnor")
    x = torch.randn(5, 40)
    torch.testing.assert_close(xnor_linear(x, layer), layer(x), atol=1e-5, rtol=1e-5)


def test_stochastic_binarization_mean():
    x = torch.full((100000,), 0.5)
    b = binarize(x, stochastic=True, generator=torch.Generator().manual_seed(0))
    assert set(b.unique().tolist()) == {-1.0, 1.0} and abs(b.mean().item() - 0.5) < 0.01


def test_twn_threshold_and_values():
    w = torch.randn(1000)
    t = twn_weight(w)
    d = 0.7 * w.abs().mean()
    assert bool((t[w.abs() <= d] == 0).all())
    alpha = w.abs()[w.abs() > d].mean()
    torch.testing.assert_close(t[w > d], torch.full_like(t[w > d], alpha.item()))


def test_ttq_learns_two_scales_and_model_wrapping():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    q, done = binarize_model(m, "ttq")
    assert done == ["2"]                              # first and last stay full precision
    q(torch.randn(2, 1, 8, 8)).sum().backward()
    layer = q[2]
    assert layer.wp.grad is not None and layer.wn.grad is not None
    assert len(layer.ternary_values()) == 3
