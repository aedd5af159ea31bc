"""Perplexity: the window protocol scores every token exactly once, batching does not change the
result, and the number equals transformers' on the same windows."""

from __future__ import annotations

import math

import pytest
import torch

from efficientml.core.errors import ConfigError
from efficientml.data.paths import resolve
from efficientml.llm.eval import IGNORE, PerplexityProtocol, num_windows, perplexity, text_perplexity, windows


@pytest.mark.parametrize("n,ctx,stride,bos", [(100, 16, None, False), (100, 16, 5, False), (17, 16, None, False),
                                               (100, 16, None, True), (100, 16, 7, True), (3, 16, None, False)])
def test_every_token_scored_once(n, ctx, stride, bos):
    ids = list(range(1000, 1000 + n))
    proto = PerplexityProtocol(ctx, stride, bos)
    scored = []
    ws = list(windows(ids, proto, bos_id=1))
    assert len(ws) == num_windows(n, proto)
    for inp, lab in ws:
        assert len(inp) == len(lab) <= ctx
        for j, t in enumerate(lab):
            if t != IGNORE:
                assert inp[j + 1] == t  # the label at j is the token after position j
                scored.append(t)
    assert scored == sorted(set(scored))  # each token at most once, in order
    unscored = [t for t in ids if t not in set(scored)]
    if bos:
        assert unscored == []  # BOS gives every window's first token a context
    elif stride is None:
        assert unscored == ids[0::ctx]  # disjoint windows: each window's first token has no context
    else:
        assert unscored == ids[:1]  # overlapping windows: only the very first token


def test_non_overlapping_counts():
    ws = list(windows(list(range(2500)), PerplexityProtocol(1024), None))
    assert [len(w[0]) for w in ws] == [1024, 1024, 452]
    assert [sum(t != IGNORE for t in w[1]) for w in ws] == [1023, 1023, 451]


def test_empty_text_is_an_error(smollm2):
    model, tok = smollm2
    with pytest.raises(ConfigError, match="empty"):
        text_perplexity(model, tok, "")
    with pytest.raises(ConfigError, match="at least"):
        perplexity(model, [5], PerplexityProtocol(16))
    with pytest.raises(ConfigError, match="exceeds"):
        PerplexityProtocol(2)  # valid
        perplexity(model, list(range(100)), PerplexityProtocol(10**6))


@pytest.fixture(scope="module")
def wiki_ids(smollm2):
    text = resolve("text/wikitext-2-raw-test.raw").read_text(encoding="utf-8")[:6000]
    return smollm2[1].encode(text)


def test_matches_transformers_and_batching(smollm2, hf_smollm2, wiki_ids):
    """Two windows of 64 tokens: ours (batch 1 and 2) and transformers' logits on the same windows."""
    import torch.nn.functional as F

    model = smollm2[0]
    proto = PerplexityProtocol(context=64)

    def hf_score(x, y):
        with torch.no_grad():
            logits = hf_smollm2(x).logits.float()
        keep = y != IGNORE
        return float(F.cross_entropy(logits[keep], y[keep], reduction="sum")), int(keep.sum())

    ours = perplexity(model, wiki_ids, proto, max_windows=2)
    batched = perplexity(model, wiki_ids, proto, batch_size=2, max_windows=2)
    theirs = perplexity(model, wiki_ids, proto, max_windows=2, score_fn=hf_score)
    assert ours.tokens_scored == theirs.tokens_scored == 2 * 63
    assert abs(ours.perplexity - theirs.perplexity) < 1e-3
    assert batched.perplexity == pytest.approx(ours.perplexity, rel=1e-6)
    assert 5 < ours.perplexity < 100  # a real language model on English text
    assert math.isclose(math.exp(ours.nll_sum / ours.tokens_scored), ours.perplexity)
