"""EIE-style sparse × sparse fully-connected layers (Han et al., "EIE: Efficient Inference Engine on
Compressed Deep Neural Network", ISCA 2016; Lec04's systems).

A magnitude-pruned weight W (out, in) is stored column by column (CSC): for every input column j its
nonzero rows and values. After a ReLU most activations are zero, so y = W x needs only the columns j
with x[j] != 0: the work is nnz(W) · density(x), where a dense matrix-vector product reads all of W.
The rows are split into partitions of consecutive output rows (EIE's processing elements, here
OpenMP threads), each with its own CSC and uint16 row indices local to the partition.

Two value formats (``dtype``):

- ``"fp32"``: fp32 values. y equals ``F.linear(x, W_pruned, b)`` up to fp32 summation order
  (each row is summed in increasing column order; BLAS blocks and reorders): ``allclose`` with
  ``rtol=1e-5, atol=1e-5 · max|y|``.
- ``"int8"``: int8 values with one fp32 scale per output row (symmetric, max|row| / 127), and x
  quantized per input vector to symmetric int8 inside the kernel; products accumulate in int32, which
  is *exact*: the accumulators equal the dense integer product ``q_w @ q_x`` bit for bit
  (:meth:`SparseLinear.int_accumulators`); y = acc · w_scale · x_scale (+ b).

The kernel is C (``csrc/eie.c``, portable, OpenMP when the compiler has it), built on first use by the
project's CPU-kernel builder (:func:`efficientml.llm.kernels.cpu_gemv.open_library`). Without a
compiler the same arithmetic runs in torch (:func:`kernel_status` says which); that fallback does not
skip zero activations cheaply and is for correctness, not speed.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError, ShapeError

SOURCE = Path(__file__).with_name("csrc") / "eie.c"
MAX_PART_ROWS = 65535          # uint16 local row indices
DEFAULT_PARTS = 8              # processing elements; threads take them statically
_lock = threading.Lock()
_state: dict[str, object] = {}


def _load() -> dict | None:
    """The kernel's two ctypes functions (built once), or None with the reason in ``_state``."""
    if "fns" in _state:
        return _state["fns"]
    with _lock:
        if "fns" not in _state:
            from efficientml.llm.kernels.cpu_gemv import bind, open_library

            dll, status = open_library(SOURCE)
            fns = None
            if dll is not None:
                p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
                fns = {"f32": bind(dll, "efficientml_eie_f32", [p] * 7 + [i64] * 5 + [i32], None),
                       "int8": bind(dll, "efficientml_eie_q8", [p] * 11 + [i64] * 5 + [i32], None)}
                status = f"on ({status})"
            _state["fns"], _state["status"] = fns, status
    return _state["fns"]


def kernel_status() -> str:
    """One line: the C kernel is on (compiler, flags, library) or off (why; the torch fallback runs)."""
    _load()
    return str(_state["status"])


def magnitude_prune(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``weight`` with the ``round(sparsity · numel)`` smallest-magnitude entries set to zero."""
    from efficientml.prune.masks import topk_mask

    return weight * topk_mask(weight.detach().abs(), sparsity).to(weight.dtype)


@dataclass(frozen=True)
class CSCWeight:
    """A pruned (out, in) weight in partitioned CSC. ``colptr`` (parts, in + 1) int64 offsets into
    ``rows`` (nnz,) uint16 partition-local rows (stored as int16 bits) and ``values`` (nnz,) fp32 or
    int8; ``scale`` (out,) fp32 per-row scales for int8 (None for fp32)."""

    colptr: torch.Tensor
    rows: torch.Tensor
    values: torch.Tensor
    scale: torch.Tensor | None
    out_features: int
    in_features: int
    rows_per_part: int

    @property
    def parts(self) -> int:
        return self.colptr.shape[0]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def nbytes(self) -> int:
        """Bytes of the stored weight (pointers, indices, values, scales)."""
        ts = [self.colptr, self.rows, self.values] + ([self.scale] if self.scale is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (q (out, in) int8, scale (out,) fp32); all-zero rows get scale 1."""
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


def to_csc(weight: torch.Tensor, dtype: str = "fp32", parts: int = DEFAULT_PARTS) -> CSCWeight:
    """The nonzeros of a (pruned) dense ``weight`` (out, in) as partitioned CSC (see :class:`CSCWeight`)."""
    if weight.dim() != 2:
        raise ShapeError(f"the weight must be a 2-D (out, in) matrix, got shape {tuple(weight.shape)}")
    if dtype not in ("fp32", "int8"):
        raise ConfigError(f"dtype must be 'fp32' or 'int8', got {dtype!r}")
    w = weight.detach().to(torch.float32, copy=True).cpu()
    out_f, in_f = w.shape
    scale = None
    if dtype == "int8":
        w, scale = _quantize_rows(w)
    rpp = max(-(-out_f // max(int(parts), 1)), -(-out_f // MAX_PART_ROWS), 1)
    colptrs, rows, vals, base = [], [], [], 0
    for r0 in range(0, out_f, rpp):
        block = w[r0:r0 + rpp]                       # (R, in)
        col_row = block.t().nonzero()                # (nnz_p, 2): (column, local row), column-major
        counts = torch.bincount(col_row[:, 0], minlength=in_f)
        cp = torch.zeros(in_f + 1, dtype=torch.int64)
        cp[1:] = torch.cumsum(counts, 0)
        colptrs.append(cp + base)
        rows.append(col_row[:, 1].to(torch.int32))
        vals.append(block[col_row[:, 1], col_row[:, 0]])
        base += col_row.shape[0]
    rows_u16 = torch.cat(rows).to(torch.int16)       # the bits of uint16 0 … 65535
    return CSCWeight(torch.stack(colptrs).contiguous(), rows_u16.contiguous(), torch.cat(vals).contiguous(),
                     scale, out_f, in_f, rpp)


def _global_rows(csc: CSCWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(global row, column) of every stored nonzero, in storage order (for the torch fallback)."""
    rows = csc.rows.to(torch.int64) & 0xFFFF
    part_of = torch.repeat_interleave(torch.arange(csc.parts), (csc.colptr[:, -1] - csc.colptr[:, 0]))
    cols = torch.cat([torch.repeat_interleave(torch.arange(csc.in_features), torch.diff(cp)) for cp in csc.colptr])
    return rows + part_of * csc.rows_per_part, cols


def _check_input(csc: CSCWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.shape[-1:] != (csc.in_features,) or x.dim() < 1:
        raise ShapeError(f"the input's last dimension must be in_features={csc.in_features}, "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point() or x.device.type != "cpu":
        raise ShapeError(f"the input must be a floating-point CPU tensor, got {x.dtype} on {x.device}")
    if bias is not None and bias.shape != (csc.out_features,):
        raise ShapeError(f"the bias must have shape ({csc.out_features},), got {tuple(bias.shape)}")
    return x.detach().to(torch.float32).reshape(-1, csc.in_features).contiguous()


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _fallback(csc: CSCWeight, x2: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel's arithmetic in torch (no compiler): (y, int32 accumulators or None)."""
    grow, cols = _global_rows(csc)
    if csc.scale is None:
        y = torch.zeros(x2.shape[0], csc.out_features).index_add_(1, grow, x2[:, cols] * csc.values)
        return (y + bias if bias is not None else y), None
    qx, xs = quantize_activations(x2)
    acc = torch.zeros(x2.shape[0], csc.out_features, dtype=torch.int64)
    acc.index_add_(1, grow, qx[:, cols].to(torch.int64) * csc.values.to(torch.int64))
    y = acc.to(torch.float32) * (csc.scale[None, :] * xs[:, None])
    return (y + bias if bias is not None else y), acc.to(torch.int32)


def quantize_activations(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the int8 kernel does to each input row: symmetric int8 with scale max|x| / 127 →
    (q (m, in) int8, scale (m,) fp32; 0 for an all-zero row)."""
    amax = x2.abs().amax(dim=1)
    scale = (amax / 127.0).to(torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(x2 / safe[:, None]), -127, 127).to(torch.int8)
    return q, scale


def eie_matvec(csc: CSCWeight, x: torch.Tensor, bias: torch.Tensor | None = None,
               return_acc: bool = False):
    """y (…, out) = x (…, in) W^T (+ bias), skipping zero activations, on the C kernel (torch's
    threads: ``torch.get_num_threads()``). ``return_acc`` (int8 only): also the int32 accumulators."""
    x2 = _check_input(csc, x, bias)
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    fns, m = _load(), x2.shape[0]
    if fns is None:
        y, acc = _fallback(csc, x2, b)
    else:
        y = torch.empty(m, csc.out_features)
        nz, threads = torch.empty(csc.in_features, dtype=torch.int32), torch.get_num_threads()
        dims = (m, csc.in_features, csc.out_features, csc.rows_per_part, csc.parts, threads)
        acc = None
        if csc.scale is None:
            fns["f32"](_ptr(csc.colptr), _ptr(csc.rows), _ptr(csc.values), _ptr(b), _ptr(x2), _ptr(y), _ptr(nz), *dims)
        else:
            acc, xs = torch.empty(m, csc.out_features, dtype=torch.int32), torch.empty(m)
            qx = torch.empty(csc.in_features, dtype=torch.int8)
            fns["int8"](_ptr(csc.colptr), _ptr(csc.rows), _ptr(csc.values), _ptr(csc.scale), _ptr(b), _ptr(x2),
                        _ptr(y), _ptr(acc), _ptr(xs), _ptr(nz), _ptr(qx), *dims)
    y = y.reshape(*x.shape[:-1], csc.out_features)
    if return_acc:
        if csc.scale is None:
            raise ConfigError("return_acc needs the int8 format (the fp32 path has no integer accumulators)")
        return y, acc.reshape(*x.shape[:-1], csc.out_features)
    return y


class SparseLinear(nn.Module):
    """An ``nn.Linear`` whose pruned weight runs EIE-style (CSC, zero activations skipped)."""

    def __init__(self, csc: CSCWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.csc = csc
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())

    @classmethod
    def from_dense(cls, linear: nn.Linear, sparsity: float, dtype: str = "fp32",
                   parts: int = DEFAULT_PARTS) -> "SparseLinear":
        """Magnitude-prune ``linear``'s weight to ``sparsity`` (fraction of zeros, in [0, 1)) and store it."""
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"SparseLinear.from_dense takes an nn.Linear, got {type(linear).__name__}")
        return cls(to_csc(magnitude_prune(linear.weight.detach(), sparsity), dtype, parts), linear.bias)

    def dense_weight(self) -> torch.Tensor:
        """The stored weight as a dense (out, in) fp32 matrix (dequantized for int8): the reference."""
        grow, cols = _global_rows(self.csc)
        w = torch.zeros(self.csc.out_features, self.csc.in_features)
        vals = self.csc.values.to(torch.float32)
        if self.csc.scale is not None:
            vals = vals * self.csc.scale[grow]
        w[grow, cols] = vals
        return w

    def int_weight(self) -> torch.Tensor:
        """The int8 path's dense integer weight (out, in) int8 (zeros where pruned)."""
        if self.csc.scale is None:
            raise ConfigError("int_weight needs the int8 format")
        grow, cols = _global_rows(self.csc)
        w = torch.zeros(self.csc.out_features, self.csc.in_features, dtype=torch.int8)
        w[grow, cols] = self.csc.values
        return w

    def int_accumulators(self, x: torch.Tensor) -> torch.Tensor:
        """The int8 kernel's exact int32 accumulators for ``x`` (…, in)."""
        return eie_matvec(self.csc, x, None, return_acc=True)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return eie_matvec(self.csc, x, self.bias)

    def extra_repr(self) -> str:
        c = self.csc
        kind = "fp32" if c.scale is None else "int8"
        return (f"in={c.in_features}, out={c.out_features}, nnz={c.nnz} "
                f"({1 - c.nnz / (c.in_features * c.out_features):.0%} sparse), {kind}, parts={c.parts}")
