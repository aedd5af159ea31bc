"""The acceptance rule of speculative sampling (Leviathan et al. 2023, Chen et al. 2023): the draft's
tokens are kept or replaced so that the output is distributed exactly as the target's own sampling.

At draft position j the target's distribution p is the one the plain engine samples from
(:func:`~efficientml.llm.generate.penalize` on the context so far, then
:func:`~efficientml.llm.generate.sampling_probs`: temperature, top-k, top-p, min-p), q the draft's:

- draft token x is kept with probability min(1, p(x) / q(x));
- at the first rejection the token is drawn from norm(max(0, p − q)) and the step ends;
- when every draft token is kept, one more (the "bonus") is drawn from p at the position after them.

Then P(token = y) = q(y) min(1, p(y)/q(y)) + (1 − Σ_x min(q(x), p(x))) norm(max(0, p − q))(y) = p(y).
A deterministic proposal (n-gram lookup, q one-hot at x) keeps x with probability p(x) and otherwise
draws from p with x removed. Greedy requests (temperature 0) keep x while it is the target's argmax,
then take the argmax: token-identical to plain greedy decoding.
"""

from __future__ import annotations

import torch

from efficientml.llm.generate import penalize, sampling_probs
from efficientml.llm.serve.sequence import SamplingParams


def seen_mask(context: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """(1, V) bool: the tokens the repetition penalty hits (prompt and output so far, as the sampler)."""
    seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
    seen[0, torch.tensor(context, dtype=torch.long, device=device)] = True
    return seen


def adjusted(logits: torch.Tensor, params: SamplingParams, context: list[int]) -> torch.Tensor:
    """One row (1, V) of logits with the repetition penalty over ``context`` applied (or as it was)."""
    if params.repetition_penalty == 1.0:
        return logits
    return penalize(logits, params.config, seen_mask(context, logits.shape[-1], logits.device))


def accept(params: SamplingParams, context: list[int], draft: list[int], q: torch.Tensor | None,
           logits: torch.Tensor, generator: torch.Generator | None) -> list[int]:
    """The draft tokens kept, then one token of the target's (correction or bonus).

    ``context``: the sequence's tokens before the draft; ``draft`` (m,) with the draft's distributions
    ``q`` (m, V), or None for a one-hot proposal; ``logits`` (m + 1, V): the target's at the last
    context token and at each draft token."""
    m = len(draft)
    if params.temperature == 0 and params.repetition_penalty == 1.0:
        best = logits.argmax(-1).tolist()  # (m + 1,) all positions at once
        n = next((j for j in range(m) if draft[j] != best[j]), m)
        return draft[:n] + [best[n]]
    out: list[int] = []
    for j in range(m + 1):
        row = adjusted(logits[j:j + 1], params, context + out)  # (1, V)
        if params.temperature == 0:
            t = int(row.argmax())
            out.append(t)
            if j == m or draft[j] != t:
                break
            continue
        p = sampling_probs(row, params.config)[0]  # (V,)
        if j == m:
            out.append(_draw(p, generator))
            break
        x = draft[j]
        qx = 1.0 if q is None else float(q[j, x])
        u = float(torch.rand(1, generator=generator, device=p.device))
        if u * qx < float(p[x]):  # u < p(x)/q(x): keep x with probability min(1, p/q)
            out.append(x)
            continue
        if q is None:
            resid = p.clone()
            resid[x] = 0.0  # max(0, p − onehot(x))
        else:
            resid = (p - q[j].to(p.dtype)).clamp_min(0.0)
        out.append(_draw(resid if float(resid.sum()) > 0 else p, generator))
        break
    return out


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator)[0])
