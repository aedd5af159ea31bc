"""Packed projections: the linears of a block that read the same input (q/k/v, gate/up) run as one
matmul, and the weight layout for MKL's matrix-vector kernel.

A block names its fusable linears as data (``Attention.fusable = ("q_proj", "k_proj", "v_proj")``,
``MLP.fusable = ("gate_proj", "up_proj")``) and calls its ``packed`` module when one is installed;
:func:`pack_projections` (run by the loaders) installs them. Nothing else in the model knows about
kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from efficientml.llm.kernels.gemv_linear import GemvLinear, check_kernel, clone_as, gemv_or_none

PLAIN = (nn.Linear, GemvLinear)  # the module types a packed group runs for (same product, same weight)


class PackedProjections(nn.Module):
    """Runs several linears that read the same input as one matmul (fewer, larger kernels: the
    decode step is bound by per-kernel overhead as much as by bandwidth). :meth:`pack` moves their
    weights into one buffer and makes each module's weight a view of its rows, so names,
    ``state_dict`` and memory are unchanged; this module holds the buffer as a plain tensor (no
    parameter or buffer of its own). Called as ``packed(x, mods)`` → the modules' outputs, or None
    when they must run separately: once a module is swapped (for a quantized one) or assigned a new
    weight (moved, cast), for good.

    On CPU the packed matmul runs for one-row inputs (decoding), and for as many rows as the
    matrix-vector kernel takes once it is on (``kernel="cpu"``, :func:`~.decode.use_cpu_gemv`: a
    small batch of sequences); with more rows (prefill, perplexity windows) MKL runs the separate,
    narrower matmuls faster."""

    def __init__(self, kernel: str | None = None) -> None:
        super().__init__()
        check_kernel(kernel)
        self.weight: torch.Tensor | None = None  # (sum out, in)
        self.bias: torch.Tensor | None = None  # (sum out,)
        self.sizes: list[int] = []  # each module's out_features, in order
        self.ptrs: tuple[int, ...] = ()  # each module's weight data_ptr when packed
        self.kernel = kernel  # None: F.linear; "cpu" / "gpu": that matrix-vector kernel when eligible

    def with_kernel(self, kernel: str | None) -> "PackedProjections":
        """The same packed buffer (shared) running on ``kernel``."""
        check_kernel(kernel)
        new = clone_as(self, PackedProjections)
        new.kernel = kernel
        return new  # type: ignore[return-value]

    def pack(self, mods: tuple[nn.Linear, ...]) -> None:
        """Pack ``mods`` (plain linears of one dtype, all with or all without bias); else nothing."""
        if any(type(m) not in PLAIN for m in mods) or any(m.weight.is_meta for m in mods):
            return
        if len({m.weight.dtype for m in mods}) != 1 or len({m.bias is None for m in mods}) != 1:
            return
        with torch.no_grad():
            w = torch.cat([m.weight for m in mods])  # (sum out, in)
            b = torch.cat([m.bias for m in mods]) if mods[0].bias is not None else None
            self.sizes = [m.out_features for m in mods]
            o = 0
            for m, n in zip(mods, self.sizes):
                m.weight = nn.Parameter(w[o:o + n], requires_grad=m.weight.requires_grad)
                if b is not None:
                    m.bias = nn.Parameter(b[o:o + n], requires_grad=m.bias.requires_grad)
                o += n
        self.weight, self.bias = w, b
        self.ptrs = tuple(m.weight.data_ptr() for m in mods)

    def active(self, mods: tuple[nn.Module, ...]) -> bool:
        """Whether ``mods`` still run as one matmul (unpacks for good once a weight was replaced)."""
        if self.weight is None or any(type(m) not in PLAIN for m in mods):
            return False
        if torch.compiler.is_compiling():  # traced once; data_ptr is not traceable
            return True
        if tuple(m.weight.data_ptr() for m in mods) != self.ptrs or mods[0].weight.dtype != self.weight.dtype:
            self.weight = self.bias = None  # a weight was replaced (moved, cast, reassigned)
            return False
        return True

    def forward(self, x: torch.Tensor, mods: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...] | None:
        if not self.active(mods):
            return None
        if torch.is_grad_enabled() and any(m.weight.requires_grad for m in mods):
            return None  # training: let autograd see each module's own weight
        y = gemv_or_none(self.kernel, x, self.weight, self.bias)
        if y is None:
            if x.device.type == "cpu" and x.numel() != x.shape[-1]:
                return None  # several rows on CPU: separate matmuls (see the class docstring)
            y = F.linear(x, self.weight, self.bias)
        return y.split(self.sizes, dim=-1)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, kernel={self.kernel}" if self.weight is not None else "unpacked"


def packed_groups(model: nn.Module):
    """(block, its fusable linears) for every block that names them (``block.fusable``)."""
    for mod in model.modules():
        names = getattr(mod, "fusable", None)
        if names:
            yield mod, tuple(getattr(mod, n) for n in names)


def pack_projections(model: nn.Module) -> nn.Module:
    """Pack q/k/v and gate/up of every block (see :class:`PackedProjections`); idempotent, in place.
    Each block gets a ``packed`` module (kept when it has one: its kernel choice stays)."""
    for block, mods in list(packed_groups(model)):
        p = block.packed if isinstance(block.packed, PackedProjections) else PackedProjections()
        p.pack(mods)
        if p.weight is not None:
            block.packed = p
    return model


def decode_layout(model: nn.Module) -> nn.Module:
    """Store every plain linear's weight (out, in) as the transpose of a contiguous (in, out) buffer,
    in place, for inference on CPU. A batch-1 decode step is a chain of matrix-vector products that
    stream the weights from memory; with this layout ``F.linear`` reaches the BLAS kernel that reads
    the weight row after row (about 2× the bandwidth of the default layout on a 2-thread x86 CPU, see
    benchmarks/llm_core.py). Values, names, shapes and ``state_dict`` are unchanged (savers make
    tensors contiguous), packed q/k/v and gate/up stay packed, and tied embeddings stay tied.

    Call it after compression, before generation: code that ``view``-s a weight needs contiguous
    weights. Idempotent; training still works (autograd sees ordinary, if strided, parameters)."""

    def relaid(w: torch.Tensor) -> torch.Tensor:
        return w if w.dim() != 2 or w.stride() == (1, w.shape[0]) else w.t().contiguous().t()

    with torch.no_grad():
        done: dict[int, nn.Parameter] = {}  # shared (tied) weights are re-laid once
        for block, mods in list(packed_groups(model)):
            p = block.packed
            if p is None or not p.active(mods):
                continue  # not packed, or no longer (a module was swapped)
            w = relaid(p.weight)  # (sum out, in) view of an (in, sum out) buffer
            o = 0
            for m, n in zip(mods, p.sizes):
                m.weight = nn.Parameter(w[o:o + n], requires_grad=m.weight.requires_grad)
                done[id(m.weight)] = m.weight
                o += n
            p.weight = w
            p.ptrs = tuple(m.weight.data_ptr() for m in mods)
        for mod in model.modules():
            if type(mod) in PLAIN and id(mod.weight) not in done:
                old = mod.weight
                new = nn.Parameter(relaid(old.detach()), requires_grad=old.requires_grad)
                mod.weight = new
                done[id(new)] = new
                for other in model.modules():  # keep ties (lm_head ↔ embed_tokens)
                    if isinstance(other, nn.Embedding) and other.weight is old:
                        other.weight = new
    return model
