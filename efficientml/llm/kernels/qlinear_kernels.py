"""Kernel choices for :class:`~.qlinear.QuantLinear`, as module swaps (same buffers, shared):

    "auto"     QuantLinear: torch's int4 CPU kernel for bf16 CPU inputs where it fits, else
               dequantize + GEMM (what loaders and quantize() build)
    "dequant"  QuantLinearDequant: always dequantize into the input's dtype + one GEMM (the reference)
    "bf16"     QuantLinearBF16: CPU fp32/fp16 inputs computed in bf16 on torch's int4/int8 kernels
               (vectorized for bf16 only: ~15× faster than in fp32, ~20× than dequantize + GEMM; the
               error is bf16 rounding); what ``prepare_cpu_decode`` swaps in for generation
    "triton"   QuantLinearTriton: fp16/bf16 CUDA inputs of at most FUSED_MAX_ROWS rows on the fused
               Triton kernel of :mod:`.triton_wq`, which reads the packed words directly; else "auto"

    use_quant_kernel(model, "dequant")   # every QuantLinear of the model; returns how many changed
    q = as_quant_kernel(q, "triton")     # one module

The Triton kernel is correct (tested on an H200) but not yet fast: 0.72–2.0 ms against 0.05 ms for
the dense bf16 matmul at 7B-MLP decode shapes (benchmarks/results/llm_compression_gpu.json), so
nothing turns it on by default.
"""

from __future__ import annotations

import torch
from torch import nn

from efficientml.core.errors import ConfigError
from efficientml.core.modules import set_module
from efficientml.llm.kernels import triton_wq
from efficientml.llm.kernels.gemv_linear import clone_as
from efficientml.llm.kernels.qlinear import QuantLinear

FUSED_MAX_ROWS = 64  # up to this many rows (tokens) the fused kernel beats dequantize + GEMM


class QuantLinearDequant(QuantLinear):
    """QuantLinear that always dequantizes into the input's dtype and runs one GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant_matmul(x)


class QuantLinearTriton(QuantLinear):
    """QuantLinear whose small fp16/bf16 CUDA batches run on the fused Triton kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
                and x.numel() // x.shape[-1] <= FUSED_MAX_ROWS and triton_wq.available(x.device)):
            return triton_wq.wq_matmul(x, self.weight_packed, self.weight_scale, self.weight_zero_point,
                                       self.spec.bits, self.in_features, self.bias)
        return super().forward(x)


class QuantLinearBF16(QuantLinear):
    """QuantLinear whose CPU fp32/fp16 inputs run torch's int4/int8 kernels in bf16 (their vectorized
    dtype); the output keeps the input's dtype. Grids those kernels do not take: as QuantLinear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float16) and (
                self._cpu_int4_ok() or self._cpu_int8_ok()):
            return super().forward(x.to(torch.bfloat16)).to(x.dtype)
        return super().forward(x)


QUANT_KERNELS = {"auto": QuantLinear, "dequant": QuantLinearDequant, "bf16": QuantLinearBF16,
                 "triton": QuantLinearTriton}


def _check(kernel: str) -> type[QuantLinear]:
    if kernel not in QUANT_KERNELS:
        raise ConfigError(f"unknown QuantLinear kernel {kernel!r}; expected one of {sorted(QUANT_KERNELS)}")
    return QUANT_KERNELS[kernel]


def as_quant_kernel(mod: QuantLinear, kernel: str) -> QuantLinear:
    """``mod`` running on ``kernel`` (a key of :data:`QUANT_KERNELS`): the same buffers, hooks and
    attributes in that class; ``mod`` itself when it already is one."""
    cls = _check(kernel)
    return mod if type(mod) is cls else clone_as(mod, cls)  # type: ignore[return-value]


def use_quant_kernel(model: nn.Module, kernel: str) -> int:
    """Swap every QuantLinear of ``model`` onto ``kernel``, in place, by dotted name; returns the
    number swapped."""
    cls = _check(kernel)
    todo = [(name, m) for name, m in model.named_modules()
            if name and isinstance(m, QuantLinear) and type(m) is not cls]
    for name, m in todo:
        set_module(model, name, clone_as(m, cls))
    return len(todo)
