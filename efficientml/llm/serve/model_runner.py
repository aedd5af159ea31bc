"""One forward over a scheduled step, and sampling each sequence's next token from it.

The step's tokens run flattened as ``(1, total_tokens)`` through the model's trunk, attention over
the block pool through :class:`~efficientml.llm.serve.paged_cache.PagedKVCache`; only the
sequences whose last token is in the step (a decode, or the final chunk of a prefill) get logits,
so the vocabulary projection runs on those rows only.

On CPU, a step of at most ``native_max_rows`` tokens, or of any number of sequences each bringing at most
``NATIVE_MAX_CHUNK`` (decodes, speculative verifies, short chunks: the steady state of a busy server),
runs in C instead (:mod:`~efficientml.llm.kernels.paged_step`): every
block with no torch op between the products, attention reading the pool in place. A model or pool it
cannot take (``paged_step.why_not``; ``native_why`` keeps the line) runs every step eagerly.
"""

from __future__ import annotations

import torch

from efficientml.core.errors import ShapeError, UnsupportedError
from efficientml.llm.kernels import paged_step
from efficientml.llm.serve.block_manager import BlockManager
from efficientml.llm.serve.paged_cache import PagedKVCache
from efficientml.llm.serve.sequence import Sequence


NATIVE_MAX_CHUNK = 16  # a longer prefill chunk in the step: the eager forward (its attention is batched GEMMs)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, blocks: BlockManager, attention_kernel: bool = True,
                 native_max_rows: int = 32) -> None:
        cfg = model.config
        if cfg.position_embedding != "rope":
            raise UnsupportedError(f"the serving engine's paged attention supports RoPE models; this one uses "
                                   f"{cfg.position_embedding}")
        if model.model.rope.dynamic:
            raise UnsupportedError(f"rope_type {cfg.rope_type!r} adapts to each sequence's length, which a "
                                   "ragged batch does not have; serve a model with static RoPE scaling")
        if getattr(model, "virtual_tokens", None) is not None:
            raise UnsupportedError("a prompt/prefix-tuned model (virtual tokens) cannot be served yet: merge or "
                                   "drop the virtual tokens first")
        if getattr(model, "kv_cache_factory", None) is not None:
            raise UnsupportedError("the engine keeps keys/values in its own float block pool; quantized KV "
                                   "blocks are not implemented yet: serve the model without KVCacheQuantConfig")
        self.model, self.blocks = model, blocks
        self.cache = PagedKVCache(blocks, cfg.sliding_window, use_kernel=attention_kernel)
        self.device = blocks.k.device
        self.native, self.native_max_rows, self.native_why = None, native_max_rows, "turned off (cpu_kernels=False)"
        if attention_kernel and native_max_rows > 0:
            self.native_why = paged_step.why_not(model, blocks.k)
            if self.native_why is None:
                self.native = paged_step.PagedStep(model, blocks, cfg.max_position_embeddings)

    @torch.inference_mode()
    def run(self, items: list[tuple[Sequence, int]], num_logits: list[int] | None = None) -> torch.Tensor:
        """Compute ``n`` tokens of each (sequence, n). Logits (R, vocab) for the last ``num_logits[i]``
        tokens of item i, in batch order; by default 1 for the sequences whose last token is in the
        step, 0 for the others (a prefill chunk short of the end). A speculative step asks for all
        k + 1 positions of a verified draft."""
        if num_logits is None:
            num_logits = [int(seq.num_computed_tokens + n == seq.num_tokens) for seq, n in items]
        if self.native is not None and self.native_max_rows > 0 and (sum(n for _, n in items) <= self.native_max_rows
                                        or max(n for _, n in items) <= NATIVE_MAX_CHUNK):
            return self._run_native(items, num_logits)
        ids = [t for seq, n in items for t in seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n]]
        pos = self.cache.plan([(seq.block_table, seq.num_computed_tokens, n) for seq, n in items])
        x = torch.tensor(ids, dtype=torch.long, device=self.device)[None]  # (1, T)
        h = self.model.model(x, self.cache, pos)  # (1, T, d)
        rows, t = [], 0
        for (_, n), m in zip(items, num_logits):
            t += n
            rows.extend(range(t - min(m, n), t))
        return self.model.logits(h[0, torch.tensor(rows, dtype=torch.long, device=self.device)])  # (R, V)

    def _run_native(self, items: list[tuple[Sequence, int]], num_logits: list[int]) -> torch.Tensor:
        tokens, positions, tables, rows = [], [], [], []
        for (seq, n), m in zip(items, num_logits):
            c = seq.num_computed_tokens
            if len(seq.block_table) * self.blocks.block_size < c + n:
                raise ShapeError(f"a block table of {len(seq.block_table)} blocks cannot hold {c + n} tokens")
            rows.extend(range(len(tokens) + n - min(m, n), len(tokens) + n))
            tokens += seq.token_ids[c:c + n]
            positions += range(c, c + n)
            tables += [seq.block_table] * n
        return self.native(tokens, positions, tables, rows)
