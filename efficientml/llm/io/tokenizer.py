"""Tokenizer: a ``tokenizers`` BPE built from tokenizer.json or from a GGUF vocabulary + merges, its
special tokens, and the model's chat template (Jinja, rendered like transformers does: sandboxed,
``trim_blocks`` and ``lstrip_blocks``).

    tok = Tokenizer.from_gguf(gguf_file)         # or Tokenizer.from_folder("path/to/hf_model")
    ids = tok.encode("Hello")                    # BOS added only when the model's tokenizer adds one
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from efficientml.core.errors import CheckpointError, ConfigError, UnsupportedError
from efficientml.core.lazy import optional_import

# How a byte-level BPE splits text before merging, by llama.cpp's ``tokenizer.ggml.pre`` name: the
# split regex of the model's own tokenizer.json (None: GPT-2's, built into ByteLevel; "digits": every
# digit alone, then GPT-2's). Names not listed are refused rather than split the wrong way.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one at a time
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS: dict[str, str | None] = {
    "default": None, "gpt-2": None, "gpt2": None,
    "smollm": "digits", "starcoder": "digits", "refact": "digits",
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}


def _byte_level_bpe(tk: Any, gf: Any, tokens: list[str]) -> Any:
    merges = gf.field("tokenizer.ggml.merges")
    if merges is None:
        raise CheckpointError(f"{gf.path.name}: GGUF byte-level tokenizer has no merges")
    pre = gf.meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_SPLITS:
        raise UnsupportedError(f"{gf.path.name}: GGUF pre-tokenizer {pre!r} is not known, so text would be "
                               f"split wrongly; known: {', '.join(PRE_SPLITS)}. Load the model's Hugging Face "
                               "folder (tokenizer.json) instead")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = tk.Tokenizer(tk.models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    split = PRE_SPLITS[pre]
    if split is None:
        backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        backend.pre_tokenizer = tk.pre_tokenizers.Sequence([
            tk.pre_tokenizers.Digits(individual_digits=True),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        backend.pre_tokenizer = tk.pre_tokenizers.Sequence([
            tk.pre_tokenizers.Split(tk.Regex(split), behavior="isolated"),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = tk.decoders.ByteLevel()
    return backend


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps no merge list: a pair of adjacent pieces merges when the joined piece is
    in the vocabulary, higher-scored joined pieces first. Every (left, right) split of every token
    whose halves are both tokens, ranked by the token's score (ties: longer left, then longer right
    piece, then vocabulary order)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, (t, s) in enumerate(zip(tokens, scores)):
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in vocab and right in vocab:
                ranked.append((-float(s), -len(left), -len(right), i, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(r[6], r[7]) for r in ranked]


def _sentencepiece_bpe(tk: Any, tokens: list[str], scores: list[float], types: list[int], prefix: bool,
                       byte_fallback: bool = True, normalize: list | None = None) -> Any:
    """A SentencePiece BPE: merges from the scores, text normalized in SentencePiece's order (``normalize``:
    NFKC / whitespace folding steps, then spaces escaped to "▁", then the dummy prefix: "Hi" is encoded as
    "▁Hi", "  Hi" as "▁▁▁Hi"). The prefix goes before every stretch of text between special tokens, as
    llama.cpp and transformers' (legacy) Llama tokenizer put it."""
    unk = next((t for t, ty in zip(tokens, types) if ty == 2), None)
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = tk.Tokenizer(tk.models.BPE(vocab, spm_merges(tokens, scores), unk_token=unk, fuse_unk=True,
                                         byte_fallback=byte_fallback))
    steps = list(normalize or []) + [tk.normalizers.Replace(" ", "\u2581")]
    if prefix:
        steps.append(tk.normalizers.Prepend("\u2581"))
    backend.normalizer = tk.normalizers.Sequence(steps)
    steps = [tk.decoders.Replace("\u2581", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse()]
    if prefix:
        steps.append(tk.decoders.Strip(" ", 1, 0))
    backend.decoder = tk.decoders.Sequence(steps)
    return backend


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    tc = folder / "tokenizer_config.json"
    if not tc.is_file():
        return {}
    try:
        conf = json.loads(tc.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(tc)!r} is not valid JSON ({e})") from None
    return conf if isinstance(conf, dict) else {}


def _tok_str(v: Any) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def _chat_template(folder: Path, conf: dict[str, Any]) -> str | None:
    """tokenizer_config's chat_template (a string, or named templates: "default"), else chat_template.jinja."""
    template = conf.get("chat_template")
    tfile = folder / "chat_template.jinja"
    if template is None and tfile.is_file():
        template = tfile.read_text()
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


class Tokenizer:
    def __init__(self, backend: Any, bos_token: str | None = None, eos_token: str | None = None,
                 add_bos: bool = False, chat_template: str | None = None,
                 pad_token: str | None = None) -> None:
        self.backend = backend  # tokenizers.Tokenizer
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._template = None
        # a SentencePiece tokenizer read from GGUF keeps its piece scores (writing GGUF needs them)
        self.gguf_scores: list[float] | None = None
        self.gguf_add_space_prefix = True

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        """tokenizer.json (+ tokenizer_config.json: special tokens, BOS, chat template); a folder with only
        a SentencePiece tokenizer.model (older Llama-2-style repos) is read from that."""
        tk = optional_import("tokenizers", "llm", "tokenization")
        folder = Path(folder)
        conf = _tokenizer_config(folder)
        tj, sp = folder / "tokenizer.json", folder / "tokenizer.model"
        if not tj.is_file() and sp.is_file():
            return cls._from_sentencepiece(tk, sp, conf)
        if not tj.is_file():
            raise CheckpointError(f"{str(folder)!r} has no tokenizer.json (or SentencePiece tokenizer.model)")
        try:
            backend = tk.Tokenizer.from_file(str(tj))
        except Exception as e:  # noqa: BLE001 — tokenizers raises plain Exception subclasses
            raise CheckpointError(f"{str(tj)!r} is not a valid tokenizer.json ({e})") from None
        return cls(backend, _tok_str(conf.get("bos_token")), _tok_str(conf.get("eos_token")),
                   bool(conf.get("add_bos_token", False)), _chat_template(folder, conf),
                   _tok_str(conf.get("pad_token")))

    @classmethod
    def _from_sentencepiece(cls, tk: Any, path: Path, conf: dict[str, Any]) -> "Tokenizer":
        """A SentencePiece BPE model as transformers' LlamaTokenizer uses it: BOS added unless
        tokenizer_config.json says otherwise; added_tokens_decoder entries past the model's pieces."""
        from efficientml.llm.io.sentencepiece_model import read_sentencepiece_model

        m = read_sentencepiece_model(path)
        if m.model_type != "bpe":
            raise UnsupportedError(f"{str(path)!r} is a SentencePiece {m.model_type} model; LLaMA-family models "
                                   "use BPE (unigram is T5's) — load a folder with tokenizer.json instead")
        if m.treat_whitespace_as_suffix or not m.escape_whitespaces:
            raise UnsupportedError(f"{str(path)!r}: SentencePiece models that put whitespace after pieces or "
                                   "keep it unescaped are not supported")
        norms = [tk.normalizers.Precompiled(m.precompiled_charsmap)] if m.precompiled_charsmap else []
        if m.remove_extra_whitespaces:  # SentencePiece drops leading, trailing and repeated spaces (only spaces)
            norms += [tk.normalizers.Replace(tk.Regex(r"\A +| +\z"), ""),
                      tk.normalizers.Replace(tk.Regex(" {2,}"), " ")]
        backend = _sentencepiece_bpe(tk, m.pieces, m.scores, m.types, m.add_dummy_prefix, m.byte_fallback, norms)
        backend.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(m.pieces, m.types) if ty in (2, 3)])
        backend.add_tokens([tk.AddedToken(t, special=False, normalized=False)
                            for t, ty in zip(m.pieces, m.types) if ty == 4])
        extra = conf.get("added_tokens_decoder") or {}
        try:
            extra = {int(k): e for k, e in extra.items() if isinstance(e["content"], str)}
        except (AttributeError, KeyError, TypeError, ValueError):
            raise CheckpointError("tokenizer_config.json: added_tokens_decoder must map token ids to "
                                  '{"content": ...} entries') from None
        for i in sorted(k for k in extra if k >= len(m.pieces)):
            e = extra[i]
            if backend.get_vocab_size(with_added_tokens=True) != i:
                raise CheckpointError(f"tokenizer_config.json adds token {i} ({e.get('content')!r}) but the "
                                      f"vocabulary ends at {backend.get_vocab_size(with_added_tokens=True) - 1}")
            tok = tk.AddedToken(e["content"], special=bool(e.get("special", True)), normalized=False)
            (backend.add_special_tokens if tok.special else backend.add_tokens)([tok])
        bos = _tok_str(conf.get("bos_token")) or m.piece(m.bos_id)
        eos = _tok_str(conf.get("eos_token")) or m.piece(m.eos_id)
        pad = _tok_str(conf.get("pad_token")) or m.piece(m.pad_id)
        tok = cls(backend, bos, eos, bool(conf.get("add_bos_token", True)), _chat_template(path.parent, conf), pad)
        # a GGUF written from this folder keeps the SentencePiece vocabulary (added tokens scored as llama.cpp)
        n_added = backend.get_vocab_size(with_added_tokens=True) - len(m.pieces)
        tok.gguf_scores = list(m.scores) + [-1000.0] * n_added
        tok.gguf_add_space_prefix = m.add_dummy_prefix
        return tok

    @classmethod
    def from_gguf(cls, gf: Any) -> "Tokenizer":
        """Build the tokenizer a GGUF file describes: a byte-level BPE (``tokenizer.ggml.model`` "gpt2",
        from tokens + merges, split by the ``tokenizer.ggml.pre`` regex) or a SentencePiece BPE
        ("llama": Llama-2, Mistral, TinyLlama; merges rebuilt from the token scores, byte fallback)."""
        tk = optional_import("tokenizers", "llm", "tokenization")
        model = gf.meta.get("tokenizer.ggml.model")
        tokens = gf.field("tokenizer.ggml.tokens")
        if not tokens:
            raise CheckpointError(f"{gf.path.name}: GGUF file has no tokenizer vocabulary")
        types = gf.field("tokenizer.ggml.token_type") or [1] * len(tokens)
        if model == "gpt2":
            backend = _byte_level_bpe(tk, gf, tokens)
        elif model == "llama":
            scores = gf.field("tokenizer.ggml.scores")
            if scores is None or len(scores) != len(tokens):
                raise CheckpointError(f"{gf.path.name}: GGUF SentencePiece tokenizer needs one score per token")
            prefix = bool(gf.meta.get("tokenizer.ggml.add_space_prefix", True))
            backend = _sentencepiece_bpe(tk, tokens, scores, types, prefix)
        else:
            raise CheckpointError(f"{gf.path.name}: GGUF tokenizer model {model!r} is not supported; expected "
                                  "'gpt2' (byte-level BPE) or 'llama' (SentencePiece BPE)")
        # matched whole before BPE: unknown (2) and control (3) tokens as special, user-defined (4) as plain
        backend.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types) if ty in (2, 3)])
        backend.add_tokens([tk.AddedToken(t, special=False, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 4])

        def name(key: str) -> str | None:
            i = gf.meta.get(key)
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        tok = cls(backend, name("tokenizer.ggml.bos_token_id"), name("tokenizer.ggml.eos_token_id"),
                  bool(gf.meta.get("tokenizer.ggml.add_bos_token", model == "llama")),
                  gf.meta.get("tokenizer.chat_template"), name("tokenizer.ggml.padding_token_id"))
        if model == "llama":
            tok.gguf_scores = [float(x) for x in gf.field("tokenizer.ggml.scores")]
            tok.gguf_add_space_prefix = bool(gf.meta.get("tokenizer.ggml.add_space_prefix", True))
        return tok

    # --- ids --------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    # --- chat -------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        if not self.chat_template:
            raise ConfigError("this tokenizer has no chat template; pass plain text instead of messages")
        from efficientml.llm.io import chat_template as ct

        ct.check_variables(extra)
        if self._template is None:
            self._template = ct.compile_template(self.chat_template)
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ConfigError(f"each chat message needs 'role' and 'content', got {m!r}")
        return ct.render(self._template, {"messages": messages, "add_generation_prompt": add_generation_prompt,
                                          "bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                                          **extra})

    # --- saving -----------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into ``folder``."""
        folder = Path(folder)
        backend = self.backend
        if self.add_bos and self.bos_id is not None and backend.post_processor is None:
            # transformers adds BOS through tokenizer.json's post-processor, not tokenizer_config's flag
            tk = optional_import("tokenizers", "llm", "tokenization")
            backend = tk.Tokenizer.from_str(backend.to_str())
            b = self.bos_token
            backend.post_processor = tk.processors.TemplateProcessing(
                single=f"{b}:0 $A:0", pair=f"{b}:0 $A:0 {b}:1 $B:1", special_tokens=[(b, self.bos_id)])
        backend.save(str(folder / "tokenizer.json"))
        added = {}
        for i, t in sorted(self.backend.get_added_tokens_decoder().items()):
            added[str(i)] = {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip,
                             "normalized": t.normalized, "single_word": t.single_word, "special": t.special}
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos,
                "add_eos_token": False, "bos_token": self.bos_token, "eos_token": self.eos_token,
                "pad_token": self.pad_token, "unk_token": None, "clean_up_tokenization_spaces": False,
                "model_max_length": 1_000_000_000, "added_tokens_decoder": added}
        if self.chat_template:
            conf["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")


class StreamDecoder:
    """Turns a stream of token ids into text pieces; holds back an incomplete UTF-8 character."""

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok, self.skip = tok, skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0  # characters already returned

    def put(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        if len(self.ids) > 64:  # keep decoding cost flat: restart from the last few tokens
            self.ids = self.ids[-8:]
            self.emitted = len(self.tok.decode(self.ids, skip_special_tokens=self.skip))
        return piece
