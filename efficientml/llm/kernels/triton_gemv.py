"""Matrix-vector product for batch-1 decoding on the GPU, in Triton: ``y = W x (+ b)`` for one row.

At batch 1 every decode step streams all weights once; a cuBLAS GEMM called with M = 1 does not
always keep enough bytes in flight to reach the memory bandwidth. Here each program owns
``BLOCK_N`` consecutive rows of the (out, in) weight, reads them ``BLOCK_K`` columns at a time in
wide coalesced loads (evict-first: weights are read once per step), multiplies by the matching
slice of ``x`` and keeps a (BLOCK_N, BLOCK_K) fp32 partial sum that is reduced once at the end.

The block sizes are tuned per (out, in, dtype) the first time a shape runs on CUDA (a dozen configs,
each timed with CUDA events with the L2 cache flushed first; :func:`tuned` shows the choices) —
outside CUDA-graph capture; during
capture an untuned shape takes the default config. Correctness is tested against ``F.linear`` on CPU
with Triton's interpreter (``TRITON_INTERPRET=1``) and on CUDA where present.

:func:`gemv` is also the op ``torch.ops.efficientml.triton_gemv`` so a ``torch.compile``-d decode
step calls it as one opaque kernel.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from efficientml.core.errors import UnsupportedError
from efficientml.llm.kernels import gemv_op

HAVE_TRITON = importlib.util.find_spec("triton") is not None  # imported on first use (~0.3 s)

# (BLOCK_N, BLOCK_K, num_warps, num_stages)
CONFIGS = ((2, 1024, 4, 3), (4, 512, 4, 3), (4, 1024, 4, 3), (4, 1024, 8, 3), (8, 256, 4, 3),
           (8, 512, 4, 3), (8, 512, 8, 3), (8, 1024, 8, 3), (16, 256, 4, 3), (16, 512, 8, 3),
           (16, 256, 8, 4), (32, 256, 8, 3))
DEFAULT = (8, 512, 4, 3)
_tuned: dict[tuple, tuple[int, int, int, int]] = {}


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K: tl.constexpr, stride_wn,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) rows of W this program owns
        nmask = rn < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # K is a compile-time constant: one kernel per layer width
            rk = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            kmask = rk < K
            x = tl.load(x_ptr + rk, mask=kmask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=nmask[:, None] & kmask[None, :],
                        other=0.0, eviction_policy="evict_first")  # (BN, BK)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)  # (BN,)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)

    return triton, _gemv_kernel


def available(device: torch.device | str) -> bool:
    """Triton is installed and can run here (a CUDA device, or the CPU interpreter when enabled)."""
    if not HAVE_TRITON:
        return False
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available()
    return _interpreting()


def eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``F.linear(x, weight, bias)`` can run here (:func:`gemv_op.fits`): CUDA, or CPU under
    Triton's interpreter."""
    return HAVE_TRITON and (x.is_cuda or (x.device.type == "cpu" and _interpreting())) \
        and gemv_op.fits(x, weight, bias)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch(cfg, x, w, b, y) -> None:
    triton, kernel = _kernel()
    bn, bk, warps, stages = cfg
    N, K = w.shape
    kernel[(triton.cdiv(N, bn),)](x, w, b if b is not None else y, y, N, K, w.stride(0),
                                        HAS_BIAS=b is not None, BLOCK_N=bn, BLOCK_K=bk,
                                        num_warps=warps, num_stages=stages)


def _l2_flusher(device: torch.device) -> torch.Tensor:
    """A buffer twice the L2 cache: zeroing it before a timed launch evicts the weight, so tuning sees
    what decoding sees (each weight read from HBM once per step), not a weight left in L2 by the last
    launch (H100/H200 hold 50 MB of L2: a whole 4096×4096 bf16 projection)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
    return torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)


def _tune(x, w, b, y) -> tuple[int, int, int, int]:
    """Fastest config for this shape: median of 20 timed launches each (CUDA events), L2 flushed
    before each."""
    flush = _l2_flusher(x.device)
    best, best_t = DEFAULT, float("inf")
    for cfg in CONFIGS:
        if cfg[0] > w.shape[0] and cfg != DEFAULT:
            continue
        try:
            for _ in range(3):
                _launch(cfg, x, w, b, y)
            ts = []
            for _ in range(20):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                flush.zero_()
                s.record()
                _launch(cfg, x, w, b, y)
                e.record()
                e.synchronize()
                ts.append(s.elapsed_time(e))
        except Exception:  # a config this GPU cannot run (shared memory, registers): skip it
            continue
        t = sorted(ts)[len(ts) // 2]
        if t < best_t:
            best, best_t = cfg, t
    return best


def tuned() -> dict[str, tuple[int, int, int, int]]:
    """The config chosen per shape so far: ``"out×in dtype cuda:i" → (BLOCK_N, BLOCK_K, warps, stages)``."""
    return {f"{n}×{k} {str(dt).removeprefix('torch.')} {dev}": c for (n, k, dt, dev), c in _tuned.items()}


def _gemv_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if not HAVE_TRITON:
        raise UnsupportedError("the Triton matrix-vector kernel needs Triton (pip install triton)")
    N, K = gemv_op.check(x, weight, bias)
    xc = x.contiguous()
    b = None if bias is None else bias.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    cfg = DEFAULT
    if x.is_cuda:
        key = (N, K, x.dtype, str(x.device))
        cfg = _tuned.get(key)
        if cfg is None:
            if torch.cuda.is_current_stream_capturing():
                cfg = DEFAULT  # no timing inside a graph capture
            else:
                cfg = _tuned[key] = _tune(xc, weight, b, y)
    _launch(cfg, xc, weight, b, y)
    return y


_op = gemv_op.register("triton_gemv", _gemv_impl)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for one row ``x`` (…, in) → (…, out), in ``x.dtype`` with fp32
    accumulation."""
    return _op(x, weight, bias)
