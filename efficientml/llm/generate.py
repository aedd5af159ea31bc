"""Generation with a KV cache: one prefill over the prompt, then one token per step.

    out = generate(model, tok.encode("Once upon a time"), SamplingConfig(max_new_tokens=64))
    print(tok.decode(out.tokens[0]), out.prefill_tok_s, out.decode_tok_s)

Rows: one prompt, or several in one batch; rows of different lengths are left-padded and the padding
is masked through the cache (each row gets the tokens it gets alone). A row ends at a stop token or,
with ``stop_strings`` and the tokenizer, at the token whose text completes a stop string.

CPU: the cache is preallocated once (:class:`StaticKVCache`), each step writes one slot and attends to
the filled prefix, so nothing grows or is reallocated per token. CUDA: the decode step runs from a
captured CUDA graph (or ``torch.compile``) over a static-shape cache, which removes the per-kernel
launch overhead that otherwise bounds a small model's decode speed.

Sampling, in transformers' order: the repetition penalty (any temperature, greedy included: a logit of
a token already in this call's prompt or output is divided by the penalty when positive, multiplied by
it when negative), then ``temperature == 0`` is greedy (argmax); otherwise logits / temperature, then
top-k, then top-p (the smallest set of tokens whose probability reaches p), then min-p (drop tokens
less likely than min_p × the most likely one's probability), then a multinomial draw.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from efficientml.core.errors import ConfigError, ShapeError
from efficientml.llm.decode_step import decode_step
from efficientml.llm.kv_cache import KVCache, StaticKVCache
from efficientml.llm.stop_strings import StopText, TextStream


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    stop_token_ids: tuple[int, ...] = ()  # generation of a row ends after it emits one of these
    seed: int | None = None
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens already seen (CTRL / transformers)
    min_p: float | None = None
    stop_strings: tuple[str, ...] = ()  # a row ends at the token completing one (needs the tokenizer)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be ≥ 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p}")
        if isinstance(self.stop_strings, str):
            raise ConfigError("stop_strings is a tuple of strings, e.g. ('\\n\\n',), not one string")
        StopText(self.stop_strings)  # validates


def penalize(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None) -> torch.Tensor:
    """The repetition penalty on logits (B, V) for the tokens ``seen`` (B, V) bool."""
    if cfg.repetition_penalty == 1.0 or seen is None:
        return logits
    p, x = cfg.repetition_penalty, logits.float()
    return torch.where(seen, torch.where(x > 0, x / p, x * p), x)


def sampling_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """(B, V) logits (penalized) → the distribution a token is drawn from: temperature, top-k, top-p,
    min-p; zero outside the kept set. Needs ``temperature > 0``."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        probs = srt.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop = before >= cfg.top_p  # keeps the smallest prefix reaching p (always the top token)
        logits = logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    if cfg.min_p is not None and cfg.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < cfg.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits.softmax(-1)


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) → token ids (B,). ``seen`` (B, V) bool: the tokens the repetition penalty hits."""
    logits = penalize(logits, cfg, seen)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, cfg), 1, generator=generator).squeeze(-1)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row (stop token included when one ended the row)
    prompt_tokens: int  # per row (columns, padding included)
    ttft_s: float  # prefill + first token
    decode_s: float  # every later token
    stopped: list[bool] = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=list)  # real tokens per row
    logprobs: list[list[float]] | None = None  # per new token: log p under the model (return_logprobs)
    texts: list[str] | None = None  # per row, with a tokenizer: the text, stop tokens out, cut at a stop string

    @property
    def new_tokens(self) -> int:
        return max((len(t) for t in self.tokens), default=0)

    @property
    def prefill_tok_s(self) -> float:
        n = sum(self.prompt_lengths) if self.prompt_lengths else self.prompt_tokens * len(self.tokens)
        return n / self.ttft_s if self.ttft_s > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second per row after the first token."""
        n = self.new_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


def _as_batch(prompt: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor, device: torch.device,
              attention_mask: torch.Tensor | None, pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) ids and, where rows have padding, a (B, T) bool mask of the real tokens (left-padded)."""
    if isinstance(prompt, torch.Tensor):
        t = prompt if prompt.dim() == 2 else prompt[None]
        real = None
        if attention_mask is not None:
            real = (attention_mask if attention_mask.dim() == 2 else attention_mask[None]).bool().cpu()
            if real.shape != t.shape:
                raise ShapeError(f"attention_mask has shape {tuple(real.shape)}; the prompt has {tuple(t.shape)}")
    else:
        if attention_mask is not None:
            raise ConfigError("attention_mask goes with a tensor prompt; lists of ids are padded here")
        first = prompt[0] if len(prompt) else 0  # one row of ids (int, numpy int, 0-d tensor), or rows of them
        one = isinstance(first, numbers.Integral) or (isinstance(first, torch.Tensor) and first.dim() == 0)
        rows = [[int(t) for t in prompt]] if one else [[int(t) for t in r] for r in prompt]
        if any(len(r) == 0 for r in rows):
            raise ShapeError("a prompt is empty; give at least one token per row")
        T = max(len(r) for r in rows)
        t = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows], dtype=torch.long)
        real = torch.tensor([[False] * (T - len(r)) + [True] * len(r) for r in rows])
    if t.shape[1] == 0:
        raise ShapeError("the prompt is empty; give at least one token")
    if real is not None:
        if not bool(real[:, -1].all()) or bool((real[:, 1:].int() < real[:, :-1].int()).any()):
            raise ShapeError("attention_mask must pad on the left (0…0 1…1 per row, last column real): "
                             "generation continues after the last column")
        if bool(real.all()):
            real = None
    return t.to(device), None if real is None else real.to(device)


@torch.inference_mode()
def generate(model: torch.nn.Module, prompt: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
             config: SamplingConfig = SamplingConfig(), cache: KVCache | None = None,
             on_token: Callable[[list[int]], None] | None = None,
             cuda_graph: bool | None = None, use_compile: bool = False,
             attention_mask: torch.Tensor | None = None, tokenizer=None,
             return_logprobs: bool = False,
             on_text: Callable[[int, str], None] | None = None) -> GenerationResult:
    """Prefill ``prompt`` (token ids: one row, or rows), then decode up to ``config.max_new_tokens``.
    ``on_token`` receives each step's new ids (one per row).

    Rows of different lengths are left-padded (as transformers' tokenizers do for generation) and the
    padding is masked, so each row continues as it would alone. A (B, T) tensor prompt that is
    already padded comes with ``attention_mask`` (B, T), 1 for real tokens, padding on the left.

    With ``tokenizer`` each row is decoded as it streams (:class:`~efficientml.llm.stop_strings.
    TextStream`): ``on_text(row, piece)`` gets the text that may be shown, ``result.texts`` the whole
    texts; ``config.stop_strings`` need it (rows end where their text completes one).
    ``return_logprobs``: each new token's log-probability under the model's own distribution
    (log-softmax of the logits, before penalty and sampling warpers, as vLLM reports them), in
    ``result.logprobs``.

    ``cache``: continue an existing cache (multi-turn chat); by default a new one sized for prompt +
    new tokens. ``cuda_graph`` (default: on when the model is on CUDA) captures the decode step;
    ``use_compile`` compiles it (inside the graph on CUDA; on CPU over a static-shape cache). Both are
    skipped for a dynamic-NTK or LongRoPE model whose cache reaches past the trained context (each step
    needs the sequence length on the host)."""
    dev = next(model.parameters()).device
    ids, real = _as_batch(prompt, dev, attention_mask, model.config.pad_token_id or 0)
    B, T = ids.shape
    if tokenizer is None and (config.stop_strings or on_text is not None):
        raise ConfigError("stop_strings and on_text need the decoded text: pass generate(..., tokenizer=tok)")
    rows = _Rows(B, tokenizer, config, on_token, on_text, return_logprobs)
    if cache is None:
        cache = _new_cache(model, B, T, config, cuda_graph, use_compile, dev)
    if cache.length + T > cache.max_length:
        raise ShapeError(f"the prompt has {T} tokens but only {cache.max_length - cache.length} of the "
                         f"context ({cache.max_length} tokens) are free")
    max_new = min(config.max_new_tokens, cache.max_length - cache.length - T + 1)
    _mark_padding(cache, real, B, T, dev)
    step = decode_step(model, cache, B, cuda_graph, use_compile) if max_new > 1 else None
    gen = None
    if config.seed is not None:
        gen = torch.Generator(device=dev)
        gen.manual_seed(config.seed)

    t0 = time.perf_counter()
    logits = model(ids, cache, num_logits=1)[:, -1]  # (B, V)
    t_first = _decode(model, cache, step, rows, logits, _seen(ids, real, logits, config), config, gen, max_new)
    t_end = time.perf_counter()
    rows.flush()
    lengths = [T] * B if real is None else real.sum(1).tolist()
    return GenerationResult(rows.out, T, t_first - t0, t_end - t_first, rows.done, lengths, rows.logprobs,
                            rows.texts())


def _seen(ids: torch.Tensor, real: torch.Tensor | None, logits: torch.Tensor,
          config: SamplingConfig) -> torch.Tensor | None:
    """(B, V) bool: the tokens of this call's prompt (padding aside) the repetition penalty hits; None
    when it is off. The decode loop adds each new token."""
    if config.repetition_penalty == 1.0:
        return None
    hits = torch.ones_like(ids, dtype=torch.int32) if real is None else real.int()  # padding is not seen
    return torch.zeros(logits.shape, dtype=torch.int32, device=ids.device).scatter_add_(1, ids, hits) > 0


def _decode(model: torch.nn.Module, cache: KVCache, step, rows: "_Rows", logits: torch.Tensor,
            seen: torch.Tensor | None, config: SamplingConfig, gen: torch.Generator | None, max_new: int) -> float:
    """Sample from the prefill's ``logits`` (B, V), then decode one token per step (on ``step`` when
    captured or compiled) until every row has ended or ``max_new`` tokens are out. Returns the time
    the first token was out."""
    tok = sample(logits, config, gen, seen)  # (B,)
    t_first = 0.0
    for i in range(max_new):
        all_done = rows.take(tok, logits)  # one host sync per step: stop checks and streaming need the ids
        if i == 0:
            t_first = time.perf_counter()
        if all_done or i == max_new - 1:
            break
        pos = cache.length
        if step is not None:
            logits = step(tok[:, None], pos)
            cache.length = pos + 1
        else:
            logits = model(tok[:, None], cache, num_logits=1)[:, -1]
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        tok = sample(logits, config, gen, seen)
    return t_first


class _Rows:
    """Each row's new tokens, log-probabilities, streamed text and whether it has ended."""

    def __init__(self, batch: int, tokenizer, config: SamplingConfig, on_token, on_text,
                 return_logprobs: bool) -> None:
        self.out: list[list[int]] = [[] for _ in range(batch)]
        self.done = [False] * batch
        self.logprobs: list[list[float]] | None = [[] for _ in range(batch)] if return_logprobs else None
        self.streams = None if tokenizer is None else \
            [TextStream(tokenizer, config.stop_strings, config.stop_token_ids) for _ in range(batch)]
        self.stop_ids = set(config.stop_token_ids)
        self.on_token, self.on_text = on_token, on_text

    def take(self, tok: torch.Tensor, logits: torch.Tensor) -> bool:
        """Record this step's tokens (B,) drawn from ``logits`` (B, V); True when every row has ended."""
        host = tok.tolist()
        if self.logprobs is not None:
            lp = torch.log_softmax(logits.float(), -1).gather(1, tok[:, None])[:, 0].tolist()
        for r, t in enumerate(host):
            if not self.done[r]:
                self.out[r].append(t)
                if self.logprobs is not None:
                    self.logprobs[r].append(lp[r])
        if self.on_token is not None:
            self.on_token(host)
        for r, t in enumerate(host):
            if self.done[r]:
                continue
            if self.streams is not None:
                piece = self.streams[r].put(t)
                if piece and self.on_text is not None:
                    self.on_text(r, piece)
            self.done[r] = t in self.stop_ids or (self.streams is not None and self.streams[r].done)
        return all(self.done)

    def flush(self) -> None:
        for r, stream in enumerate(self.streams or []):
            piece = stream.flush()
            if piece and self.on_text is not None:
                self.on_text(r, piece)

    def texts(self) -> list[str] | None:
        return None if self.streams is None else [s.text for s in self.streams]


def _new_cache(model: torch.nn.Module, B: int, T: int, config: SamplingConfig, cuda_graph: bool | None,
               use_compile: bool, dev: torch.device) -> KVCache:
    """A cache for prompt + new tokens (at most the context), with static shapes when the decode step
    will be captured (CUDA graph) or compiled (CPU)."""
    ctx = model.config.max_position_embeddings
    if T > ctx:
        raise ShapeError(f"the prompt has {T} tokens; the model's context is {ctx} tokens")
    n = min(T + config.max_new_tokens, ctx)
    if getattr(model, "kv_cache_factory", None) is not None or getattr(model, "virtual_tokens", None) is not None:
        # KVCacheQuantConfig's cache, or one holding virtual tokens (no static shapes): no graph/compile;
        # the native C step on CPU where it takes them
        return model.new_cache(B, n)
    graphable = bool(cuda_graph if cuda_graph is not None else dev.type == "cuda")
    return StaticKVCache.for_model(model, B, n, static_shapes=graphable or (use_compile and dev.type == "cpu"))


def _mark_padding(cache: KVCache, real: torch.Tensor | None, B: int, T: int, dev: torch.device) -> None:
    """Record which key slots from here on hold real tokens: this prompt's padding, none after it.
    Recorded before a decode step is captured or compiled: the step reads the mask."""
    if real is None and cache.key_mask is None:
        return
    free = torch.ones(B, cache.max_length - cache.length, dtype=torch.bool, device=dev)
    if real is not None:
        free[:, :T] = real
    cache.mark_keys(torch.arange(cache.length, cache.max_length, device=dev), free)
