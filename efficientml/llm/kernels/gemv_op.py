"""What the matrix-vector kernels share (``cpu_gemv``, ``triton_gemv``): the argument checks, and the
op registration — as a ``torch.library`` op, a kernel is one opaque call inside a
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


_LIB: list = []  # the torch.library.Library that holds the ops (kept alive for the process)


def library():
    """The ``torch.library.Library`` ("efficientml" fragment) every kernel op is defined in."""
    if not _LIB:
        _LIB.append(torch.library.Library("efficientml", "FRAGMENT"))
    return _LIB[0]


def register(name: str, impl: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]):
    """``impl(x, weight, bias)`` as the op ``torch.ops.efficientml.<name>`` (with a fake
    implementation giving the output's shape), so a ``torch.compile``-d decode step calls it as one
    opaque extern call. Returns the function to call: ``impl`` itself in eager code, the op while
    compiling. (Defined with ``Library.define``/``impl``: a call costs ~16 µs inside a compiled
    graph against ~39 µs for a ``torch.library.custom_op``, and a decode step makes 121 of them; eager
    calls skip the dispatcher altogether.) On a torch without ``register_fake`` (< 2.4): ``impl``."""
    if not hasattr(torch.library, "register_fake"):
        return impl
    lib = library()
    lib.define(f"{name}(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
    lib.impl(name, impl, "CompositeExplicitAutograd")

    def fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    torch.library.register_fake(f"efficientml::{name}", fake, lib=lib)
    op = getattr(torch.ops.efficientml, name).default

    def call(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return op(x, weight, bias) if torch.compiler.is_compiling() else impl(x, weight, bias)

    call.op = op  # type: ignore[attr-defined]
    return call
