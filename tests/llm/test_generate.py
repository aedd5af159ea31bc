"""Generation: greedy tokens identical to transformers' generate, sampling options behave as defined,
stop tokens end a row, and a prompt longer than the context is refused."""

from __future__ import annotations

import shutil

import pytest
import torch

from efficientml.core.errors import ConfigError, ShapeError
from efficientml.llm.generate import SamplingConfig, generate, penalize, sample, sampling_probs
from efficientml.llm.stop_strings import StopText

PROMPT = "The history of the Roman Empire"


def test_greedy_matches_transformers(smollm2, hf_smollm2):
    model, tok = smollm2
    ids = tok.encode(PROMPT)
    streamed = []
    out = generate(model, ids, SamplingConfig(max_new_tokens=24), on_token=lambda t: streamed.append(t[0]))
    with torch.no_grad():
        ref = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                  top_p=None, top_k=None, temperature=None)
    assert out.tokens[0] == ref[0, len(ids):].tolist()
    assert streamed == out.tokens[0]
    assert out.prompt_tokens == len(ids) and out.ttft_s > 0 and out.decode_tok_s > 0


def test_repetition_penalty_greedy_matches_transformers(smollm2, hf_smollm2):
    model, tok = smollm2
    ids = tok.encode("List the days of the week: Monday, Tuesday,")
    plain = generate(model, ids, SamplingConfig(max_new_tokens=32)).tokens[0]
    out = generate(model, ids, SamplingConfig(max_new_tokens=32, repetition_penalty=1.5)).tokens[0]
    with torch.no_grad():
        ref = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                  repetition_penalty=1.5, top_p=None, top_k=None, temperature=None)
    assert out == ref[0, len(ids):].tolist()
    assert out != plain  # the penalty changed the continuation


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=1.3, top_k=20),
                                dict(temperature=0.9, top_p=0.8), dict(temperature=1.0, min_p=0.05),
                                dict(temperature=0.6, top_k=40, top_p=0.9, min_p=0.1, repetition_penalty=1.2)])
def test_sampling_distribution_matches_transformers(kw):
    """The distribution each token is drawn from equals transformers' logits processors + warpers."""
    tr = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 500, generator=g) * 3
    prev = torch.randint(0, 500, (3, 30), generator=g)
    seen = torch.zeros(3, 500, dtype=torch.bool).scatter_(1, prev, True)
    cfg = SamplingConfig(**kw)
    ours = sampling_probs(penalize(logits, cfg, seen), cfg)
    procs = [tr.RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty), tr.TemperatureLogitsWarper(cfg.temperature)]
    procs += [tr.TopKLogitsWarper(cfg.top_k)] if cfg.top_k else []
    procs += [tr.TopPLogitsWarper(cfg.top_p)] if cfg.top_p else []
    procs += [tr.MinPLogitsWarper(cfg.min_p)] if cfg.min_p else []
    scores = logits.clone()
    for proc in procs:
        scores = proc(prev, scores)
    theirs = scores.softmax(-1)
    assert torch.equal(ours > 0, theirs > 0)  # the same kept tokens
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="repetition_penalty"):
        SamplingConfig(repetition_penalty=0)
    with pytest.raises(ConfigError, match="min_p"):
        SamplingConfig(min_p=1.5)


def test_static_shape_cache_same_tokens(smollm2):
    model, tok = smollm2
    ids = tok.encode(PROMPT)
    a = generate(model, ids, SamplingConfig(max_new_tokens=8))
    b = generate(model, ids, SamplingConfig(max_new_tokens=8), cache=model.new_cache(1, 64, static_shapes=True))
    assert a.tokens == b.tokens


def test_batch_rows_match_single(smollm2):
    model, tok = smollm2
    p1, p2 = tok.encode("The capital of France is"), tok.encode("My favourite food is a")
    assert len(p1) == len(p2)
    both = generate(model, [p1, p2], SamplingConfig(max_new_tokens=6))
    assert both.tokens[0] == generate(model, p1, SamplingConfig(max_new_tokens=6)).tokens[0]
    assert both.tokens[1] == generate(model, p2, SamplingConfig(max_new_tokens=6)).tokens[0]


def test_left_padded_batch_matches_transformers_and_rows_alone(smollm2, hf_smollm2):
    """Prompts of different lengths in one batch: left-padded and masked, each row decodes the tokens
    it decodes alone, and the tokens of transformers' generate on the same padded batch; the
    prefill's logits at real positions equal transformers' (padding masked the same way)."""
    model, tok = smollm2
    rows = [tok.encode("The capital of France is"), tok.encode(PROMPT + " began in the year"),
            tok.encode("Water boils at")]
    cfg = SamplingConfig(max_new_tokens=12)
    out = generate(model, rows, cfg)
    for r, ids in zip(out.tokens, rows):
        assert r == generate(model, ids, cfg).tokens[0]
    T = max(map(len, rows))
    pad = model.config.pad_token_id or 0
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        ref = hf_smollm2.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                                  do_sample=False, top_p=None, top_k=None, temperature=None, pad_token_id=pad)
        theirs = hf_smollm2(ids, attention_mask=mask).logits
        ours = model(ids, attention_mask=mask)
    assert out.tokens == ref[:, T:].tolist()
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-4)
    assert out.prompt_lengths == [len(r) for r in rows] and out.prompt_tokens == T
    # the same batch as a padded tensor + attention_mask; a static-shape cache; the penalty ignores padding
    again = generate(model, ids, cfg, attention_mask=mask, cache=model.new_cache(3, T + 12, static_shapes=True))
    assert again.tokens == out.tokens
    pen = SamplingConfig(max_new_tokens=12, repetition_penalty=1.3)
    assert generate(model, rows, pen).tokens[0] == generate(model, rows[0], pen).tokens[0]


def test_padding_must_be_on_the_left(smollm2):
    model, _ = smollm2
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]])
    with pytest.raises(ShapeError, match="pad on the left"):
        generate(model, ids, SamplingConfig(max_new_tokens=2), attention_mask=(ids != 0).long())
    with pytest.raises(ShapeError, match="attention_mask has shape"):
        generate(model, ids, SamplingConfig(max_new_tokens=2), attention_mask=torch.ones(2, 3))
    with pytest.raises(ShapeError, match="empty"):
        generate(model, [[5, 6], []], SamplingConfig(max_new_tokens=2))
    np = pytest.importorskip("numpy")  # ids as numpy integers: one row, or rows
    one = generate(model, np.array([5, 6, 7]), SamplingConfig(max_new_tokens=2)).tokens
    assert one == generate(model, [5, 6, 7], SamplingConfig(max_new_tokens=2)).tokens
    assert generate(model, [np.array([5, 6, 7]), [8]], SamplingConfig(max_new_tokens=2)).tokens[0] == one[0]


def test_stop_text_holds_back_prefixes_and_cuts_at_the_first_stop():
    st = StopText(["</s>", "\n\nUser:"])
    assert st.feed("Hello <") == ("Hello ", False)  # "<" may begin "</s>": held back
    assert st.feed("b> world\n") == ("<b> world", False)  # it did not; "\n" may begin the second
    assert st.feed("\nUs") == ("", False)
    assert st.feed("er: hi") == ("", True)  # completed across three pieces; nothing of it is shown
    assert st.feed("more") == ("", True) and st.flush() == ""
    st = StopText(["b", "abc"])
    assert st.feed("xxab") == ("xxa", True)  # the earliest stop string in the text wins
    st = StopText(["END"])
    assert st.feed("the EN") == ("the ", False) and st.flush() == "EN"
    with pytest.raises(ConfigError, match="non-empty"):
        StopText([""])
    with pytest.raises(ConfigError, match="tuple of strings"):
        SamplingConfig(stop_strings="\n")


def test_stop_strings_end_rows_where_the_text_appears(smollm2):
    """A row ends at the token whose text completes a stop string: its tokens are the free run's up
    to that token; another row of the batch goes on; without the tokenizer it is refused."""
    model, tok = smollm2
    rows = [tok.encode("Here is a list of fruits: 1. apple 2."), tok.encode(PROMPT)]
    free = generate(model, rows, SamplingConfig(max_new_tokens=24)).tokens
    text = tok.decode(free[0])
    stop = text[text.index("3") + 1:text.index("3") + 3]  # two characters after "3" (".", " "…)
    k = next(i for i in range(1, 25) if stop in tok.decode(free[0][:i]))
    cfg = SamplingConfig(max_new_tokens=24, stop_strings=("XYZ-never", stop))
    out = generate(model, rows, cfg, tokenizer=tok)
    assert out.tokens[0] == free[0][:k] and out.stopped[0]
    assert out.tokens[1] == free[1] and not out.stopped[1]
    with pytest.raises(ConfigError, match="tokenizer"):
        generate(model, rows[0], cfg)


def test_logprobs_are_the_models_own(smollm2, hf_smollm2):
    """return_logprobs: each new token's log-probability equals the log-softmax of transformers'
    logits over prompt + output at that position, also when sampling warps the draw."""
    model, tok = smollm2
    ids = tok.encode(PROMPT)
    for cfg in (SamplingConfig(max_new_tokens=8),
                SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=5, seed=0)):
        out = generate(model, ids, cfg, return_logprobs=True)
        seq = torch.tensor([ids + out.tokens[0]])
        with torch.no_grad():
            ref = torch.log_softmax(hf_smollm2(seq).logits[0, len(ids) - 1:-1].float(), -1)
        want = ref.gather(1, torch.tensor(out.tokens[0])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(out.logprobs[0]), want, rtol=1e-4, atol=1e-4)
    assert generate(model, ids, SamplingConfig(max_new_tokens=2)).logprobs is None


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).repeat(2000, 1)
    assert sample(logits, SamplingConfig(top_k=1, temperature=1.0)).eq(1).all()
    assert sample(logits, SamplingConfig(top_p=0.01, temperature=1.0)).eq(1).all()
    g = torch.Generator().manual_seed(0)
    top2 = sample(logits, SamplingConfig(top_k=2, temperature=1.0), g)
    assert set(top2.tolist()) == {1, 2}
    frac = top2.eq(1).float().mean().item()
    assert abs(frac - 1 / (1 + torch.e ** -1)) < 0.04  # softmax over the two kept logits
    p = torch.softmax(logits[0], 0)  # top-p 0.9: 1, 2 cover 0.66+0.24=0.90… keep the smallest set ≥ p
    keep = sample(logits, SamplingConfig(top_p=float(p[1] + p[2]) - 1e-4, temperature=1.0), g)
    assert set(keep.tolist()) == {1, 2}
    with pytest.raises(ConfigError):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ConfigError):
        SamplingConfig(temperature=-1)


def test_seeded_sampling_reproducible(smollm2):
    model, tok = smollm2
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=50, top_p=0.95, seed=123)
    a = generate(model, tok.encode(PROMPT), cfg)
    b = generate(model, tok.encode(PROMPT), cfg)
    assert a.tokens == b.tokens


def test_stop_token(smollm2):
    model, tok = smollm2
    ids = tok.encode(PROMPT)
    free = generate(model, ids, SamplingConfig(max_new_tokens=6)).tokens[0]
    stop = free[2]
    out = generate(model, ids, SamplingConfig(max_new_tokens=6, stop_token_ids=(stop,)))
    assert out.tokens[0] == free[: free.index(stop) + 1] and out.stopped == [True]


def test_prompt_longer_than_context(smollm2):
    model, _ = smollm2
    n = model.config.max_position_embeddings + 1
    with pytest.raises(ShapeError, match="context"):
        generate(model, [5] * n, SamplingConfig(max_new_tokens=1))
    with pytest.raises(ShapeError, match="free"):
        generate(model, [5] * 20, SamplingConfig(max_new_tokens=1), cache=model.new_cache(1, 16))
    with pytest.raises(ShapeError, match="empty"):
        generate(model, [], SamplingConfig(max_new_tokens=1))


@pytest.mark.cuda
def test_cuda_graph_decode_matches_eager():
    from efficientml.llm.config import LlamaConfig
    from efficientml.llm.model import build_model, init_weights

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    m = build_model(cfg, device="cpu")
    init_weights(m, std=0.2, seed=0)
    m = m.cuda().eval()
    prompt = list(range(10, 30))
    eager = generate(m, prompt, SamplingConfig(max_new_tokens=16), cuda_graph=False)
    cache = m.new_cache(1, 64, static_shapes=True)
    graphed = generate(m, prompt, SamplingConfig(max_new_tokens=16), cache=cache, cuda_graph=True)
    assert graphed.tokens == eager.tokens
    cache.reset()
    again = generate(m, prompt, SamplingConfig(max_new_tokens=16), cache=cache, cuda_graph=True)
    assert again.tokens == eager.tokens and cache._graph_step is not None
    rows = [prompt, prompt[5:]]  # left-padded: the graph reads the cache's padding mask
    padded = generate(m, rows, SamplingConfig(max_new_tokens=16), cuda_graph=False)
    cache = m.new_cache(2, 64, static_shapes=True)
    graphed = generate(m, rows, SamplingConfig(max_new_tokens=16), cache=cache, cuda_graph=True)
    assert graphed.tokens == padded.tokens
    assert padded.tokens[0] == eager.tokens[0]


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile on CPU needs a C compiler")
def test_compiled_cpu_decode_matches_eager():
    """generate(use_compile=True) on CPU: the step is compiled once per static cache (positions are
    inputs, not guards) and decodes the same tokens as the eager path, also on reuse."""
    from efficientml.llm.config import LlamaConfig
    from efficientml.llm.kv_cache import StaticKVCache
    from efficientml.llm.kernels.packed import decode_layout, pack_projections
    from efficientml.llm.model import build_model

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    m = decode_layout(pack_projections(build_model(cfg, device="cpu"))).eval()
    prompt = [1, 5, 7, 9, 11]
    eager = generate(m, prompt, SamplingConfig(max_new_tokens=10)).tokens
    cache = StaticKVCache.for_model(m, 1, 24, static_shapes=True)
    first = generate(m, prompt, SamplingConfig(max_new_tokens=10), cache=cache, use_compile=True)
    step = cache._compiled_step
    cache.reset()
    again = generate(m, prompt, SamplingConfig(max_new_tokens=10), cache=cache, use_compile=True)
    assert first.tokens == eager and again.tokens == eager
    assert cache._compiled_step is step  # compiled once for this cache
    rows = [prompt, prompt[2:]]  # left-padded: the compiled step reads the cache's padding mask
    padded = generate(m, rows, SamplingConfig(max_new_tokens=10)).tokens
    cache = StaticKVCache.for_model(m, 2, 24, static_shapes=True)
    assert generate(m, rows, SamplingConfig(max_new_tokens=10), cache=cache, use_compile=True).tokens == padded
    assert padded[0] == eager[0]
