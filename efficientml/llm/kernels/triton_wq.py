"""Fused weight-only quantized matmul for CUDA in Triton: ``out = x @ dequant(W).T`` without ever
materializing the dense weight. Reads :class:`~efficientml.llm.kernels.qlinear.QuantLinear`'s buffers
as they are stored (the compressed-tensors ``pack-quantized`` bit stream, see ``packing.py``):

- ``weight_packed`` int32 (N, ceil(K·b/32)): code ``k`` of row ``n`` is bits ``k·b … k·b+b−1`` of the
  row's little-endian bit stream (a 3-bit code may straddle two words);
- ``weight_scale`` (N, G) fp16/bf16/fp32, one scale per group of ``K / G`` inputs;
- ``weight_zero_point`` int32 (ceil(N·b/32), G) packed along the output axis, or None (symmetric:
  zero point ``2^(b−1)``).

Each program computes a (BLOCK_M, BLOCK_N) tile: for every BLOCK_K slice it loads the packed words of
its (BLOCK_K, BLOCK_N) weight tile, extracts the codes with shifts and masks, applies ``(u − z) · s``
in fp32, casts to the activation dtype and accumulates ``tl.dot`` in fp32. Batch-1 decode is
bandwidth bound, so reading b/16 of the fp16 weight bytes is where the speedup comes from.

Correctness is tested against :meth:`QuantLinear.dequantize` (on CPU with Triton's interpreter,
``TRITON_INTERPRET=1``, and on CUDA where present).
"""

from __future__ import annotations

import os

import torch

from efficientml.core.errors import ShapeError, UnsupportedError

try:  # CUDA machines have it; elsewhere the dequantize-then-matmul path runs
    import triton
except ImportError:
    triton = None

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _codes(ptr, row, col, stride_row, stride_col, pos, BITS: tl.constexpr, mask):
        """b-bit codes at bit stream positions ``pos`` of rows ``row`` (broadcast shapes)."""
        bit = pos * BITS
        word = bit // 32
        off = bit % 32
        w0 = tl.load(ptr + row * stride_row + (col + word) * stride_col, mask=mask, other=0)
        w0 = w0.to(tl.uint32, bitcast=True)
        v = w0 >> off.to(tl.uint32)
        if (32 % BITS) != 0:  # codes may straddle two words
            spill = (off + BITS) > 32
            w1 = tl.load(ptr + row * stride_row + (col + word + 1) * stride_col, mask=mask & spill, other=0)
            w1 = w1.to(tl.uint32, bitcast=True)
            v = v | tl.where(spill, w1 << (32 - off).to(tl.uint32), 0)
        return (v & ((1 << BITS) - 1)).to(tl.int32)

    @triton.jit
    def _wq_matmul_kernel(x_ptr, wp_ptr, s_ptr, z_ptr, b_ptr, o_ptr, M, N, K: tl.constexpr, GROUP,
                          stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg,
                          stride_zr, stride_zg, stride_om, stride_on,
                          BITS: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
                          PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # K is a compile-time constant: one kernel per layer width
            rk = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            xm = (rm[:, None] < M) & (rk[None, :] < K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=xm, other=0.0)
            wm = (rk[:, None] < K) & (rn[None, :] < N)  # (BK, BN)
            u = _codes(wp_ptr, rn[None, :], 0, stride_wn, stride_wk, rk[:, None], BITS, wm)
            g = rk[:, None] // GROUP  # (BK, 1) group of each input
            s = tl.load(s_ptr + rn[None, :] * stride_sn + g * stride_sg, mask=wm, other=0.0).to(tl.float32)
            if HAS_ZP:
                z = _codes(z_ptr, g, 0, stride_zg, stride_zr, rn[None, :], BITS, wm)
            else:
                z = 1 << (BITS - 1)
            w = ((u - z).to(tl.float32) * s).to(x.dtype)  # (BK, BN) dequantized tile
            acc += tl.dot(x, w, input_precision=PRECISION, out_dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        om = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(o_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(o_ptr.dtype.element_ty), mask=om)


def available(device: torch.device | str) -> bool:
    """Triton is installed and can run here (a CUDA tensor, or the CPU interpreter when enabled)."""
    if triton is None:
        return False
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    return os.environ.get("TRITON_INTERPRET") == "1"


def wq_matmul(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
              weight_zero_point: torch.Tensor | None, bits: int, in_features: int,
              bias: torch.Tensor | None = None, block_m: int | None = None, block_n: int = 64,
              block_k: int = 32) -> torch.Tensor:
    """``x (…, K) @ dequant(W).T (+ bias)`` → (…, N) in ``x.dtype``, fused (see the module docstring)."""
    if triton is None:
        raise UnsupportedError("the fused quantized matmul needs Triton; install it (pip install triton) "
                               "or use QuantLinear's dequantize-then-matmul path")
    if not 1 <= bits <= 8:
        raise ShapeError(f"bits must be in [1, 8], got {bits}")
    K = in_features
    if x.shape[-1] != K:
        raise ShapeError(f"input has {x.shape[-1]} features, the quantized weight expects {K}")
    N, G = weight_scale.shape
    if K % G:
        raise ShapeError(f"{G} groups do not divide {K} input features")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    bm = block_m or (16 if M <= 16 else 64)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, block_n))
    zp = weight_zero_point if weight_zero_point is not None else weight_packed  # unused placeholder
    b = bias if bias is not None else out
    _wq_matmul_kernel[grid](
        x2, weight_packed, weight_scale, zp, b, out, M, N, K, K // G,
        x2.stride(0), x2.stride(1), weight_packed.stride(0), weight_packed.stride(1),
        weight_scale.stride(0), weight_scale.stride(1), zp.stride(0), zp.stride(1),
        out.stride(0), out.stride(1),
        BITS=bits, HAS_ZP=weight_zero_point is not None, HAS_BIAS=bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32: no TF32 rounding
        BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k)
    return out.reshape(*x.shape[:-1], N)
