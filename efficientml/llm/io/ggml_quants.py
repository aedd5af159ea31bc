"""GGML block formats (the tensor encodings of GGUF files), decoded to float32 with numpy, vectorized
over every block of a tensor at once.

Each format stores a row as consecutive blocks of ``block`` weights in ``nbytes`` bytes. Decoded here:

  legacy, 32 weights per block
    Q4_0   f16 d, 16 B nibbles                          w = d·(q − 8)
    Q4_1   f16 d, f16 m, 16 B nibbles                   w = d·q + m
    Q5_0   f16 d, u32 5th bits, 16 B nibbles            w = d·(q − 16)
    Q5_1   f16 d, f16 m, u32 5th bits, 16 B nibbles     w = d·q + m
    Q8_0   f16 d, 32 × i8                               w = d·q
    IQ4_NL f16 d, 16 B nibbles                          w = d·T[q]   (T: a fixed non-uniform 16-level table)
  "k-quants", 256 weights per block (a super-block of 16 or 8 sub-blocks with their own quantized scales)
    Q2_K   16 B 4+4-bit scale/min, 64 B 2-bit q, f16 d, f16 dmin      w = d·s·q − dmin·m  (16 × 16)
    Q3_K   32 B high bits, 64 B 2-bit low, 12 B 6-bit scales, f16 d   w = d·(s − 32)·(q − 4)  (16 × 16)
    Q4_K   f16 d, f16 dmin, 12 B 6-bit scale/min, 128 B nibbles       w = d·s·q − dmin·m  (8 × 32)
    Q5_K   as Q4_K + 32 B of 5th bits                                 w = d·s·q − dmin·m  (8 × 32)
    Q6_K   128 B low nibbles, 64 B 2-bit high, 16 × i8 scales, f16 d  w = d·s·(q − 32)  (16 × 16)
    Q8_K   f32 d, 256 × i8, 16 × i16 block sums                       w = d·q
    IQ4_XS f16 d, u16 + 4 B 6-bit scales, 128 B nibbles               w = d·(s − 32)·T[q]  (8 × 32)

Nibble order: in the 32-weight formats byte j holds weight j (low half) and weight j+16 (high half); in
Q4_K/Q5_K each 32-byte group holds two 32-weight sub-blocks (low halves, then high halves). The
products are formed in the same order as llama.cpp's ``dequantize_row_*`` (scale·sub-scale first), so
the results equal the reference decoders bit for bit (tests/llm/test_gguf.py checks against the
``gguf`` package). Not decoded: the IQ1/IQ2/IQ3 grid formats and the ternary TQ formats.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from efficientml.core.errors import CheckpointError, UnsupportedError

# fixed level table of IQ4_NL / IQ4_XS
_IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                       dtype=np.float32)


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    """The f16 field at byte ``at`` of every block → (nblocks, 1) float32."""
    return np.ascontiguousarray(b[:, at:at + 2]).view(np.float16).astype(np.float32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """(nb, 16) bytes → (nb, 32) values: weight j is byte j's low half, weight j+16 its high half."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _q4_0(b):
    return (_nibbles32(b[:, 2:18]).astype(np.float32) - 8.0) * _f16(b, 0)


def _q4_1(b):
    return _nibbles32(b[:, 4:20]).astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def _fifth_bits(b: np.ndarray, at: int) -> np.ndarray:
    """The little-endian u32 at byte ``at``: bit j is the 5th bit of weight j → (nb, 32) of 0/16."""
    qh = np.ascontiguousarray(b[:, at:at + 4]).view("<u4")  # (nb, 1)
    return (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _q5_0(b):
    q = _nibbles32(b[:, 6:22]) | _fifth_bits(b, 2)
    return (q.astype(np.float32) - 16.0) * _f16(b, 0)


def _q5_1(b):
    q = _nibbles32(b[:, 8:24]) | _fifth_bits(b, 4)
    return q.astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def _q8_0(b):
    return np.ascontiguousarray(b[:, 2:34]).view(np.int8).astype(np.float32) * _f16(b, 0)


def _iq4_nl(b):
    return _IQ4_LEVELS[_nibbles32(b[:, 2:18])] * _f16(b, 0)


def _per16(scale: np.ndarray, q: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """w = scale·q (− offset) with one scale (and offset) per 16 weights: scale (nb, 16), q (nb, 256)."""
    w = scale[:, :, None] * q.reshape(q.shape[0], 16, 16).astype(np.float32)
    if offset is not None:
        w -= offset[:, :, None]
    return w.reshape(q.shape[0], 256)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """(nb, 64) bytes of 2-bit values → (nb, 256): in each 32-byte half, the four 2-bit planes
    (shift 0, 2, 4, 6) in turn, each plane 32 weights in byte order."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 256)


def _q2_k(b):
    sc = b[:, 0:16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    return _per16(d * (sc & 0x0F).astype(np.float32), _crumbs(b[:, 16:80]), dmin * (sc >> 4).astype(np.float32))


def _q3_k(b):
    hmask, s = b[:, 0:32], b[:, 96:108]
    low = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)  # (nb, 16) low 4 bits of each scale
    high = (s[:, 8:12][:, None, :] >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, :, None]) & 3  # (nb, 4, 4)
    scales = (low | (high.reshape(-1, 16) << 4)).astype(np.float32) - 32.0
    # the high bit of 2-bit plane j of half n is bit 4n + j of hmask; a clear bit subtracts 4
    bits = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (nb, 8, 32)
    q = _crumbs(b[:, 32:96]).astype(np.int8) - ((1 - bits.reshape(-1, 256)) << 2).astype(np.int8)
    return _per16(_f16(b, 108) * scales, q)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes → 8 six-bit scales and 8 six-bit mins, (nb, 8) each."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """(nb, 128) bytes → (nb, 8, 32): group g of 32 bytes is sub-block 2g (low halves) and 2g+1 (high)."""
    return (qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8)[None, None, :, None]).reshape(-1, 8, 32) & 0x0F


def _per32(d, dmin, s: np.ndarray, q: np.ndarray) -> np.ndarray:
    sc, mn = _scale_min_k4(s)
    w = (d * sc)[:, :, None] * q.astype(np.float32) - (dmin * mn)[:, :, None]  # (nb, 8, 32)
    return w.reshape(-1, 256)


def _q4_k(b):
    return _per32(_f16(b, 0), _f16(b, 2), b[:, 4:16], _k_nibbles(b[:, 16:144]))


def _q5_k(b):
    qh = b[:, 16:48]
    fifth = ((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4  # (nb, 8, 32)
    return _per32(_f16(b, 0), _f16(b, 2), b[:, 4:16], _k_nibbles(b[:, 48:176]) | fifth)


def _q6_k(b):
    ql, qh = b[:, 0:128].reshape(-1, 2, 2, 32), b[:, 128:192].reshape(-1, 2, 1, 32)
    # per 128-weight half: quarters are (low nibbles of ql[0:32], of ql[32:64], high nibbles of ...)
    low = np.stack([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 4, 32)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]) & 3  # (nb, 2, 4, 32)
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    scales = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    return _per16(_f16(b, 208) * scales, q.reshape(-1, 256))


def _q8_k(b):
    d = np.ascontiguousarray(b[:, 0:4]).view("<f4")
    return np.ascontiguousarray(b[:, 4:260]).view(np.int8).astype(np.float32) * d


def _iq4_xs(b):
    d = _f16(b, 0)
    sh = np.ascontiguousarray(b[:, 2:4]).view("<u2")  # (nb, 1): 2 high bits of each of 8 scales
    sl = b[:, 4:8]
    low = np.stack([sl & 0x0F, sl >> 4], axis=2).reshape(-1, 8)  # scale ib: byte ib/2, half ib%2
    high = (sh >> (2 * np.arange(8, dtype=np.uint16))) & 3
    scales = (low.astype(np.uint16) | (high << 4)).astype(np.float32) - 32.0  # (nb, 8)
    q = _IQ4_LEVELS[_nibbles32(b[:, 8:136].reshape(-1, 16)).reshape(-1, 8, 32)]  # (nb, 8, 32)
    return ((d * scales)[:, :, None] * q).reshape(-1, 256)


# name → (GGML type id, weights per block, bytes per block, decoder)
BLOCK_FORMATS: dict[str, tuple[int, int, int, Callable[[np.ndarray], np.ndarray]]] = {
    "Q4_0": (2, 32, 18, _q4_0), "Q4_1": (3, 32, 20, _q4_1), "Q5_0": (6, 32, 22, _q5_0),
    "Q5_1": (7, 32, 24, _q5_1), "Q8_0": (8, 32, 34, _q8_0), "Q2_K": (10, 256, 84, _q2_k),
    "Q3_K": (11, 256, 110, _q3_k), "Q4_K": (12, 256, 144, _q4_k), "Q5_K": (13, 256, 176, _q5_k),
    "Q6_K": (14, 256, 210, _q6_k), "Q8_K": (15, 256, 292, _q8_k), "IQ4_NL": (20, 32, 18, _iq4_nl),
    "IQ4_XS": (23, 256, 136, _iq4_xs),
}
# type ids of formats that are recognized (for sizes and messages) but not decoded
UNDECODED = {9: ("Q8_1", 32, 40), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
             19: ("IQ1_S", 256, 50), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 29: ("IQ1_M", 256, 56),
             34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66)}
SUPPORTED = ", ".join(["F32", "F16", "BF16", "F64", *BLOCK_FORMATS])
# (weights, bytes) per block of every block format named above, decoded or not
BLOCK_SIZES = {k: v[1:3] for k, v in BLOCK_FORMATS.items()} | {v[0]: v[1:3] for v in UNDECODED.values()}


def dequantize_blocks(raw: np.ndarray, kind: str, n_elements: int) -> np.ndarray:
    """Decode a block-format tensor's bytes (any shape, uint8) into ``n_elements`` float32 weights."""
    if kind not in BLOCK_FORMATS:
        raise UnsupportedError(f"GGML format {kind} is not decoded here; decoded: {SUPPORTED}")
    _, n, nbytes, decode = BLOCK_FORMATS[kind]
    buf = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if n_elements % n or buf.size != n_elements // n * nbytes:
        raise CheckpointError(f"{kind} tensor of {n_elements} weights has {buf.size} bytes, expected "
                              f"{n_elements // n * nbytes} ({n} weights per {nbytes}-byte block)")
    out = np.empty(n_elements, dtype=np.float32)
    step = max(1, (1 << 22) // n)  # 4M weights at a time: bounded temporaries for a 7B layer
    blocks = buf.reshape(-1, nbytes)
    for i in range(0, blocks.shape[0], step):
        part = blocks[i:i + step]
        out[i * n:(i + part.shape[0]) * n] = decode(part).reshape(-1)
    return out
