"""What the matrix-vector kernels share (``cpu_gemv``, ``triton_gemv``): the argument checks, and the
custom-op wrapper — as a ``torch.library`` op, a kernel is one opaque call inside a
``torch.compile``-d decode step, with a fake implementation that gives the output's shape (…, out)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from efficientml.core.errors import ShapeError


def fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int = 1) -> bool:
    """``F.linear(x, weight, bias)`` is a matrix-vector product a kernel can take: at most
    ``max_rows`` input rows of the weight's width, a contiguous (out, in) weight and a bias of the
    input's dtype and device, no gradient needed. Each kernel adds its own device/dtype condition."""
    if weight.dim() != 2 or not weight.is_contiguous() or weight.dtype != x.dtype or weight.device != x.device:
        return False
    if x.shape[-1] != weight.shape[1] or x.numel() > max_rows * x.shape[-1] or x.numel() == 0:
        return False
    if bias is not None and (bias.dtype != x.dtype or bias.device != x.device):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))


def check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
          max_rows: int = 1) -> tuple[int, int]:
    """Raise a ShapeError naming what :func:`fits` would reject (gradients aside); ``(out, in)``."""
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f or x.numel() > max_rows * in_f or x.numel() == 0:
        rows = "one row" if max_rows == 1 else f"1 to {max_rows} rows"
        raise ShapeError(f"gemv takes {rows} of {in_f} features for a ({out_f}, {in_f}) weight, "
                         f"got an input of shape {tuple(x.shape)}")
    if not weight.is_contiguous():
        raise ShapeError("gemv needs a contiguous (out, in) weight (nn.Linear's layout, not decode_layout's)")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ShapeError(f"gemv needs one dtype, got input {x.dtype}, weight {weight.dtype}"
                         + (f", bias {bias.dtype}" if bias is not None else ""))
    return out_f, in_f


def register(name: str, impl: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]):
    """``impl(x, weight, bias)`` as ``torch.ops.efficientml.<name>``; returns that op, or ``impl``
    itself on a torch without ``torch.library.custom_op`` (< 2.4: eager use only)."""
    if not hasattr(torch.library, "custom_op"):
        return impl

    def op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return impl(x, weight, bias)

    op.__name__ = name
    defined = torch.library.custom_op(f"efficientml::{name}", op, mutates_args=())

    @defined.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    return getattr(torch.ops.efficientml, name)
