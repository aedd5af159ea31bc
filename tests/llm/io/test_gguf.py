"""GGUF: our block dequantization equals the gguf package's reference decoder bit for bit (every
decoded format), a written tiny Llama GGUF (llama.cpp's Q/K permutation applied) loads back to the
original weights, a k-quant GGUF loads to exactly the tensors transformers' own GGUF loader makes,
and broken or undecodable files raise clear errors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from efficientml.core.errors import CheckpointError, UnsupportedError
from efficientml.llm.io.ggml_quants import BLOCK_FORMATS, BLOCK_SIZES
from efficientml.llm.io.gguf import GGUFFile, dequantize_blocks, unpermute_rope_rows
from efficientml.llm.model import build_model, init_weights
from efficientml.llm.config import LlamaConfig

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_dequantize_equals_reference(kind):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    q = gguf.quants.quantize(w, Q[kind])  # (48, bytes per row)
    ref = gguf.quants.dequantize(q, Q[kind]).astype(np.float32)
    ours = dequantize_blocks(q, kind, w.size).reshape(w.shape)
    np.testing.assert_array_equal(ours, ref)
    rel = np.abs(ours - w).max() / np.abs(w).max()
    assert rel < {"Q8_0": 0.01, "Q4_0": 0.2, "Q4_1": 0.2, "Q5_0": 0.1, "Q5_1": 0.1}[kind]


# byte offsets of each format's f16 scale fields, and a scale that keeps |w| around 0.1
F16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "IQ4_NL": [0], "Q2_K": [80, 82],
          "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_XS": [0]}
SCALE = {"Q4_0": 0.1 / 8, "Q4_1": 0.1 / 15, "Q5_0": 0.1 / 16, "Q5_1": 0.1 / 31, "Q8_0": 0.1 / 127,
         "IQ4_NL": 0.1 / 127, "Q2_K": 0.1 / 45, "Q3_K": 0.1 / 128, "Q4_K": 0.1 / 945, "Q5_K": 0.1 / 1953,
         "Q6_K": 0.1 / 4064, "IQ4_XS": 0.1 / 4064}


def random_blocks(kind: str, rows: int, cols: int, rng, signed: bool = True) -> np.ndarray:
    """Random bytes in ``kind``'s block layout (every quant, sub-scale and bit pattern occurs), with
    finite f16 scales: (rows, bytes per row) uint8."""
    n, nbytes = BLOCK_SIZES[kind]
    raw = rng.integers(0, 256, (rows, cols // n * nbytes), dtype=np.uint8)
    blocks = raw.reshape(-1, nbytes)
    for at in F16_AT.get(kind, []):
        lo = -SCALE[kind] if signed else 0.0
        blocks[:, at:at + 2] = rng.uniform(lo, SCALE[kind], (blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("kind", [k for k in BLOCK_FORMATS if k != "Q8_K"])
def test_every_bit_pattern_equals_reference(kind):
    rng = np.random.default_rng(1)
    raw = random_blocks(kind, 12, 1024, rng)
    ref = gguf.quants.dequantize(raw, Q[kind]).astype(np.float32)  # (12, 1024)
    ours = dequantize_blocks(raw, kind, raw.shape[0] * 1024).reshape(ref.shape)
    np.testing.assert_array_equal(ours, ref)
    assert np.isfinite(ours).all() and (ours != 0).mean() > 0.5


def test_q8_k():  # the gguf package does not decode Q8_K: w = d·q, d an f32, block sums ignored
    rng = np.random.default_rng(2)
    d = rng.uniform(-1, 1, (8, 1)).astype(np.float32)
    q = rng.integers(-128, 128, (8, 256)).astype(np.int8)
    raw = np.concatenate([d.view(np.uint8), q.view(np.uint8), np.zeros((8, 32), np.uint8)], axis=1)  # 8 blocks
    np.testing.assert_array_equal(dequantize_blocks(raw, "Q8_K", 8 * 256).reshape(8, 256), d * q.astype(np.float32))


def test_wrong_byte_count_and_undecoded_format():
    raw = np.zeros(144 * 3 - 1, np.uint8)
    with pytest.raises(CheckpointError, match="Q4_K tensor of 768 weights has 431 bytes, expected 432"):
        dequantize_blocks(raw, "Q4_K", 768)
    with pytest.raises(UnsupportedError, match="IQ2_XXS is not decoded here; decoded: F32, .*Q4_K"):
        dequantize_blocks(raw, "IQ2_XXS", 768)


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


def write_tiny_gguf(path, model, cfg=CFG, extra=None, arch="llama", types=None):
    """``model`` as a GGUF file of ``arch``, the matrices in ``types`` (default :data:`TYPES`; {}: all F32)."""
    types = TYPES if types is None else types
    w = gguf.GGUFWriter(str(path), arch)
    if extra is not None:
        extra(w)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    from efficientml.llm.io.fused import fuse_split

    sd = {k: v.numpy() for k, v in fuse_split(cfg, model.state_dict()).items()}  # phi3: fused, as llama.cpp
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    hf = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
    for k, a in sd.items():
        if k in names:
            name, kind = names[k], "F32"
        else:
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:-1])
            short = hf[rest]
            name, kind = f"blk.{i}.{short}.weight", types.get(short, "F32")
            if short == "attn_q" and arch == "llama":  # qwen GGUFs keep rotate-half order
                a = _llamacpp_permute(a, cfg.num_attention_heads)
            if short == "attn_k" and arch == "llama":
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
    from efficientml.llm.io.load import load_gguf

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


def _llamacpp_rope_factors(hd, base, factor, lo, hi, old):
    """The per-frequency divisors llama.cpp's converter writes for a llama3 rope_scaling."""
    out = []
    for i in range(0, hd, 2):
        wavelen = 2 * math.pi * base ** (i / hd)
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_freqs_become_llama3_scaling(tmp_path):
    from efficientml.llm.io.gguf import llama3_scaling
    from efficientml.llm.io.load import load_gguf
    from efficientml.llm.rope import rope_inv_freq

    cfg = dataclasses.replace(CFG, hidden_size=512, num_attention_heads=4, rope_theta=500000.0)  # head_dim 128
    m = build_model(cfg, device="cpu")
    init_weights(m, seed=1)
    f = _llamacpp_rope_factors(128, 500000.0, 32.0, 1.0, 4.0, 8192)  # Llama-3.2's scaling
    assert 1.0 < f.max() and (f == 1).any()
    path = tmp_path / "l3.gguf"
    write_tiny_gguf(path, m, cfg, extra=lambda w: w.add_tensor("rope_freqs.weight", f))
    got = GGUFFile(path).config
    assert got.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    plain = rope_inv_freq(cfg)[0]
    np.testing.assert_allclose((plain / rope_inv_freq(got)[0]).numpy(), f, rtol=1e-5)
    assert load_gguf(GGUFFile(path)).config.rope_type == "llama3"
    with pytest.raises(UnsupportedError, match="no llama3 scaling reproduces"):
        llama3_scaling(torch.from_numpy(f[::-1].copy()), cfg, "x.gguf")
    assert llama3_scaling(torch.ones(64), cfg, "x.gguf") is None


def test_unsupported_rope_scaling_type_is_refused(tmp_path):
    m = build_model(CFG, device="cpu")
    init_weights(m, seed=1)
    path = tmp_path / "yarn.gguf"
    write_tiny_gguf(path, m, extra=lambda w: w.add_string("llama.rope.scaling.type", "yarn"))
    with pytest.raises(UnsupportedError, match="RoPE scaling 'yarn' is not supported"):
        GGUFFile(path).config


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


KCFG = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                   rope_theta=10000.0, tie_word_embeddings=False)
KTYPES = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q3_K", "ffn_gate": "Q2_K",
          "ffn_up": "IQ4_XS", "ffn_down": "Q5_1"}


def write_kquant_gguf(path, cfg=KCFG, types=KTYPES, seed=0):
    """A GGUF as llama.cpp's Q*_K_M / IQ4_XS files are mixed: random bytes in each block format."""
    rng = np.random.default_rng(seed)
    d, ff, hd = cfg.hidden_size, cfg.intermediate_size, cfg.dim_per_head
    shapes = {"attn_q": (cfg.num_attention_heads * hd, d), "attn_k": (cfg.num_key_value_heads * hd, d),
              "attn_v": (cfg.num_key_value_heads * hd, d), "attn_output": (d, cfg.num_attention_heads * hd),
              "ffn_gate": (ff, d), "ffn_up": (ff, d), "ffn_down": (d, ff)}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tensor("token_embd.weight", rng.standard_normal((cfg.vocab_size, d)).astype(np.float32))
    w.add_tensor("output_norm.weight", rng.uniform(0.5, 1.5, d).astype(np.float32))
    w.add_tensor("output.weight", random_blocks("Q6_K", cfg.vocab_size, d, rng), raw_dtype=Q.Q6_K)
    for i in range(cfg.num_hidden_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", rng.uniform(0.5, 1.5, d).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", rng.uniform(0.5, 1.5, d).astype(np.float32))
        for short, kind in types.items():
            signed = kind not in ("Q4_K", "Q5_K", "Q2_K")  # k-quant d, dmin ≥ 0 as llama.cpp writes them
            w.add_tensor(f"blk.{i}.{short}.weight", random_blocks(kind, *shapes[short], rng, signed), raw_dtype=Q[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_kquant_gguf_equals_transformers_loader(tmp_path):
    """transformers' GGUF loader (gguf's decoders, its own Q/K un-permutation) gives exactly our tensors."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from efficientml.llm.io.load import load_gguf

    path = tmp_path / "kq.gguf"
    write_kquant_gguf(path)
    ours = load_gguf(GGUFFile(path))
    hf_cfg = load_gguf_checkpoint(str(path))["config"]
    assert (hf_cfg["hidden_size"], hf_cfg["num_key_value_heads"]) == (256, 2)
    hf_cfg = {k: v for k, v in hf_cfg.items() if k != "model_type"}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg))
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    sd = ours.state_dict()
    assert set(theirs) == set(sd)
    for k, v in theirs.items():
        assert torch.equal(sd[k], torch.as_tensor(np.asarray(v), dtype=torch.float32)), k
    hf.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in theirs.items()})
    ids = torch.tensor([list(range(3, 300, 13))])
    with torch.no_grad():
        a, b = ours(ids), hf.eval()(ids).logits
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


def test_undecoded_tensor_type_names_it(tmp_path):
    from efficientml.llm.io.load import load_gguf

    path = tmp_path / "iq2.gguf"
    write_kquant_gguf(path, types={**KTYPES, "ffn_up": "IQ2_XXS"})
    gf = GGUFFile(path)  # the container and its sizes are read; decoding the tensor is refused
    assert {t.kind for t in gf.infos} >= {"IQ2_XXS", "Q4_K", "Q6_K"}
    with pytest.raises(UnsupportedError, match="ffn_up.weight' has type IQ2_XXS, which is not decoded; decoded: F32"):
        load_gguf(gf)


def test_end_of_turn_token_stops_generation(tmp_path):
    m = build_model(CFG, device="cpu")
    init_weights(m, seed=1)
    path = tmp_path / "eot.gguf"
    write_tiny_gguf(path, m, extra=lambda w: (w.add_eos_token_id(2), w.add_eot_token_id(5)))
    assert GGUFFile(path).config.eos_token_ids == [2, 5]


def test_qwen3_gguf_equals_transformers_loader(tmp_path):
    """Qwen3: per-head q/k norms, head_dim set apart from hidden / heads, no Q/K permutation."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from efficientml.llm.io.load import load_gguf

    cfg = dataclasses.replace(CFG, model_type="qwen3", qk_norm=True, head_dim=32, tie_word_embeddings=True)
    m = build_model(cfg, device="cpu")
    init_weights(m, seed=4)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape))
    path = tmp_path / "q3.gguf"
    write_tiny_gguf(path, m, cfg, arch="qwen3",
                    extra=lambda w: (w.add_key_length(32), w.add_value_length(32)))
    gf = GGUFFile(path)
    assert (gf.config.model_type, gf.config.qk_norm, gf.config.dim_per_head) == ("qwen3", True, 32)
    ours = load_gguf(gf)
    hf_cfg = load_gguf_checkpoint(str(path))["config"]
    hf_cfg = {k: v for k, v in hf_cfg.items() if k != "model_type"} | {"head_dim": 32}  # its mapping omits key_length
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf_cfg))
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    sd = ours.state_dict()
    for k, v in theirs.items():
        assert torch.equal(sd[k], torch.as_tensor(np.asarray(v), dtype=torch.float32)), k
    hf.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in theirs.items()}, strict=False)
    hf.tie_weights()
    ids = torch.tensor([list(range(1, 60, 3))])
    with torch.no_grad():
        a, b = ours(ids), hf.eval()(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
