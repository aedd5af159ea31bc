import shutil

import pytest
import torch
import torch.nn.functional as F

from efficientml.core.errors import CheckpointError, ConfigError, DataNotFoundError
from efficientml.data import paths
from efficientml.data.cifar_samples import load_cifar_samples, normalize_images
from efficientml.models import build_model
from efficientml.models.pretrained import load_weights
from efficientml.models.resnet_cifar import PRETRAINED_MEAN, PRETRAINED_STD, WEIGHTS, PadShortcut


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,count", [("resnet20", 269_722), ("resnet32", 464_154),
                                        ("resnet44", 658_586), ("resnet56", 853_018)])
def test_param_counts_option_a(name, count):
    assert n_params(build_model(name)) == count


def test_option_b_adds_two_projections():
    # two 1×1 conv + BN projections: 16·32 + 2·32 and 32·64 + 2·64
    assert n_params(build_model("resnet20", option="B")) - 269_722 == (16 * 32 + 64) + (32 * 64 + 128)


def test_shapes_width_and_channels():
    m = build_model("resnet56", num_classes=7, in_channels=1).eval()
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    half = build_model("resnet20", width=0.5)
    assert half.linear.in_features == 32
    assert n_params(half) == 68_050


def test_option_a_shortcut_matches_reference_formula():
    x = torch.randn(2, 16, 8, 8)
    ref = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 32 // 4, 32 // 4))  # Idelbayev's LambdaLayer
    torch.testing.assert_close(PadShortcut(16, 32, 2)(x), ref, rtol=0, atol=0)


def test_bad_depth_and_option():
    with pytest.raises(ConfigError, match="6n\\+2"):
        from efficientml.models.resnet_cifar import CifarResNet
        CifarResNet(depth=21)
    with pytest.raises(ConfigError, match="shortcut option"):
        build_model("resnet20", option="C")
    with pytest.raises(ConfigError, match="num_classes=10"):
        build_model("resnet20", num_classes=100, pretrained=True)


@pytest.mark.parametrize("name,correct", [("resnet20", 20), ("resnet32", 19), ("resnet44", 20), ("resnet56", 20)])
def test_pretrained_sample_accuracy(name, correct):
    x, y = load_cifar_samples()
    x = normalize_images(x, PRETRAINED_MEAN, PRETRAINED_STD)
    m = build_model(name, pretrained=True).eval()
    with torch.no_grad():
        pred = m(x).argmax(1)
    assert (pred == y).sum().item() == correct


def test_missing_weights_name_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "models_roots", lambda: [tmp_path / "models"])
    monkeypatch.setenv("EFFICIENTML_CACHE", str(tmp_path / "cache"))

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(DataNotFoundError, match=r"resnet-cifar10/resnet20-12fca82f\.th.*EFFICIENTML_MODELS"):
        build_model("resnet20", pretrained=True)
    assert not (tmp_path / "cache" / "models" / "resnet-cifar10" / "resnet20-12fca82f.th").exists()


def test_corrupt_weights_rejected_by_hash(monkeypatch, tmp_path):
    src = next(r / WEIGHTS[20] for r in paths.models_roots() if (r / WEIGHTS[20]).is_file())
    dst = tmp_path / WEIGHTS[20]
    dst.parent.mkdir(parents=True)
    data = bytearray(src.read_bytes())
    data[-100] ^= 0xFF
    dst.write_bytes(bytes(data))
    monkeypatch.setattr(paths, "models_roots", lambda: [tmp_path])
    with pytest.raises(CheckpointError, match="12fca82f"):
        build_model("resnet20", pretrained=True)


def test_weights_of_another_depth_do_not_load(tmp_path):
    src = next(r / WEIGHTS[20] for r in paths.models_roots() if (r / WEIGHTS[20]).is_file())
    shutil.copy(src, tmp_path / "w.th")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_weights(build_model("resnet32"), tmp_path / "w.th")
