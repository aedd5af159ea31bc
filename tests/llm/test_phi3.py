"""Phi-3 family (Phi-3-mini, Phi-3.5-mini, Phi-4-mini): fused qkv_proj / gate_up_proj split at load and
fused on save, RoPE over part of each head, LongRoPE's short and long factors, a sliding window — logits
and greedy generations equal to transformers' Phi3ForCausalLM on the same (random) weights."""

from __future__ import annotations

import json

import pytest
import torch

from efficientml.core.errors import CheckpointError
from efficientml.llm.generate import SamplingConfig, generate
from efficientml.llm.io.load import load_hf, save_hf

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            sliding_window=None, rms_norm_eps=1e-5)
LONGROPE = dict(original_max_position_embeddings=16, partial_rotary_factor=0.75,
                rope_scaling={"type": "longrope", "short_factor": [1.0, 1.05, 1.1, 1.3, 1.5, 2.0],
                              "long_factor": [1.2, 1.6, 2.5, 4.0, 6.0, 9.0]})
CASES = {"plain": {}, "sliding": {"sliding_window": 5}, "partial-longrope": LONGROPE}


def _theirs(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(**{**BASE, **kw})
    m = transformers.Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that their placement matters
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    m.save_pretrained(str(tmp_path / "hf"))
    return m, tmp_path / "hf"


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("T", [12, 40])
def test_logits_match_transformers(tmp_path, case, T):
    theirs, folder = _theirs(tmp_path, **CASES[case])
    ours = load_hf(folder)
    ids = torch.randint(3, 96, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        assert _rel(ours(ids), theirs(ids).logits) <= 1e-4, case


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_matches_transformers(tmp_path, case):
    """12 prompt tokens + 14 new ones: LongRoPE switches to the long factors past 16 with keys cached under
    the short ones, in both implementations."""
    theirs, folder = _theirs(tmp_path, **CASES[case])
    ours = load_hf(folder)
    prompt = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    want = theirs.generate(prompt, max_new_tokens=14, do_sample=False, min_new_tokens=14)[0, 12:].tolist()
    got = generate(ours, prompt[0].tolist(), SamplingConfig(max_new_tokens=14)).tokens[0]
    assert got == want


def test_saved_folder_is_phi3_for_transformers(tmp_path):
    theirs, folder = _theirs(tmp_path, **LONGROPE)
    out = save_hf(load_hf(folder), None, tmp_path / "ours")
    conf = json.loads((out / "config.json").read_text())
    assert conf["model_type"] == "phi3" and conf["partial_rotary_factor"] == 0.75
    from safetensors.torch import load_file

    keys = set(load_file(str(out / "model.safetensors")))
    assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"} <= keys
    assert not any("q_proj" in k or "gate_proj" in k for k in keys)
    back = transformers.Phi3ForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, theirs(ids).logits)


def test_bad_fused_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = _theirs(tmp_path)
    sd = load_file(str(folder / "model.safetensors"))
    sd["model.layers.0.self_attn.qkv_proj.weight"] = sd["model.layers.0.self_attn.qkv_proj.weight"][:-16]
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"qkv_proj.weight' has shape \(112, 64\); the config implies 128"):
        load_hf(folder)


def _phi3_gguf_metadata(cfg_kw: dict, max_pos: int, head_dim: int):
    """What llama.cpp's converter adds for Phi-3 (gguf-py's writer): rope.dimension_count = the rotary
    part of the head, the sliding window, LongRoPE factors as tensors with the pretrained context and
    the attention factor as metadata. Fused attn_qkv / ffn_up and rotate-half Q/K rows come from
    write_tiny_gguf(arch="phi3")."""
    import math

    def extra(w):
        w.add_rope_dimension_count(int(head_dim * cfg_kw.get("partial_rotary_factor", 1.0)))
        if cfg_kw.get("sliding_window"):
            w.add_sliding_window(cfg_kw["sliding_window"])
        sc = cfg_kw.get("rope_scaling")
        if sc:
            orig = cfg_kw["original_max_position_embeddings"]
            w.add_rope_scaling_orig_ctx_len(orig)
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(max_pos / orig) / math.log(orig)))
            w.add_tensor("rope_factors_long.weight", torch.tensor(sc["long_factor"]).numpy())
            w.add_tensor("rope_factors_short.weight", torch.tensor(sc["short_factor"]).numpy())
    return extra


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_phi3_matches_transformers(tmp_path, case):
    from efficientml.llm.io.gguf import GGUFFile
    from efficientml.llm.io.load import load_gguf

    from .io.test_gguf import write_tiny_gguf

    theirs, folder = _theirs(tmp_path, **CASES[case])
    src = load_hf(folder)  # its weights, as the file's source
    extra = _phi3_gguf_metadata(CASES[case], BASE["max_position_embeddings"], src.config.dim_per_head)
    write_tiny_gguf(tmp_path / "phi3.gguf", src, src.config, extra=extra, arch="phi3", types={})
    gf = GGUFFile(tmp_path / "phi3.gguf")
    assert gf.config.model_type == "phi3"
    ours = load_gguf(gf)
    for T in (12, 40):
        ids = torch.randint(3, 96, (1, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            assert _rel(ours(ids), theirs(ids).logits) <= 1e-4, (case, T)
