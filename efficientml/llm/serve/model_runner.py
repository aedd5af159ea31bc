"""One forward over a scheduled step, and sampling each sequence's next token from it.

The step's tokens run flattened as ``(1, total_tokens)`` through the model's trunk, attention over
the block pool through :class:`~efficientml.llm.serve.paged_cache.PagedKVCache`; only the
sequences whose last token is in the step (a decode, or the final chunk of a prefill) get logits,
so the vocabulary projection runs on those rows only.

Sampling is per sequence with :func:`efficientml.llm.generate.sample` (its parameters are per
request); greedy sequences without a repetition penalty are one batched ``argmax``.
"""

from __future__ import annotations

import torch

from efficientml.core.errors import UnsupportedError
from efficientml.llm.generate import sample
from efficientml.llm.serve.block_manager import BlockManager
from efficientml.llm.serve.paged_cache import PagedKVCache
from efficientml.llm.serve.sequence import Sequence


class ModelRunner:
    def __init__(self, model: torch.nn.Module, blocks: BlockManager) -> None:
        cfg = model.config
        if cfg.position_embedding != "rope":
            raise UnsupportedError(f"the serving engine's paged attention supports RoPE models; this one uses "
                                   f"{cfg.position_embedding}")
        if model.model.rope.dynamic:
            raise UnsupportedError(f"rope_type {cfg.rope_type!r} adapts to each sequence's length, which a "
                                   "ragged batch does not have; serve a model with static RoPE scaling")
        self.model, self.blocks = model, blocks
        self.cache = PagedKVCache(blocks, cfg.sliding_window)
        self.device = blocks.k.device

    @torch.inference_mode()
    def run(self, items: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Compute ``n`` tokens of each (sequence, n); logits (S, vocab) for the S sequences whose
        last token is in the step, in batch order."""
        ids = [t for seq, n in items for t in seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n]]
        pos = self.cache.plan([(seq.block_table, seq.num_computed_tokens, n) for seq, n in items])
        x = torch.tensor(ids, dtype=torch.long, device=self.device)[None]  # (1, T)
        h = self.model.model(x, self.cache, pos)  # (1, T, d)
        last, t = [], 0
        for seq, n in items:
            t += n
            if seq.num_computed_tokens + n == seq.num_tokens:
                last.append(t - 1)
        return self.model.logits(h[0, torch.tensor(last, dtype=torch.long, device=self.device)])  # (S, V)


def sample_next(seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
    """One token per sequence from its row of ``logits`` (S, V), by its own parameters and generator."""
    plain = [i for i, s in enumerate(seqs) if s.params.temperature == 0 and s.params.repetition_penalty == 1.0]
    out = [0] * len(seqs)
    if plain:
        for i, t in zip(plain, logits[plain].argmax(-1).tolist()):
            out[i] = t
    for i, s in enumerate(seqs):
        if s.params.temperature == 0 and s.params.repetition_penalty == 1.0:
            continue
        seen = None
        if s.params.repetition_penalty != 1.0:
            seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=logits.device)
            seen[0, torch.tensor(s.token_ids, device=logits.device)] = True
        out[i] = int(sample(logits[i:i + 1], s.params.config, s.generator, seen)[0])
    return out


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> tuple[list[float], list[dict[int, float]]]:
    """Log-probabilities of the sampled ``tokens`` under the model (log-softmax of the raw logits, as
    vLLM reports them) and, when ``top`` > 0, each row's ``top`` most likely tokens with theirs."""
    lp = torch.log_softmax(logits.float(), -1)  # (S, V)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    if top <= 0:
        return chosen, [{} for _ in tokens]
    vals, idx = lp.topk(top, dim=-1)
    return chosen, [dict(zip(i.tolist(), v.tolist())) for i, v in zip(idx, vals)]
