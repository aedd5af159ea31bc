"""ggml's block encoders (the inverse of :mod:`efficientml.llm.io.ggml_quants`' decoders), as its
reference quantizers compute them, byte for byte: per block of 32 weights, Q8_0 an fp16 scale
``d = max|w| / 127`` and int8 codes ``round(w / d)``; Q4_0 ``d`` = (the weight of largest magnitude) / −8
and codes 0…15 around 8; Q4_1 ``d = (max − min) / 15``, the minimum and codes 0…15 (two per byte).
A QuantLinear whose grid is Q4_0 / Q8_0 is written from its own codes and scales, exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from efficientml.llm.io.gguf import permute_rope_rows

BLOCK_BYTES = {8: 34, 2: 18, 3: 20}  # ggml type (Q8_0, Q4_0, Q4_1) → bytes per block of 32 weights


def _blocks(w: torch.Tensor) -> np.ndarray:
    return w.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1, 32)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(blocks, 32) codes 0…15 → (blocks, 16) bytes: weight j in the low nibble, j + 16 in the high."""
    q = q.astype(np.uint8)
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def quantize_q8_0(w: torch.Tensor) -> np.ndarray:
    """(rows, cols) float, cols a multiple of 32 → Q8_0 bytes: per block of 32, fp16 d then 32 int8."""
    x = _blocks(w)
    d = (np.abs(x).max(1, keepdims=True) / np.float32(127)).astype(np.float32)
    v = x * _inverse(d)
    q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))  # C roundf: halves away from zero
    return np.concatenate([_f16_bytes(d), q.astype(np.int8).view(np.uint8)], 1).reshape(-1)


def quantize_q4_0(w: torch.Tensor) -> np.ndarray:
    """Q4_0: per block of 32, fp16 d = (the weight of largest magnitude) / −8, codes ⌊w/d + 8.5⌋ ≤ 15."""
    x = _blocks(w)
    peak = np.take_along_axis(x, np.abs(x).argmax(1)[:, None], 1)  # signed
    d = (peak / np.float32(-8)).astype(np.float32)
    q = np.minimum(np.trunc(x * _inverse(d) + np.float32(8.5)), 15)
    return np.concatenate([_f16_bytes(d), _nibbles(q)], 1).reshape(-1)


def quantize_q4_1(w: torch.Tensor) -> np.ndarray:
    """Q4_1: per block of 32, fp16 d = (max − min) / 15, fp16 min, codes ⌊(w − min)/d + 0.5⌋ ≤ 15."""
    x = _blocks(w)
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    d = ((hi - lo) / np.float32(15)).astype(np.float32)
    q = np.minimum(np.trunc((x - lo) * _inverse(d) + np.float32(0.5)), 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _nibbles(q)], 1).reshape(-1)


def tensor_bytes(w: torch.Tensor, ggml_type: int) -> np.ndarray:
    if ggml_type == 0:
        return w.detach().to(torch.float32).contiguous().numpy().view(np.uint8).reshape(-1)
    if ggml_type == 1:
        return w.detach().to(torch.float16).contiguous().numpy().view(np.uint8).reshape(-1)
    if ggml_type == 30:
        return w.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8).reshape(-1)
    return {8: quantize_q8_0, 2: quantize_q4_0, 3: quantize_q4_1}[ggml_type](w)


def nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    n = int(np.prod(shape))
    return n * 4 if ggml_type == 0 else n * 2 if ggml_type in (1, 30) else n // 32 * BLOCK_BYTES[ggml_type]


def qlinear_bytes(mod: nn.Module, kind: int, heads: int | None) -> np.ndarray:
    """A QuantLinear's codes and fp16 scales as Q4_0 / Q8_0 blocks (rows permuted for llama Q/K)."""
    codes, scale = mod.codes(), mod.weight_scale.to(torch.float16)  # (out, in) uint8, (out, G)
    if heads is not None:
        codes, scale = permute_rope_rows(codes, heads), permute_rope_rows(scale, heads)
    u = codes.to("cpu").numpy().reshape(-1, 32)
    d = scale.to("cpu").numpy().reshape(-1, 1).view(np.uint8).reshape(-1, 2)
    if kind == 2:
        return np.concatenate([d, _nibbles(u)], 1).reshape(-1)
    q = (u.astype(np.int16) - 128).astype(np.int8).view(np.uint8)  # codes 0…255 around 128 → int8
    return np.concatenate([d, q], 1).reshape(-1)
