"""A draft model proposing tokens over its own paged KV cache (the "draft" speculator).

The draft (a smaller or compressed model with the target's vocabulary: a packed W4 copy, a
layer-pruned one) keeps a *shadow* :class:`~.sequence.Sequence` per target sequence in its own
:class:`~.block_manager.BlockManager` pool, run by its own :class:`~.model_runner.ModelRunner`. A step:

1. sync: the shadow takes the target sequence's tokens; its KV is truncated to the longest prefix
   both share (the draft tokens the target rejected are rolled back), so only the tokens the target
   added since (accepted drafts it had not computed, the correction or bonus token) are recomputed;
2. m rounds, each one batched forward over every proposing shadow: round 0 computes the shadow's
   uncomputed tail (the whole prompt the first time), later rounds the token the previous one drew.
   Each round draws the next draft token: the argmax for a greedy request, else a sample from the
   draft's distribution q under the request's own parameters (kept for the acceptance rule).

A shadow is freed when its target sequence finishes, is aborted or preempted.
"""

from __future__ import annotations

import torch

from efficientml.llm.generate import sampling_probs
from efficientml.llm.serve.block_manager import BlockManager
from efficientml.llm.serve.model_runner import ModelRunner
from efficientml.llm.serve.sequence import Sequence
from efficientml.llm.serve.spec_accept import adjusted


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(limit, len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


class DraftProposer:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 attention_kernel: bool, device: torch.device) -> None:
        cfg = model.config
        dtype = model.dtype if model.dtype.is_floating_point else torch.float32
        self.model = model.eval()
        self.blocks = BlockManager(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                                   cfg.dim_per_head, dtype, device, enable_prefix_caching)
        self.runner = ModelRunner(model, self.blocks, attention_kernel=attention_kernel)
        self.shadows: dict[int, Sequence] = {}  # target seq_id → the draft's copy

    def num_used_blocks(self) -> int:
        return self.blocks.num_used_blocks

    def forget(self, seq: Sequence) -> None:
        d = self.shadows.pop(seq.seq_id, None)
        if d is not None:
            self.blocks.free(d)

    def _sync(self, seq: Sequence) -> Sequence | None:
        """The shadow of ``seq`` holding its tokens, KV valid for their longest computed common prefix;
        None when the draft pool has no room for a new one."""
        d = self.shadows.get(seq.seq_id)
        if d is None:
            d = Sequence(list(seq.token_ids), seq.params, seq.request_id, seq.index)
            if not self.blocks.can_allocate(d):
                return None
            self.blocks.allocate(d)  # prefix-cache hits count as computed
            self.shadows[seq.seq_id] = d
            return d
        keep = _common_prefix(d.token_ids, seq.token_ids, d.num_computed_tokens)
        self.blocks.truncate(d, min(keep, seq.num_tokens - 1))  # ≥ 1 token to run: its logits are needed
        d.token_ids = list(seq.token_ids)
        return d

    @torch.inference_mode()
    def propose(self, wants: list[tuple[Sequence, int]]) -> dict[int, tuple[list[int], torch.Tensor | None]]:
        """For each (target sequence, m): m draft tokens and their distributions q (m, V), q None
        for a greedy request (the rule then needs no q)."""
        live = []
        for seq, m in wants:
            d = self._sync(seq)
            if d is None:
                continue
            span = d.num_uncomputed + m - 1  # the tail, then m - 1 drawn tokens (the last is not run)
            if not self.blocks.can_append(d, span):
                continue
            self.blocks.append(d, span)
            live.append((seq, d, m))
        toks: dict[int, list[int]] = {seq.seq_id: [] for seq, _, _ in live}
        qs: dict[int, list[torch.Tensor]] = {seq.seq_id: [] for seq, _, _ in live}
        for j in range(max((m for _, _, m in live), default=0)):
            step = [(seq, d) for seq, d, m in live if m > j]
            logits = self.runner.run([(d, d.num_uncomputed) for _, d in step])  # (len(step), V)
            for (seq, d), row in zip(step, logits):
                d.num_computed_tokens = d.num_tokens
                self.blocks.commit(d)
                tok, q = _draw(seq, d.token_ids, row[None])
                d.token_ids.append(tok)
                toks[seq.seq_id].append(tok)
                if q is not None:
                    qs[seq.seq_id].append(q)
        return {sid: (t, torch.stack(qs[sid]) if qs[sid] else None) for sid, t in toks.items()}


def _draw(seq: Sequence, context: list[int], row: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """The draft's next token from its logits row (1, V) under ``seq``'s parameters, with q (V,)."""
    p = seq.params
    row = adjusted(row, p, context)
    if p.temperature == 0:
        return int(row.argmax()), None
    q = sampling_probs(row, p.config)[0]
    return int(torch.multinomial(q, 1, generator=seq.generator)[0]), q
