"""The in-process parts of benchmarks/serving.py: offline throughput (nano-vllm style), static against
continuous batching, KV memory waste, and prefix caching's time to first token.

Every request is a seeded random prompt (token ids) with a seeded random output length, generated
with ``ignore_eos`` so every system produces exactly the tokens asked for; throughput is output tokens
the requests asked for ÷ wall seconds.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import torch

from efficientml.analysis.record import log

Requests = list[tuple[list[int], int]]  # (prompt ids, output tokens)


def random_requests(n: int, prompt_len: tuple[int, int], output_len: tuple[int, int], seed: int,
                    vocab: int) -> Requests:
    rng = random.Random(seed)
    return [([rng.randrange(100, vocab) for _ in range(rng.randint(*prompt_len))], rng.randint(*output_len))
            for _ in range(n)]


def _params(n_out: int):
    from efficientml.llm.serve import SamplingParams

    return SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True)


def new_engine(model, policy: str = "continuous", max_num_seqs: int = 64, prefix_caching: bool = True,
               kv_cache_mb: int = 1024):
    from efficientml.llm.serve import EngineConfig, LLMEngine, SchedulerConfig

    cfg = EngineConfig(kv_cache_bytes=kv_cache_mb << 20, enable_prefix_caching=prefix_caching,
                       scheduler=SchedulerConfig(policy=policy, max_num_seqs=max_num_seqs))
    return LLMEngine(model, None, cfg)


# ------------------------------------------------------------------------------------------ our engine
def _peak_sample(eng, peak: dict[str, Any]) -> None:
    """After a step: when the blocks in use reach a new high, what the running sequences fill of them."""
    used = eng.blocks.num_used_blocks
    if used <= peak.get("blocks_used", -1):
        return
    running = list(eng.scheduler.running)
    slots, filled = eng.blocks.usage(running)
    peak.update(blocks_used=used, slots=slots, filled_slots=filled, running=len(running),
                reserved_prompt_plus_max_tokens=sum(s.num_prompt_tokens + s.params.max_tokens for s in running),
                step=eng.num_steps)  # cumulative over the engine's runs


@torch.inference_mode()
def run_engine(eng, reqs: Requests) -> dict[str, Any]:
    """All requests present at once, stepped to the end; throughput, the KV peak, each output's tokens."""
    t0, steps0, pre0 = time.perf_counter(), eng.num_steps, eng.scheduler.num_preemptions
    rids = [eng.add_request(ids, _params(n), arrival_time=t0) for ids, n in reqs]
    peak: dict[str, Any] = {}
    while eng.has_unfinished():
        eng.step()
        _peak_sample(eng, peak)
    wall = time.perf_counter() - t0
    seqs = [eng.requests[r].seqs[0] for r in rids]
    outputs = [list(s.output_ids) for s in seqs]
    if any(len(o) != n for o, (_, n) in zip(outputs, reqs)):
        raise RuntimeError("the engine did not produce exactly the tokens each request asked for")
    eng.pop_finished()
    toks = sum(len(o) for o in outputs)
    return {"wall_s": wall, "output_tokens": toks, "output_tok_s": toks / wall, "steps": eng.num_steps - steps0,
            "preemptions": eng.scheduler.num_preemptions - pre0, "peak": peak, "outputs": outputs,
            "blocks_used_after": eng.blocks.num_used_blocks}


@torch.inference_mode()
def run_static_generate(model, reqs: Requests, batch: int) -> dict[str, Any]:
    """Our ``generate`` over fixed batches in arrival order; each batch runs to its longest output."""
    from efficientml.llm.generate import SamplingConfig, generate

    t0, made, outputs = time.perf_counter(), 0, []
    for i in range(0, len(reqs), batch):
        chunk = reqs[i:i + batch]
        longest = max(n for _, n in chunk)
        r = generate(model, [ids for ids, _ in chunk], SamplingConfig(max_new_tokens=longest))
        made += longest * len(chunk)
        outputs += [list(row[:n]) for row, (_, n) in zip(r.tokens, chunk)]
    wall = time.perf_counter() - t0
    toks = sum(n for _, n in reqs)
    return {"wall_s": wall, "output_tokens": toks, "output_tok_s": toks / wall, "batch": batch,
            "generated_tokens": made, "outputs": outputs}


# ------------------------------------------------------------------------------------------ transformers
def hf_model(our_model, tokenizer, folder, dtype: torch.dtype):
    """transformers' LlamaForCausalLM on the HF folder our ``save_hf`` writes (tests/llm/test_parity.py)."""
    import transformers

    from efficientml.llm.io.load import save_hf

    if not (folder / "config.json").exists():
        save_hf(our_model, tokenizer, folder)
    return transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()


@torch.inference_mode()
def run_hf_sequential(hf, reqs: Requests) -> dict[str, Any]:
    """``hf.generate`` one request at a time, greedy, exactly n new tokens (min = max = n)."""
    t0, outputs = time.perf_counter(), []
    for ids, n in reqs:
        x = torch.tensor([ids])
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
        outputs.append(out[0, len(ids):].tolist())
    wall = time.perf_counter() - t0
    toks = sum(len(o) for o in outputs)
    return {"wall_s": wall, "output_tokens": toks, "output_tok_s": toks / wall, "outputs": outputs}


@torch.inference_mode()
def run_hf_static(hf, reqs: Requests) -> dict[str, Any]:
    """``hf.generate`` on all of ``reqs`` as one left-padded batch, to the longest output."""
    longest, width = max(n for _, n in reqs), max(len(ids) for ids, _ in reqs)
    x = torch.tensor([[0] * (width - len(ids)) + ids for ids, _ in reqs])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in reqs])
    t0 = time.perf_counter()
    hf.generate(x, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                pad_token_id=0)
    wall = time.perf_counter() - t0
    toks = sum(n for _, n in reqs)
    return {"wall_s": wall, "output_tokens": toks, "output_tok_s": toks / wall, "batch": len(reqs),
            "generated_tokens": longest * len(reqs)}


def _strip(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "outputs"}


def _same_fraction(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(1, min(len(a), len(b)))


# ------------------------------------------------------------------------------------------ the parts
def part_offline(st) -> None:
    """64 requests at once: transformers sequential (a seeded subset) and static batches, our static
    ``generate``, our engine; the KV waste at the engine's peak."""
    model, tok = st.model()
    p = st.protocol["offline"]
    reqs = random_requests(p["requests"], tuple(p["prompt_len"]), tuple(p["output_len"]), st.seed,
                           model.config.vocab_size)
    eng = new_engine(model, max_num_seqs=p["requests"], kv_cache_mb=2048)  # prepares the CPU kernels in place
    run_engine(eng, reqs[:2])  # warm-up
    ours = run_engine(eng, reqs)
    log(f"offline: engine {ours['output_tok_s']:.1f} tok/s, peak {ours['peak']}")
    static = run_static_generate(model, reqs, p["static_batch"])
    log(f"offline: our static generate {static['output_tok_s']:.1f} tok/s")
    sub = random.Random(st.seed + 1).sample(reqs, p["hf_subset"])
    hf_runs = {}
    for dt in p["hf_dtypes"]:
        hf = hf_model(st.model_fp32()[0], tok, st.tmp / "hf", st.torch_dtype(dt))
        run_hf_sequential(hf, sub[:1])  # warm-up
        hf_runs[dt] = {"sequential": _strip(run_hf_sequential(hf, sub)), "static": _strip(run_hf_static(hf, sub))}
        log(f"offline: transformers {dt} sequential {hf_runs[dt]['sequential']['output_tok_s']:.1f} tok/s")
        del hf
    best = max(hf_runs, key=lambda d: hf_runs[d]["sequential"]["output_tok_s"])
    hf_tps = hf_runs[best]["sequential"]["output_tok_s"]
    st.rec.results["offline"] = {"ours_engine": _strip(ours), "ours_static_generate": _strip(static),
                                 "transformers": hf_runs, "transformers_subset_requests": len(sub),
                                 "engine_vs_static_generate_greedy_same": _same_fraction(ours["outputs"],
                                                                                         static["outputs"])}
    st.rec.target("offline_throughput_vs_hf_sequential", ours["output_tok_s"] / hf_tps, ">=", 10.0,
                  note=f"our engine ({st.dtype}, continuous, {len(reqs)} requests at once) "
                       f"{ours['output_tok_s']:.1f} output tok/s ÷ transformers sequential generate "
                       f"({best}, the faster of {', '.join(p['hf_dtypes'])}) {hf_tps:.1f} tok/s, timed on a seeded "
                       f"subset of {len(sub)} of the same requests; ignore_eos, greedy, 2 threads")
    _kv_waste_target(st, ours, model.config.max_position_embeddings)
    st.save()


def _kv_waste_target(st, ours: dict[str, Any], max_len: int) -> None:
    pk = ours["peak"]
    paged = 1.0 - pk["filled_slots"] / pk["slots"]
    contiguous_max = 1.0 - pk["filled_slots"] / (pk["running"] * max_len)
    contiguous_req = 1.0 - pk["filled_slots"] / pk["reserved_prompt_plus_max_tokens"]
    st.rec.results["kv_memory"] = {"block_size": 16, "peak": pk, "paged_waste_fraction": paged,
                                   "contiguous_max_model_len_waste_fraction": contiguous_max,
                                   "contiguous_prompt_plus_max_tokens_waste_fraction": contiguous_req,
                                   "max_model_len": max_len}
    st.rec.target("kv_memory_waste_fraction", paged, "<=", 0.04,
                  note=f"at the offline run's peak ({pk['blocks_used']} blocks, {pk['running']} running): "
                       f"1 − {pk['filled_slots']} computed tokens ÷ {pk['slots']} slots in used blocks; a "
                       f"contiguous preallocation wastes {contiguous_max:.3f} at max_model_len={max_len} per "
                       f"sequence, {contiguous_req:.3f} at prompt + max_tokens per sequence")


def part_continuous(st) -> None:
    """The same mixed-length requests through the engine's static and continuous policies."""
    model, _ = st.model()
    p = st.protocol["continuous"]
    reqs = random_requests(p["requests"], tuple(p["prompt_len"]), tuple(p["output_len"]), st.seed + 2,
                           model.config.vocab_size)
    runs = {}
    for policy in ("static", "continuous"):
        eng = new_engine(model, policy, max_num_seqs=p["max_num_seqs"])
        run_engine(eng, reqs[:2])  # warm-up
        runs[policy] = run_engine(eng, reqs)
        log(f"continuous part: {policy} {runs[policy]['output_tok_s']:.1f} tok/s in {runs[policy]['steps']} steps")
    same = _same_fraction(runs["static"]["outputs"], runs["continuous"]["outputs"])
    st.rec.results["continuous_vs_static"] = {**{k: _strip(v) for k, v in runs.items()},
                                              "greedy_outputs_same_fraction": same, **p}
    c, s = runs["continuous"]["output_tok_s"], runs["static"]["output_tok_s"]
    st.rec.target("continuous_vs_static_throughput", c / s, ">=", 1.5,
                  note=f"engine continuous {c:.1f} ÷ static {s:.1f} output tok/s, {p['requests']} requests at "
                       f"once, max_num_seqs={p['max_num_seqs']}, outputs {p['output_len'][0]}–"
                       f"{p['output_len'][1]} tokens (ignore_eos), {st.dtype}")
    st.save()


@torch.inference_mode()
def _ttfts(model, reqs: Requests, caching: bool) -> list[float]:
    """One request at a time through a fresh engine; each one's time to first token."""
    eng = new_engine(model, prefix_caching=caching, kv_cache_mb=256)
    out = []
    for ids, n in reqs:
        eng.generate([ids], _params(n))
        out.append(eng.last_run.requests[0].ttft_s)
    return out


def part_prefix(st) -> None:
    """A shared system prompt, then short user turns: TTFT of the 2nd and later requests, cache on/off."""
    model, _ = st.model()
    p = st.protocol["prefix"]
    rng = random.Random(st.seed + 3)
    system = [rng.randrange(100, model.config.vocab_size) for _ in range(p["system_tokens"])]
    reqs = [(system + [rng.randrange(100, model.config.vocab_size) for _ in range(rng.randint(*p["user_len"]))], 1)
            for _ in range(p["requests"])]
    _ttfts(model, [(ids[-40:], 1) for ids, _ in reqs[:2]], True)  # warm-up
    on, off = _ttfts(model, reqs, True), _ttfts(model, reqs, False)
    med_on, med_off = statistics.median(on[1:]), statistics.median(off[1:])
    st.rec.results["prefix"] = {"ttft_s_cached": on, "ttft_s_uncached": off, "median_later_cached_s": med_on,
                                "median_later_uncached_s": med_off, **p}
    st.rec.target("prefix_cache_ttft_speedup", med_off / med_on, ">=", 3.0,
                  note=f"median TTFT of requests 2–{len(reqs)}: {med_off * 1e3:.0f} ms without prefix caching ÷ "
                       f"{med_on * 1e3:.0f} ms with it; a shared {p['system_tokens']}-token system prompt + "
                       f"{p['user_len'][0]}–{p['user_len'][1]} user tokens, one request at a time, {st.dtype}")
    st.save()
