import pytest
import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError, ShapeError, UnsupportedError
from efficientml.core.transform import LayerFilter
from efficientml.models import build_model
from efficientml.quant import IntegerConfig, KMeansConfig, WeightOnlyConfig, convert_integer, quantize
from efficientml.quant.mixed import apply_bits, layer_sensitivity, layer_sizes, pareto_front, search_bits, weight_bytes


def _vgg():
    torch.manual_seed(0)
    return build_model("vgg", width=0.125, in_channels=1).eval()


def test_mixed_precision_meets_budget_and_prefers_robust_layers():
    m = _vgg()
    x = torch.randn(16, 1, 28, 28)
    sens = layer_sensitivity(m, x, (2, 4, 8))
    assert all(s[8] > s[4] > s[2] for s in sens.values())
    sizes = layer_sizes(m)
    budget = 0.5 * weight_bytes(sizes, {n: 8 for n in sizes})
    bits = search_bits(sens, sizes, budget)
    assert weight_bytes(sizes, bits) <= budget and set(bits.values()) <= {2, 4, 8}
    apply_bits(m, bits)(x)
    with pytest.raises(ConfigError, match="below the smallest possible model"):
        search_bits(sens, sizes, 10)


def test_pareto_front():
    pts = [{"size_bytes": 1, "accuracy": 50}, {"size_bytes": 2, "accuracy": 40}, {"size_bytes": 3, "accuracy": 60}]
    assert [p["size_bytes"] for p in pareto_front(pts)] == [1, 3]


def test_quantize_entry_point_and_errors():
    m = _vgg()
    r = quantize(m, WeightOnlyConfig(format="fp8_e4m3"))
    assert r.path == "simulated" and len(r.report["quantized_layers"]) == 9
    with pytest.raises(ShapeError, match="layer 'backbone.conv0': nf4 needs the last dimension to be a multiple"):
        quantize(m, WeightOnlyConfig(format="nf4", strict_groups=True))
    assert not torch.equal(r.model.classifier.weight, m.classifier.weight)          # input untouched
    with pytest.raises(ConfigError, match="unknown number format 'int9'"):
        WeightOnlyConfig(format="int9")
    with pytest.raises(ShapeError, match="group size 7 does not divide"):
        quantize(m, WeightOnlyConfig(format="int4", granularity="group", group_size=7, strict_groups=True))
    with pytest.raises(UnsupportedError, match="layer type 'Embedding' has no quantized implementation"):
        quantize(m, WeightOnlyConfig(), filter=LayerFilter(types=("Conv2d", "Embedding")))
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(UnsupportedError, match=r"layer '0' \(Embedding\) has no quantized implementation"):
        quantize(emb, WeightOnlyConfig())
    r = quantize(emb, WeightOnlyConfig(skip_unsupported=True))
    assert r.report["float_layers"] == ["0 (Embedding)"]
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize(m, IntegerConfig())
    with pytest.raises(ConfigError, match="not a quantization config"):
        quantize(m, object())
    assert quantize(m, KMeansConfig(bits=2)).report["layers"]["classifier"] == 2


def test_onnx_qdq_matches_integer_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from efficientml.quant.export import export_onnx, run_onnx

    m = _vgg()
    im = convert_integer(m, [torch.randn(8, 1, 28, 28)])
    x = torch.randn(6, 1, 28, 28)
    path = export_onnx(im, tmp_path / "vgg.onnx", x[:1])
    ours = im(x)
    lsb = im.output_qparams.scale
    for optimize in (True, False):                  # ORT's fused integer kernels and plain QDQ
        out = run_onnx(path, x, optimize=optimize)
        assert float((out - ours).abs().max()) <= lsb * 1.001
        assert torch.equal(out.argmax(1), ours.argmax(1))
