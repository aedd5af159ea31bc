"""The bf16/fp16-weight matrix-vector kernel for decoding on CPU (``csrc/gemv_h16.c``): a model
held in bf16 (or fp16) streams half the bytes of fp32 per token, widened to fp32 in registers (bf16
by a shift, fp16 by F16C where the compiler has ``_Float16``) and summed in fp32, for 1 to
:data:`MAX_ROWS` input rows. Built and cached like :mod:`.cpu_gemv` (same compiler, flags, cache,
``EFFICIENTML_CPU_GEMV=0`` turns it off); inputs and outputs keep the model's dtype (the rows are
widened to fp32 on the way in, the result rounded once on the way out).

:func:`gemv` is also the op ``torch.ops.efficientml.gemv_h16`` (an opaque call in a compiled step).
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch

from efficientml.core.errors import ShapeError
from efficientml.llm.kernels import cpu_gemv, gemv_op

SOURCE = Path(__file__).with_name("csrc") / "gemv_h16.c"
MAX_ROWS = cpu_gemv.MAX_ROWS

_lock = threading.Lock()
_state: dict[str, object] = {}  # "fn", "f16" (fp16 supported), "status"


def _load():
    if "fn" in _state:
        return _state["fn"]
    with _lock:
        if "fn" in _state:
            return _state["fn"]
        fn, f16, status = None, False, f"off (torch {torch.__version__} has no torch.library.register_fake; needs ≥ 2.4)"
        if hasattr(torch.library, "register_fake"):
            dll, status = cpu_gemv.open_library(SOURCE)
            if dll is not None:
                fn = cpu_gemv.bind(dll, "efficientml_gemv_h16", [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 +
                                   [ctypes.c_int] * 2)
                f16 = bool(dll.efficientml_gemv_h16_has_f16())
                status = f"on (bf16{', fp16' if f16 else '; no fp16: the compiler has no _Float16'}; {status})"
        _state.update(fn=fn, f16=f16, status=status)
        return fn


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return _load() is not None


def status() -> str:
    """One line: on (dtypes, compiler, flags, library) or off (why)."""
    _load()
    return str(_state["status"])


def eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """``F.linear(x, weight, bias)`` can run here: 1 to MAX_ROWS bf16 (or fp16, where supported) CPU rows
    and a contiguous (out, in) weight of the same dtype, no gradient (:func:`gemv_op.fits`)."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if x.dtype == torch.float16 and not (available() and _state["f16"]):
        return False
    return gemv_op.fits(x, weight, bias, MAX_ROWS)


def _impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    fn = _load()
    if fn is None:
        raise RuntimeError(f"the 16-bit CPU matrix-vector kernel is {status()}")
    out_f, in_f = gemv_op.check(x, weight, bias, MAX_ROWS)
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ShapeError(f"gemv_h16 takes bf16 or fp16 weights and inputs, got {x.dtype}")
    xf = x.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    y = torch.empty(*x.shape[:-1], out_f, dtype=torch.float32)
    rc = fn(weight.data_ptr(), xf.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
            x.numel() // in_f, out_f, in_f, torch.get_num_threads(), int(x.dtype == torch.float16))
    if rc != 0:
        raise RuntimeError("gemv_h16 was built without fp16 support (the compiler has no _Float16)")
    return y.to(x.dtype)


_op = gemv_op.register("gemv_h16", _impl)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for 1 to MAX_ROWS bf16/fp16 rows on the kernel → (…, out), x's dtype."""
    return _op(x, weight, bias)
