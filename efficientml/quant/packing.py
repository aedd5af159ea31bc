"""Dense bit packing of b-bit codes into int32 words — the compressed-tensors ``pack-quantized`` layout
that vLLM and transformers load.

Along each row, element ``i`` occupies bits ``i·b … i·b + b − 1`` of the row's bit stream, and word ``k``
holds bits ``32k … 32k + 31`` (little-endian, no padding bits; an element may straddle two words, as
3-bit codes do). Rows are padded to a multiple of 32 elements, so a row of ``n`` codes takes
``ceil(n·b / 32)`` words. compressed-tensors stores *signed* values ``q = u − 2^(b−1)`` offset back by
``2^(b−1)`` before packing, which is exactly our unsigned code ``u`` — so the words are identical.

For 4-bit codes the int32 words viewed as bytes are plain nibble pairs (low nibble first), which the
W4A16 linear unpacks with two byte operations.
"""

from __future__ import annotations

import math

import torch

from efficientml.core.errors import ShapeError


def packed_words(n: int, bits: int) -> int:
    return math.ceil(n * bits / 32)


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Codes (rows, n) with values in [0, 2^bits) → int32 (rows, ceil(n·bits/32)); ``dim=0`` packs
    along rows instead (compressed-tensors packs zero points that way)."""
    if codes.dim() != 2:
        raise ShapeError(f"pack_int32 expects a 2-D tensor, got shape {tuple(codes.shape)}")
    if not 1 <= bits <= 8:
        raise ShapeError(f"bits must be in [1, 8], got {bits}")
    if dim == 0:
        return pack_int32(codes.t(), bits, 1).t().contiguous()
    rows, n = codes.shape
    v = codes.to(torch.int64) & ((1 << bits) - 1)
    pad = (-n) % 32
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.reshape(rows, -1, 32)  # (rows, chunks, 32): 32 elements fill exactly `bits` words
    words = torch.zeros(rows, v.shape[1], bits, dtype=torch.int64, device=codes.device)
    for i in range(32):
        start = i * bits
        k, off = divmod(start, 32)
        words[:, :, k] |= (v[:, :, i] << off) & 0xFFFFFFFF
        if off + bits > 32:  # the element straddles into the next word
            words[:, :, k + 1] |= v[:, :, i] >> (32 - off)
    words = words.reshape(rows, -1)[:, :packed_words(n, bits)]
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # two's complement into int32
    return words.to(torch.int32).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words → uint8 codes (rows, n) (or (n, cols) for dim=0)."""
    if packed.dtype != torch.int32:
        raise ShapeError(f"packed weights must be int32, got {packed.dtype}")
    if dim == 0:
        return unpack_int32(packed.t().contiguous(), bits, n, 1).t().contiguous()
    rows, nw = packed.shape
    if nw != packed_words(n, bits):
        raise ShapeError(f"{nw} packed words per row do not hold {n} {bits}-bit values "
                         f"(expected {packed_words(n, bits)})")
    if bits == 4:  # nibbles never straddle bytes
        b = packed.contiguous().view(torch.uint8)  # (rows, 4·nw), little-endian
        return torch.stack((b & 15, b >> 4), dim=-1).reshape(rows, -1)[:, :n]
    w = packed.to(torch.int64) & 0xFFFFFFFF
    chunks = math.ceil(n / 32)
    need = chunks * bits
    if w.shape[1] < need:
        w = torch.nn.functional.pad(w, (0, need - w.shape[1]))
    w = w.reshape(rows, chunks, bits)
    mask = (1 << bits) - 1
    out = torch.empty(rows, chunks, 32, dtype=torch.int64, device=packed.device)
    for i in range(32):
        start = i * bits
        k, off = divmod(start, 32)
        val = w[:, :, k] >> off
        if off + bits > 32:
            val = val | (w[:, :, k + 1] << (32 - off))
        out[:, :, i] = val & mask
    return out.reshape(rows, -1)[:, :n].to(torch.uint8)
