"""``GemvLinear``: an ``nn.Linear`` that runs few-row inputs on a matrix-vector kernel.

:func:`~efficientml.llm.kernels.decode.use_cpu_gemv` / ``use_gpu_gemv`` swap a model's plain
``nn.Linear`` s for these (same parameters, shared, not copied: ties and packed row views hold), so the
model's own forward has no kernel dispatch. Each call that a kernel can take (its ``eligible``: 1 to
``MAX_ROWS`` fp32 CPU rows for ``cpu_gemv``, bf16/fp16 ones for ``cpu_gemv16``, one row on CUDA for
``triton_gemv``, a contiguous (out, in) weight, no gradient) runs on it; every other call is ``F.linear``, as before the swap.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from efficientml.core.errors import ConfigError
from efficientml.llm.kernels import cpu_gemv, cpu_gemv16, triton_gemv

KERNELS = ("cpu", "gpu")  # "cpu": cpu_gemv (C, fp32) / cpu_gemv16 (C, bf16/fp16); "gpu": triton_gemv (Triton, CUDA)


def gemv_or_none(kernel: str | None, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` on ``kernel`` when it can take this call, else None (the caller
    runs its own path). ``kernel`` None: always None."""
    if kernel == "cpu" and cpu_gemv.eligible(x, weight, bias):
        return cpu_gemv.gemv(x, weight, bias)  # looked up per call: tests wrap it to count calls
    if kernel == "cpu" and cpu_gemv16.eligible(x, weight, bias):
        return cpu_gemv16.gemv(x, weight, bias)
    if kernel == "gpu" and triton_gemv.eligible(x, weight, bias):
        return triton_gemv.gemv(x, weight, bias)
    return None


@functools.cache
def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX-512 BF16 or AMX: oneDNN's bf16 GEMM is
    fast there); without, torch's CPU bf16 GEMM is emulated, ~5x slower than fp32 on the same shapes."""
    cpu = getattr(torch, "cpu", None)
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def wide_or_none(kernel: str | None, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor | None:
    """A many-row 16-bit CPU product (prefill) on kernel "cpu", computed as fp32 GEMM (rounded once to
    ``x.dtype``) where the CPU has no native bf16/fp16 matrix unit; else None (the caller's F.linear)."""
    if kernel != "cpu" or x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    if weight.dtype != x.dtype or native_bf16_matmul():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None  # training: autograd sees the module's own product
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def check_kernel(kernel: str | None) -> None:
    if kernel is not None and kernel not in KERNELS:
        raise ConfigError(f"unknown matrix-vector kernel {kernel!r}; expected one of {KERNELS} or None")


def clone_as(mod: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A module of class ``cls`` with ``mod``'s state: the same parameter, buffer and child objects
    (shared), its hooks and attributes; ``mod`` itself is left as it was."""
    new = cls.__new__(cls)
    new.__dict__.update(mod.__dict__)
    for d in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):  # own containers
        object.__setattr__(new, d, type(getattr(mod, d))(getattr(mod, d)))
    return new


class GemvLinear(nn.Linear):
    """``nn.Linear`` whose calls run on the matrix-vector ``kernel`` ("cpu" or "gpu") when it can take
    them, and through ``F.linear`` otherwise (more rows, another dtype, a strided weight, gradients).
    Many 16-bit rows (a prompt) on kernel "cpu" run as one fp32 GEMM where the CPU has no native bf16
    matrix unit (:func:`wide_or_none`: ~5x faster than torch's emulated bf16 GEMM there).
    A module with forward hooks runs ``F.linear`` too (the reference path a capture or a mask sees)."""

    kernel: str = "cpu"

    @classmethod
    def wrap(cls, lin: nn.Linear, kernel: str) -> "GemvLinear":
        """``lin`` as a GemvLinear on ``kernel``: the same parameters and hooks (no copy)."""
        check_kernel(kernel)
        new = clone_as(lin, cls)
        new.kernel = kernel
        return new  # type: ignore[return-value]

    def unwrap(self) -> nn.Linear:
        """Back to a plain ``nn.Linear`` holding the same parameters and hooks."""
        plain = clone_as(self, nn.Linear)
        plain.__dict__.pop("kernel", None)
        return plain  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._forward_hooks and not self._forward_pre_hooks:
            y = gemv_or_none(self.kernel, x, self.weight, self.bias)
            if y is None:
                y = wide_or_none(self.kernel, x, self.weight, self.bias)
            if y is not None:
                return y
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel}"
