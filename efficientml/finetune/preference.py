"""Preference data with a rule-based reward: pairs built from local text, encoded with the chat template,
and a win rate measured by generation — a preference whose judge is a deterministic function, so the
result of DPO is measurable without people.

Rules (each judges generated ids and makes the pairs):

- :class:`LengthRule`: a response wins when it ends (EOS) after at least ``min_tokens`` and at most
  ``max_tokens`` tokens; ``chosen`` is the continuation cut at a word boundary within the limit,
  ``rejected`` the same continuation running well past it (the two share their beginning, so the
  preference is about where to stop, not about the words);
- :class:`FormatRule`: a response wins when it starts with a required ``prefix`` (an answer format);
  ``chosen`` is the continuation with it, ``rejected`` the same words without.

From a corpus (TinyShakespeare by default, through the project's data resolution) each pair is one line
as the prompt and the text that follows as the answer; both responses end in EOS, as SFT rows do.

    pairs = preference_pairs(tok, "tinyshakespeare", n_pairs=256, rule=LengthRule(max_tokens=8))
    train = PreferenceSet.encode(tok, pairs[:200])
    win_rate(model, tok, [p["prompt"] for p in pairs[200:]], rule)      # {"win_rate": …, …}

Encoded rows are right-padded; ``labels`` are IGNORE on the prompt and the padding, so a sequence
log-probability covers the response tokens only (the EOS included).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from efficientml.core.config import Config
from efficientml.core.errors import ConfigError
from efficientml.finetune.sft_data import IGNORE, encode_example

PROMPT = "Continue the play in a few words:\n{line}"


@dataclass(frozen=True)
class LengthRule(Config):
    """A response wins when it ends within ``max_tokens`` tokens (EOS counted as the last one) and has
    at least ``min_tokens`` before the EOS."""

    kind = "length_rule"
    max_tokens: int = 8
    min_tokens: int = 1

    def validate(self) -> None:
        if not isinstance(self.min_tokens, int) or not isinstance(self.max_tokens, int) \
                or not 0 <= self.min_tokens < self.max_tokens:
            raise ConfigError(f"LengthRule needs integers 0 ≤ min_tokens < max_tokens, got min_tokens="
                              f"{self.min_tokens!r}, max_tokens={self.max_tokens!r}")

    def __call__(self, response: list[int], tok: Any) -> bool:
        """``response``: the generated ids (stop token included when it ended the row)."""
        if tok.eos_id not in response:
            return False
        n = response.index(tok.eos_id)  # tokens before the EOS
        return self.min_tokens <= n and n + 1 <= self.max_tokens

    def pair(self, tok: Any, words: list[str]) -> tuple[str, str]:
        """(chosen, rejected) from a continuation: cut within the limit, and running well past it."""
        chosen = _cut(tok, words, max(1, self.max_tokens - 1))
        longer = words
        while len(tok.encode(" ".join(longer), add_bos=False)) <= 2 * self.max_tokens:
            longer = longer + words
        rejected = _cut(tok, longer, 3 * self.max_tokens)
        if len(tok.encode(rejected, add_bos=False)) <= self.max_tokens:  # one very long word: keep it whole
            rejected = " ".join(longer)
        return chosen, rejected


@dataclass(frozen=True)
class FormatRule(Config):
    """A response wins when it starts with the tokens of ``prefix`` (a required answer format)."""

    kind = "format_rule"
    prefix: str = "Answer:"
    max_tokens: int = 8              # length of the pairs' responses; generation gets twice as many

    def validate(self) -> None:
        if not isinstance(self.prefix, str) or not self.prefix.strip():
            raise ConfigError(f"FormatRule needs a non-empty prefix, got {self.prefix!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")

    def __call__(self, response: list[int], tok: Any) -> bool:
        want = tok.encode(self.prefix, add_bos=False)
        return response[:len(want)] == want

    def pair(self, tok: Any, words: list[str]) -> tuple[str, str]:
        """(chosen, rejected): the same cut continuation with and without the prefix."""
        body = _cut(tok, words, self.max_tokens)
        return f"{self.prefix} {body}", body


def _cut(tok: Any, words: list[str], limit: int) -> str:
    """The longest prefix of ``words`` whose encoding has at most ``limit`` tokens (≥ 1 word)."""
    out = words[0]
    for i in range(2, len(words) + 1):
        cand = " ".join(words[:i])
        if len(tok.encode(cand, add_bos=False)) > limit:
            break
        out = cand
    return out


def preference_pairs(tok: Any, source: str = "tinyshakespeare", n_pairs: int = 256,
                     rule: "LengthRule | FormatRule" = LengthRule(), seed: int = 0, text: str | None = None,
                     part: tuple[float, float] = (0.0, 0.9)) -> list[dict[str, str]]:
    """``n_pairs`` {"prompt", "chosen", "rejected"} from lines of ``source`` (a corpus name or file, or
    ``text`` itself) within the ``part`` fraction of it (default: the first 90%, the training part)."""
    from efficientml.data.text import load_text

    if not 0.0 <= part[0] < part[1] <= 1.0:
        raise ConfigError(f"part must be (start, end) fractions with 0 ≤ start < end ≤ 1, got {part!r}")
    body = text if text is not None else load_text(source)
    body = body[int(len(body) * part[0]):int(len(body) * part[1])]
    lines = [ln.strip() for ln in body.splitlines() if len(ln.split()) >= 3]
    if len(lines) < 4:
        raise ConfigError(f"{source!r} has {len(lines)} usable lines (three words or more) in the part "
                          f"{part}; preference pairs need at least 4")
    rng = random.Random(seed)
    pairs = []
    for _ in range(n_pairs):
        i = rng.randrange(len(lines) - 3)
        chosen, rejected = rule.pair(tok, " ".join(lines[i + 1:i + 4]).split())
        pairs.append({"prompt": PROMPT.format(line=lines[i]), "chosen": chosen, "rejected": rejected})
    return pairs


def prompt_ids(tok: Any, prompt: str) -> list[int]:
    """The prompt as SFT renders it (chat template and generation prompt), without the response."""
    ids, labels = encode_example(tok, {"prompt": prompt, "response": "x"})
    return [t for t, lab in zip(ids, labels) if lab == IGNORE]


def _rows(encoded: list[tuple[list[int], list[int]]], pad_id: int, max_length: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    width = min(max_length, max(len(i) for i, _ in encoded))
    ids = torch.full((len(encoded), width), pad_id)
    labels = torch.full((len(encoded), width), IGNORE)
    for r, (i, lab) in enumerate(encoded):
        ids[r, :len(i[:width])], labels[r, :len(lab[:width])] = torch.tensor(i[:width]), torch.tensor(lab[:width])
    return ids, labels


@dataclass
class PreferenceSet:
    """Encoded pairs: ``ids``/``labels`` (2N, T), rows 0…N−1 chosen and N…2N−1 rejected, right-padded."""

    ids: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def encode(cls, tok: Any, pairs: list[dict[str, str]], max_length: int = 256) -> "PreferenceSet":
        if not pairs:
            raise ConfigError("no preference pairs to encode")
        enc = []
        for key in ("chosen", "rejected"):
            for i, p in enumerate(pairs):
                missing = {"prompt", "chosen", "rejected"} - set(p)
                if missing:
                    raise ConfigError(f"preference pair {i + 1} lacks {sorted(missing)}; expected 'prompt', "
                                      "'chosen' and 'rejected'")
                enc.append(encode_example(tok, {"prompt": p["prompt"], "response": p[key]}, f"pair {i + 1}"))
        ids, labels = _rows(enc, tok.eos_id or 0, max_length)
        return cls(ids, labels)

    def __len__(self) -> int:
        return self.ids.shape[0] // 2

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows for pairs ``idx`` (B,): (2B, T) ids and labels, the B chosen first."""
        rows = torch.cat([idx, idx + len(self)])
        ids, labels = self.ids[rows], self.labels[rows]
        width = int((labels != IGNORE).nonzero()[:, 1].max()) + 1  # drop all-padding columns
        return ids[:, :width], labels[:, :width]

    def fingerprint(self) -> torch.Tensor:
        """A cheap identity of the encoded data (pairs, width, a checksum of ids and labels), stored next
        to precomputed reference log-probabilities so they are never reused on other data."""
        w = torch.arange(1, self.ids.numel() + 1, dtype=torch.float64).view_as(self.ids) % 9973
        return torch.tensor([len(self), self.ids.shape[1], float((self.ids.double() * w).sum()),
                             float((self.labels.double() * w).sum())], dtype=torch.float64)


def pair_batches(n: int, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless batches of pair indices, reshuffled every pass (the same on every rank for a seed)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=g)
        for s in range(0, max(1, n - batch_size + 1), batch_size):
            yield order[s:s + batch_size]


@torch.no_grad()
def win_rate(model: torch.nn.Module, tok: Any, prompts: list[str], rule: LengthRule | FormatRule,
             max_new_tokens: int | None = None, temperature: float = 0.0, seed: int = 0,
             batch_size: int = 16) -> dict[str, Any]:
    """The share of ``prompts`` whose generated response (greedy, or sampled at ``temperature``) the
    rule accepts; the rows are generated in batches, left-padded."""
    from efficientml.llm.generate import SamplingConfig, generate

    if tok.eos_id is None:
        raise ConfigError("win_rate needs a tokenizer with an EOS id (the rule judges where the response ends)")
    was = model.training
    model.eval()
    cfg = SamplingConfig(max_new_tokens=max_new_tokens or 2 * rule.max_tokens, temperature=temperature,
                         stop_token_ids=(tok.eos_id,), seed=seed if temperature > 0 else None)
    wins, lengths = [], []
    for s in range(0, len(prompts), batch_size):
        rows = [prompt_ids(tok, p) for p in prompts[s:s + batch_size]]
        out = generate(model, rows, cfg)
        for r in out.tokens:
            wins.append(rule(r, tok))
            lengths.append(r.index(tok.eos_id) if tok.eos_id in r else len(r))
    model.train(was)
    return {"win_rate": sum(wins) / max(1, len(wins)), "wins": int(sum(wins)), "prompts": len(wins),
            "mean_response_tokens": sum(lengths) / max(1, len(lengths)), "rule": rule.to_dict(),
            "temperature": temperature}
