"""Real sparse execution: 2:4 on GPU tensor cores, unstructured (CSR) on CPU.

- **2:4 (GPU).** :func:`to_semi_structured` applies a 2:4 mask along the input dimension and swaps
  each ``nn.Linear`` weight for PyTorch's ``SparseSemiStructuredTensor`` (cuSPARSELt or CUTLASS), so
  ``F.linear`` runs the sparse kernel. Needs CUDA with compute capability ≥ 8.0, fp16/bf16 weights
  and shapes the kernels accept (dimensions multiples of 64 are safe). :func:`sparse24_benchmark`
  times dense vs 2:4 for given shapes and token counts and says where sparse is slower.
- **Unstructured (CPU).** :class:`CSRLinear` and :class:`CSRConv2d` hold the nonzeros in CSR and
  compute sparse × dense with scipy's CSR kernel when scipy is installed (torch's CSR path
  otherwise); convs run as im2col + sparse × dense. They pay off only at high
  sparsity; :func:`crossover` measures the sparsity where they start to beat the dense layer.
"""

from __future__ import annotations

from typing import Any

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.errors import UnsupportedError
from efficientml.prune.masks import nm_mask


# --------------------------------------------------------------------------------------------------
# 2:4 semi-structured (GPU)

def semi_structured_available() -> tuple[bool, str]:
    """(available, reason): feature checks, not version checks."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, "this PyTorch has no torch.sparse.to_sparse_semi_structured"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU on this machine (2:4 sparse tensor cores need one)"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"GPU compute capability {major}.x < 8.0 has no sparse tensor cores"
    return True, ""


def apply_24(weight: torch.Tensor) -> torch.Tensor:
    """Zero all but the 2 largest |w| of every 4 consecutive input weights."""
    return weight * nm_mask(weight.detach().abs(), 2, 4)


def to_semi_structured(model: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Prune every Linear to 2:4 and store it as a semi-structured sparse tensor (in place)."""
    ok, why = semi_structured_available()
    if not ok:
        raise UnsupportedError(f"2:4 semi-structured sparsity is unavailable: {why}")
    from torch.sparse import to_sparse_semi_structured

    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            w = apply_24(mod.weight.detach()).to(device="cuda", dtype=dtype)
            mod.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
    return model


def sparse24_benchmark(shapes: tuple[tuple[int, int], ...] = ((4096, 11008), (11008, 4096)),
                       tokens: tuple[int, ...] = (1, 16, 256, 4096), dtype: torch.dtype = torch.float16,
                       quick: bool = False) -> dict[str, Any]:
    """Median latency of dense vs 2:4 ``nn.Linear(in, out)`` per token count, plus one MLP block
    (4096 → 11008 → 4096, SiLU) end to end. Keys are ``"{out}x{in}"`` (the weight's shape)."""
    from efficientml.analysis import measure_latency

    ok, why = semi_structured_available()
    if not ok:
        raise UnsupportedError(f"2:4 semi-structured sparsity is unavailable: {why}")
    runs, warmup = (10, 3) if quick else (50, 10)
    out: dict[str, Any] = {"dtype": str(dtype), "device": torch.cuda.get_device_name(), "layers": {}}
    for cin, cout in shapes:
        dense = nn.Linear(cin, cout, bias=False).to("cuda", dtype)
        with torch.no_grad():
            dense.weight.copy_(apply_24(dense.weight))
        sparse = to_semi_structured(nn.Linear(cin, cout, bias=False).to("cuda", dtype), dtype)
        row: dict[str, Any] = {}
        for t in tokens:
            x = torch.randn(t, cin, device="cuda", dtype=dtype)
            entry: dict[str, Any] = {"dense_ms": measure_latency(dense, x, warmup, runs).median_ms}
            try:
                entry["sparse_ms"] = measure_latency(sparse, x, warmup, runs).median_ms
                entry["speedup"] = entry["dense_ms"] / entry["sparse_ms"]
                entry["kind"] = "measured"
                if entry["speedup"] < 1:
                    entry["note"] = "2:4 is slower than dense here"
            except (RuntimeError, NotImplementedError) as e:  # a shape the sparse kernel rejects
                entry["sparse_ms"], entry["speedup"], entry["note"] = None, None, f"unsupported: {e}"
            row[str(t)] = entry
        out["layers"][f"{cout}x{cin}"] = row
    mlp = nn.Sequential(nn.Linear(4096, 11008, bias=False), nn.SiLU(), nn.Linear(11008, 4096, bias=False))
    mlp = mlp.to("cuda", dtype)
    with torch.no_grad():
        for m in mlp:
            if isinstance(m, nn.Linear):
                m.weight.copy_(apply_24(m.weight))
    x = torch.randn(4096, 4096, device="cuda", dtype=dtype)
    d = measure_latency(mlp, x, warmup, runs).median_ms
    s = measure_latency(to_semi_structured(mlp, dtype), x, warmup, runs).median_ms
    out["mlp_block_4096tok"] = {"dense_ms": d, "sparse_ms": s, "speedup": d / s, "kind": "measured"}
    return out


# --------------------------------------------------------------------------------------------------
# unstructured CSR (CPU)

def _csr(w: torch.Tensor) -> Any:
    """A CSR matrix for ``w`` (2-D): scipy's when installed (its CSR × dense kernel is far faster on
    CPU than torch's beta CSR path), else a torch sparse CSR tensor."""
    try:
        import scipy.sparse as sp
    except ImportError:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return w.to_sparse_csr()
    return sp.csr_matrix(w.detach().cpu().float().numpy())


def _spmm(w: Any, x: torch.Tensor) -> torch.Tensor:
    """``w @ x`` for a CSR ``w`` from :func:`_csr` and a dense 2-D ``x``."""
    if isinstance(w, torch.Tensor):
        return torch.sparse.mm(w, x)
    return torch.from_numpy(w @ x.detach().float().contiguous().numpy())


class CSRLinear(nn.Module):
    """``y = x Wᵀ + b`` with W in CSR (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = _csr(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = _spmm(self.weight, flat.T).T                             # (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class CSRConv2d(nn.Module):
    """A conv as im2col + CSR weight × dense patches (groups=1, inference only)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.groups != 1 or isinstance(conv.padding, str):
            raise UnsupportedError("CSRConv2d handles groups=1 convs with numeric padding only")
        self.out_channels, self.kernel_size = conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight = _csr(conv.weight.detach().reshape(conv.out_channels, -1))  # (O, C·k·k)
        self.bias = None if conv.bias is None else conv.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, C·k·k, L)
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)                          # (C·k·k, B·L)
        y = _spmm(self.weight, cols)                                                    # (O, B·L)
        y = y.reshape(self.out_channels, b, ho * wo).transpose(0, 1).reshape(b, self.out_channels, ho, wo)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y


def to_csr(model: nn.Module, min_sparsity: float = 0.0) -> nn.Module:
    """Swap every Linear/Conv2d (groups=1) whose weight sparsity ≥ ``min_sparsity`` for its CSR twin."""
    from efficientml.core.modules import set_module

    for name, mod in list(model.named_modules()):
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and name:
            sparsity = 1.0 - mod.weight.count_nonzero().item() / mod.weight.numel()
            if sparsity < min_sparsity or (isinstance(mod, nn.Conv2d) and mod.groups != 1):
                continue
            set_module(model, name, CSRLinear(mod) if isinstance(mod, nn.Linear) else CSRConv2d(mod))
    return model


def crossover(layer: nn.Module, x: torch.Tensor, sparsities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99),
              threads: int = 2, runs: int = 10) -> dict[str, Any]:
    """Measured dense vs CSR latency of ``layer`` at each sparsity (random magnitude masks); the
    crossover is the lowest sparsity from which CSR is faster at every higher one measured."""
    import copy

    from efficientml.analysis import measure_latency
    from efficientml.prune.masks import fine_mask

    rows = []
    for s in sparsities:
        dense = copy.deepcopy(layer)
        with torch.no_grad():
            dense.weight.mul_(fine_mask(dense.weight.abs(), s))
        sparse = CSRLinear(dense) if isinstance(dense, nn.Linear) else CSRConv2d(dense)
        d = measure_latency(dense, x, warmup=2, runs=runs, threads=threads).median_ms
        c = measure_latency(sparse, x, warmup=2, runs=runs, threads=threads).median_ms
        rows.append({"sparsity": s, "dense_ms": d, "csr_ms": c, "speedup": d / c, "kind": "measured"})
    cross = None
    for i in range(len(rows)):
        if all(r["speedup"] > 1 for r in rows[i:]):
            cross = rows[i]["sparsity"]
            break
    return {"rows": rows, "crossover_sparsity": cross, "threads": threads}
