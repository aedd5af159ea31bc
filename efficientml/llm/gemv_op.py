"""The custom-op wrapper the matrix-vector kernels share (``cpu_gemv``, ``triton_gemv``): as a
``torch.library`` op, a kernel is one opaque call inside a ``torch.compile``-d decode step, with a
fake implementation that gives the output's shape (…, out) for tracing."""

from __future__ import annotations

from collections.abc import Callable

import torch


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
