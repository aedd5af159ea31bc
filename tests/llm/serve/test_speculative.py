"""Speculative decoding in the engine: greedy output token-identical to plain decoding (draft model and
n-gram lookup, concurrent requests, preemption, stops), sampled output distributed as the target's
(chi-square against the exact distribution, with a wrong rule shown to fail the same test), KV
rollback and block accounting, auto-off, bad configs."""

from __future__ import annotations

import copy

import pytest
import torch
from scipy.stats import chi2

from efficientml.core.errors import ConfigError
from efficientml.llm.generate import SamplingConfig, generate, sampling_probs
from efficientml.llm.serve import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig, SpeculativeConfig
from efficientml.llm.serve import speculative as speculative_mod
from efficientml.llm.serve.block_manager import BlockManager
from efficientml.llm.serve.ngram import ngram_propose
from efficientml.llm.serve.sequence import Sequence
from efficientml.llm.serve.spec_accept import accept

from ..conftest import tiny_model


def _chaotic(seed=0, vocab=128, gain=8.0):
    """A tiny random model whose weights are scaled up, so greedy outputs vary (at gain 1 a random
    model repeats one token, which any proposer guesses)."""
    m = tiny_model(seed, max_position_embeddings=256, vocab_size=vocab)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(gain)
    return m


def _noisy(model, scale, seed=1):
    """A draft: the target with Gaussian noise (``scale`` × each tensor's std) on every weight."""
    d = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return d


def _prompts(lengths, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _engine(model, spec=None, num_blocks=64, block_size=16, **sched):
    return LLMEngine(model, None, EngineConfig(num_blocks=num_blocks, block_size=block_size, cpu_kernels=False,
                                               speculative=spec, scheduler=SchedulerConfig(**sched)))


def _ids(outs):
    return [list(o.outputs[0].token_ids) for o in outs]


def _no_leak(eng):
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks
    prop = eng.spec.proposer
    if hasattr(prop, "blocks"):
        assert prop.blocks.num_free_blocks == prop.blocks.num_blocks and not prop.shadows


# ---- greedy: token-identical


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_greedy_identical_to_plain_engine_with_concurrent_requests(method):
    model = _chaotic()
    prompts = _prompts([5, 17, 33, 40, 9, 26])
    prompts[1] = prompts[1] + prompts[1][:9]  # a repeat, for the n-gram lookup to find
    params = [SamplingParams(max_tokens=24, ignore_eos=True),
              SamplingParams(max_tokens=19, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=24, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(max_tokens=7, ignore_eos=True),
              SamplingParams(max_tokens=24, stop_token_ids=(83,), ignore_eos=True),
              SamplingParams(max_tokens=1, ignore_eos=True)]
    plain = _engine(model).generate(prompts, params)
    ref = [generate(model, p, SamplingConfig(max_new_tokens=sp.max_tokens, repetition_penalty=sp.repetition_penalty,
                                             stop_token_ids=sp.stop_token_ids)).tokens[0]
           for p, sp in zip(prompts, params)]
    assert _ids(plain) == ref
    spec = SpeculativeConfig(method, 3, draft_model=_noisy(model, 0.05) if method == "draft" else None)
    eng = _engine(model, spec, max_num_seqs=4)
    outs = eng.generate(prompts, params)
    assert _ids(outs) == ref
    assert [o.outputs[0].finish_reason for o in outs] == [o.outputs[0].finish_reason for o in plain]
    lp, lp_plain = outs[1].outputs[0].logprobs, plain[1].outputs[0].logprobs
    assert len(lp) == 19 and max(abs(a - b) for a, b in zip(lp, lp_plain)) < 1e-4
    assert outs[1].outputs[0].top_logprobs[5].keys() == plain[1].outputs[0].top_logprobs[5].keys()
    run = eng.last_run
    assert run.spec_proposed > 10 and 0 < run.spec_accepted < run.spec_proposed  # kept some, rejected some
    assert run.acceptance_rate == run.spec_accepted / run.spec_proposed
    assert run.mean_accepted_length == run.spec_accepted / run.spec_verifications
    _no_leak(eng)


def test_speculation_takes_fewer_steps_when_drafts_are_right():
    """The draft is the target itself: every draft token is kept, each verification adds k + 1 tokens."""
    model = _chaotic()
    prompt = _prompts([12])[0]
    params = SamplingParams(max_tokens=26, ignore_eos=True)
    plain = _engine(model)
    ref = plain.generate([prompt], params)
    eng = _engine(model, SpeculativeConfig("draft", 4, draft_model=_noisy(model, 0.0)))
    out = eng.generate([prompt], params)
    assert _ids(out) == _ids(ref)
    assert eng.last_run.acceptance_rate == 1.0 and eng.last_run.mean_accepted_length == 4.0
    assert eng.num_steps == 1 + 5 and plain.num_steps == 26  # prefill + 25 tokens in verifications of 5
    _no_leak(eng)


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_greedy_identical_under_preemption(method):
    model = _chaotic(seed=3)
    prompts = _prompts([5, 17, 33, 40, 3, 60, 12, 25], seed=4)
    prompts[5] = prompts[5][:30] + prompts[5][:30]
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ref = _ids(_engine(model, num_blocks=200, block_size=8).generate(prompts, params))
    spec = SpeculativeConfig(method, 4, draft_model=_noisy(model, 0.05) if method == "draft" else None)
    eng = _engine(model, spec, num_blocks=12, block_size=8, max_num_seqs=4, max_num_batched_tokens=64)
    outs = eng.generate(prompts, params)
    assert _ids(outs) == ref
    assert eng.scheduler.num_preemptions > 0 and eng.last_run.spec_accepted > 0
    _no_leak(eng)


def test_sampled_n2_fork_and_abort_free_every_block():
    model = _chaotic()
    spec = SpeculativeConfig("draft", 3, draft_model=_noisy(model, 0.05))
    eng = _engine(model, spec)
    out = eng.generate([_prompts([21])[0]], SamplingParams(max_tokens=12, n=2, temperature=0.8, seed=3,
                                                           ignore_eos=True))[0]
    assert [len(o.token_ids) for o in out.outputs] == [12, 12] and eng.last_run.spec_proposed > 0
    _no_leak(eng)
    rid = eng.add_request(_prompts([30])[0], SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(4):
        eng.step()
    assert eng.spec.proposer.blocks.num_used_blocks > 0
    assert eng.abort(rid)
    _no_leak(eng)


# ---- sampled: distribution-equal


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of ``counts`` against ``probs`` (cells expected < 5 pooled)."""
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]]).double()
    e = torch.cat([exp[big], exp[~big].sum()[None]]).double()
    keep = e > 0
    if bool((obs[~keep] > 0).any()):
        return 0.0  # an outcome of probability 0 happened
    stat = float(((obs[keep] - e[keep]) ** 2 / e[keep]).sum())
    return float(chi2.sf(stat, int(keep.sum()) - 1))


@pytest.mark.parametrize("with_q", [True, False])
def test_acceptance_rule_draws_exactly_from_the_target(with_q):
    """accept() on fixed p and q (or a one-hot proposal): its first token is distributed as p, not q;
    the two-token outcome (kept, bonus) as p ⊗ p."""
    V, N = 6, 20000
    g = torch.Generator().manual_seed(0)
    logits_p = torch.randn(2, V, generator=g) * 1.5  # the target's rows at the two positions
    q = torch.softmax(torch.randn(1, V, generator=g) * 2.0, -1)  # the draft's, far from p
    params = SamplingParams(temperature=0.7, top_k=5)
    p = sampling_probs(logits_p, params.config)  # (2, V)
    x1 = int(p[0].argsort()[-2])  # the one-hot proposal: the target's second most likely token
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(V * V)
    first = torch.zeros(V)
    for _ in range(N):
        x = int(torch.multinomial(q[0], 1, generator=gen)) if with_q else x1
        out = accept(params, [0], [x], q if with_q else None, logits_p, gen)
        first[out[0]] += 1
        if len(out) == 2:
            counts[out[0] * V + out[1]] += 1
    assert _chi2_pvalue(first, p[0]) > 1e-3  # the first token: p, whatever q is
    kept = torch.minimum(q[0], p[0]) if with_q else torch.zeros(V).index_fill_(0, torch.tensor([x1]), float(p[0, x1]))
    a = float(kept.sum())  # P(the draft token is kept) = Σ min(p, q)
    assert abs(float(counts.sum()) - N * a) < 5 * (N * a * (1 - a)) ** 0.5
    joint = kept[:, None] * p[1][None, :]  # (V, V): (kept draft token, bonus)
    assert _chi2_pvalue(counts, (joint / joint.sum()).view(-1)) > 1e-3
    q_first = q[0] if with_q else torch.nn.functional.one_hot(torch.tensor(x1), V).float()
    assert _chi2_pvalue(first, q_first * 0.999 + 0.001 / V) < 1e-12  # the test refuses a wrong distribution


def _exact_tokens_2_3(model, prompt, params):
    """The exact distribution of output tokens 2 and 3 (V × V) of the target sampling alone."""
    V = model.config.vocab_size
    with torch.no_grad():
        p1 = sampling_probs(model(torch.tensor([prompt]))[:, -1], params.config)[0]  # (V,)
        ctx2 = torch.tensor([prompt + [a] for a in range(V)])
        p2 = sampling_probs(model(ctx2)[:, -1], params.config)  # (V, V): t1 → t2
        ctx3 = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3 = sampling_probs(model(ctx3)[:, -1], params.config).view(V, V, V)  # t1, t2 → t3
    return torch.einsum("a,ab,abc->bc", p1, p2, p3).reshape(-1)


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_sampled_engine_output_distributed_as_the_target(method, monkeypatch):
    """4000 seeded requests, max_tokens 3: tokens 2 and 3 come from verification steps (token 1 from
    the prompt's forward). Their joint counts pass a chi-square test against the target's exact
    distribution; the same test rejects the output of a rule that keeps every draft token."""
    V, N = 8, 4000
    model = _chaotic(seed=5, vocab=V, gain=3.0)
    draft = _noisy(model, 0.8, seed=2)
    prompt = list(range(V)) * 2  # every token followed by another: the n-gram lookup always proposes
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=7, seed=i, ignore_eos=True) for i in range(N)]
    exact = _exact_tokens_2_3(model, prompt, params[0])

    def counts():
        spec = SpeculativeConfig(method, 2, draft_model=draft if method == "draft" else None)
        eng = _engine(model, spec, num_blocks=2048, max_num_seqs=512, max_num_batched_tokens=4096)
        outs = eng.generate([prompt] * N, params)
        c = torch.zeros(V * V)
        for o in outs:
            t = o.outputs[0].token_ids
            c[t[1] * V + t[2]] += 1
        _no_leak(eng)
        return c, eng.last_run

    c, run = counts()
    assert run.spec_verifications > N // 2 and 0 < run.acceptance_rate < 1  # (the token budget caps some steps)
    assert _chi2_pvalue(c, exact) > 1e-3
    real = speculative_mod.accept

    def keep_all(params, context, draft, q, logits, generator):  # wrong: the draft's distribution
        return draft + real(params, context + draft, [], None, logits[len(draft):], generator)

    monkeypatch.setattr(speculative_mod, "accept", keep_all)
    wrong, _ = counts()
    assert _chi2_pvalue(wrong, exact) < 1e-6


# ---- KV rollback and block accounting


def _seq(tokens):
    return Sequence(list(tokens), SamplingParams())


def test_truncate_frees_blocks_and_uncommits_the_rewritten_block():
    bm = BlockManager(1, 8, 4, 1, 2)
    s = _seq(range(10, 21))  # 11 tokens: 3 blocks of 4
    bm.allocate(s)
    s.num_computed_tokens = 11
    bm.commit(s)
    assert len(s.block_hashes) == 2 and bm.num_free_blocks == 5
    b0, b1, b2 = s.block_table
    bm.truncate(s, 6)  # keeps tokens 0…5: blocks 0 and 1, block 1 rewritten from slot 2 on
    assert s.block_table == [b0, b1] and bm.num_free_blocks == 6 and s.num_computed_tokens == 6
    assert len(s.block_hashes) == 1 and bm.block_hash[b1] is None and bm.block_hash[b0] is not None
    assert len(bm.hash_to_block) == 1
    bm.truncate(s, 4)  # a block boundary: block 0 stays whole, keeps its hash
    assert s.block_table == [b0] and bm.block_hash[b0] is not None and len(s.block_hashes) == 1
    other = _seq(list(range(10, 14)) + [99, 98])  # the same first block: a prefix-cache hit
    assert bm.cached_tokens(other) == 4
    bm.free(s)
    assert bm.num_free_blocks == 8


def test_truncate_of_a_shared_block_keeps_its_hash_and_copy_on_write_protects_it():
    bm = BlockManager(1, 8, 4, 1, 2)
    parent = _seq(range(10, 19))  # 9 tokens
    bm.allocate(parent)
    parent.num_computed_tokens = 8
    bm.commit(parent)
    child = parent.fork(1)
    bm.fork(parent, child)
    shared = child.block_table[1]
    bm.truncate(child, 6)  # block 1 is also the parent's: it keeps its hash
    assert bm.block_hash[shared] is not None and child.block_table[1] == shared and bm.ref_count[shared] == 2
    bm.append(child, 1)  # writing slot 6 copies the shared block first
    assert child.block_table[1] != shared and bm.ref_count[shared] == 1
    bm.free(child)
    bm.free(parent)
    assert bm.num_free_blocks == 8


def test_ngram_lookup():
    assert ngram_propose([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]  # 3-gram "1 2 3" seen at 0
    assert ngram_propose([1, 2, 3, 4, 5, 7, 2, 7, 5], 3, 1, 2) == [7, 2, 7]  # 1-gram "5": latest at 4
    assert ngram_propose([5, 6, 7, 8], 3) == []
    assert ngram_propose([4, 4], 5) == [4]
    assert ngram_propose([1, 2, 1, 2], 3, ngram_min=3) == []


# ---- auto-off


def test_speculation_off_for_steps_with_many_decodes():
    model = _chaotic()
    prompts = _prompts([6, 9, 11])
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (4, 16, 16)]
    ref = _ids(_engine(model).generate(prompts, params))
    eng = _engine(model, SpeculativeConfig("draft", 3, draft_model=_noisy(model, 0.05), disable_by_batch_size=3))
    seen = []
    plan = eng.spec.plan

    def spy(items, budget, max_model_len):
        new, rows, drafts = plan(items, budget, max_model_len)
        seen.append((sum(1 for s, n in items if n == 1), len(drafts)))
        return new, rows, drafts

    eng.spec.plan = spy
    assert _ids(eng.generate(prompts, params)) == ref
    assert all(d == 0 for n, d in seen if n >= 3) and any(n == 3 for n, _ in seen)
    assert any(d > 0 for n, d in seen if n < 3)
    assert eng.spec.num_plain_steps == sum(1 for n, _ in seen if n >= 3)


def test_speculation_off_per_sequence_when_acceptance_stays_low():
    model = _chaotic()
    prompts = _prompts([6, 9])
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    ref = _ids(_engine(model).generate(prompts, params))
    bad = _noisy(model, 1.0)  # accepts almost nothing
    eng = _engine(model, SpeculativeConfig("draft", 2, draft_model=bad, min_acceptance_rate=0.5,
                                           acceptance_window=4))
    assert _ids(eng.generate(prompts, params)) == ref
    assert 0 < eng.last_run.spec_proposed <= 2 * (4 + 2)  # stops once 4 drafts show a low rate
    always = _engine(model, SpeculativeConfig("draft", 2, draft_model=bad))
    always.generate(prompts, params)
    assert always.last_run.spec_proposed > 40


# ---- bad configs


def test_bad_speculative_configs_are_refused():
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        SpeculativeConfig("ngram", 0)
    with pytest.raises(ConfigError, match="needs a draft_model"):
        SpeculativeConfig("draft", 3)
    with pytest.raises(ConfigError, match="not one of"):
        SpeculativeConfig("medusa", 3)
    with pytest.raises(ConfigError, match="ngram_min"):
        SpeculativeConfig("ngram", 3, ngram_min=3, ngram_max=2)
    with pytest.raises(ConfigError, match="disable_by_batch_size"):
        SpeculativeConfig("ngram", 3, disable_by_batch_size=0)
    model = tiny_model()
    other = tiny_model(vocab_size=96)
    with pytest.raises(ConfigError, match="vocabulary has 96 tokens, the target's 128"):
        _engine(model, SpeculativeConfig("draft", 3, draft_model=other))
