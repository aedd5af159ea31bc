"""SFT data: examples → token ids + labels with the loss on response tokens only, then packed or padded.

An example is one JSON object (one per line of a .jsonl file) in one of three shapes:

- ``{"messages": [{"role": "user", "content": …}, …, {"role": "assistant", "content": …}]}``: rendered
  with the tokenizer's chat template; the loss covers the last (assistant) message only;
- ``{"prompt": …, "response": …}``: the same, as a one-turn chat;
- ``{"text": …}``: plain language modelling (every token is a target).

Labels are the input ids with ``IGNORE`` (−100) on prompt tokens; ``loss = CE(logits[:, :-1],
labels[:, 1:])``. Packing concatenates examples (each ending in EOS) into rows of ``max_length``
tokens, so no compute is spent on padding; without packing each example is one row, right-padded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from efficientml.core.errors import ConfigError, DataNotFoundError

IGNORE = -100
FALLBACK = "<|user|>\n{prompt}\n<|assistant|>\n"  # for a tokenizer without a chat template


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    from efficientml.core.paths import require_file
    from efficientml.data.text import decode_text

    path = require_file(path, "SFT data file (.jsonl)", DataNotFoundError)
    rows = []
    for i, line in enumerate(decode_text(path.read_bytes(), f"SFT data file {str(path)!r}").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"line {i} of {str(path)!r} is not valid JSON ({e.msg}); expected one object "
                              "per line") from None
        if not isinstance(row, dict):
            raise ConfigError(f"line {i} of {str(path)!r} is a {type(row).__name__}; expected a JSON object")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{str(path)!r} holds no examples; expected one JSON object per line")
    return rows


def _messages(ex: dict[str, Any], where: str) -> list[dict[str, str]] | None:
    if "messages" in ex:
        msgs = ex["messages"]
        if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) \
                or msgs[-1].get("role") != "assistant":
            raise ConfigError(f"{where}: 'messages' must be a list of chat messages ending with an "
                              "assistant message (the response the loss is on)")
        return msgs
    if "prompt" in ex and "response" in ex:
        return [{"role": "user", "content": str(ex["prompt"])}, {"role": "assistant", "content": str(ex["response"])}]
    if "text" in ex:
        return None
    raise ConfigError(f"{where} has fields {sorted(ex)}; expected 'messages', 'prompt' + 'response', or 'text'")


def encode_example(tok: Any, ex: dict[str, Any], where: str = "example") -> tuple[list[int], list[int]]:
    """(ids, labels) for one example; labels are IGNORE on the prompt, ids elsewhere; EOS appended."""
    msgs = _messages(ex, where)
    eos = [tok.eos_id] if tok.eos_id is not None else []
    if msgs is None:
        ids = tok.encode(str(ex["text"])) + eos
        return ids, list(ids)
    if getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True)
        full = tok.apply_chat_template(msgs, add_generation_prompt=False)
        response = full[len(prompt):] if full.startswith(prompt) else msgs[-1]["content"]
    else:
        prompt = "".join(FALLBACK.format(prompt=m["content"]) if m["role"] == "user" else m["content"] + "\n"
                         for m in msgs[:-1])
        response = msgs[-1]["content"]
    p_ids, r_ids = tok.encode(prompt), tok.encode(response, add_bos=False)
    if r_ids[-1:] != eos:
        r_ids = r_ids + eos
    return p_ids + r_ids, [IGNORE] * len(p_ids) + list(r_ids)


def encode_all(tok: Any, examples: list[dict[str, Any]], source: str = "data") -> list[tuple[list[int], list[int]]]:
    out = [encode_example(tok, ex, f"example {i + 1} of {source}") for i, ex in enumerate(examples)]
    if not any(any(t != IGNORE for t in lab) for _, lab in out):
        raise ConfigError(f"{source}: no example has a response token to train on")
    return out


def pack(encoded: list[tuple[list[int], list[int]]], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate and cut into (N, max_length) rows of ids and labels (the tail shorter than a row is dropped;
    a stream shorter than one row becomes one row)."""
    ids = [t for i, _ in encoded for t in i]
    labels = [t for _, lab in encoded for t in lab]
    n = max(1, len(ids) // max_length) * max_length
    ids, labels = ids[:n], labels[:n]
    rows = len(ids) // max_length if len(ids) >= max_length else 1
    width = max_length if len(ids) >= max_length else len(ids)
    return (torch.tensor(ids).view(rows, width), torch.tensor(labels).view(rows, width))


def pad(encoded: list[tuple[list[int], list[int]]], max_length: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One example per row, truncated to ``max_length`` and right-padded (labels IGNORE on padding)."""
    width = min(max_length, max(len(i) for i, _ in encoded))
    ids = torch.full((len(encoded), width), pad_id)
    labels = torch.full((len(encoded), width), IGNORE)
    for r, (i, lab) in enumerate(encoded):
        i, lab = i[:width], lab[:width]
        ids[r, :len(i)], labels[r, :len(lab)] = torch.tensor(i), torch.tensor(lab)
    return ids, labels


def lm_rows(ids: list[int], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A token stream (e.g. TinyShakespeare) cut into rows; every token is a target."""
    return pack([(ids, ids)], max_length)


def batches(ids: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int = 0,
            shuffle: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (ids, labels) batches, reshuffled every pass."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(ids.shape[0], generator=g) if shuffle else torch.arange(ids.shape[0])
        for s in range(0, ids.shape[0] - batch_size + 1 if ids.shape[0] >= batch_size else 1, batch_size):
            idx = order[s:s + batch_size]
            yield ids[idx], labels[idx]
