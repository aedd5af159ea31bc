"""Per-op cost formulas and the classification of torch functions into MACs, elementwise and pooling ops.

:func:`op_cost` turns one intercepted torch call (name, arguments, result) into an :class:`OpCost`;
the counting rules are documented in :mod:`efficientml.analysis.macs`. This module imports nothing
from the rest of ``analysis``: both the tracer (:mod:`~efficientml.analysis.trace`) and the MAC report
(:mod:`~efficientml.analysis.macs`) build on it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class OpCost:
    """The cost of one op (or a sum of ops): MACs, elementwise ops and pooling/reduction ops."""

    macs: int = 0
    elementwise: int = 0
    pool: int = 0

    def __add__(self, other: "OpCost") -> "OpCost":
        return OpCost(self.macs + other.macs, self.elementwise + other.elementwise,
                      self.pool + other.pool)

    def __bool__(self) -> bool:
        return bool(self.macs or self.elementwise or self.pool)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


ZERO = OpCost()

# --- formulas (pure functions of shapes) -------------------------------------------------------


def conv_macs(out_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> int:
    """MACs of a convolution: every output element is a dot product of length C_in/groups · ∏k."""
    return math.prod(out_shape) * math.prod(weight_shape[1:])


def conv_transpose_macs(in_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> int:
    """MACs of a transposed convolution: every input element scatters into (C_out/groups) · ∏k."""
    return math.prod(in_shape) * math.prod(weight_shape[1:])


def linear_macs(out_shape: tuple[int, ...], in_features: int) -> int:
    return math.prod(out_shape) * in_features


def matmul_macs(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> int:
    """MACs of ``a @ b`` with torch.matmul's broadcasting (1-D operands included)."""
    k = a_shape[-1]
    a = tuple(a_shape) if len(a_shape) > 1 else (1, k)           # (..., n, k)
    b = tuple(b_shape) if len(b_shape) > 1 else (k, 1)           # (..., k, m)
    return _broadcast_numel(a[:-2], b[:-2]) * a[-2] * k * b[-1]


def _broadcast_numel(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    return math.prod(max(x, y) if min(x, y) != 0 else 0 for x, y in zip(a, b))


def attention_macs(q_shape: tuple[int, ...], k_shape: tuple[int, ...],
                   v_shape: tuple[int, ...]) -> int:
    """MACs of softmax(QKᵀ)V: ``B·L·S·E`` (QKᵀ) + ``B·L·S·E_v`` (AV); B is q's leading dims."""
    batch = math.prod(q_shape[:-2])
    length, e = q_shape[-2], q_shape[-1]
    s, ev = k_shape[-2], v_shape[-1]
    return batch * length * s * (e + ev)


def mha_macs(q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_shape: tuple[int, ...]) -> int:
    """MACs of nn.MultiheadAttention on (L, N, E) / (S, N, E_k) / (S, N, E_v) inputs.

    Projections: q L·N·E·E, k S·N·E·E_k, v S·N·E·E_v, out L·N·E·E; attention: N·L·S·E twice (the
    heads split E, so the head count cancels out).
    """
    length, e = q_shape[0], q_shape[-1]
    s, ek, ev = k_shape[0], k_shape[-1], v_shape[-1]
    n = q_shape[1] if len(q_shape) == 3 else 1
    proj = n * (length * e * e + s * e * ek + s * e * ev + length * e * e)
    return proj + 2 * n * length * s * e


def einsum_macs(equation: str, operands: list[torch.Tensor], out: torch.Tensor) -> int:
    """MACs of an einsum: the product of every index's size (one multiply-add per combination)."""
    lhs, _, rhs = equation.replace(" ", "").partition("->")
    if len(operands) < 2:
        return 0
    sizes: dict[str, int] = {}
    for term, op in zip(lhs.split(","), operands):
        explicit = term.replace("...", "")
        if "..." in term:  # letters before "..." align left, after it align right
            head, _, tail = term.partition("...")
            dims = list(op.shape[:len(head)]) + list(op.shape[op.dim() - len(tail):])
        else:
            dims = list(op.shape)
        for c, d in zip(explicit, dims):
            sizes[c] = max(sizes.get(c, 1), int(d))
    total = math.prod(sizes.values())
    if "..." in lhs:  # broadcast dims appear once in the output
        out_letters = [c for c in rhs.replace("...", "") if c.isalpha()] if rhs else []
        explicit_out = math.prod(sizes[c] for c in out_letters) if out_letters else 1
        total *= max(1, out.numel() // max(1, explicit_out))
    return total


def pool_ops(name: str, inp: torch.Tensor, out: torch.Tensor, kernel: tuple[int, ...] | None) -> int:
    """Window elements visited: ``out.numel()·∏kernel`` for fixed windows, ``in.numel()`` otherwise."""
    if kernel is not None and not name.startswith("adaptive"):
        return out.numel() * math.prod(kernel)
    return inp.numel()


# --- op classification -------------------------------------------------------------------------

ELEMENTWISE = frozenset("""
add sub rsub mul div true_divide floor_divide remainder fmod neg abs exp exp2 expm1 log log2 log10
log1p sqrt rsqrt square pow reciprocal sign floor ceil round trunc erf sin cos
relu relu6 leaky_relu rrelu elu selu celu gelu silu mish hardswish hardsigmoid hardtanh hardshrink
softshrink tanhshrink softsign softplus sigmoid logsigmoid tanh threshold prelu glu
clamp clip clamp_min clamp_max maximum minimum where masked_fill lerp addcmul addcdiv
softmax log_softmax softmin
batch_norm layer_norm group_norm instance_norm rms_norm local_response_norm normalize
""".split())

POOLS = frozenset("""
max_pool1d max_pool2d max_pool3d max_pool1d_with_indices max_pool2d_with_indices
max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d lp_pool1d lp_pool2d
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
adaptive_max_pool3d adaptive_max_pool1d_with_indices adaptive_max_pool2d_with_indices
""".split())

REDUCTIONS = frozenset("mean sum amax amin logsumexp prod norm var std".split())

CONVS = frozenset({"conv1d", "conv2d", "conv3d"})
CONV_TRANSPOSES = frozenset({"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"})
RNNS = frozenset({"lstm", "gru", "rnn_tanh", "rnn_relu"})
MATMULS = frozenset({"matmul", "mm", "bmm", "mv", "dot", "inner", "vdot", "_sparse_mm", "smm", "spmm"})

# Calls that only read metadata (names as op_name normalizes them: ``__len__`` → ``len``).
METADATA = frozenset("""
size dim numel shape dtype device is_contiguous stride storage_offset data_ptr untyped_storage
element_size nelement is_floating_point is_complex requires_grad grad_fn is_leaf layout is_cuda
is_sparse ndim ndimension len iter format repr hash item tolist get_device
""".split())


def op_name(func: Callable[..., Any]) -> str:
    """A normalized op name: ``Tensor.__iadd__`` → ``add``, ``Tensor.relu_`` → ``relu``."""
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # a property such as Tensor.T: name it by the descriptor
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    if name.startswith("__") and name.endswith("__") and len(name) > 4:
        core = name[2:-2]
        if core in {"radd", "iadd", "rsub", "isub", "rmul", "imul", "rtruediv", "itruediv",
                    "rmatmul", "imatmul", "rpow", "ipow", "rdiv", "idiv", "ifloordiv",
                    "rfloordiv"}:
            core = core[1:]
        name = {"truediv": "div", "floordiv": "floor_divide", "getitem": "getitem",
                "setitem": "setitem"}.get(core, core)
    if name.endswith("_") and not name.endswith("__") and name[:-1]:
        name = name[:-1]
    return name


def _arg(args: tuple, kwargs: dict, i: int, key: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(key, default)


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def op_cost(name: str, func_name: str, args: tuple, kwargs: dict, out: Any) -> OpCost:
    """The cost of one torch function call given its normalized name, arguments and result."""
    y = _first_tensor(out)
    if y is None:
        return ZERO
    if name in CONVS:
        return OpCost(macs=conv_macs(tuple(y.shape), tuple(_arg(args, kwargs, 1, "weight").shape)))
    if name in CONV_TRANSPOSES:
        x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
        return OpCost(macs=conv_transpose_macs(tuple(x.shape), tuple(w.shape)))
    if name == "linear":
        w = _arg(args, kwargs, 1, "weight")
        return OpCost(macs=linear_macs(tuple(y.shape), int(w.shape[-1])))
    if name in MATMULS:
        return _matmul_cost(func_name, args, kwargs)
    if name in {"addmm", "baddbmm", "addbmm", "addmv", "addr"}:
        a = _arg(args, kwargs, 1, "mat1")
        k = int(a.shape[-1]) if name != "addr" else 1
        return OpCost(macs=y.numel() * k * (a.shape[0] if name == "addbmm" else 1),
                      elementwise=y.numel())
    if name == "einsum":
        eq = args[0]
        ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        return OpCost(macs=einsum_macs(eq, ops, y))
    if name in {"scaled_dot_product_attention", "multi_head_attention_forward"}:
        return _attention_cost(name, args, kwargs)
    if name in RNNS:
        return _rnn_cost(args)
    return _non_mac_cost(name, args, kwargs, y)


def _matmul_cost(func_name: str, args: tuple, kwargs: dict) -> OpCost:
    if func_name == "__rmatmul__":  # b.__rmatmul__(a) is a @ b
        a, b = args[1], args[0]
    else:
        a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other")
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return ZERO
    if a.layout != torch.strided and a.dim() == 2:     # sparse (O, K) @ dense (K, N): nnz·N
        return OpCost(macs=_nnz(a) * (b.shape[-1] if b.dim() > 1 else 1))
    if b.layout != torch.strided and b.dim() == 2:     # dense (N, K) @ sparse (K, M): N·nnz
        return OpCost(macs=_nnz(b) * (a.shape[-2] if a.dim() > 1 else 1))
    return OpCost(macs=matmul_macs(tuple(a.shape), tuple(b.shape)))


def _attention_cost(name: str, args: tuple, kwargs: dict) -> OpCost:
    if name == "scaled_dot_product_attention":
        q, k, v = args[:3] if len(args) >= 3 else (kwargs["query"], kwargs["key"], kwargs["value"])
        scores = math.prod(q.shape[:-1]) * k.shape[-2]  # B·L·S entries of the softmax
        return OpCost(macs=attention_macs(tuple(q.shape), tuple(k.shape), tuple(v.shape)),
                      elementwise=scores)
    q, k, v = args[:3]  # multi_head_attention_forward: (L, N, E) / (S, N, E) or unbatched
    n = q.shape[1] if q.dim() == 3 else 1
    heads = int(_arg(args, kwargs, 4, "num_heads"))
    scores = n * heads * q.shape[0] * k.shape[0]
    return OpCost(macs=mha_macs(tuple(q.shape), tuple(k.shape), tuple(v.shape)),
                  elementwise=scores)


def _rnn_cost(args: tuple) -> OpCost:
    packed = len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].dim() == 1 \
        and not args[1].is_floating_point()            # (data, batch_sizes, hx, params, …)
    x, weights = args[0], args[3] if packed else args[2]
    steps = x.shape[0] if packed else x.numel() // x.shape[-1]   # timesteps × batch
    return OpCost(macs=steps * sum(w.numel() for w in weights if w.dim() == 2))


def _non_mac_cost(name: str, args: tuple, kwargs: dict, y: torch.Tensor) -> OpCost:
    """Elementwise ops (one per output element) and pools/reductions (one per element visited)."""
    if name in ELEMENTWISE:
        return OpCost(elementwise=y.numel())
    if name in {"max", "min"}:  # binary max/min is elementwise; with a dim it reduces
        other = _arg(args, kwargs, 1, "other")
        if isinstance(other, torch.Tensor):
            return OpCost(elementwise=y.numel())
        return OpCost(pool=_arg(args, kwargs, 0, "input").numel())
    if name in POOLS:
        x = _arg(args, kwargs, 0, "input")
        geom = pool_kernel(name, args, kwargs)
        return OpCost(pool=pool_ops(name, x, y, geom))
    if name in REDUCTIONS:
        x = _arg(args, kwargs, 0, "input")
        if isinstance(x, torch.Tensor):
            return OpCost(pool=x.numel())
    return ZERO


def _nnz(t: torch.Tensor) -> int:
    """Stored nonzeros of a sparse (COO, CSR, CSC, BSR) tensor."""
    if t.layout == torch.sparse_coo:
        return int(t._nnz())
    return int(t.values().numel())


def pool_kernel(name: str, args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """The kernel size of a fixed-window pool call as a tuple, or None for adaptive pools."""
    if name.startswith("adaptive") or name not in POOLS:
        return None
    nd = int(name.split("pool")[1][0])
    k = _arg(args, kwargs, 1, "kernel_size")
    if name.startswith("lp_pool"):
        k = _arg(args, kwargs, 2, "kernel_size")
    return _ntuple(k, nd)


def _ntuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, (tuple, list)):
        return tuple(int(x) for x in v) if len(v) == n else tuple(int(v[0]) for _ in range(n))
    return tuple(int(v) for _ in range(n))
