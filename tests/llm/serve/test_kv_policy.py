"""KV-cache policies (full, window, StreamingLLM, H2O) against an independent token-by-token reference
in float64 that keeps per layer and head a list of un-rotated keys and rotates them every step."""

from __future__ import annotations

import math

import pytest
import torch

from efficientml.core.errors import ConfigError
from efficientml.llm.serve.block_manager import BlockManager
from efficientml.llm.serve.kv_policy import KVPolicy
from efficientml.llm.serve.policy_cache import PolicyKVCache

from ..conftest import tiny_model


def _rot(x: torch.Tensor, p: float, inv: torch.Tensor) -> torch.Tensor:
    f = p * inv
    c, s = torch.cat([f, f]).cos(), torch.cat([f, f]).sin()
    h = x.shape[-1] // 2
    return x * c + torch.cat([-x[..., h:], x[..., :h]], -1) * s


def _kept(policy: KVPolicy, ents: list[dict], n: int) -> list[dict]:
    """The reference's eviction, written from the papers' rules (not from KVPolicy.keep)."""
    if policy.kind in ("window", "streaming"):
        sinks = [e for e in ents if e["pos"] < policy.sinks]
        rest = sorted((e for e in ents if e["pos"] >= policy.sinks), key=lambda e: e["pos"])
        return sinks + rest[len(rest) - min(len(rest), policy.window - 1):]
    budget = {k: (math.ceil(b * n) if isinstance(b, float) else b) for k, b in
              (("heavy", policy.heavy), ("recent", policy.recent))}
    recent = [e for e in ents if e["pos"] >= n - budget["recent"]]
    mean = policy.score == "mean"  # attention per query since the token arrived (n - pos queries)
    older = sorted((e for e in ents if e["pos"] < n - budget["recent"]),
                   key=lambda e: -e["score"] / (n - e["pos"] if mean else 1))
    return older[:budget["heavy"]] + recent


@torch.no_grad()
def reference_logits(model, ids: list[int], policy: KVPolicy) -> torch.Tensor:
    m = model.double()
    cfg = m.config
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
    g, inv = nh // nkv, m.model.rope.inv_freq.double()
    store = [[[] for _ in range(nkv)] for _ in m.model.layers]
    out = []
    for t, tok in enumerate(ids):
        x = m.model.embed_tokens(torch.tensor([tok]))[0]
        for li, layer in enumerate(m.model.layers):
            a, h = layer.self_attn, layer.input_layernorm(x)
            q, k, v = a.q_proj(h).view(nh, hd), a.k_proj(h).view(nkv, hd), a.v_proj(h).view(nkv, hd)
            o = []
            for kh in range(nkv):
                ents = store[li][kh]
                ents.append({"k": k[kh], "v": v[kh], "pos": t, "score": 0.0})
                ents.sort(key=lambda e: e["pos"])
                inside = policy.kind == "streaming" and policy.reposition
                keys = torch.stack([_rot(e["k"], i if inside else e["pos"], inv) for i, e in enumerate(ents)])
                qr = _rot(q[kh * g:(kh + 1) * g], len(ents) - 1 if inside else t, inv)  # (g, hd)
                p = torch.softmax(qr @ keys.T / math.sqrt(hd), -1)  # (g, n)
                for e, w in zip(ents, p.sum(0).tolist()):
                    e["score"] += w
                o.append(p @ torch.stack([e["v"] for e in ents]))
            x = x + a.o_proj(torch.cat(o).reshape(-1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        for li in range(len(store)):
            for kh in range(nkv):
                store[li][kh] = _kept(policy, store[li][kh], t + 1) if policy.kind != "full" else store[li][kh]
        out.append(m.logits(m.model.norm(x)))
    model.float()
    return torch.stack(out)


def _run(model, ids, policy, chunks=None, **kw):
    cache = PolicyKVCache.for_model(model, policy, **kw)
    chunks = chunks or [1] * len(ids)
    out, t = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(torch.tensor([ids[t:t + n]]), cache=cache)[0])
            t += n
    return torch.cat(out), cache


def _ids(n, seed=0):
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_full_policy_equals_plain_forward():
    model, ids = tiny_model(max_position_embeddings=256), _ids(60)
    got, cache = _run(model, ids, KVPolicy.full(), chunks=[17, 1, 1, 25, 16])
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0]
    assert (got - ref).abs().max() < 1e-5
    assert cache.used == 60 and cache.evicted_tokens == 0


@pytest.mark.parametrize("policy", [KVPolicy.sliding_window(7), KVPolicy.streaming(2, 6),
                                    KVPolicy.streaming(3, 5, reposition=False), KVPolicy.h2o(0.25, 0.2),
                                    KVPolicy.h2o(4, 3), KVPolicy.h2o(0.2, 0.2, score="mean")], ids=lambda p: f"{p.kind}-{p.window}-{p.heavy}-{p.score}")
def test_policies_match_independent_reference(policy):
    """Token by token, every logit equals the float64 reference that re-rotates its kept keys each step
    (StreamingLLM at positions inside the cache) and evicts by the papers' rules, to 1e-4."""
    model, ids = tiny_model(max_position_embeddings=256), _ids(40, seed=1)
    ref = reference_logits(model, ids, policy).float()
    got, _ = _run(model, ids, policy, block_size=4)
    assert (got - ref).abs().max() < 1e-4


@pytest.mark.parametrize("policy", [KVPolicy.streaming(2, 6), KVPolicy.sliding_window(5)])
def test_window_policy_chunks_equal_single_steps(policy):
    """One forward of many tokens sees, per query, exactly what single-token steps see."""
    model, ids = tiny_model(max_position_embeddings=256), _ids(50, seed=2)
    one, _ = _run(model, ids, policy)
    many, cache = _run(model, ids, policy, chunks=[9, 1, 13, 4, 23])
    assert (one - many).abs().max() < 1e-5
    assert cache.used == policy.sinks + policy.window - 1


def test_streaming_memory_is_constant_past_the_trained_context():
    """600 tokens through a model trained on 64: the cache holds the same blocks after the warm-up."""
    model, ids = tiny_model(max_position_embeddings=64), _ids(600, seed=3)
    pool = BlockManager(2, 64, 4, 2, 16, enable_prefix_caching=False)
    cache = PolicyKVCache(pool, KVPolicy.streaming(4, 12), model.model.rope.inv_freq)
    held = []
    with torch.no_grad():
        for t in range(0, 600, 8):
            logits = model(torch.tensor([ids[t:t + 8]]), cache=cache)
            held.append(cache.held_blocks)
    assert torch.isfinite(logits).all()
    assert set(held[3:]) == {4} and cache.peak_blocks == 6  # (4 + 11) kept → 4 blocks; +8 new during a step
    assert pool.num_free_blocks == 64 - 4


def test_h2o_returns_blocks_to_the_pool():
    """A 64-token prefill under H2O(4, 4) keeps 8 tokens: 2 blocks of 4 kept, 14 given back."""
    model, ids = tiny_model(max_position_embeddings=256), _ids(64, seed=4)
    pool = BlockManager(2, 32, 4, 2, 16, enable_prefix_caching=False)
    cache = PolicyKVCache(pool, KVPolicy.h2o(4, 4))
    with torch.no_grad():
        model(torch.tensor([ids]), cache=cache)
    assert cache.used == 8 and cache.held_blocks == 2 and cache.released_blocks == 14
    assert pool.num_free_blocks == 30 and cache.peak_blocks == 16
    pos = cache.pos[:, :, :8]
    assert (pos[..., :].ge(60).sum(-1) == 4).all()  # the 4 most recent kept in every layer and head
    assert cache.nbytes() == 2 * pool.nbytes() // 32
    cache.free()
    assert pool.num_free_blocks == 32


def test_parse_and_validation():
    assert KVPolicy.parse("streaming:4,1020") == KVPolicy.streaming(4, 1020)
    assert KVPolicy.parse("h2o:0.1,0.1") == KVPolicy.h2o(0.1, 0.1)
    assert KVPolicy.parse("h2o:100,20").heavy == 100
    assert KVPolicy.parse("h2o:0.1,0.1,mean") == KVPolicy.h2o(0.1, 0.1, score="mean")
    assert KVPolicy.parse("window:512") == KVPolicy.sliding_window(512)
    for bad in ("lru:3", "window", "h2o:1.5,0.1", "streaming:a,b"):
        with pytest.raises(ConfigError):
            KVPolicy.parse(bad)
    with pytest.raises(ConfigError, match="sinks"):
        KVPolicy.streaming(0, 10)


def test_stream_perplexity_equals_the_plain_forward_and_single_steps():
    from efficientml.llm.serve.policy_cache import stream_perplexity

    model, ids = tiny_model(max_position_embeddings=256), _ids(70, seed=5)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    ref = float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).exp())
    r = stream_perplexity(model, ids, KVPolicy.full(), chunk=16)
    assert abs(r["perplexity"] - ref) < 1e-4 * ref and r["tokens_scored"] == 69
    pol = KVPolicy.streaming(2, 9)
    one, _ = _run(model, ids, pol)
    step = float(torch.nn.functional.cross_entropy(one[:-1], torch.tensor(ids[1:])).exp())
    r = stream_perplexity(model, ids, pol, chunk=13, block_size=4)
    assert abs(r["perplexity"] - step) < 1e-4 * step
    assert r["kv_bytes_end"] == 3 * 4 * 2 * 2 * 2 * 16 * 4  # 10 kept → 3 blocks of 4 × (layers, k/v, kv heads, hd) fp32
