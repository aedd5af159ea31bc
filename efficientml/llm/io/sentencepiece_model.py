"""Read a SentencePiece ``tokenizer.model`` (the ``ModelProto`` protobuf that Llama-2, Vicuna, Mistral
and other older Hub repos ship instead of, or beside, tokenizer.json) without the sentencepiece or
protobuf packages: its pieces, scores and types, the special ids, and the normalizer settings.

Only the fields tokenization depends on are decoded (field numbers from sentencepiece_model.proto);
the rest are skipped by wire type. :class:`~efficientml.llm.io.tokenizer.Tokenizer` builds its BPE from
this the way it does from a GGUF SentencePiece vocabulary.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from efficientml.core.errors import CheckpointError

MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


@dataclass
class SentencePieceModel:
    pieces: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    # 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte (GGUF's token types are the same)
    types: list[int] = field(default_factory=list)
    model_type: str = "unigram"  # the proto's default
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    treat_whitespace_as_suffix: bool = False
    normalizer: str = ""  # the normalization rule's name ("identity" for Llama)
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True

    def piece(self, i: int) -> str | None:
        return self.pieces[i] if 0 <= i < len(self.pieces) else None


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("varint runs past the end")
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf: bytes):
    """(field number, wire type, value) of one message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _varint(buf, i)
        elif wire == 1:
            val, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            val, i = buf[i:i + n], i + n
        elif wire == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire} (field {num}) is not used by this format")
        if i > len(buf):
            raise ValueError(f"field {num} runs past the end")
        yield num, wire, val


def _int32(v: int) -> int:
    """A varint-encoded int32 (negative values are sign-extended to 64 bits)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def read_sentencepiece_model(path: str | Path) -> SentencePieceModel:
    """Parse ``tokenizer.model``; a truncated or foreign file is a :class:`CheckpointError`."""
    path = Path(path)
    m = SentencePieceModel()
    try:
        for num, wire, val in _fields(path.read_bytes()):
            if num == 1 and wire == 2:
                piece, score, kind = None, 0.0, 1
                for n, w, v in _fields(val):
                    if n == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif n == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3 and w == 0:
                        kind = int(v)
                if piece is None:
                    raise ValueError(f"piece {len(m.pieces)} has no text")
                m.pieces.append(piece)
                m.scores.append(score)
                m.types.append(kind)
            elif num == 2 and wire == 2:
                for n, w, v in _fields(val):
                    if w != 0:
                        continue
                    if n == 3:
                        m.model_type = MODEL_TYPES.get(int(v), f"type {v}")
                    elif n == 24:
                        m.treat_whitespace_as_suffix = bool(v)
                    elif n == 35:
                        m.byte_fallback = bool(v)
                    elif n in (40, 41, 42, 43):
                        setattr(m, {40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}[n], _int32(v))
            elif num == 3 and wire == 2:
                for n, w, v in _fields(val):
                    if n == 1 and w == 2:
                        m.normalizer = v.decode("utf-8")
                    elif n == 2 and w == 2:
                        m.precompiled_charsmap = bytes(v)
                    elif n in (3, 4, 5) and w == 0:
                        setattr(m, {3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                                    5: "escape_whitespaces"}[n], bool(v))
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(f"{str(path)!r} is truncated or not a SentencePiece model ({e})") from None
    if not m.pieces:
        raise CheckpointError(f"{str(path)!r} is not a SentencePiece model (no pieces)")
    return m
