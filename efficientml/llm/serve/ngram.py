"""n-gram prompt lookup: draft tokens without a draft model (Saxena's prompt lookup decoding; vLLM's
``ngram`` speculator).

The last ``n`` tokens of a sequence (its prompt and output so far) are looked up earlier in the same
tokens, the longest ``n`` in ``ngram_max … ngram_min`` first and, for one ``n``, the most recent match;
the tokens that followed the match are the proposal. Summaries, code edits and retrieval answers
copy long spans of their prompt, so the continuation is often right. The proposal is deterministic
(q is one-hot), so the acceptance rule keeps a token with the target's probability of it.
"""

from __future__ import annotations

from efficientml.llm.serve.sequence import Sequence


def ngram_propose(tokens: list[int], k: int, ngram_min: int = 1, ngram_max: int = 4) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest matching suffix
    (``ngram_max`` down to ``ngram_min`` tokens) of ``tokens``; [] when no suffix recurs."""
    L = len(tokens)
    for n in range(min(ngram_max, L - 1), ngram_min - 1, -1):
        suffix = tokens[L - n:]
        for start in range(L - n - 1, -1, -1):  # the most recent occurrence that is not the suffix itself
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


class NgramProposer:
    """The proposer interface (:class:`~.draft.DraftProposer` is the other one): ``propose`` maps each
    (sequence, up to m tokens) to (draft tokens, None: one-hot q); nothing to free."""

    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        self.ngram_min, self.ngram_max = ngram_min, ngram_max

    def propose(self, wants: list[tuple[Sequence, int]]) -> dict[int, tuple[list[int], None]]:
        out = {}
        for seq, m in wants:
            toks = ngram_propose(seq.token_ids, m, self.ngram_min, self.ngram_max)
            if toks:
                out[seq.seq_id] = (toks, None)
        return out

    def forget(self, seq: Sequence) -> None:
        pass

    def num_used_blocks(self) -> int:
        return 0
