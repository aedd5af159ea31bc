"""The model on small random configurations: KV-cache decoding equals a full forward, a block runs on
its own, and logits match transformers' Llama / Mistral / Qwen2 on the same weights."""

from __future__ import annotations

import pytest
import torch

from efficientml.core.errors import ShapeError
from efficientml.llm.config import LlamaConfig, alibi_slopes
from efficientml.llm.model import build_model, init_weights
from efficientml.llm.kv_cache import StaticKVCache

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0)


def tiny(**kw) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **kw})


def make(cfg: LlamaConfig, seed: int = 0):
    m = build_model(cfg, device="cpu")
    init_weights(m, std=0.2, seed=seed)
    with torch.no_grad():  # non-trivial norms and biases so every parameter matters
        for n, p in m.named_parameters():
            if n.endswith("layernorm.weight") or n.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape))
            elif n.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape))
    return m.eval()


CONFIGS = {
    "llama-gqa": tiny(),
    "mha-tied": tiny(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa": tiny(num_key_value_heads=1),
    "qwen2-bias": tiny(model_type="qwen2", attention_bias=True),
    "qwen3-qk-norm": tiny(model_type="qwen3", qk_norm=True, head_dim=16),  # head_dim ≠ hidden / heads
    "mistral-window": tiny(model_type="mistral", sliding_window=5),
    "rope-linear": tiny(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope-dynamic": tiny(rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
    "rope-llama3": tiny(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "rope-yarn": tiny(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "rope-yarn-mscale": tiny(rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                                           "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 0.9, "mscale_all_dim": 0.6}),
    "alibi": tiny(position_embedding="alibi", num_key_value_heads=4),
    "alibi-gqa-window": tiny(position_embedding="alibi", sliding_window=6),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_equals_full_forward(name):
    cfg = CONFIGS[name]
    m = make(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        full = m(ids)  # (2, 17, V)
        for static in (False, True):
            cache = StaticKVCache.for_model(m, 2, 32, static_shapes=static)
            parts = [m(ids[:, :9], cache)]  # prefill 9, then chunk of 3, then one by one
            parts.append(m(ids[:, 9:12], cache))
            for t in range(12, 17):
                parts.append(m(ids[:, t:t + 1], cache))
            torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
            assert cache.length == 17


@pytest.mark.parametrize("name", list(CONFIGS))
def test_left_padding_is_invisible(name):
    """A left-padded row (attention_mask 0 over its padding) gets the logits it gets alone: in one
    forward, and prefilled into a cache (plain and static) then decoded token by token."""
    cfg = CONFIGS[name]
    m = make(cfg)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, cfg.vocab_size, (1, 12), generator=g)
    b = torch.randint(0, cfg.vocab_size, (1, 17), generator=g)
    nxt = torch.randint(0, cfg.vocab_size, (2, 3), generator=g)
    ids = torch.cat([torch.cat([torch.full((1, 5), 7), a], 1), b])  # (2, 17): row 0 padded by 5
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        alone = [m(torch.cat([a, nxt[:1]], 1))[0], m(torch.cat([b, nxt[1:]], 1))[0]]  # (15|20, V)
        full = m(ids, attention_mask=mask)
        assert full.isfinite().all()  # padding queries see themselves: no empty softmax rows
        torch.testing.assert_close(full[0, 5:], alone[0][:12], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(full[1], alone[1][:17], rtol=1e-4, atol=1e-5)
        for static in (False, True):
            cache = StaticKVCache.for_model(m, 2, 32, static_shapes=static)
            first = m(ids, cache, attention_mask=mask)
            torch.testing.assert_close(first, full, rtol=1e-5, atol=1e-5)
            for t in range(3):
                step = m(nxt[:, t:t + 1], cache)[:, 0]  # (2, V)
                torch.testing.assert_close(step[0], alone[0][12 + t], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(step[1], alone[1][17 + t], rtol=1e-4, atol=1e-5)
            cache.reset()
            assert cache.key_mask.all()  # every slot real again (the same tensor: a captured step reads it)


def test_padding_mask_errors():
    m = make(CONFIGS["llama-gqa"])
    with pytest.raises(ShapeError, match="attention_mask has shape"):
        m(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


def test_block_runs_alone():
    cfg = CONFIGS["llama-gqa"]
    m = make(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 11))
    with torch.no_grad():
        x = m.model.embed_tokens(ids)
        rope = m.model.rope(torch.arange(11))  # (cos, sin), each (T, hd)
        for layer in m.model.layers:
            x = layer(x, rope)
        torch.testing.assert_close(m.lm_head(m.model.norm(x)), m(ids), rtol=0, atol=0)


def test_naming_is_hugging_face_llama():
    m = build_model(tiny(), device="meta")
    names = set(dict(m.named_modules()))
    for n in ("model.embed_tokens", "model.layers.1.input_layernorm", "model.layers.1.self_attn.q_proj",
              "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
              "model.layers.1.self_attn.o_proj", "model.layers.1.post_attention_layernorm",
              "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj",
              "model.norm", "lm_head"):
        assert n in names
    assert all(type(mod) is torch.nn.Linear for n, mod in m.named_modules() if n.endswith("_proj") or n == "lm_head")
    assert m.model.embed_tokens.weight.is_meta  # built without allocating
    tied = build_model(tiny(tie_word_embeddings=True), device="cpu")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_alibi_slopes():
    assert alibi_slopes(8) == pytest.approx([2 ** -(i + 1) for i in range(8)])
    s12 = alibi_slopes(12)
    assert s12[:8] == pytest.approx(alibi_slopes(8)) and s12[8:] == pytest.approx(alibi_slopes(16)[0::2][:4])


def test_alibi_bias_matches_definition():
    """With ALiBi and one head, attention weights must be softmax(qk/√d + slope·(j − i))."""
    cfg = tiny(position_embedding="alibi", num_attention_heads=1, num_key_value_heads=1, hidden_size=8,
               num_hidden_layers=1)
    m = make(cfg)
    mask = m.model.attention_mask(torch.arange(4), 4, torch.float32)  # (1, 4, 4)
    slope = alibi_slopes(1)[0]
    want = torch.tensor([[0, -1e9, -1e9, -1e9], [-1, 0, -1e9, -1e9], [-2, -1, 0, -1e9], [-3, -2, -1, 0.0]])
    want = torch.where(want < -1e8, float("-inf"), want * slope)
    torch.testing.assert_close(mask[0], want)


HF_CLASSES = {"llama-gqa": "LlamaForCausalLM", "mha-tied": "LlamaForCausalLM", "mqa": "LlamaForCausalLM",
              "qwen2-bias": "Qwen2ForCausalLM", "qwen3-qk-norm": "Qwen3ForCausalLM",
              "mistral-window": "MistralForCausalLM",
              "rope-linear": "LlamaForCausalLM", "rope-llama3": "LlamaForCausalLM", "rope-dynamic": "LlamaForCausalLM",
              "rope-yarn": "LlamaForCausalLM", "rope-yarn-mscale": "LlamaForCausalLM"}


@pytest.mark.parametrize("name", list(HF_CLASSES))
def test_logits_match_transformers(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    from efficientml.llm.io.load import load_hf, save_hf

    cfg = CONFIGS[name]
    m = make(cfg)
    save_hf(m, None, tmp_path / "m")
    hf = getattr(transformers, HF_CLASSES[name]).from_pretrained(
        str(tmp_path / "m"), dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = m(ids)
        again = load_hf(tmp_path / "m")(ids)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    loaded = load_hf(tmp_path / "m")
    for k, v in m.state_dict().items():  # save → load is exact
        assert torch.equal(loaded.state_dict()[k], v), k
    torch.testing.assert_close(again, ours, rtol=1e-4, atol=1e-5)  # loaded models run packed q/k/v


def test_packed_projections_same_logits_and_state():
    from efficientml.llm.kernels.packed import pack_projections

    cfg = CONFIGS["qwen2-bias"]
    m = make(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        ref = m(ids)
        keys = list(m.state_dict())
        pack_projections(m)
        att = m.model.layers[0].self_attn
        assert att.packed.weight is not None and att.q_proj.weight.data_ptr() == att.packed.weight.data_ptr()
        assert list(m.state_dict()) == keys
        storages = {p.untyped_storage().data_ptr() for p in m.parameters()}
        assert len(storages) == 2 * 7 + 3  # per layer: qkv w, qkv b, o, gate_up, down, 2 norms (27 unpacked)
        torch.testing.assert_close(m(ids), ref, rtol=1e-5, atol=1e-5)
        # swapping a projection (as quantization does) falls back to separate calls
        new = torch.nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        new.weight.copy_(att.q_proj.weight)
        new.bias.copy_(att.q_proj.bias)
        att.q_proj = new
        torch.testing.assert_close(m(ids), ref, rtol=1e-5, atol=1e-5)
        assert att.packed.weight is None or att.packed(torch.zeros(1, cfg.hidden_size),
                                                        (att.q_proj, att.k_proj, att.v_proj)) is None
        m.model.layers[1].mlp.up_proj.weight.mul_(2)  # in-place edits (AWQ-style scaling) stay visible
        assert not torch.allclose(m(ids), ref)


def test_packed_runs_one_row_on_cpu_and_several_rows_separately():
    """CPU: one row (decoding) runs as one packed matmul; several rows run the separate matmuls
    (faster under MKL); both give the modules' own outputs."""
    from efficientml.llm.kernels.packed import pack_projections

    cfg = CONFIGS["qwen2-bias"]
    m = pack_projections(make(cfg))
    att = m.model.layers[0].self_attn
    mods = (att.q_proj, att.k_proj, att.v_proj)
    with torch.no_grad():
        one = torch.randn(1, 1, cfg.hidden_size)
        out = att.packed(one, mods)
        assert out is not None
        for o, mod in zip(out, mods):
            torch.testing.assert_close(o, mod(one))
        assert att.packed(torch.randn(1, 3, cfg.hidden_size), mods) is None


def test_packed_model_traces_with_torch_compile():
    """The decode step is compiled on CUDA (torch.compile inside the CUDA graph); dynamo must trace the
    packed projections (data_ptr is not traceable) — checked here with the eager backend on CPU."""
    from efficientml.llm.kernels.packed import pack_projections

    cfg = CONFIGS["qwen2-bias"]
    m = pack_projections(make(cfg))
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    with torch.no_grad():
        ref = m(ids)
        out = torch.compile(m, backend="eager", fullgraph=True)(ids)
    torch.testing.assert_close(out, ref)


def test_decode_layout_keeps_values_names_ties_and_packing():
    from efficientml.llm.kernels.packed import decode_layout, pack_projections

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    m = pack_projections(make(cfg))
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    with torch.no_grad():
        ref = m(ids)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        decode_layout(m)
        decode_layout(m)  # idempotent
        att = m.model.layers[0].self_attn
        assert att.q_proj.weight.stride() == (1, att.packed.weight.shape[0])  # (out, in) view of (in, out)
        assert att.packed(torch.zeros(1, cfg.hidden_size), (att.q_proj, att.k_proj, att.v_proj)) is not None
        assert m.lm_head.weight is m.model.embed_tokens.weight
        assert m.lm_head.weight.stride() == (1, cfg.vocab_size)
        after = m.state_dict()
        assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
        torch.testing.assert_close(m(ids), ref, rtol=1e-5, atol=1e-5)
        # cached decoding still equals the full forward
        cache = m.new_cache(2, 16)
        m(ids[:, :5], cache)
        step = m(ids[:, 5:], cache)[:, -1]
    torch.testing.assert_close(step, ref[:, -1], rtol=1e-4, atol=1e-4)


def test_decode_layout_model_saves_and_reloads(tmp_path):
    from efficientml.llm.io.load import load_hf, save_hf
    from efficientml.llm.kernels.packed import decode_layout, pack_projections

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    m = decode_layout(pack_projections(make(cfg)))
    save_hf(m, None, tmp_path / "hf")
    back = load_hf(tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), m(ids), rtol=1e-5, atol=1e-5)


def test_dynamic_ntk_rope_matches_transformers_beyond_the_context(tmp_path):
    """transformers' "dynamic" RoPE: unchanged within max_position_embeddings, base grown with the
    sequence beyond it. Full forward past the context, and cached greedy generation crossing it."""
    transformers = pytest.importorskip("transformers")
    from efficientml.llm.generate import SamplingConfig, generate
    from efficientml.llm.io.load import save_hf

    cfg = tiny(max_position_embeddings=12, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    m = make(cfg)
    plain = make(tiny(max_position_embeddings=12))  # the same weights, no scaling
    plain.load_state_dict(m.state_dict())
    save_hf(m, None, tmp_path / "m")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(m(ids[:, :12]), plain(ids[:, :12]), rtol=0, atol=0)  # within: no change
        ours, ref = m(ids), hf(ids).logits
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(ours, plain(ids), atol=1e-3)  # beyond: scaled
        cache = StaticKVCache.for_model(m, 1, 24)  # past the 12-token context
        out = generate(m, ids[:1, :8], SamplingConfig(max_new_tokens=14), cache=cache).tokens[0]
        want = hf.generate(ids[:1, :8], max_new_tokens=14, min_new_tokens=14, do_sample=False, top_p=None,
                           top_k=None, temperature=None)[0, 8:].tolist()
    assert out == want
    static = StaticKVCache.for_model(m, 1, 24, static_shapes=True)  # positions as tensors: same tokens
    assert generate(m, ids[:1, :8], SamplingConfig(max_new_tokens=14), cache=static,
                    use_compile=True).tokens[0] == want  # (compile is skipped past the context)
