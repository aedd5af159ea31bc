import json

import pytest
import torch

from efficientml import apply
from efficientml.core.errors import ConfigError, UnsupportedError
from efficientml.llm.compress import (AWQConfig, GPTQConfig, RTNConfig, SmoothQuantConfig, load_compressed,
                                      save_compressed)
from efficientml.llm.kernels.qlinear import QuantLinear, W8A8Linear

from ..conftest import tiny_model


@pytest.mark.parametrize("conf", [RTNConfig(4, 32), RTNConfig(3, 32, True), GPTQConfig(4, None)])
def test_save_load_round_trip(tmp_path, conf, ids, calib):
    m = tiny_model()
    apply(m, conf, calib=calib, inplace=True, progress=False)
    with torch.no_grad():
        ref = m(ids)
    save_compressed(m, None, tmp_path / "q")
    hf = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = hf["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["config_groups"]["group_0"]["weights"]["num_bits"] == conf.w_bits
    m2, _ = load_compressed(tmp_path / "q")
    assert sum(isinstance(x, QuantLinear) for x in m2.modules()) == 14
    with torch.no_grad():
        assert (m2(ids) - ref).abs().max().item() <= 1e-5


def test_w8a8_round_trip(tmp_path, ids, calib):
    m = tiny_model()
    apply(m, SmoothQuantConfig(act="static"), calib=calib, inplace=True, progress=False)
    with torch.no_grad():
        ref = m(ids)
    save_compressed(m, None, tmp_path / "w8")
    m2, _ = load_compressed(tmp_path / "w8")
    assert sum(isinstance(x, W8A8Linear) for x in m2.modules()) == 14
    with torch.no_grad():
        assert (m2(ids) - ref).abs().max().item() <= 1e-5


def test_existing_output_folder_refused(tmp_path):
    m = tiny_model()
    apply(m, RTNConfig(4, 32), inplace=True)
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="already exists"):
        save_compressed(m, None, tmp_path / "q")
    assert [p.name for p in (tmp_path / "q").iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_compressed_tensors_reader_agrees(tmp_path):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    m = tiny_model()
    apply(m, RTNConfig(4, 32), inplace=True)
    save_compressed(m, None, tmp_path / "q")
    qc = QuantizationConfig.model_validate(json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"])
    scheme = qc.config_groups["group_0"]
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    local = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.startswith(name + ".")}
    theirs = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    ours = m.get_submodule(name).dequantize()
    # they dequantize in the scale's dtype (fp16): our exact fp32 values rounded to fp16 must match
    torch.testing.assert_close(theirs, ours.to(theirs.dtype), rtol=0, atol=0)
    assert ct.__version__


def test_family_without_mapping(calib):
    m = tiny_model()
    object.__setattr__(m.config, "model_type", "gpt2")
    with pytest.raises(UnsupportedError, match="no scaling-group mapping"):
        apply(m, AWQConfig(4, 32), calib=calib, inplace=True)


def test_too_few_calibration_tokens():
    m = tiny_model()
    with pytest.raises(ConfigError, match="needs at least 128"):
        apply(m, GPTQConfig(4, 32), calib=torch.zeros(2, 16, dtype=torch.long), inplace=True)
    with pytest.raises(ConfigError, match="needs calibration tokens"):
        apply(m, AWQConfig(4, 32), calib=None, inplace=True)


def test_generic_load_opens_compressed_folders(tmp_path, ids, calib):
    """`efficientml llm ppl/generate DIR` go through llm.load.load: a quantized folder loads its real
    packed linears, not a dense model."""
    from efficientml.llm.io.load import load, load_tokenizer

    m = tiny_model()
    apply(m, RTNConfig(4, 32), calib=calib, inplace=True, progress=False)
    with torch.no_grad():
        ref = m(ids)
    save_compressed(m, load_tokenizer("smollm2-135m"), tmp_path / "q")
    m2, tok = load(tmp_path / "q")
    assert sum(isinstance(x, QuantLinear) for x in m2.modules()) == 14
    assert tok.encode("Paris") == load_tokenizer("smollm2-135m").encode("Paris")
    with torch.no_grad():
        assert (m2(ids) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("conf", [RTNConfig(4, 32), RTNConfig(3, 32, True), SmoothQuantConfig(act="static"),
                                  AWQConfig(4, 32)])
def test_phi3_checkpoint_holds_fused_projections(tmp_path, conf, ids, calib):
    """Phi-3: the checkpoint names qkv_proj / gate_up_proj as transformers and vLLM do (packed codes,
    scales and zero points joined by output row); it loads back to the same separate linears."""
    from safetensors.torch import load_file

    m = tiny_model(model_type="phi3", tie_word_embeddings=False)
    apply(m, conf, calib=calib, inplace=True, progress=False)
    with torch.no_grad():
        ref = m(ids)
    save_compressed(m, None, tmp_path / "q")
    keys = set(load_file(str(tmp_path / "q" / "model.safetensors")))
    assert not any(".q_proj." in k or ".gate_proj." in k for k in keys)
    assert {"model.layers.0.self_attn.qkv_proj.weight_scale",
            "model.layers.1.mlp.gate_up_proj.weight_scale"} <= keys
    ignore = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["lm_head"]
    m2, _ = load_compressed(tmp_path / "q")
    for name, mod in m.named_modules():
        if isinstance(mod, (QuantLinear, W8A8Linear)):
            other = m2.get_submodule(name)
            assert all(torch.equal(a, b) for a, b in zip(mod.state_dict().values(), other.state_dict().values()))
    with torch.no_grad():
        assert (m2(ids) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family, options, conf", [
    ("llama", {}, RTNConfig(4, 32, symmetric=True)),
    ("phi3", {"tie_word_embeddings": False}, RTNConfig(4, 32, symmetric=True)),  # fused qkv_proj / gate_up_proj
    ("qwen3", {"qk_norm": True}, AWQConfig(4, 32, symmetric=True, n_grid=4, clip_grid=4)),  # AWQ past q/k norms
    ("granite", {"embedding_multiplier": 6.0, "attention_multiplier": 0.1, "residual_multiplier": 0.3,
                 "logits_scaling": 4.0}, AWQConfig(4, 32, symmetric=True, n_grid=4, clip_grid=4)),
])
def test_transformers_loads_the_checkpoint(tmp_path, ids, calib, family, options, conf):
    """transformers (with compressed-tensors installed) builds its own model from our folder and
    decompresses the packed weights: its logits equal ours. Symmetric weights: transformers 5.x with
    compressed-tensors 0.20 allocates asymmetric zero points unpacked on the meta device and then
    refuses the packed (out/8, G) tensor that compressed-tensors' own compressor writes (and reads:
    test_compressed_tensors_reader_agrees)."""
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")

    m = tiny_model(model_type=family, **options)
    apply(m, conf, calib=calib, inplace=True, progress=False)
    with torch.no_grad():
        ref = m(ids)
    save_compressed(m, None, tmp_path / "q", float_dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM",
                                 "qwen3": "Qwen3ForCausalLM", "granite": "GraniteForCausalLM"}[family]
    with torch.no_grad():
        assert (hf(ids).logits - ref).abs().max().item() <= 1e-5
