"""The serving engine against generate() run on each prompt alone (the independent reference)."""

from __future__ import annotations

import pytest
import torch

from efficientml.core.errors import ConfigError, ShapeError, UnsupportedError
from efficientml.llm.generate import SamplingConfig, generate
from efficientml.llm.serve import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig

from ..conftest import tiny_model


def _model(**kw):
    return tiny_model(max_position_embeddings=256, **kw)


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]


def _engine(model, num_blocks=64, block_size=16, tokenizer=None, **sched):
    cfg = EngineConfig(num_blocks=num_blocks, block_size=block_size, cpu_kernels=False,
                       scheduler=SchedulerConfig(**sched))
    return LLMEngine(model, tokenizer, cfg)


def _reference(model, prompts, n, **kw):
    return [generate(model, p, SamplingConfig(max_new_tokens=n, **kw)).tokens[0] for p in prompts]


@pytest.mark.parametrize("path", ["torch", "kernels", "native"])
def test_step_logits_equal_each_sequence_alone(path):
    """Every logits row of every ragged step (prefill chunks and decodes, sequences joining at different
    steps) equals the model's eager forward over that sequence alone, to 1e-4 — on torch ops, on the
    CPU kernels (linears on cpu_gemv, decode attention on the paged-attention kernel), and with every
    step in C (paged_step: all steps here are ≤ 20 tokens)."""
    model = _model()
    ref_model = _model()  # the kernels swap modules in place: the reference keeps plain ones
    kernels = path != "torch"
    eng = LLMEngine(model, None, EngineConfig(num_blocks=64, cpu_kernels=kernels, scheduler=SchedulerConfig(
        max_num_seqs=3, max_num_batched_tokens=20), native_max_rows=32 if path == "native" else 0))
    assert eng.runner.cache.use_kernel == kernels
    assert (eng.runner.native is not None) == (path == "native"), eng.runner.native_why
    checked = []
    run = eng.runner.run

    def spy(items):
        logits = run(items)
        ends = [seq.token_ids[:seq.num_computed_tokens + n] for seq, n in items
                if seq.num_computed_tokens + n == seq.num_tokens]
        for row, ids in zip(logits, ends):
            ref = ref_model(torch.tensor([ids]))[0, -1]
            checked.append((row - ref).abs().max().item())
        return logits

    eng.runner.run = spy
    prompts = _prompts([7, 30, 3, 45, 16])
    eng.add_request(prompts[0], SamplingParams(max_tokens=6, ignore_eos=True))
    eng.step()
    eng.step()
    for p in prompts[1:]:  # joining while the first decodes
        eng.add_request(p, SamplingParams(max_tokens=6, ignore_eos=True))
        eng.step()
    while eng.has_unfinished():
        eng.step()
    assert len(checked) == 5 * 6 and max(checked) <= 1e-4
    assert eng.runner.cache._kernel_ok == (True if path == "kernels" else None if path == "native" else False)


@pytest.mark.parametrize("window", [None, 8])
def test_greedy_equals_generate_with_more_requests_than_seqs_and_preemption(window):
    model = _model(sliding_window=window)
    prompts = _prompts([5, 17, 33, 40, 3, 60, 12, 25])
    ref = _reference(model, prompts, 20)
    eng = _engine(model, num_blocks=12, block_size=8, max_num_seqs=4, max_num_batched_tokens=64)
    outs = eng.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    assert [list(o.outputs[0].token_ids) for o in outs] == ref
    assert eng.scheduler.num_preemptions > 0  # the 12-block pool cannot hold 4 sequences of up to 80 tokens
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert eng.blocks.num_used_blocks == 0


def test_chunked_prefill_equals_unchunked():
    model = _model()
    prompts = _prompts([50, 9, 70, 31])
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    whole = _engine(model, max_num_batched_tokens=512).generate(prompts, params)
    chunked_eng = _engine(model, max_num_batched_tokens=8)
    chunked = chunked_eng.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in chunked] == [o.outputs[0].token_ids for o in whole]
    assert chunked_eng.num_steps > 70 // 8  # the long prompt really was split


def test_prefix_cache_hits_on_a_shared_prefix_and_changes_nothing():
    model = _model()
    system = _prompts([40], seed=5)[0]
    prompts = [system + s for s in _prompts([3, 9, 14], seed=6)]
    ref = _reference(model, prompts, 8)
    eng = _engine(model, max_num_batched_tokens=256)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    first = eng.generate(prompts[:1], params)
    rest = eng.generate(prompts[1:], params)
    assert [list(o.outputs[0].token_ids) for o in first + rest] == ref
    assert [o.metrics.num_cached_tokens for o in rest] == [32, 32]  # two full 16-token blocks of the 40
    assert eng.blocks.prefix_hits == 4 and eng.blocks.prefix_queries == 2 + 3 + 3
    off = _engine(model, max_num_batched_tokens=256)
    off.blocks.enable_prefix_caching = False
    off.generate(prompts, params)
    assert off.blocks.prefix_hits == 0


def test_fork_n2_copies_on_write_and_each_sequence_matches_generate():
    model = _model()
    prompt = _prompts([21])[0]  # 21 = 16 + 5: the forked sequences share a partly filled block
    eng = _engine(model)
    out = eng.generate([prompt], SamplingParams(max_tokens=12, n=2, temperature=0.9, seed=7, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1]
    for o in out.outputs:  # sequence i draws from its own generator, seeded seed + i
        assert list(o.token_ids) == _reference(model, [prompt], 12, temperature=0.9, seed=7 + o.index)[0]
    assert out.outputs[0].token_ids != out.outputs[1].token_ids
    assert eng.blocks.cow_copies == 1 and eng.blocks.num_used_blocks == 0
    greedy = eng.generate([prompt], SamplingParams(max_tokens=12, n=2, ignore_eos=True))[0]
    ref = _reference(model, [prompt], 12)[0]
    assert [list(o.token_ids) for o in greedy.outputs] == [ref, ref]
    assert greedy.metrics.num_output_tokens == 24


def test_abort_frees_blocks_at_once_and_nothing_leaks():
    model = _model()
    eng = _engine(model, max_num_batched_tokens=256)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    rids = [eng.add_request(p, params) for p in _prompts([20, 33, 8])]
    for _ in range(3):
        eng.step()
    held = len(eng.scheduler.running[1].block_table)
    before = eng.blocks.num_used_blocks
    assert eng.abort(rids[1]) and not eng.abort(rids[1]) and not eng.abort("nope")
    assert eng.blocks.num_used_blocks == before - held
    while eng.has_unfinished():
        eng.step()
    assert eng.blocks.num_used_blocks == 0
    aborted = eng.requests[rids[1]].output(eng.requests[rids[1]].seqs, {})
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    assert len(aborted.outputs[0].token_ids) == 3


def test_fcfs_admission_order_under_preemption():
    model = _model()
    prompts = _prompts([30, 30, 30, 30, 30, 30])
    eng = _engine(model, num_blocks=10, block_size=8, max_num_seqs=3, max_num_batched_tokens=40)
    outs = eng.generate(prompts, SamplingParams(max_tokens=25, ignore_eos=True))
    assert eng.scheduler.admission_log == [o.request_id for o in outs] and eng.requests == {}
    assert eng.scheduler.num_preemptions > 0
    firsts = [o.metrics.first_token_time for o in outs]
    assert firsts == sorted(firsts)  # nobody overtook an earlier request
    assert [list(o.outputs[0].token_ids) for o in outs] == _reference(model, prompts, 25)


def test_seeded_sampling_is_reproducible_whatever_the_batch():
    model = _model()
    prompts = _prompts([10, 25, 4])
    params = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=3, ignore_eos=True)
    alone = [_engine(model).generate([p], params)[0].outputs[0].token_ids for p in prompts]
    together = [o.outputs[0].token_ids for o in _engine(model, max_num_batched_tokens=16).generate(prompts, params)]
    assert together == alone
    assert [list(t) for t in alone] == _reference(model, prompts, 10, temperature=1.0, top_k=20, top_p=0.9, seed=3)


def test_repetition_penalty_min_p_and_logprobs_match_generate():
    model = _model()
    prompts = _prompts([12, 30])
    params = SamplingParams(max_tokens=8, repetition_penalty=1.3, min_p=0.05, temperature=0.7, seed=1,
                            ignore_eos=True, logprobs=2)
    outs = _engine(model).generate(prompts, params)
    for p, o in zip(prompts, outs):
        ref = generate(model, p, params.config, return_logprobs=True)
        assert list(o.outputs[0].token_ids) == ref.tokens[0]
        torch.testing.assert_close(torch.tensor(o.outputs[0].logprobs), torch.tensor(ref.logprobs[0]),
                                   atol=1e-4, rtol=0)
        tops = o.outputs[0].top_logprobs
        assert all(len(t) == 2 and max(t.values()) >= lp - 1e-6 for t, lp in zip(tops, o.outputs[0].logprobs))


def test_static_batches_run_to_completion_and_dynamic_waits_for_size():
    model = _model()
    prompts = _prompts([6, 9, 12, 15])
    params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in (3, 12, 3, 3)]
    eng = _engine(model, policy="static", max_num_seqs=2)
    outs = eng.generate(prompts, params)
    first_batch_done = max(o.metrics.finish_time for o in outs[:2])
    assert min(o.metrics.first_token_time for o in outs[2:]) > first_batch_done
    cont = _engine(model, policy="continuous", max_num_seqs=2).generate(prompts, params)
    assert cont[2].metrics.first_token_time < cont[1].metrics.finish_time  # joins as request 0 leaves
    assert [o.outputs[0].token_ids for o in cont] == [o.outputs[0].token_ids for o in outs]
    dyn = _engine(model, policy="dynamic", max_num_seqs=2, batch_timeout_s=3600)
    dyn.add_request(prompts[0], params[0])
    assert dyn.step() == []  # one request, a long timeout: the batch waits to fill
    dyn.add_request(prompts[1], params[1])
    assert len(dyn.step()) == 2


def test_metrics_are_consistent():
    model = _model()
    eng = _engine(model)
    outs = eng.generate(_prompts([5, 18]), SamplingParams(max_tokens=6, ignore_eos=True))
    run = eng.last_run
    assert run.output_tokens == 12 and run.prompt_tokens == 23 and run.num_requests == 2
    for o in outs:
        m = o.metrics
        assert 0 <= m.queue_s < m.ttft_s <= m.latency_s and m.tpot_s > 0
        assert m.as_dict()["tpot_s"] == m.tpot_s
        assert m.latency_s == pytest.approx(m.ttft_s + 5 * m.tpot_s)
    s = run.summary()
    assert s["output_tok_s"] == pytest.approx(12 / run.wall_s) and s["ttft_s"]["p99"] >= s["ttft_s"]["median"]
    assert run.goodput(ttft_slo_s=1e9, tpot_slo_s=1e9) == pytest.approx(2 / run.wall_s)
    assert run.goodput(ttft_slo_s=0.0, tpot_slo_s=1e9) == 0


def test_cpu_kernels_path_matches_generate():
    """prepare_cpu_decode's kernels (GemvLinear on 1-8 rows, BLAS beyond) keep the outputs."""
    model = _model()
    prompts = _prompts([5, 30, 11])
    ref = _reference(model, prompts, 10)
    eng = LLMEngine(model, None, EngineConfig(num_blocks=32))
    assert eng.kernels is not None
    outs = eng.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
    assert [list(o.outputs[0].token_ids) for o in outs] == ref


def test_bad_requests_are_refused_with_one_sentence():
    model = _model()
    eng = _engine(model, num_blocks=4, block_size=8)
    with pytest.raises(ShapeError, match="empty"):
        eng.add_request([])
    with pytest.raises(ShapeError, match="context"):
        eng.add_request(list(range(3, 100)) * 3)
    with pytest.raises(ShapeError, match=r"\[0, 128\)"):
        eng.add_request([5, 400])
    with pytest.raises(ConfigError, match="KV blocks"):
        eng.add_request([5] * 20, SamplingParams(max_tokens=40))
    with pytest.raises(ConfigError, match="tokenizer"):
        eng.add_request("hello")
    with pytest.raises(ConfigError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ConfigError, match="policy"):
        SchedulerConfig(policy="fifo")
    alibi = tiny_model(max_position_embeddings=64, position_embedding="alibi")
    with pytest.raises(UnsupportedError, match="RoPE"):
        _engine(alibi)
    model.kv_cache_factory = lambda *a: None
    with pytest.raises(UnsupportedError, match="KVCacheQuantConfig"):
        _engine(model)
    del model.kv_cache_factory
    eng.add_request([5, 6], request_id="a")
    with pytest.raises(ConfigError, match="already in use"):
        eng.add_request([5, 6], request_id="a")


def test_kv_waste_is_at_most_one_partial_block_per_sequence():
    model = _model()
    eng = _engine(model, max_num_batched_tokens=512)
    for p in _prompts([17, 40, 9]):
        eng.add_request(p, SamplingParams(max_tokens=5, ignore_eos=True))
    eng.step()  # all three prefilled: 17 + 40 + 9 = 66 tokens in 2 + 3 + 1 blocks
    assert eng.blocks.usage(eng.scheduler.running) == (6 * 16, 66)
    assert eng.kv_waste_fraction() == pytest.approx(1 - 66 / 96)


def test_runner_returns_logits_for_every_requested_position():
    """num_logits asks for the trailing positions of a chunk (what verifying a k-token draft needs)."""
    model = _model()
    eng = _engine(model)
    a, b = _prompts([12, 7])
    eng.add_request(a)
    eng.add_request(b)
    eng.scheduler.schedule()  # admits both: blocks allocated, nothing computed yet
    seqs = list(eng.scheduler.running)
    logits = eng.runner.run([(seqs[0], 12), (seqs[1], 7)], num_logits=[4, 7])
    full = [model(torch.tensor([a]))[0], model(torch.tensor([b]))[0]]
    torch.testing.assert_close(logits, torch.cat([full[0][-4:], full[1]]), atol=1e-4, rtol=0)


def test_random_arrivals_aborts_forks_and_preemption_keep_every_invariant():
    """A small soak: requests arrive between steps, some are aborted, some fork (n = 2), the pool is
    small enough to preempt. After every step each block's reference count equals the number of block
    tables holding it; at the end no block is used, and every request that ran to the end has
    generate()'s greedy output."""
    model = _model()
    g = torch.Generator().manual_seed(11)
    prompts = _prompts(torch.randint(2, 50, (24,), generator=g).tolist(), seed=12)
    maxes = torch.randint(1, 16, (24,), generator=g).tolist()
    eng = _engine(model, num_blocks=16, block_size=8, max_num_seqs=5, max_num_batched_tokens=24)
    rids, aborted, finals, i = [], set(), {}, 0
    while i < len(prompts) or eng.has_unfinished():
        for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
            if i < len(prompts):
                rids.append(eng.add_request(prompts[i], SamplingParams(max_tokens=maxes[i], ignore_eos=True,
                                                                       n=2 if i % 5 == 0 else 1)))
                i += 1
        if rids and torch.rand(1, generator=g) < 0.08:
            victim = rids[int(torch.randint(0, len(rids), (1,), generator=g))]
            if eng.abort(victim):
                aborted.add(victim)
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
        holders = [0] * eng.blocks.num_blocks
        for seq in eng.scheduler.running:
            for b in seq.block_table:
                holders[b] += 1
        assert holders == eng.blocks.ref_count
        assert all(not s.block_table for s in eng.scheduler.waiting)
    assert eng.blocks.num_used_blocks == 0 and eng.scheduler.num_preemptions > 0
    done = [r for r in rids if r not in aborted]
    assert set(done) <= set(finals) and len(done) >= 15
    for r in done:
        k = rids.index(r)
        ref = _reference(model, [prompts[k]], maxes[k])[0]
        assert [list(o.token_ids) for o in finals[r].outputs] == [ref] * (2 if k % 5 == 0 else 1)


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_room():
    model = _model()
    prompts = _prompts([30, 30, 30])
    eng = _engine(model, max_num_batched_tokens=64, chunked_prefill=False)
    outs = eng.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
    assert [list(o.outputs[0].token_ids) for o in outs] == _reference(model, prompts, 4)
    firsts = [o.metrics.first_token_time for o in outs]
    assert firsts[0] == firsts[1] < firsts[2]  # 30 + 30 fit the first step's 64 tokens, the third does not
    with pytest.raises(ConfigError, match="chunked prefill"):
        eng.add_request(_prompts([62])[0], SamplingParams(max_tokens=4))


def test_decodes_keep_streaming_while_a_long_prompt_is_chunked():
    model = _model()
    a, b = _prompts([4, 60])
    eng = _engine(model, max_num_batched_tokens=8)
    ra = eng.add_request(a, SamplingParams(max_tokens=10, ignore_eos=True))
    eng.step()
    eng.add_request(b, SamplingParams(max_tokens=3, ignore_eos=True))
    steps = [[o.request_id for o in eng.step()] for _ in range(9)]
    assert all(ra in s for s in steps)  # one token of the decode every step, the prompt takes the other 7
    assert eng.scheduler.running[-1].num_computed_tokens == 60  # 8 steps of 7 prompt tokens, then the last 4
    while eng.has_unfinished():
        eng.step()
    assert eng.blocks.num_used_blocks == 0
