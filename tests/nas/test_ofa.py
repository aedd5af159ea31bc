"""The once-for-all supernet: elastic layers, channel sorting, exact extraction, BN re-calibration and
progressive shrinking on a tiny space."""

import random

import pytest
import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError
from efficientml.nas.dynamic import DynamicDepthwise
from efficientml.nas.ofa import OFANet, recalibrate_bn
from efficientml.nas.ofa_train import ShrinkConfig, accuracy, evaluate_subnet, progressive_shrink
from efficientml.nas.space import MBSpace

TINY = MBSpace(stem=8, stages=((16, 2, 2), (24, 2, 2)), head=32, min_depths=(1, 1), resolutions=(12, 16))


def _randomize(net: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and kernel transforms, so the checks below are not vacuous."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
        if isinstance(m, DynamicDepthwise):
            for p in m.transforms.values():
                p.data += 0.05 * torch.randn_like(p)
    return net


def test_kernel_transform_starts_as_the_centre():
    dw = DynamicDepthwise(4, (3, 5, 7), 1)
    assert torch.equal(dw.active_weight(4, 5), dw.weight[:, :, 1:6, 1:6])
    assert torch.equal(dw.active_weight(2, 3), dw.weight[:2, :, 2:5, 2:5])
    with pytest.raises(ValueError):
        dw.active_weight(4, 4)


def test_extracted_subnets_equal_the_supernet():
    net = _randomize(OFANet(MBSpace())).eval()
    rng = random.Random(0)
    for _ in range(6):
        a = net.space.sample(rng, resolution=28)
        net.set_active(a)
        x = torch.randn(2, 1, 28, 28)
        with torch.no_grad():
            assert torch.allclose(net.extract()(x), net(x), atol=1e-6, rtol=0), a.key()


def test_sort_channels_keeps_the_full_network_and_orders_importance():
    net = _randomize(OFANet(TINY)).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        y0 = net(x)
        net.sort_channels()
        assert torch.allclose(net(x), y0, atol=1e-5, rtol=0)
    imp = net.stages[0][0].project.weight.abs().sum(dim=(0, 2, 3))
    assert torch.all(imp[:-1] >= imp[1:])


def test_recalibrate_bn_gives_the_exact_average():
    net = _randomize(OFANet(TINY)).eval()
    sub = net.extract(TINY.smallest())
    batches = [torch.randn(4, 1, 12, 12) for _ in range(3)]
    recalibrate_bn(sub, batches)
    bn = sub.features[0][1]
    acts = [sub.features[0][0](b) for b in batches]
    means = torch.stack([a.mean(dim=(0, 2, 3)) for a in acts]).mean(0)
    assert torch.allclose(bn.running_mean, means, atol=1e-5)
    assert not sub.training and bn.momentum == 0.1


def test_width_and_arch_errors():
    with pytest.raises(ConfigError, match="width 0.5"):
        OFANet(TINY, width=0.5)
    with pytest.raises(ConfigError, match="expand ratios > 1"):
        OFANet(MBSpace(expands=(1, 3)))


def _toy_loader(n=64, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, :, :8].mean(dim=(1, 2, 3)) > 0).long()
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def test_progressive_shrinking_trains_every_phase():
    net = OFANet(TINY)
    data = _toy_loader()
    before = accuracy(net, data, 16)
    hist = progressive_shrink(net, data, ShrinkConfig(epochs=(6, 1, 1, 1), lr=(0.1, 0.02, 0.02, 0.02)))
    assert [p["phase"] for p in hist["phases"]] == ["full", "kernel", "depth", "width"]
    assert hist["phases"][0]["loss_last_epoch"] < hist["phases"][0]["loss_first"]
    acc, sub = evaluate_subnet(net, TINY.largest(), data[:2], data)
    assert acc > before and acc > 40
    assert sum(1 for _ in sub.modules() if isinstance(_, nn.Conv2d)) == 2 + 3 * 4


def test_shrink_config_validation():
    with pytest.raises(ConfigError, match="ordered subset"):
        ShrinkConfig(phases=("kernel", "full"), epochs=(1, 1), lr=(0.1, 0.1))


def test_extracted_subnet_takes_the_int8_engine_path_bit_exactly():
    """The plain subnet is a zoo model: integer conversion and the C engine take it as is."""
    pytest.importorskip("efficientml.engine")
    import shutil

    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("needs a C compiler")
    from efficientml.engine import compile_engine
    from tests.engine.conftest import integer_model

    net = OFANet(TINY)
    arch = TINY.sample(random.Random(5), resolution=16)
    sub = recalibrate_bn(net.extract(arch), [torch.randn(8, 1, 16, 16) for _ in range(2)])
    im = integer_model(sub, (1, 16, 16))
    x = torch.randn(2, 1, 16, 16)
    eng = compile_engine(im, x[:1], prefix="nas_sub")
    for i in range(2):
        assert torch.equal(eng.run(x[i:i + 1]), im.integer_output(x[i:i + 1]))
