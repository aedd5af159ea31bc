"""GGUF quantized matrices straight onto the quantized CPU kernel (``kernels.cpu_qgemv``): Q4_0, Q4_1,
Q8_0 blocks are the kernel's own layout (copied as they are), Q4_K super-blocks become eight 32-weight
blocks each with its scale d·sc and offset −dmin·m (the 4-bit codes re-packed, never turned into floats).
Other block types (Q5_*, Q6_K, Q2_K, Q3_K, IQ*) have no integer kernel here and load dequantized, as
before; :func:`quantized_linears` says which.

llama.cpp's converter interleaves each head's Q/K rows; rows of a QWeight are independent, so they
are put back in rotate-half order by the same row permutation as the float path.
"""

from __future__ import annotations

import numpy as np
import torch

from efficientml.llm.config import LlamaConfig
from efficientml.llm.io.ggml_quants import _f16, _k_nibbles, _scale_min_k4
from efficientml.llm.io.gguf import GGUFFile, TensorInfo, hf_name, unpermute_rope_rows
from efficientml.llm.kernels.cpu_qgemv import GGML_KINDS, QK, QWeight, _nibbles, pack_ggml
from efficientml.llm.kernels.qgemv_linear import QGemvLinear

KERNEL_KINDS = (*GGML_KINDS, "Q4_K")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _q4_k(raw: np.ndarray, shape: tuple[int, int]) -> QWeight:
    out, K = shape
    b = np.asarray(raw, dtype=np.uint8).reshape(out * K // 256, 144)
    sc, mn = _scale_min_k4(b[:, 4:16])  # (nb, 8) six-bit scales and mins
    d = torch.from_numpy((_f16(b, 0) * sc).reshape(out, K // QK))  # per 32 weights
    m = torch.from_numpy((-_f16(b, 2) * mn).reshape(out, K // QK))
    codes = torch.from_numpy(_k_nibbles(b[:, 16:144]).reshape(out, K))
    return QWeight(_nibbles(codes), d.contiguous(), m.contiguous(), 4)


def qweight_of(t: TensorInfo) -> QWeight | None:
    """The tensor in the kernel's layout, or None (a type the kernel does not take, or rows not in blocks of 32)."""
    if t.kind not in KERNEL_KINDS or len(t.shape) != 2 or t.shape[1] % QK:
        return None
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
