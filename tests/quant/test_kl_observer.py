"""The KL (entropy) observer on residual networks: it must not clip post-ReLU activations, residual
sums or residual-branch projections below what they carry (issue #16 item 3: ResNet-style logits at
1.8 dB under KL against 16.9 dB under min-max)."""

import pytest
import torch

from efficientml.analysis.metrics import sqnr
from efficientml.models import build_model
from efficientml.quant import IntegerConfig, convert_integer
from efficientml.quant.observers import make_observer


def _logits_sqnr(model, x, observer, reduce_range):
    im = convert_integer(model, [x], IntegerConfig(observer=observer, reduce_range=reduce_range))
    with torch.no_grad():
        ref, out = model(x), im(x)
    return sqnr(ref, out), int((out.argmax(1) == ref.argmax(1)).sum())


@pytest.mark.parametrize("reduce_range", [True, False])
def test_kl_matches_minmax_on_pretrained_resnet20(pretrained_cifar, reduce_range):
    model, x, _ = pretrained_cifar("resnet20")
    kl, kl_agree = _logits_sqnr(model, x, "kl", reduce_range)
    mm, _ = _logits_sqnr(model, x, "minmax", reduce_range)
    assert kl - mm >= -1.0, (kl, mm)
    assert kl >= 25.0 and kl_agree >= 19, (kl, kl_agree)


def test_kl_on_an_inverted_residual_network():
    """Depthwise, ReLU6, linear-bottleneck projections added to the stream (zoo MobileNetV2)."""
    model = build_model("mobilenetv2", num_classes=10).eval()
    x = torch.randn(8, 3, 64, 64)
    kl, _ = _logits_sqnr(model, x, "kl", True)
    mm, _ = _logits_sqnr(model, x, "minmax", True)
    assert kl - mm >= -1.0, (kl, mm)


def test_mostly_zero_activations_keep_their_range():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g).abs()
    x[torch.rand(200_000, generator=g) < 0.9] = 0.0          # a ReLU output: 90% exact zeros
    o = make_observer("kl")
    o.update(x)
    lo, hi = o.range()
    nonzero = x[x > 0]
    assert lo == 0.0
    assert hi >= float(nonzero.quantile(0.999)), hi         # the zero spike no longer drags it down
    assert o.zeros == float((x == 0).sum())


def test_heavy_tails_are_not_collapsed_and_outliers_still_clipped():
    g = torch.Generator().manual_seed(1)
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    ranges = {}
    for tol in (0.0, 0.1):                                   # 0: the plain argmin (TensorRT's choice)
        o = make_observer("kl", tolerance=tol)
        o.update(x)
        ranges[tol] = o.range()
    amax = float(x.abs().max())
    assert ranges[0.0][1] <= ranges[0.1][1]                  # the tolerance only ever clips less
    assert ranges[0.0][1] >= 0.3 * amax and ranges[0.0][0] <= -0.3 * amax, ranges
    y = x.abs()
    y[:5] = 200.0                                            # five far outliers are still cut
    o = make_observer("kl")
    o.update(y)
    assert o.range()[1] < 0.2 * 200.0, o.range()


def test_small_tensors_use_min_max():
    x = torch.randn(500)                                     # e.g. a pooled (B, C) feature
    o = make_observer("kl")
    o.update(x)
    assert o.range() == pytest.approx((float(x.min()), float(x.max())), rel=1e-6)
