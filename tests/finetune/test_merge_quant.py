"""Merging a QLoRA adapter into a W4 model: the calibrated (GPTQ) re-quantization stays closer to
base+adapter than round-to-nearest, and the merged model saves as a packed checkpoint and as GGUF
(Q4_0) that load back with the same logits."""

import pytest
import torch

from efficientml import apply
from efficientml.core.errors import ConfigError
from efficientml.finetune import QLoRAConfig
from efficientml.finetune.merge_quant import MergeQuantConfig, merge_into_quantized, merged_float, save_merged
from efficientml.llm.kernels.qlinear import QuantLinear

from ..llm.conftest import _write_tokenizer_gguf, tiny_model


def _qlora_model():
    m = apply(tiny_model(), QLoRAConfig(rank=8, alpha=16)).model
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return m


def _mse(a, b):
    return ((a - b) ** 2).mean().item()


def test_calibrated_merge_beats_naive_rounding():
    model = _qlora_model()
    calib = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    res = merge_into_quantized(model, calib)
    assert isinstance(res.calibrated.model.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(res.naive.model.layers[1].self_attn.q_proj, QuantLinear)
    with torch.no_grad():
        ref, flat = model(ids), merged_float(model)(ids)
        cal, naive = res.calibrated(ids), res.naive(ids)
    torch.testing.assert_close(flat, ref, rtol=1e-4, atol=1e-5)  # the merged float model is base+adapter
    assert _mse(cal, ref) < 0.95 * _mse(naive, ref), (_mse(cal, ref), _mse(naive, ref))
    assert res.report["config"]["method"] == "gptq"
    with pytest.raises(ConfigError, match="nothing to merge"):
        merged_float(tiny_model())
    with pytest.raises(ConfigError, match="calib must be a \\(samples, tokens\\) tensor"):
        merge_into_quantized(model, calib.float())


def test_merged_model_saves_packed_and_as_gguf(tmp_path):
    pytest.importorskip("gguf")
    from efficientml.llm.io.compressed import load_compressed
    from efficientml.llm.io.gguf import GGUFFile
    from efficientml.llm.io.load import load_gguf
    from efficientml.llm.io.tokenizer import Tokenizer

    tokens = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(125)]
    _write_tokenizer_gguf(tmp_path / "tok.gguf", "llama", tokens, [2, 3, 3] + [1] * 125, scores=[0.0] * 128,
                         bos=1, eos=2)
    tok = Tokenizer.from_gguf(GGUFFile(tmp_path / "tok.gguf"))
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    res = merge_into_quantized(_qlora_model(), calib)
    paths = save_merged(res.calibrated, tok, tmp_path / "merged-w4")
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    packed, _ = load_compressed(paths["packed"])
    from_gguf = load_gguf(GGUFFile(paths["gguf"]))
    with torch.no_grad():
        want = res.calibrated(ids)
        torch.testing.assert_close(packed(ids), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_gguf(ids), want, rtol=1e-3, atol=1e-3)  # fp16 embeddings in the GGUF
    assert MergeQuantConfig().quant_config().spec.group_size == 32
    assert MergeQuantConfig(method="awq_gptq").quant_config().use_gptq
    with pytest.raises(ConfigError, match="method"):
        MergeQuantConfig(method="rtn")
