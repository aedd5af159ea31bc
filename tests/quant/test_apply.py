"""efficientml.apply for every CNN quantization config: exactly what the older spelling
(quant.quantize) and the technique's own function give, the layer filter, and copy vs in place."""

import copy

import pytest
import torch
import torch.nn as nn

from efficientml import apply
from efficientml.core.errors import UnsupportedError
from efficientml.core.transform import LayerFilter, TransformResult
from efficientml.models import build_model
from efficientml.quant import (AdaRoundConfig, BinaryConfig, DeepCompressionConfig, IntegerConfig, KMeansConfig,
                               QATConfig, WeightOnlyConfig, adaround, binarize_model, convert_integer,
                               kmeans_quantize, prepare_qat, quantize)
from efficientml.quant.apply import quantize_weight


def _vgg():
    torch.manual_seed(0)
    return build_model("vgg", width=0.125, in_channels=1).eval()


X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
CALIB = [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(4))]


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _old(cfg, calib=None):
    """What the technique's own function does (the body of the older dispatch)."""
    m = _vgg()
    if isinstance(cfg, WeightOnlyConfig):
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    mod.weight.copy_(quantize_weight(mod.weight, cfg))
        return m
    if isinstance(cfg, IntegerConfig):
        return convert_integer(m, calib, cfg)
    if isinstance(cfg, KMeansConfig):
        kmeans_quantize(m, cfg)
        return m
    if isinstance(cfg, AdaRoundConfig):
        adaround(m, calib, cfg)
        return m
    if isinstance(cfg, QATConfig):
        return prepare_qat(m, cfg)
    return binarize_model(m, cfg.mode, cfg.skip_first_last, cfg.ttq_threshold)[0]


@pytest.mark.parametrize("cfg,calib,path", [
    (WeightOnlyConfig(format="int4", granularity="channel"), None, "simulated"),
    (WeightOnlyConfig(format="fp8_e4m3"), None, "simulated"),
    (IntegerConfig(), CALIB, "real"),
    (KMeansConfig(bits=2, iters=5), None, "simulated"),
    (AdaRoundConfig(bits=4, iters=5, batch_size=8), CALIB, "simulated"),
    (QATConfig(), None, "simulated"),
    (BinaryConfig(mode="twn"), None, "simulated"),
])
def test_apply_equals_the_older_spelling_and_the_function(cfg, calib, path):
    torch.manual_seed(0)
    new = apply(_vgg(), cfg, calib=calib)
    torch.manual_seed(0)
    thin = quantize(_vgg(), cfg, calibration=calib)
    torch.manual_seed(0)
    own = _old(cfg, calib)
    assert isinstance(new, TransformResult) and new.path == thin.path == path
    with torch.no_grad():
        out = new.model(X)
        assert torch.equal(out, thin.model(X)) and torch.equal(out, own(X))
    assert _same_state(new.model, thin.model) and new.report.keys() == thin.report.keys()


def test_deep_compression_and_its_layers():
    cfg = DeepCompressionConfig(default_sparsity=0.5, conv_bits=3, linear_bits=2)
    new, thin = apply(_vgg(), cfg), quantize(_vgg(), cfg)
    assert _same_state(new.model, thin.model)
    assert new.layers["classifier"] == {"bits": 2, "density": pytest.approx(0.5, abs=0.01)}
    assert new.report["bits"]["backbone.conv0"] == 3


def test_weight_only_filter_and_in_place():
    m = _vgg()
    orig = copy.deepcopy(m)
    res = apply(m, WeightOnlyConfig(format="int4"), filter=LayerFilter(exclude=("classifier", "backbone.conv0")))
    assert _same_state(m, orig)                                           # default: the input is untouched
    assert torch.equal(res.model.classifier.weight, m.classifier.weight)
    assert torch.equal(res.model.backbone.conv0.weight, m.backbone.conv0.weight)
    assert not torch.equal(res.model.backbone.conv1.weight, m.backbone.conv1.weight)
    assert "classifier" not in res.layers and len(res.layers) == 7 and res.layers["backbone.conv1"] == "int4"
    res = apply(m, WeightOnlyConfig(format="int4"), filter="backbone.conv1", inplace=True)
    assert res.model is m and list(res.layers) == ["backbone.conv1"]
    assert not torch.equal(m.backbone.conv1.weight, orig.backbone.conv1.weight)
    assert torch.equal(m.backbone.conv2.weight, orig.backbone.conv2.weight)


def test_filters_of_qat_binary_and_refusals():
    res = apply(_vgg(), QATConfig(), filter=LayerFilter(types=(nn.Linear,)))
    assert list(res.layers) == ["classifier"] and isinstance(res.model.backbone.conv0, nn.Conv2d)
    res = apply(_vgg(), BinaryConfig(mode="bwn", skip_first_last=False), filter="backbone.*")
    assert "classifier" not in res.layers and len(res.layers) == 8
    m = _vgg()
    res = apply(m, QATConfig(), inplace=True)                  # builds a new model: the input stays as it was
    assert res.model is not m and isinstance(m.classifier, nn.Linear)
    with pytest.raises(UnsupportedError, match="IntegerConfig converts every Conv2d/Linear"):
        apply(_vgg(), IntegerConfig(), calib=CALIB, filter="classifier")
    with pytest.raises(UnsupportedError, match="KMeansConfig converts every Conv2d/Linear"):
        apply(_vgg(), KMeansConfig(), filter="classifier")
