"""GGUF quantized matrices straight onto the quantized CPU kernel (``kernels.cpu_qgemv``): Q4_0, Q4_1,
Q8_0 blocks are the kernel's own layout (copied as they are), Q4_K super-blocks become eight 32-weight
blocks each with its scale d·sc and offset −dmin·m (the 4-bit codes re-packed, never turned into floats).
Five-bit types run on the 8-bit kernel with their codes as int8 (exact; 8 bits a weight instead of 5.5–6):
Q5_0 as q − 16 with d, Q5_1 as q with d and m, Q5_K as q with d·sc and −dmin·m per 32 weights.
Other block types (Q6_K: scales per 16 weights; Q2_K, Q3_K, IQ*) have no integer kernel here and load
dequantized, as before; :func:`quantized_linears` says which.

llama.cpp's converter interleaves each head's Q/K rows; rows of a QWeight are independent, so they
are put back in rotate-half order by the same row permutation as the float path.
"""

from __future__ import annotations

import numpy as np
import torch

from efficientml.llm.config import LlamaConfig
from efficientml.llm.io.ggml_quants import _f16, _fifth_bits, _k_nibbles, _nibbles32, _scale_min_k4
from efficientml.llm.io.gguf import GGUFFile, TensorInfo, hf_name, unpermute_rope_rows
from efficientml.llm.kernels.cpu_qgemv import GGML_KINDS, QK, QWeight, _nibbles, pack_ggml
from efficientml.llm.kernels.qgemv_linear import QGemvLinear

KERNEL_KINDS = (*GGML_KINDS, "Q4_K", "Q5_0", "Q5_1", "Q5_K")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _q4_k(raw: np.ndarray, shape: tuple[int, int]) -> QWeight:
    out, K = shape
    b = np.asarray(raw, dtype=np.uint8).reshape(out * K // 256, 144)
    sc, mn = _scale_min_k4(b[:, 4:16])  # (nb, 8) six-bit scales and mins
    d = torch.from_numpy((_f16(b, 0) * sc).reshape(out, K // QK))  # per 32 weights
    m = torch.from_numpy((-_f16(b, 2) * mn).reshape(out, K // QK))
    codes = torch.from_numpy(_k_nibbles(b[:, 16:144]).reshape(out, K))
    return QWeight(_nibbles(codes), d.contiguous(), m.contiguous(), 4)


def _q5(kind: str, raw: np.ndarray, shape: tuple[int, int]) -> QWeight:
    """Q5_0 / Q5_1 (32-weight blocks) or Q5_K (256) as 8-bit codes on the 8-bit kernel, exactly."""
    out, K = shape
    if kind == "Q5_K":
        b = np.asarray(raw, dtype=np.uint8).reshape(out * K // 256, 176)
        sc, mn = _scale_min_k4(b[:, 4:16])
        fifth = ((b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4
        q = (_k_nibbles(b[:, 48:176]) | fifth).astype(np.int8)
        d, m = _f16(b, 0) * sc, -_f16(b, 2) * mn
    else:
        one = kind == "Q5_1"
        b = np.asarray(raw, dtype=np.uint8).reshape(out * K // QK, 24 if one else 22)
        q = (_nibbles32(b[:, 8 if one else 6:]) | _fifth_bits(b, 4 if one else 2)).astype(np.int8)
        d, m = _f16(b, 0), (_f16(b, 2) if one else None)
        if not one:
            q = q - np.int8(16)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(out, K // QK))  # noqa: E731
    return QWeight(torch.from_numpy(q.reshape(out, K).copy()), t(d), None if m is None else t(m), 8)


def qweight_of(t: TensorInfo) -> QWeight | None:
    """The tensor in the kernel's layout, or None (a type the kernel does not take, or rows not in blocks of 32)."""
    if t.kind not in KERNEL_KINDS or len(t.shape) != 2 or t.shape[1] % QK:
        return None
    if t.kind in ("Q5_0", "Q5_1", "Q5_K"):
        return None if t.kind == "Q5_K" and t.shape[1] % 256 else _q5(t.kind, t.data, t.shape)
    return _q4_k(t.data, t.shape) if t.kind == "Q4_K" else pack_ggml(t.kind, t.data, t.shape)


def _unpermuted(w: QWeight, n_heads: int) -> QWeight:
    def rows(x):
        return None if x is None else unpermute_rope_rows(x, n_heads).contiguous()

    return QWeight(rows(w.qs), rows(w.d), rows(w.m), w.bits)


def quantized_linears(gf: GGUFFile, cfg: LlamaConfig) -> dict[str, QGemvLinear]:
    """``{module name: QGemvLinear}`` for every linear of the file stored in a kernel block type (the
    output matrix too: ``lm_head`` from ``output.weight``, or from the tied ``token_embd.weight``, whose
    float copy the embedding lookup still gets)."""
    permute = gf.family.gguf.permute_qk
    mods: dict[str, QGemvLinear] = {}
    for t in gf.infos:
        name = hf_name(t.name, gf.arch)
        if name is None or not name.endswith(".weight"):
            continue
        module = name.removesuffix(".weight")
        head = module == "lm_head" or (module == "model.embed_tokens" and cfg.tie_word_embeddings)
        if not head and module.rsplit(".", 1)[-1] not in LINEARS:
            continue
        w = qweight_of(t)
        if w is None:
            continue
        if permute and module.endswith("self_attn.q_proj"):
            w = _unpermuted(w, cfg.num_attention_heads)
        elif permute and module.endswith("self_attn.k_proj"):
            w = _unpermuted(w, cfg.num_key_value_heads)
        mods["lm_head" if head else module] = QGemvLinear(w)
    return mods
