"""GGUF: our block dequantization equals the gguf package's reference decoder bit for bit, a written
tiny Llama GGUF (llama.cpp's Q/K permutation applied) loads back to the original weights, and broken
files raise CheckpointError."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from efficientml.core.errors import CheckpointError
from efficientml.llm.gguf import GGUFFile, dequantize_blocks, unpermute_rope_rows
from efficientml.llm.model import build_model, init_weights
from efficientml.llm.config import LlamaConfig

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_dequantize_equals_reference(kind):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    q = gguf.quants.quantize(w, Q[kind])  # (48, bytes per row)
    ref = gguf.quants.dequantize(q, Q[kind]).astype(np.float32)
    ours = dequantize_blocks(q, kind, w.size).reshape(w.shape)
    np.testing.assert_array_equal(ours, ref)
    rel = np.abs(ours - w).max() / np.abs(w).max()
    assert rel < {"Q8_0": 0.01, "Q4_0": 0.2, "Q4_1": 0.2}[kind]


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The permutation llama.cpp's converter applies to Q/K rows (rotate-half → interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llamacpp():
    w = np.arange(8 * 64 * 3, dtype=np.float32).reshape(8 * 64, 3)
    back = unpermute_rope_rows(torch.from_numpy(_llamacpp_permute(w, 8)), 8)
    np.testing.assert_array_equal(back.numpy(), w)


CFG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rope_theta=10000.0, tie_word_embeddings=False)
TYPES = {"attn_q": "Q8_0", "attn_k": "Q4_0", "attn_v": "Q4_1", "attn_output": "F16", "ffn_gate": "BF16",
         "ffn_up": "F32", "ffn_down": "Q8_0"}


def write_tiny_gguf(path, model, cfg=CFG):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    hf = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for k, a in sd.items():
        if k in names:
            name, kind = names[k], "F32"
        else:
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:-1])
            short = hf[rest]
            name, kind = f"blk.{i}.{short}.weight", TYPES.get(short, "F32")
            if short == "attn_q":
                a = _llamacpp_permute(a, cfg.num_attention_heads)
            if short == "attn_k":
                a = _llamacpp_permute(a, cfg.num_key_value_heads)
        a = np.ascontiguousarray(a, dtype=np.float32)
        if kind == "F32":
            w.add_tensor(name, a)
        elif kind == "F16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, Q[kind]), raw_dtype=Q[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf_roundtrip(tmp_path):
    from efficientml.llm.load import load_gguf

    m = build_model(CFG, device="cpu")
    init_weights(m, seed=1)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, m)
    gf = GGUFFile(path)
    assert gf.config.num_key_value_heads == 2 and gf.config.tie_word_embeddings is False
    loaded = load_gguf(gf)
    ref = m.state_dict()
    for k, v in loaded.state_dict().items():
        kind = next((t for s, t in TYPES.items() if f".{s}." in "." + k.replace("self_attn.", "").replace(
            "mlp.", "").replace("q_proj", "attn_q").replace("k_proj", "attn_k").replace("v_proj", "attn_v")
            .replace("o_proj", "attn_output").replace("gate_proj", "ffn_gate").replace("up_proj", "ffn_up")
            .replace("down_proj", "ffn_down")), "F32")
        tol = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q4_0": 0.2, "Q4_1": 0.2}[kind]
        err = ((v - ref[k]).abs().max() / ref[k].abs().max()).item()
        assert err <= tol, (k, kind, err)
    # rows un-permuted: per-head structure of Q matches the original, not a shuffled one
    q = loaded.model.layers[0].self_attn.q_proj.weight
    assert torch.corrcoef(torch.stack([q.flatten(), ref["model.layers.0.self_attn.q_proj.weight"].flatten()]))[0, 1] > 0.999


def test_truncated_and_corrupt_gguf(tmp_path):
    m = build_model(CFG, device="cpu")
    init_weights(m, seed=1)
    good = tmp_path / "tiny.gguf"
    write_tiny_gguf(good, m)
    data = good.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        GGUFFile(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:200])
    with pytest.raises(CheckpointError):
        GGUFFile(head)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + data[4:])
    with pytest.raises(CheckpointError, match="not a GGUF"):
        GGUFFile(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        GGUFFile(tmp_path / "missing.gguf")
