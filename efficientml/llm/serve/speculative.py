"""Speculative decoding in the engine: propose k tokens cheaply, verify them in the target's one forward.

    spec = SpeculativeConfig(method="draft", num_speculative_tokens=4, draft_model=w4_copy,
                             disable_by_batch_size=8)
    engine = LLMEngine(model, tok, EngineConfig(speculative=spec))

A step with speculation (:meth:`SpecDecoder.plan`, then the engine's forward and
:meth:`SpecDecoder.verify`):

1. each decoding sequence gets up to k draft tokens from the proposer — a draft model over its own
   paged KV (:class:`~.draft.DraftProposer`) or n-gram lookup in its own tokens
   (:class:`~.ngram.NgramProposer`) — capped by its remaining ``max_tokens``, the context and the
   step's token budget;
2. the drafts are appended to the sequence and its blocks extended, so the scheduled batch computes
   the last token and all m drafts, m + 1 logits rows per sequence, in the ModelRunner's ONE forward
   with the batch's other sequences (prefill chunks, plain decodes);
3. :func:`~.spec_accept.accept` keeps a prefix of the drafts and adds one target token (the rule
   preserves the target's distribution; greedy output is token-identical to plain decoding); the
   engine appends them one by one (stops, ``max_tokens``, logprobs as usual) and
   :meth:`~.block_manager.BlockManager.truncate` rolls the KV of the rejected drafts back.

**Auto-off.** Speculation costs k extra tokens of target compute per sequence (and the draft's
forwards): in a large batch decoding is compute-bound and it loses (the complaint vLLM's users
made), so a step with ``disable_by_batch_size`` or more decoding sequences runs plainly. Per
sequence, once ``acceptance_window`` drafts are proposed, it stops when their acceptance rate is
below ``min_acceptance_rate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from efficientml.core.errors import ConfigError
from efficientml.llm.serve.block_manager import BlockManager
from efficientml.llm.serve.draft import DraftProposer
from efficientml.llm.serve.ngram import NgramProposer
from efficientml.llm.serve.sequence import Sequence
from efficientml.llm.serve.spec_accept import accept

METHODS = ("draft", "ngram")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"  # "draft": draft_model proposes; "ngram": prompt lookup, no model
    num_speculative_tokens: int = 4  # k, drafts per sequence per step
    draft_model: torch.nn.Module | None = field(default=None, repr=False, compare=False)
    ngram_min: int = 1
    ngram_max: int = 4
    disable_by_batch_size: int | None = None  # a step with this many decoding sequences runs plainly
    min_acceptance_rate: float = 0.0  # per sequence: off below it (after acceptance_window drafts)
    acceptance_window: int = 32
    draft_num_blocks: int | None = None  # the draft's KV pool; None: the target's + k per sequence

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"speculative method {self.method!r} is not one of {METHODS}")
        if self.num_speculative_tokens < 1:
            raise ConfigError(f"num_speculative_tokens must be ≥ 1, got {self.num_speculative_tokens}")
        if self.method == "draft" and self.draft_model is None:
            raise ConfigError("speculative method 'draft' needs a draft_model (a smaller model with the "
                              "target's vocabulary), or use method='ngram'")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"need 1 ≤ ngram_min ≤ ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ConfigError(f"disable_by_batch_size must be None or ≥ 1, got {self.disable_by_batch_size}")
        if not 0.0 <= self.min_acceptance_rate <= 1.0 or self.acceptance_window < 1:
            raise ConfigError(f"min_acceptance_rate must be in [0, 1] and acceptance_window ≥ 1, got "
                              f"{self.min_acceptance_rate}, {self.acceptance_window}")
        if self.draft_num_blocks is not None and self.draft_num_blocks < 1:
            raise ConfigError(f"draft_num_blocks must be None or ≥ 1, got {self.draft_num_blocks}")


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, model: torch.nn.Module, blocks: BlockManager,
                 max_num_seqs: int, attention_kernel: bool) -> None:
        self.config, self.blocks, self.k = config, blocks, config.num_speculative_tokens
        if config.method == "ngram":
            self.proposer: DraftProposer | NgramProposer = NgramProposer(config.ngram_min, config.ngram_max)
        else:
            draft = config.draft_model
            dv, tv = draft.config.vocab_size, model.config.vocab_size
            if dv != tv:
                raise ConfigError(f"the draft model's vocabulary has {dv} tokens, the target's {tv}: a draft "
                                  "must share the target's tokenizer")
            if draft.device != model.device:
                raise ConfigError(f"the draft model is on {draft.device}, the target on {model.device}")
            nb = config.draft_num_blocks or blocks.num_blocks + max_num_seqs * blocks.blocks_for(self.k + 1)
            self.proposer = DraftProposer(draft, nb, blocks.block_size, blocks.enable_prefix_caching,
                                          attention_kernel, model.device)
        self.num_proposed = self.num_accepted = self.num_verified = 0  # drafts, kept drafts, verifications
        self.num_plain_steps = 0  # steps with decodes run without speculation (disable_by_batch_size)
        self._rates: dict[int, list[int]] = {}  # seq_id → [proposed, accepted]

    def forget(self, seq: Sequence) -> None:
        """``seq`` finished, was aborted or preempted: free what the proposer holds for it."""
        self.proposer.forget(seq)
        self._rates.pop(seq.seq_id, None)

    def _off(self, seq: Sequence) -> bool:
        proposed, accepted = self._rates.get(seq.seq_id, (0, 0))
        c = self.config
        return proposed >= c.acceptance_window and accepted < c.min_acceptance_rate * proposed

    def plan(self, items: list[tuple[Sequence, int]], budget: int, max_model_len: int
             ) -> tuple[list[tuple[Sequence, int]], list[int] | None, dict]:
        """The step's (sequence, tokens) with the drafts added, logits rows per item (None: the
        default) and the drafts, seq_id → (tokens, q or None). ``budget``: tokens the step has left."""
        decodes = [seq for seq, n in items  # (a prompt's end forks n > 1 first: not speculated)
                   if n == 1 and seq.num_uncomputed == 1 and (seq.params.n == 1 or seq.forked)]
        dbs = self.config.disable_by_batch_size
        if not decodes:
            return items, None, {}
        if dbs is not None and len(decodes) >= dbs:
            self.num_plain_steps += 1
            return items, None, {}
        wants = []
        for seq in decodes:
            m = min(self.k, seq.params.max_tokens - seq.num_output_tokens - 1,
                    max_model_len - seq.num_tokens - 1, budget)
            if m >= 1 and not self._off(seq):
                wants.append((seq, m))
                budget -= m
        drafts = self.proposer.propose(wants) if wants else {}
        for seq, _ in wants:
            d = drafts.get(seq.seq_id)
            if d is None or not d[0]:
                drafts.pop(seq.seq_id, None)
            elif not self.blocks.can_append(seq, 1 + len(d[0])):
                del drafts[seq.seq_id]  # no preemption for a guess: this step decodes it plainly
            else:
                self.blocks.append(seq, 1 + len(d[0]))
                seq.token_ids.extend(d[0])
        if not drafts:
            return items, None, {}
        new = [(s, n + len(drafts[s.seq_id][0]) if s.seq_id in drafts else n) for s, n in items]
        rows = [n if s.seq_id in drafts else int(s.num_computed_tokens + n == s.num_tokens) for s, n in new]
        return new, rows, drafts

    def verify(self, seq: Sequence, draft: tuple[list[int], torch.Tensor | None], logits: torch.Tensor) -> list[int]:
        """Take ``seq``'s drafts back off its tokens; the tokens to append (kept drafts, then the
        target's). ``logits`` (m + 1, V): the target's rows for this sequence."""
        tokens, q = draft
        L = seq.num_tokens - len(tokens)
        context = seq.token_ids[:L]
        del seq.token_ids[L:]
        out = accept(seq.params, context, tokens, q, logits, seq.generator)
        kept = len(out) - 1
        self.num_proposed += len(tokens)
        self.num_accepted += kept
        self.num_verified += 1
        r = self._rates.setdefault(seq.seq_id, [0, 0])
        r[0] += len(tokens)
        r[1] += kept
        return out

    def counters(self) -> tuple[int, int, int]:
        return self.num_proposed, self.num_accepted, self.num_verified

    def stats(self) -> dict:
        return {"spec_proposed": self.num_proposed, "spec_accepted": self.num_accepted,
                "spec_verifications": self.num_verified, "spec_plain_steps": self.num_plain_steps,
                "spec_draft_blocks_used": self.proposer.num_used_blocks()}
