import pytest
import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError, ShapeError
from efficientml.models import build_model, list_models
from efficientml.models.mobilenetv2 import make_divisible


def meta(name, **kw):
    with torch.device("meta"):  # parameter shapes without allocating or initializing them
        return build_model(name, **kw)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def count_macs(model, x):
    """Multiply-accumulates of convs and linears, counted independently of efficientml.analysis."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total += out.numel() // out.shape[0] * (mod.in_channels // mod.groups) * kh * kw
        elif isinstance(mod, nn.Linear):
            total += mod.in_features * mod.out_features

    model, x = model.to("meta"), x.to("meta")  # shapes only: no arithmetic on a shared CPU
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        out = model.eval()(x)
    for h in handles:
        h.remove()
    return total, out


def test_all_models_registered():
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "mobilenetv2", "resnet18",
            "resnet34", "resnet50", "small_cnn", "mlp"} <= set(list_models())


def test_mobilenetv2_imagenet_params_and_macs():
    m = meta("mobilenetv2")
    assert n_params(m) == 3_504_872
    macs, out = count_macs(m, torch.randn(1, 3, 224, 224))
    assert macs == 300_774_272  # ≈300M, the paper's Table 3
    assert out.shape == (1, 1000)


@pytest.mark.parametrize("width,count", [(0.5, 1_968_680), (1.4, 6_108_776)])
def test_mobilenetv2_width(width, count):
    assert n_params(meta("mobilenetv2", width=width)) == count


def test_mobilenetv2_cifar_stem_and_resolution():
    m = build_model("mobilenetv2", num_classes=10, cifar_stem=True).eval()
    assert m.features(torch.randn(1, 3, 32, 32)).shape == (1, 1280, 4, 4)   # total stride 8
    assert build_model("mobilenetv2").eval().features(torch.randn(1, 3, 32, 32)).shape == (1, 1280, 1, 1)
    g = build_model("mobilenetv2", num_classes=10, in_channels=1, dropout=0.0).eval()
    assert g(torch.randn(2, 1, 96, 80)).shape == (2, 10)


def test_make_divisible():
    assert [make_divisible(v) for v in (32 * 0.35, 16 * 0.5, 24 * 0.75, 1280 * 1.4, 3)] == [16, 8, 24, 1792, 8]
    assert make_divisible(20, 8) == 24  # 16 would lose more than 10%


@pytest.mark.parametrize("name,count,macs", [("resnet18", 11_689_512, 1_814_073_344),
                                             ("resnet34", 21_797_672, 3_663_761_408),
                                             ("resnet50", 25_557_032, 4_089_184_256)])
def test_resnet_imagenet_counts(name, count, macs):
    m = meta(name)
    assert n_params(m) == count
    got, out = count_macs(m, torch.randn(1, 3, 224, 224))
    assert got == macs
    assert out.shape == (1, 1000)


def test_resnet18_torchvision_names_and_small_input():
    keys = set(meta("resnet18").state_dict())
    assert {"conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.bn2.running_var", "fc.bias"} <= keys
    assert "layer1.0.downsample.0.weight" not in keys
    m = build_model("resnet18", num_classes=10, small_input=True).eval()
    assert n_params(m) == 11_689_512 - 64 * 3 * 49 + 64 * 3 * 9 - 513 * 990
    x = torch.randn(2, 3, 32, 32)
    assert m.layer4(m.layer3(m.layer2(m.layer1(m.conv1(x))))).shape == (2, 512, 4, 4)
    assert m(x).shape == (2, 10)


def test_resnet_zero_init_residual_starts_as_identity_blocks():
    m = build_model("resnet18", zero_init_residual=True).eval()
    blk = m.layer1[0]
    x = torch.rand(1, 64, 8, 8)  # non-negative: relu(0 + x) == x
    torch.testing.assert_close(blk(x), x)


def test_small_cnn_and_mlp():
    m = build_model("small_cnn")
    assert n_params(m) == 85_162
    assert m(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    m3 = build_model("small_cnn", in_channels=3, num_classes=5)
    assert n_params(m3) == 85_162 + 2 * 9 * 32 - 65 * 5
    assert m3(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    mlp = build_model("mlp")
    assert n_params(mlp) == 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10 == 235_146
    assert mlp(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ShapeError, match="784 features"):
        mlp(torch.randn(3, 3, 32, 32))
    with pytest.raises(ConfigError, match="width"):
        build_model("small_cnn", width=0)
