"""Perplexity with one fixed, documented protocol.

Protocol (the same for every model and for the transformers comparison):

1. The whole text is tokenized as one string, without BOS (``add_bos=True`` puts one BOS at the start
   of every window instead; the BOS is context, never a target).
2. Windows of ``context`` tokens start every ``stride`` tokens (default ``stride = context``: windows
   do not overlap). The last window ends at the last token and may be shorter.
3. Within a window, every token that has at least one token before it is a candidate target (the
   window's first token has no context and is never scored, unless a BOS precedes it). With overlapping
   windows (``stride < context``) only tokens no earlier window scored are scored, so every token is
   scored at most once, with up to ``context - stride`` tokens of extra context.
4. Perplexity = exp(sum of target negative log-likelihoods / number of targets), natural log, fp32
   log-softmax over the full vocabulary.

Windows of equal length are batched (``batch_size``); the vocabulary projection and log-softmax run
over at most 1024 scored positions at a time, so memory is bounded by the batch, not by the text.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from efficientml.core.errors import ConfigError
from efficientml.core.progress import track

IGNORE = -100


@dataclass(frozen=True)
class PerplexityProtocol:
    context: int = 1024
    stride: int | None = None  # None: = context (non-overlapping windows)
    add_bos: bool = False

    def __post_init__(self) -> None:
        if self.context < 2:
            raise ConfigError(f"context must be at least 2 tokens, got {self.context}")
        if self.stride is not None and not 1 <= self.stride <= self.context:
            raise ConfigError(f"stride must be in 1…context ({self.context}), got {self.stride}")

    @property
    def step(self) -> int:
        return self.stride or self.context


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens_scored: int
    windows: int
    text_tokens: int
    seconds: float
    protocol: PerplexityProtocol

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_scored / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        return d


def windows(ids: Sequence[int], protocol: PerplexityProtocol,
            bos_id: int | None = None) -> Iterator[tuple[list[int], list[int]]]:
    """Yield ``(input_ids, labels)`` per window; ``labels[j]`` is the target predicted at position j
    (the next token) or ``IGNORE``. Together they score every token at most once."""
    n = len(ids)
    if protocol.add_bos and bos_id is None:
        raise ConfigError("add_bos needs a tokenizer with a BOS token")
    span = protocol.context - (1 if protocol.add_bos else 0)  # text tokens per window
    step = min(protocol.step, span)
    scored_until = 0 if protocol.add_bos else 1  # absolute index of the first token not yet scored
    begin = 0
    while True:
        end = min(begin + span, n)
        chunk = list(ids[begin:end])
        inp = ([bos_id] + chunk) if protocol.add_bos else chunk
        off = 1 if protocol.add_bos else 0
        labels = [IGNORE] * len(inp)
        for a in range(max(scored_until, begin + (0 if protocol.add_bos else 1)), end):
            labels[a - begin + off - 1] = ids[a]  # token a is predicted at the position before it
        scored_until = max(scored_until, end)
        yield inp, labels
        if end >= n:
            return
        begin += step


def _batches(ids: Sequence[int], protocol: PerplexityProtocol, bos_id: int | None,
             batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    buf: list[tuple[list[int], list[int]]] = []
    for w in windows(ids, protocol, bos_id):
        if buf and len(w[0]) != len(buf[0][0]):  # only the last window can be shorter
            yield torch.tensor([b[0] for b in buf]), torch.tensor([b[1] for b in buf])
            buf = []
        buf.append(w)
        if len(buf) == batch_size:
            yield torch.tensor([b[0] for b in buf]), torch.tensor([b[1] for b in buf])
            buf = []
    if buf:
        yield torch.tensor([b[0] for b in buf]), torch.tensor([b[1] for b in buf])


def num_windows(n_tokens: int, protocol: PerplexityProtocol) -> int:
    span = protocol.context - (1 if protocol.add_bos else 0)
    step = min(protocol.step, span)
    return 1 if n_tokens <= span else 1 + math.ceil((n_tokens - span) / step)


@torch.inference_mode()
def score_window_batch(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                       logits_rows: int = 1024) -> tuple[float, int]:
    """Our model: (sum of target NLL, number of targets) for a (B, T) batch."""
    dev = next(model.parameters()).device
    input_ids, labels = input_ids.to(dev), labels.to(dev)
    return nll_from_hidden(model, model.model(input_ids), labels, logits_rows)


def nll_from_hidden(model: torch.nn.Module, h: torch.Tensor, labels: torch.Tensor,
                    logits_rows: int = 1024) -> tuple[float, int]:
    """(sum of target NLL, number of targets) from the trunk's hidden states ``h`` (B, T, d): the
    scored positions are gathered, then projected to the vocabulary and log-softmaxed in fp32
    ``logits_rows`` at a time (memory bounded by rows × vocab, whatever the batch; 1024 rows keep
    the CPU matmul as efficient as one window at once — 256 cost SmolLM2-135M 7% of its time)."""
    keep = labels != IGNORE
    hs, ys = h[keep], labels[keep]  # (n, d), (n,)
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for s in range(0, hs.shape[0], logits_rows):
        logits = model.logits(hs[s:s + logits_rows]).float()  # (rows, V)
        total += F.cross_entropy(logits, ys[s:s + logits_rows], reduction="sum").double()
    return float(total), int(ys.numel())


def perplexity(model: torch.nn.Module, ids: Sequence[int], protocol: PerplexityProtocol = PerplexityProtocol(),
               bos_id: int | None = None, batch_size: int = 1, progress: bool | None = None,
               score_fn: Callable[[torch.Tensor, torch.Tensor], tuple[float, int]] | None = None,
               max_windows: int | None = None) -> PerplexityResult:
    """Perplexity of ``ids`` (a tokenized text) under the protocol in this module's docstring.
    ``score_fn(input_ids, labels) -> (nll_sum, count)`` replaces our model (e.g. to score another
    implementation on exactly the same windows); ``max_windows`` evaluates a prefix of the windows."""
    if len(ids) < (1 if protocol.add_bos else 2):
        raise ConfigError(f"the text has {len(ids)} tokens; perplexity needs at least "
                          f"{1 if protocol.add_bos else 2} (is the text empty?)")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if ctx is not None and protocol.context > ctx:
        raise ConfigError(f"context {protocol.context} exceeds the model's {ctx} positions")
    score = score_fn or (lambda x, y: score_window_batch(model, x, y))
    n_win = num_windows(len(ids), protocol)
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    total, count, done = 0.0, 0, 0
    t0 = time.perf_counter()
    batches = _batches(ids, protocol, bos_id, batch_size)
    for x, y in track(batches, "perplexity", total=math.ceil(n_win / batch_size), enabled=progress):
        if max_windows is not None and done >= max_windows:
            break
        if max_windows is not None and done + x.shape[0] > max_windows:
            x, y = x[: max_windows - done], y[: max_windows - done]
        nll, n = score(x, y)
        total += nll
        count += n
        done += x.shape[0]
    secs = time.perf_counter() - t0
    if count == 0:
        raise ConfigError("no token was scored; the text is shorter than two tokens")
    return PerplexityResult(math.exp(total / count), total, count, done, len(ids), secs, protocol)


def text_perplexity(model: torch.nn.Module, tokenizer, text: str,
                    protocol: PerplexityProtocol = PerplexityProtocol(), **kw) -> PerplexityResult:
    if not text or not text.strip():
        raise ConfigError("the text for perplexity is empty")
    return perplexity(model, tokenizer.encode(text, add_bos=False), protocol, bos_id=tokenizer.bos_id, **kw)
