"""Net2Net growth: widened and deepened models compute the original function (eval mode, random BN stats)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import ConfigError, UnsupportedError
from efficientml.models.mobilenetv2 import ConvBNReLU, InvertedResidual
from efficientml.nas.net2net import deepen, widen
from efficientml.prune import DependencyGraph
from tests.prune.conftest import randomize_bn




def cnn() -> nn.Module:  # 389 parameters
    return randomize_bn(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)))


def mlp() -> nn.Module:  # 48 + 16 + 54 + 21 = 139 parameters
    return randomize_bn(nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                      nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)))


class MBNet(nn.Module):
    """Stem → MobileNetV2 block without residual (stride 2) → global mean → Linear."""

    def __init__(self):
        super().__init__()
        self.stem = ConvBNReLU(3, 4, 3)
        self.block = InvertedResidual(4, 6, stride=2, expand_ratio=3)   # 4 → 12 → dw 12 → 6
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvBNReLU(3, 4, 3)
        self.block = InvertedResidual(4, 4, stride=1, expand_ratio=2)   # residual: x + conv(x)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item()


IMG = torch.randn(2, 3, 8, 8)
VEC = torch.randn(4, 5)


@pytest.mark.parametrize("build,layer,width,x,params", [
    (cnn, "0", 7, IMG, 389 + 3 * (27 + 1 + 2) + 6 * 3 * 9),            # conv0 4→7: 641
    (cnn, "3", 9, IMG, 389 + 3 * (4 * 9 + 1 + 2) + 5 * 3),            # conv3 6→9, fc reads 9: 521
    (mlp, "0", 11, VEC, 139 + 3 * (5 + 1 + 2) + 6 * 3),                # 181
    (mlp, "3", 10, VEC, 139 + 4 * (8 + 1) + 3 * 4),                   # 187
    (MBNet, "block.conv.0.0", 16, IMG, None),
    (MBNet, "stem.0", 6, IMG, None),
])
def test_widen_preserves_function(build, layer, width, x, params):
    torch.manual_seed(1)
    model = build()
    model = randomize_bn(model)
    before = copy.deepcopy(model.state_dict())
    wide = widen(model, layer, width, seed=3, example_inputs=x).eval()
    assert wide.get_submodule(layer).weight.shape[0] == width
    assert max_diff(model, wide, x) < 1e-5
    if params is not None:
        assert n_params(wide) == params
    for k, v in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, before[k]), k


def test_widen_mobilenet_block_counts():
    model = randomize_bn(MBNet())
    wide = widen(model, "block.conv.0.0", 16, example_inputs=IMG)
    conv = wide.block.conv
    dw = conv[1][0]
    assert (dw.in_channels, dw.out_channels, dw.groups) == (16, 16, 16)     # the depthwise conv grew too
    assert conv[1][1].num_features == 16 and conv[2].in_channels == 16
    # expand 64 + BN 32 + dw 144 + BN 32 + project 96 + BN 12, the rest unchanged
    block = lambda m: sum(p.numel() for p in m.block.parameters())  # noqa: E731
    assert (block(model), block(wide)) == (288, 380)
    assert n_params(wide) - n_params(model) == 92
    assert max_diff(model, wide, torch.randn(1, 3, 6, 6)) < 1e-5            # no longer tied to the probe


def test_widen_flatten_of_spatial_map():
    model = randomize_bn(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                                       nn.Flatten(), nn.Linear(3 * 4 * 4, 5)))
    x = torch.randn(3, 2, 4, 4)
    wide = widen(model, "0", 5, seed=1, example_inputs=x)
    assert wide[4].in_features == 5 * 16
    assert n_params(wide) == n_params(model) + 2 * (18 + 1 + 2) + 5 * 2 * 16
    assert max_diff(model, wide, x) < 1e-5


def test_widen_default_probe_and_replica_split():
    model = cnn()
    wide = widen(model, "0", 12, seed=0)   # a 32×32 probe is enough for a globally pooled model
    assert max_diff(model, wide, IMG) < 1e-5
    # every original unit's reader columns are split over its replicas: they sum back to the original
    w_old, w_new = model[3].weight, wide[3].weight
    src = [int(torch.nonzero((wide[0].weight[c] == model[0].weight).flatten(1).all(1))[0]) for c in range(12)]
    summed = torch.zeros_like(w_old).index_add_(1, torch.tensor(src), w_new)
    torch.testing.assert_close(summed, w_old, atol=1e-6, rtol=1e-6)


def test_widen_noise_changes_function_slightly():
    model = cnn()
    exact = widen(model, "3", 10, seed=2)
    noisy = widen(model, "3", 10, noise=0.01, seed=2)
    d = max_diff(model, noisy, IMG)
    scale = model(IMG).abs().max().item()
    assert 1e-6 < d < 0.05 * scale
    assert max_diff(model, exact, IMG) < 1e-5
    assert torch.equal(exact[3].weight[:6], noisy[3].weight[:6])   # only the new units are perturbed


def test_widen_is_deterministic_and_chains():
    model = mlp()
    a, b = widen(model, "0", 12, seed=5), widen(model, "0", 12, seed=5)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    twice = widen(widen(model, "0", 12, seed=5), "3", 9, seed=6)
    assert max_diff(model, twice, VEC) < 1e-5
    graph = DependencyGraph.build(twice, VEC)                  # the prune path takes it as is
    assert sorted(len(g) for g in graph.groups) == [3, 9, 12]


def test_widen_refuses_residual_output_and_depthwise():
    model = randomize_bn(ResNet())
    with pytest.raises(UnsupportedError, match="residual add"):
        widen(model, "block.conv.2", 6, example_inputs=IMG)       # projection meets the stem's output
    with pytest.raises(UnsupportedError, match="residual add"):
        widen(model, "stem.0", 6, example_inputs=IMG)
    assert max_diff(model, widen(model, "block.conv.0.0", 10, example_inputs=IMG), IMG) < 1e-5  # inner: fine
    with pytest.raises(UnsupportedError, match="model's input or output"):
        widen(mlp(), "5", 4)                                      # the logits
    with pytest.raises(UnsupportedError, match="groups=1"):
        widen(MBNet(), "block.conv.1.0", 16)                      # depthwise: widen its producer


def test_widen_refuses_concat():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 3, 1), nn.Conv2d(5, 4, 1)

        def forward(self, x):
            return self.c(F.relu(torch.cat([self.a(x), self.b(x)], 1)))

    with pytest.raises(UnsupportedError, match="concatenation"):
        widen(Cat(), "a", 4)


@pytest.mark.parametrize("width", [4, 3])
def test_widen_refuses_non_growing_width(width):
    with pytest.raises(ConfigError, match="new_width > the current width 4"):
        widen(cnn(), "0", width)


def test_widen_bad_arguments():
    with pytest.raises(ConfigError, match="no layer named"):
        widen(cnn(), "nope", 8)
    with pytest.raises(ConfigError, match="noise"):
        widen(cnn(), "0", 8, noise=-1.0)
    with pytest.raises(UnsupportedError, match="groups=1 or a Linear"):
        widen(cnn(), "1", 8)


@pytest.mark.parametrize("build,after,kind,x,added", [
    (cnn, "2", "conv", IMG, 4 * 4 * 9 + 8),          # after a ReLU
    (cnn, "5", "conv", IMG, 6 * 6 * 9 + 12),
    (mlp, "2", "linear", VEC, 8 * 8 + 8),
    (mlp, "3", "linear", VEC, 6 * 6 + 6),           # a Linear followed by ReLU
    (MBNet, "block.conv.0.2", "conv", IMG, 12 * 12 * 9 + 24),   # ReLU6
    (MBNet, "block.conv.1.0", "conv", IMG, None),   # depthwise conv followed by BN: refused
])
def test_deepen_preserves_function(build, after, kind, x, added):
    model = randomize_bn(build())
    before = copy.deepcopy(model.state_dict())
    if added is None:
        with pytest.raises(ConfigError, match="ReLU-family"):
            deepen(model, after, kind=kind)
        return
    deep = deepen(model, after, kind=kind).eval()
    assert n_params(deep) == n_params(model) + added
    assert max_diff(model, deep, x) < 1e-5
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
        assert torch.equal(deep.state_dict()[k], v), k       # every old weight keeps its name


def test_deepen_is_exact_and_kernel_size():
    model = cnn()
    deep = deepen(model, "2", kernel_size=5)
    conv, bn = deep[2][1], deep[2][2]
    assert conv.kernel_size == (5, 5) and conv.padding == (2, 2)
    with torch.no_grad():
        h = torch.randn(2, 4, 6, 6) * 10
        assert torch.equal(bn(conv(h)), h)          # the inserted conv + BN is exactly the identity
        assert torch.equal(model(IMG), deep(IMG))


def test_deepen_functional_relu_and_twice():
    class Func(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))

    model = randomize_bn(Func())
    deep = deepen(model, "bn")                      # F.relu follows: the block wraps the BN
    assert isinstance(deep.bn, nn.Sequential) and isinstance(deep.bn[3], nn.ReLU)
    assert max_diff(model, deep, IMG) < 1e-5
    base = cnn()
    once = deepen(base, "2")
    with pytest.raises(ConfigError, match="container"):
        deepen(once, "2")
    twice = deepen(once, "2.3")                     # after the inserted layer's activation
    assert max_diff(base, twice, IMG) < 1e-5 and len(twice[2][3]) == 4


def test_deepen_errors():
    with pytest.raises(ConfigError, match="ReLU-family"):
        deepen(cnn(), "0")                          # conv followed by BN
    with pytest.raises(ConfigError, match="kind='linear'"):
        deepen(mlp(), "2", kind="conv")
    with pytest.raises(ConfigError, match="kind must be"):
        deepen(cnn(), "2", kind="attention")
    with pytest.raises(ConfigError, match="odd"):
        deepen(cnn(), "2", kernel_size=2)
