import pytest
import torch

from efficientml.analysis.metrics import sqnr
from efficientml.core.errors import ConfigError, ShapeError
from efficientml.llm.compress.mappings import BLOCK_LINEARS
from efficientml.llm.compress.weight_format import WeightFormatConfig, apply_weight_format
from efficientml.quant.formats import FORMATS, nf4_values, quantize_to_format

from ..conftest import tiny_model


def _weight(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(96, 256, generator=g) * torch.rand(96, 1, generator=g)  # rows of different scales


def test_nf4_is_absmax_per_64_onto_the_16_levels():
    w = _weight()
    q = quantize_to_format(w, FORMATS.get("nf4"))
    # independent: nearest of the 16 levels (argmin of the distance) times each block's absmax
    blocks = w.reshape(96, 4, 64)
    absmax = blocks.abs().amax(-1, keepdim=True)
    lv = nf4_values().float()
    idx = ((blocks / absmax)[..., None] - lv).abs().argmin(-1)
    torch.testing.assert_close(q, (lv[idx] * absmax).reshape(w.shape), rtol=0, atol=0)
    assert all(len(b.unique()) <= 16 for b in q.reshape(-1, 64))
    assert sqnr(w, q) > 20.0


def test_fp8_e4m3_per_channel_equals_torch_cast():
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8_e4m3fn")
    w = _weight(1)
    q = quantize_to_format(w, FORMATS.get("fp8_e4m3"))
    s = w.abs().amax(1, keepdim=True) / 448.0          # per output channel: max |w| → E4M3's max
    torch.testing.assert_close(q, (w / s).to(torch.float8_e4m3fn).float() * s, rtol=0, atol=0)
    assert sqnr(w, q) > 30.0


@pytest.mark.parametrize("fmt,bits", [("nf4", 4.5), ("fp8_e4m3", None), ("mxfp4", 4.25)])
def test_llm_weights_rounded_in_place_block_linears_only(fmt, bits):
    ref, m = tiny_model(), tiny_model()
    rep = apply_weight_format(m, WeightFormatConfig(fmt))
    assert rep["path"] == "simulated" and rep["format"] == fmt and len(rep["layers"]) == 14
    for i, (b0, b1) in enumerate(zip(ref.model.layers, m.model.layers)):
        for name in BLOCK_LINEARS:
            w0, w1 = b0.get_submodule(name).weight, b1.get_submodule(name).weight
            assert torch.equal(w1, quantize_to_format(w0.detach(), FORMATS.get(fmt)))
            assert not torch.equal(w1, w0)
            if bits is not None:
                assert rep["layers"][f"model.layers.{i}.{name}"] == bits
    assert torch.equal(m.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert torch.equal(m.model.layers[0].input_layernorm.weight, ref.model.layers[0].input_layernorm.weight)
    # FP8 with one fp32 scale per output channel: 8 + 32 / in_features bits
    if fmt == "fp8_e4m3":
        assert rep["layers"]["model.layers.0.mlp.down_proj"] == 8 + 32 / 128
        assert rep["layers"]["model.layers.0.self_attn.q_proj"] == 8 + 32 / 64


def test_nf4_llm_output_close_to_fp(ids):
    ref, m = tiny_model(), tiny_model()
    apply_weight_format(m, WeightFormatConfig("nf4"))
    with torch.no_grad():
        assert sqnr(ref(ids), m(ids)) > 15.0


def test_bad_format_and_block_size():
    with pytest.raises(ConfigError, match="nf5"):
        WeightFormatConfig("nf5")
    m = tiny_model(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ShapeError, match=r"model.layers.0.self_attn.q_proj: nf4 needs the last dimension"):
        apply_weight_format(m, WeightFormatConfig("nf4"))
