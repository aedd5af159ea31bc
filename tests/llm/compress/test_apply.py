"""efficientml.apply for the LLM techniques: exactly the weights and logits the block-wise code gives
when run by hand (the body of the removed llm.compress.quantize / prune), the filter, copy vs in
place, and the quantized KV cache config."""

import pytest
import torch
from torch import nn

from efficientml import apply
from efficientml.core.errors import ConfigError, UnsupportedError
from efficientml.core.transform import LayerFilter, TransformResult
from efficientml.llm.compress import (AWQConfig, GPTQConfig, KVCacheQuantConfig, LLMPruneConfig, QuantizedKVCache,
                                      QuantLinear, RTNConfig, SmoothQuantConfig)
from efficientml.llm.compress.awq import awq_processor
from efficientml.llm.compress.calib import run_blockwise
from efficientml.llm.compress.gptq import gptq_processor
from efficientml.llm.compress.magnitude import magnitude_prune
from efficientml.llm.compress.mappings import BLOCK_LINEARS
from efficientml.llm.compress.rtn import quantize_weight
from efficientml.llm.compress.smoothquant import smoothquant_processor
from efficientml.llm.compress.sparsegpt import sparsegpt_processor
from efficientml.llm.compress.wanda import wanda_processor
from efficientml.llm.kernels.qlinear import install_quantized
from efficientml.llm.kv_cache import StaticKVCache

from ..conftest import tiny_model


def _by_hand(model, config, calib, pack=True):
    """The block-wise code run directly, as the older llm.compress.quantize/prune did."""
    with torch.no_grad():
        if isinstance(config, RTNConfig):
            for block in model.model.layers:
                for name in BLOCK_LINEARS:
                    w = block.get_submodule(name).weight.detach().float()
                    install_quantized(block, name, quantize_weight(w, config.spec, name=name), pack)
            return model
        if isinstance(config, LLMPruneConfig) and config.method == "magnitude":
            magnitude_prune(model, config)
            return model
        if isinstance(config, LLMPruneConfig):
            proc = {"wanda": wanda_processor, "sparsegpt": sparsegpt_processor}[config.method](model, config)
        elif isinstance(config, AWQConfig):
            proc = awq_processor(model, config, pack, {}, None)
        else:
            proc = {GPTQConfig: gptq_processor, SmoothQuantConfig: smoothquant_processor}[type(config)](
                model, config, pack, {})
        run_blockwise(model, calib, proc, 8, None, progress=False)
    return model


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("config,path", [
    (RTNConfig(4, 32), "real"), (AWQConfig(4, 32, n_grid=4, clip_grid=4, search_samples=2), "real"),
    (GPTQConfig(4, 32), "real"), (SmoothQuantConfig(), "real"),
    (LLMPruneConfig("magnitude", 0.5), "simulated"), (LLMPruneConfig("wanda", n_m=(2, 4)), "simulated"),
    (LLMPruneConfig("sparsegpt", 0.5), "simulated"),
])
def test_apply_equals_the_block_wise_code(config, path, calib, ids):
    res = apply(tiny_model(), config, calib=calib, progress=False)
    ref = _by_hand(tiny_model(), config, calib)
    assert isinstance(res, TransformResult) and res.path == path
    assert _state_equal(res.model, ref)
    with torch.no_grad():
        assert torch.equal(res.model(ids), ref(ids))
    assert len(res.layers) == 2 * len(BLOCK_LINEARS)
    assert res.report["method"] == getattr(config, "method", type(config).kind)
    assert type(config).from_dict(res.to_dict()["config"]) == config


def test_pack_false_is_simulated_and_matches_by_hand(calib, ids):
    res = apply(tiny_model(), RTNConfig(3, 32), pack=False)
    ref = _by_hand(tiny_model(), RTNConfig(3, 32), calib, pack=False)
    assert res.path == "simulated" and _state_equal(res.model, ref)
    assert res.layers["model.layers.1.mlp.down_proj"] == {"bits": 3, "group_size": 32}


def test_copy_by_default_in_place_on_request():
    m = tiny_model()
    res = apply(m, RTNConfig(4, 32))
    assert res.model is not m and type(m.model.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(res.model.model.layers[0].self_attn.q_proj, QuantLinear)
    res = apply(m, RTNConfig(4, 32), inplace=True)
    assert res.model is m and isinstance(m.model.layers[0].self_attn.q_proj, QuantLinear)


def test_rtn_filter_and_block_wise_refusal(calib):
    res = apply(tiny_model(), RTNConfig(4, 32), filter=LayerFilter(include=("model.layers.0.*",)))
    assert len(res.layers) == len(BLOCK_LINEARS) and all(n.startswith("model.layers.0.") for n in res.layers)
    assert type(res.model.model.layers[1].mlp.up_proj) is nn.Linear
    res = apply(tiny_model(), RTNConfig(4, 32), filter=LayerFilter(exclude=("*.mlp.*",)))
    assert sorted({n.split(".")[-1] for n in res.layers}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    with pytest.raises(UnsupportedError, match="AWQConfig transforms every decoder-block linear together"):
        apply(tiny_model(), AWQConfig(4, 32), calib=calib, filter="model.layers.0.*")
    with pytest.raises(ConfigError, match=r"RTNConfig does not take option\(s\) \['example_inputs'\]"):
        apply(tiny_model(), RTNConfig(4, 32), example_inputs=1)


def test_kv_cache_quant_config(ids):
    m = tiny_model()
    res = apply(m, KVCacheQuantConfig(bits=4, group_size=8))
    assert res.path == "real" and len(res.layers) == m.config.num_hidden_layers
    assert isinstance(m.new_cache(2, 32), StaticKVCache)                     # the input keeps its cache
    cache = res.model.new_cache(2, 32)
    assert isinstance(cache, QuantizedKVCache) and cache.bits == 4 and cache.g == 8
    with torch.no_grad():
        out = res.model(ids, cache=cache)
        ref = m(ids, cache=QuantizedKVCache.for_model(m, 2, 32, bits=4, group_size=8))
    assert torch.equal(out, ref)
    with pytest.raises(ConfigError, match=r"KV-cache bits must be one of \[4, 8\], got 3"):
        KVCacheQuantConfig(bits=3)
    with pytest.raises(ConfigError, match="KV group_size 5 must divide head_dim 16"):
        apply(m, KVCacheQuantConfig(group_size=5))
    with pytest.raises(UnsupportedError, match="no static-shape mode"):
        res.model.new_cache(1, 8, static_shapes=True)
    with pytest.raises(UnsupportedError, match="takes no layer filter"):
        apply(m, KVCacheQuantConfig(), filter="model.layers.0.*")


def test_generate_uses_the_quantized_kv_cache(ids):
    """generate() builds the cache apply(KVCacheQuantConfig) installed: the same tokens as greedy decoding
    through an explicit QuantizedKVCache."""
    from efficientml.llm.generate import SamplingConfig, generate

    m = tiny_model()
    q = apply(m, KVCacheQuantConfig(bits=4, group_size=8)).model
    prompt = ids[0, :6].tolist()
    cfg = SamplingConfig(max_new_tokens=12)
    got = generate(q, prompt, cfg).tokens
    ref = generate(m, prompt, cfg, cache=QuantizedKVCache.for_model(m, 1, 6 + 12, bits=4, group_size=8)).tokens
    assert got == ref
