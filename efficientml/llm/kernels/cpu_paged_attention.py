"""Paged attention for decoding on CPU (``csrc/paged_attention_f32.c``): each sequence's one query
attends to its keys/values where they lie in the serving engine's block pool, through its block
table — no gathered copy of the cache per step (what ``index_select`` + SDPA needs).

One OpenMP work item per (sequence, KV head); the query heads of a GQA group share every key and
value read; softmax in one pass (running max and sum). fp32 only; ``EFFICIENTML_CPU_GEMV=0`` turns
it off with the other CPU kernels. Built on first use like :mod:`.cpu_gemv` (same compiler search,
flags and cache); :func:`available` False and :func:`status` says why when it cannot be.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch

from efficientml.core.errors import ShapeError
from efficientml.llm.kernels import cpu_gemv

SOURCE = Path(__file__).with_name("csrc") / "paged_attention_f32.c"
MAX_GROUP, MAX_HEAD_DIM = 16, 256  # the C kernel's stack accumulators

_lock = threading.Lock()
_state: dict[str, object] = {}


def _load():
    if "fn" in _state:
        return _state["fn"]
    with _lock:
        if "fn" in _state:
            return _state["fn"]
        fn, (dll, status) = None, cpu_gemv.open_library(SOURCE)
        if dll is not None:
            fn = cpu_gemv.bind(dll, "efficientml_paged_attention_f32",
                               [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int64])
            status = f"on ({status})"
        _state.update(fn=fn, status=status)
        return fn


def available() -> bool:
    return _load() is not None


def status() -> str:
    _load()
    return str(_state["status"])


def supports(k_pool: torch.Tensor, num_heads: int) -> bool:
    """Whether a pool layer ``(num_blocks, bs, nkv, hd)`` and ``num_heads`` query heads can run here."""
    nkv, hd = k_pool.shape[-2], k_pool.shape[-1]
    return (k_pool.device.type == "cpu" and k_pool.dtype == torch.float32 and num_heads % nkv == 0
            and num_heads // nkv <= MAX_GROUP and hd <= MAX_HEAD_DIM and available())


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                           ctx: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor:
    """q (B, nh, hd); k_pool/v_pool (num_blocks, bs, nkv, hd) contiguous; tables (B, max_blocks) int64;
    ctx (B,) int64 keys per sequence → (B, nh, hd): softmax(q·kᵀ·scale)·v over each sequence's keys."""
    fn = _load()
    if fn is None:
        raise RuntimeError(f"the CPU paged-attention kernel is {status()}")
    B, nh, hd = q.shape
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()) or k_pool.shape[-1] != hd:
        raise ShapeError(f"pool layers must be contiguous (num_blocks, bs, nkv, {hd}); got {tuple(k_pool.shape)}")
    q = q.contiguous()
    tables, ctx = tables.contiguous(), ctx.contiguous()
    out = torch.empty_like(q)
    rc = fn(q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), tables.data_ptr(), ctx.data_ptr(),
            out.data_ptr(), B, tables.shape[1], nh, k_pool.shape[-2], hd, k_pool.shape[1], scale, window or 0)
    if rc != 0:
        raise ShapeError(f"paged attention: {nh} heads over {k_pool.shape[-2]} KV heads of {hd} is outside the "
                         f"kernel's limits (group ≤ {MAX_GROUP}, head_dim ≤ {MAX_HEAD_DIM})")
    return out
