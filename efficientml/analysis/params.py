"""Parameter counts and model size in bytes, dense or sparse (nonzeros plus index overhead).

Sparse storage formats (applied to weight tensors, i.e. parameters with ≥ 2 dimensions; biases and
norm parameters stay dense). ``b`` is the value bit width, ``nnz`` the nonzero count:

- ``"dense"``: ``numel · b``.
- ``"csr"``: the weight viewed as ``rows = shape[0]`` by ``cols = numel / rows``; values ``nnz · b``,
  column indices ``nnz · index_bits`` and row pointers ``(rows + 1) · pointer_bits``. By default
  ``index_bits = ⌈log2 cols⌉`` and ``pointer_bits = ⌈log2 (nnz + 1)⌉`` (the fewest that work); pass
  ``index_bits=32`` for scipy-style int32 indices (then both are 32).
- ``"bitmask"``: values ``nnz · b`` plus one bit per element.
- ``"relative"`` (Deep Compression): each stored entry holds a value and the gap to the previous
  entry in ``index_bits`` bits (default 4) over the flattened weight; a gap larger than
  ``2**index_bits`` is bridged with filler zero entries, which are counted.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from efficientml.core.config import check_choice
from efficientml.core.errors import ConfigError

SPARSE_FORMATS = ("dense", "csr", "bitmask", "relative")


def count_parameters(model: nn.Module, *, trainable_only: bool = False,
                     nonzero_only: bool = False) -> int:
    """Number of parameters (shared parameters once); optionally only trainable or nonzero ones."""
    total = 0
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        total += int(torch.count_nonzero(p.detach())) if nonzero_only else p.numel()
    return total


def _bits_ceil_log2(n: int) -> int:
    return max(1, math.ceil(math.log2(n))) if n > 1 else 1


def tensor_bits(t: torch.Tensor, bits: int = 32, fmt: str = "dense",
                index_bits: int | None = None) -> int:
    """Storage bits of one tensor at ``bits`` per value in sparse format ``fmt`` (see module doc)."""
    check_choice("sparse format", fmt, SPARSE_FORMATS)
    if bits <= 0:
        raise ConfigError(f"bits must be a positive integer, got {bits!r}")
    numel = t.numel()
    if fmt == "dense" or numel == 0:
        return numel * bits
    flat = t.detach().reshape(-1)
    nnz = int(torch.count_nonzero(flat))
    if fmt == "bitmask":
        return nnz * bits + numel
    if fmt == "csr":
        rows = t.shape[0] if t.dim() >= 1 else 1
        cols = numel // max(1, rows)
        col_bits = index_bits if index_bits is not None else _bits_ceil_log2(cols)
        ptr_bits = index_bits if index_bits is not None else _bits_ceil_log2(nnz + 1)
        return nnz * (bits + col_bits) + (rows + 1) * ptr_bits
    # relative: gaps between consecutive nonzero positions, the first measured from position -1
    ib = 4 if index_bits is None else index_bits
    if ib <= 0:
        raise ConfigError(f"index_bits must be a positive integer, got {ib!r}")
    pos = torch.nonzero(flat).reshape(-1)
    if pos.numel() == 0:
        return 0
    gaps = torch.diff(pos, prepend=pos.new_tensor([-1]))
    span = 2 ** ib
    entries = int(torch.div(gaps + span - 1, span, rounding_mode="floor").sum())  # ⌈gap/span⌉ each
    return entries * (bits + ib)


def model_size_bits(model: nn.Module, bits: int = 32, *, sparse_format: str = "dense",
                    index_bits: int | None = None) -> int:
    """Storage bits of all parameters; ``sparse_format`` applies to weights (≥ 2-D) only."""
    check_choice("sparse format", sparse_format, SPARSE_FORMATS)
    total = 0
    for p in model.parameters():
        fmt = sparse_format if p.dim() >= 2 else "dense"
        total += tensor_bits(p, bits, fmt, index_bits)
    return total


def model_size_bytes(model: nn.Module, bits: int = 32, *, sparse_format: str = "dense",
                     index_bits: int | None = None) -> float:
    """Model size in bytes at ``bits`` per parameter value (may be fractional for sub-byte widths).

    >>> model_size_bytes(nn.Linear(100, 10), bits=8)   # 1010 params · 1 byte
    1010.0
    """
    return model_size_bits(model, bits, sparse_format=sparse_format, index_bits=index_bits) / 8
