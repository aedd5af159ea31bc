"""Each sequence's next token from its row of the step's logits, by its own request's parameters.

Sampling is :func:`efficientml.llm.generate.sample` (repetition penalty, temperature, top-k, top-p,
min-p, multinomial — generate's order), per sequence, since parameters and seeded generators are
per request; greedy sequences without a repetition penalty are one batched ``argmax``.
"""

from __future__ import annotations

import torch

from efficientml.llm.generate import sample
from efficientml.llm.serve.sequence import Sequence


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
