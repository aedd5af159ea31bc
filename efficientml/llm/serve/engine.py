"""The serving engine: requests in, tokens out, one scheduled step at a time.

    engine = LLMEngine(model, tokenizer, EngineConfig(scheduler=SchedulerConfig(max_num_seqs=16)))
    outs = engine.generate(["Once upon a time", "The capital of France"], SamplingParams(max_tokens=64))
    print(outs[0].outputs[0].text, engine.last_run.output_tok_s)

or, driven by a server loop (requests arriving and leaving while others run)::

    rid = engine.add_request("Hello", SamplingParams(max_tokens=32, temperature=0.8, seed=1))
    while engine.has_unfinished():
        for out in engine.step():             # schedule() → run() → postprocess()
            stream(out.request_id, out.outputs[0].new_text)
    engine.abort(rid)                          # frees the request's blocks at once

One step: the :class:`~.scheduler.Scheduler` picks the sequences and their token counts (continuous
batching, chunked prefill, preemption), the :class:`~.model_runner.ModelRunner` runs them as one
flattened forward over the paged KV pool, and the engine samples, appends, checks stops, forks
``n > 1`` requests after their prompt and reports a :class:`~.request.RequestOutput` for every
request the step touched. On CPU the linears go onto the project's fast kernels
(:func:`~efficientml.llm.kernels.decode.prepare_cpu_decode`; they take any number of rows).

With ``EngineConfig(speculative=SpeculativeConfig(...))`` decoding sequences also carry up to k draft
tokens (a draft model's or n-gram lookup's) that the same forward verifies (:mod:`.speculative`).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Sequence as Seq

import torch

from efficientml.core.errors import ConfigError, ShapeError
from efficientml.llm.kernels.decode import prepare_cpu_decode
from efficientml.llm.serve.block_manager import BlockManager
from efficientml.llm.serve.metrics import RunMetrics
from efficientml.llm.serve.model_runner import ModelRunner
from efficientml.llm.serve.sampler import sample_next, token_logprobs
from efficientml.llm.serve.request import Request, RequestOutput
from efficientml.llm.serve.scheduler import Scheduler, SchedulerConfig
from efficientml.llm.serve.sequence import SamplingParams, Sequence
from efficientml.llm.serve.speculative import SpecDecoder, SpeculativeConfig
from efficientml.llm.stop_strings import TextStream


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: as many as kv_cache_bytes holds
    kv_cache_bytes: int = 256 << 20
    max_model_len: int | None = None  # None: the model's context
    enable_prefix_caching: bool = True
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cpu_kernels: bool = True  # CPU: prepare_cpu_decode(model) (in place), decodes on the paged-attention kernel
    native_max_rows: int = 32  # CPU: steps of ≤ this many tokens (or chunks ≤ 16 each) run in C; 0: never
    speculative: SpeculativeConfig | None = None  # None: no speculative decoding

    def __post_init__(self) -> None:
        if self.block_size < 1 or (self.num_blocks is not None and self.num_blocks < 1):
            raise ConfigError(f"block_size and num_blocks must be ≥ 1, got {self.block_size}, {self.num_blocks}")
        if self.kv_cache_bytes <= 0:
            raise ConfigError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")


class LLMEngine:
    def __init__(self, model: torch.nn.Module, tokenizer=None, config: EngineConfig = EngineConfig()) -> None:
        cfg = model.config
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, config
        self.device = model.device
        self.kernels = None
        if self.device.type == "cpu" and config.cpu_kernels:
            self.kernels = prepare_cpu_decode(model)
        dtype = model.dtype if model.dtype.is_floating_point else torch.float32
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        bs = config.block_size
        block_bytes = 2 * cfg.num_hidden_layers * bs * cfg.num_key_value_heads * cfg.dim_per_head * dtype.itemsize
        num_blocks = config.num_blocks or max(1, config.kv_cache_bytes // block_bytes)
        self.blocks = BlockManager(cfg.num_hidden_layers, num_blocks, bs, cfg.num_key_value_heads,
                                   cfg.dim_per_head, dtype, self.device, config.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self.runner = ModelRunner(model, self.blocks, config.cpu_kernels, config.native_max_rows)
        self.spec: SpecDecoder | None = None
        if config.speculative is not None:
            draft = config.speculative.draft_model
            if draft is not None and draft is not model and self.kernels is not None:
                prepare_cpu_decode(draft)
            self.spec = SpecDecoder(config.speculative, model, self.blocks, config.scheduler.max_num_seqs,
                                    config.cpu_kernels)
        eos = cfg.eos_token_id if tokenizer is None or tokenizer.eos_id is None else tokenizer.eos_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.last_run: RunMetrics | None = None

    # ---- requests
    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        """Queue a prompt (text, with a tokenizer, or token ids); returns its request id."""
        params = params or SamplingParams()
        ids = self._encode(prompt)
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need the decoded text: create the engine with a tokenizer")
        self._check_fits(ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ConfigError(f"request id {rid!r} is already in use")
        req = Request(rid, ids, params, time.perf_counter() if arrival_time is None else arrival_time)
        seq = self._new_seq(req, Sequence(list(ids), params, rid, 0, arrival_time=req.arrival_time))
        self.requests[rid] = req
        self.scheduler.add(seq)
        return rid

    def _encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("a text prompt needs a tokenizer: create the engine with one, or pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ShapeError("the prompt is empty; give at least one token")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ShapeError(f"prompt token ids must be in [0, {vocab}), got {min(ids)}…{max(ids)}")
        return ids

    def _check_fits(self, ids: list[int], params: SamplingParams) -> None:
        if len(ids) >= self.max_model_len:
            raise ShapeError(f"the prompt has {len(ids)} tokens; the context is {self.max_model_len} "
                             "(prompt + at least one new token must fit)")
        need = self.blocks.blocks_for(min(len(ids) + params.max_tokens, self.max_model_len))
        if need > self.blocks.num_blocks:
            raise ConfigError(f"one sequence of this request needs {need} KV blocks; the pool has "
                              f"{self.blocks.num_blocks}: raise num_blocks / kv_cache_bytes or lower max_tokens")
        sc = self.config.scheduler
        if not sc.chunked_prefill and len(ids) + params.max_tokens > sc.max_num_batched_tokens:
            raise ConfigError(f"without chunked prefill a sequence of up to {len(ids) + params.max_tokens} "
                              f"tokens must fit max_num_batched_tokens ({sc.max_num_batched_tokens})")

    def _new_seq(self, req: Request, seq: Sequence) -> Sequence:
        if req.params.seed is not None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(req.params.seed + seq.index)
        if self.tokenizer is not None:
            seq.stream = TextStream(self.tokenizer, req.params.stop, tuple(self.eos_ids) + req.params.stop_token_ids)
        req.seqs.append(seq)
        return seq

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False when it is unknown or already finished."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        now = time.perf_counter()
        for seq in req.seqs:
            if not seq.is_finished:
                self._finish(seq)
                seq.finish_reason, seq.finish_time = "abort", now
        req.aborted = True
        return True

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if self.spec is not None:
            self.spec.forget(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def pop_finished(self) -> list[Request]:
        """Forget the finished requests (a long-running server calls this to bound memory)."""
        done = [r for r in self.requests.values() if r.finished]
        for r in done:
            del self.requests[r.request_id]
        return done

    # ---- one step
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward, sample; the outputs of every request this step touched."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        items, num_logits, drafts = batch.items, None, {}
        if self.spec is not None:
            for seq in batch.preempted:
                self.spec.forget(seq)
            budget = self.config.scheduler.max_num_batched_tokens - batch.num_tokens
            items, num_logits, drafts = self.spec.plan(items, budget, self.max_model_len)
        logits = self.runner.run(items) if num_logits is None else self.runner.run(items, num_logits)
        self.num_steps += 1
        return self._postprocess(items, logits, drafts)

    def _postprocess(self, items: list[tuple[Sequence, int]], logits: torch.Tensor,
                     drafts: dict | None = None) -> list[RequestOutput]:
        to_sample, rows, row, verified = [], [], 0, []
        for seq, n in items:
            if drafts and seq.seq_id in drafts:  # n = 1 + m drafts: m + 1 logits rows
                verified.append((seq, row, n))
                row += n
                continue
            reaches_end = seq.num_computed_tokens + n == seq.num_tokens
            seq.num_computed_tokens += n
            self.blocks.commit(seq)
            if reaches_end:  # logits row `row`; forked siblings sample from the same row
                for s in [seq] + self._fork(seq):
                    to_sample.append(s)
                    rows.append(row)
                row += 1
        new: dict[int, tuple[list[int], str]] = {}
        if to_sample:
            self._sample(to_sample, logits[torch.tensor(rows, device=logits.device)], new)
        for seq, r, n in verified:
            new[seq.seq_id] = self._append_verified(seq, drafts[seq.seq_id], logits[r:r + n])
        touched: dict[str, list[Sequence]] = {}
        for seq in to_sample + [v[0] for v in verified]:
            touched.setdefault(seq.request_id, []).append(seq)
        return [self.requests[rid].output(seqs, new) for rid, seqs in touched.items()]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, new: dict) -> None:
        """One token for each of ``seqs`` from its row of ``logits``; appended, reported in ``new``."""
        tokens = sample_next(seqs, logits)
        lps = None
        top = max((s.params.logprobs for s in seqs if s.params.logprobs is not None), default=None)
        if top is not None:
            lps = token_logprobs(logits, tokens, top)
        now = time.perf_counter()
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            new[seq.seq_id] = ([tok], self._append(seq, tok, now, None if lps is None else (lps[0][i], lps[1][i])))

    def _append_verified(self, seq: Sequence, draft: tuple, logits: torch.Tensor) -> tuple[list[int], str]:
        """The tokens the acceptance rule gives ``seq`` for its verified drafts, appended until a stop;
        the KV of the rejected drafts rolled back. ``logits`` (m + 1, V)."""
        toks = self.spec.verify(seq, draft, logits)  # type: ignore[union-attr]
        seq.num_computed_tokens = seq.num_tokens - 1 + len(toks)  # the last token and the kept drafts
        lps = None
        if seq.params.logprobs is not None:
            lps = token_logprobs(logits[:len(toks)], toks, seq.params.logprobs)
        now, text, done = time.perf_counter(), "", []
        for i, tok in enumerate(toks):
            text += self._append(seq, tok, now, None if lps is None else (lps[0][i], lps[1][i]))
            done.append(tok)
            if seq.is_finished:
                return done, text
        self.blocks.truncate(seq, seq.num_computed_tokens)
        self.blocks.commit(seq)
        return done, text

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """After a request's prompt: its other n - 1 sequences, sharing the prompt's blocks."""
        if seq.params.n == 1 or seq.forked:
            return []
        seq.forked = True
        req = self.requests[seq.request_id]
        children = [self._new_seq(req, seq.fork(i)) for i in range(1, seq.params.n)]
        for c in children:
            self.blocks.fork(seq, c)
        self.scheduler.insert_after(seq, children)
        return children

    def _append(self, seq: Sequence, tok: int, now: float, lp: tuple[float, dict] | None) -> str:
        """Add a sampled token to ``seq``; finish it at a stop; returns the text it released."""
        seq.append_token(tok)
        if seq.first_token_time is None:
            seq.first_token_time = now
        if lp is not None and seq.params.logprobs is not None:
            seq.output_logprobs.append(lp[0])
            seq.top_logprobs.append(dict(list(lp[1].items())[:seq.params.logprobs]))
        piece = seq.stream.put(tok) if seq.stream is not None else ""
        p = seq.params
        reason = None
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids):
            reason = "stop"
        elif seq.stream is not None and seq.stream.done:
            reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            if seq.stream is not None:
                piece += seq.stream.flush()
            seq.finish_reason, seq.finish_time = reason, now
            self._finish(seq)
        seq.output_text += piece
        return piece

    # ---- offline
    def generate(self, prompts: Seq[str | Seq[int]] | str, params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run ``prompts`` to completion; their final outputs in order (the engine then forgets them).
        ``self.last_run`` holds the run's metrics."""
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ConfigError(f"{len(plist)} sampling params for {len(prompts)} prompts; give one, or one each")
        spec0 = self.spec.counters() if self.spec is not None else (0, 0, 0)
        t0 = time.perf_counter()
        rids = [self.add_request(p, sp, arrival_time=t0) for p, sp in zip(prompts, plist)]
        final: dict[str, RequestOutput] = {}
        while any(rid not in final for rid in rids):
            if not self.has_unfinished():
                break
            outs = self.step()
            for out in outs:
                if out.finished:
                    final[out.request_id] = out
            if not outs and not self.scheduler.running:  # "dynamic": the batch is waiting to fill
                time.sleep(min(1e-3, self.config.scheduler.batch_timeout_s))
        wall = time.perf_counter() - t0
        reqs = [self.requests[rid] for rid in rids]
        spec = [b - a for a, b in zip(spec0, self.spec.counters())] if self.spec is not None else [0, 0, 0]
        self.last_run = RunMetrics(wall, len(reqs), sum(len(r.prompt_ids) for r in reqs),
                                   sum(s.num_output_tokens for r in reqs for s in r.seqs),
                                   tuple(r.metrics() for r in reqs), *spec)
        outs = [self.requests[rid].output(self.requests[rid].seqs, {}) for rid in rids]
        for rid in rids:  # reported: the engine forgets them (a long-lived engine must not grow)
            del self.requests[rid]
        return outs

    def kv_waste_fraction(self) -> float:
        """Of the KV slots in used blocks, the fraction holding no computed token right now."""
        slots, filled = self.blocks.usage(self.scheduler.running)
        return 1.0 - filled / slots if slots else 0.0

    def stats(self) -> dict:
        """Queue lengths, KV blocks used/free, prefix-cache hit rate, preemptions (for /metrics)."""
        b = self.blocks
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "blocks_used": b.num_used_blocks, "blocks_free": b.num_free_blocks, "blocks_total": b.num_blocks,
                "peak_blocks_used": b.peak_used_blocks, "prefix_queries": b.prefix_queries,
                "prefix_hits": b.prefix_hits, "prefix_hit_rate": b.prefix_hit_rate,
                "preemptions": self.scheduler.num_preemptions, "steps": self.num_steps,
                **(self.spec.stats() if self.spec is not None else {})}

