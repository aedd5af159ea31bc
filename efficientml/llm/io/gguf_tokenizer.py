"""A tokenizer as GGUF's ``tokenizer.ggml.*`` metadata, as llama.cpp's converter writes it: tokens in id
order with their types, byte-level BPE merges and the ``tokenizer.ggml.pre`` name of its split, or a
SentencePiece tokenizer (from a GGUF file) with its scores; special token ids and the chat template.
"""

from __future__ import annotations

import json
from typing import Any

from efficientml.core.errors import ConfigError, UnsupportedError
from efficientml.llm.config import LlamaConfig
from efficientml.llm.io.tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT, _TEKKEN_SPLIT, Tokenizer


def _pre_name(pre: dict | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizer.json pre-tokenizer; refuse unknown splits."""
    if pre is None:
        raise UnsupportedError("the tokenizer has no pre-tokenizer; llama.cpp's byte-level BPE needs one")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        kinds = [s.get("type") for s in steps]
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
                and steps[1].get("use_regex", True):
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            regex = steps[0].get("pattern", {}).get("Regex")
            for name, split in (("llama-bpe", _LLAMA3_SPLIT), ("qwen2", _QWEN2_SPLIT), ("tekken", _TEKKEN_SPLIT)):
                if regex == split:
                    return name
    raise UnsupportedError(f"the tokenizer splits text with {json.dumps(pre)[:200]}, which has no llama.cpp "
                           "pre-tokenizer name here; known: GPT-2, SmolLM digits, Llama-3, Qwen2, Tekken")


def _normalizes(spec: dict | None) -> bool:
    """Whether a tokenizer.json normalizer does more than SentencePiece's escaping and dummy prefix
    (which llama.cpp's "llama" tokenizer does itself)."""
    steps = (spec or {}).get("normalizers", [spec] if spec else [])
    return any(st.get("type") not in ("Replace", "Prepend") or
               (st.get("type") == "Replace" and st.get("pattern", {}).get("String") != " ") for st in steps)


def tokenizer_metadata(tok: Tokenizer, vocab_size: int, cfg: LlamaConfig) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` keys for ``tok``, padded to the model's ``vocab_size``."""
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedError(f"tokenizer model {model.get('type')!r} is not written to GGUF; BPE is")
    vocab, tokens, types = _token_table(spec, vocab_size)
    if model.get("byte_fallback") or getattr(tok, "gguf_scores", None) is not None:
        meta = _sentencepiece_meta(tok, spec, vocab, tokens, types, vocab_size)
    else:
        meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_name(spec.get("pre_tokenizer")),
                "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]}
    meta["tokenizer.ggml.tokens"] = tokens
    meta["tokenizer.ggml.token_type"] = types
    for k, v in _special_ids(tok, cfg).items():
        if v is not None:
            meta[f"tokenizer.ggml.{k}"] = int(v)
    meta["tokenizer.ggml.add_bos_token"] = bool(tok.add_bos)
    meta["tokenizer.ggml.add_eos_token"] = False
    if tok.chat_template:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta


def _token_table(spec: dict, vocab_size: int) -> tuple[dict[str, int], list[str], list[int]]:
    """(token → id, tokens by id, their GGUF types) padded to ``vocab_size``: 1 normal, 3 control (special
    added tokens), 4 user-defined (other added tokens), 5 unused (padding)."""
    vocab: dict[str, int] = dict(spec.get("model", {}).get("vocab", {}))
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise ConfigError(f"the tokenizer has {n} tokens but the model's vocabulary is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # unused until filled
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = 1
    for i, a in added.items():
        types[i] = 3 if a.get("special") else 4
    return vocab, tokens, types


def _sentencepiece_meta(tok: Tokenizer, spec: dict, vocab: dict[str, int], tokens: list[str], types: list[int],
                        vocab_size: int) -> dict[str, Any]:
    """SentencePiece-style BPE: llama.cpp's "llama" tokenizer, with scores (``types`` gains byte and
    unknown tokens in place)."""
    n = max(vocab.values()) + 1
    scores = getattr(tok, "gguf_scores", None)
    if scores is None or len(scores) != n:
        raise UnsupportedError("a SentencePiece tokenizer is written to GGUF only with its piece scores (a "
                               "tokenizer loaded from a GGUF file keeps them); this one came from "
                               "tokenizer.json")
    if _normalizes(spec.get("normalizer")):
        raise UnsupportedError("this SentencePiece tokenizer normalizes text (NFKC or whitespace folding), "
                               "which llama.cpp's tokenizer does not: a GGUF file would tokenize differently")
    for i, t in enumerate(tokens[:n]):
        if types[i] == 1 and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = 6  # byte tokens
    unk = spec.get("model", {}).get("unk_token")
    if unk in vocab:
        types[vocab[unk]] = 2
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": list(scores) + [-1000.0] * (vocab_size - n),
            "tokenizer.ggml.add_space_prefix": bool(getattr(tok, "gguf_add_space_prefix", True))}


def _special_ids(tok: Tokenizer, cfg: LlamaConfig) -> dict[str, int | None]:
    """BOS/EOS/padding ids, and the config's other stop tokens as end of turn / of message (Llama-3.1)."""
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "padding_token_id": tok.token_id(tok.pad_token)}
    stops = [i for i in cfg.eos_token_ids if i != tok.eos_id]
    if ids["eos_token_id"] is None and cfg.eos_token_ids:
        ids["eos_token_id"], stops = cfg.eos_token_ids[0], cfg.eos_token_ids[1:]
    for key, i in zip(("eot_token_id", "eom_token_id"), stops):
        ids[key] = i
    if ids["bos_token_id"] is None and cfg.bos_token_id is not None:
        ids["bos_token_id"] = cfg.bos_token_id
    return ids
