"""Integer-only inference (Jacob et al. 2018): int8 weights and activations, int32 accumulation,
int32 bias with S_bias = S_in·S_w, zero-point cross terms precomputed, requantization by a
fixed-point multiplier and a rounding right shift, BatchNorm folded, ReLU/ReLU6 fused as clamps.

The float model is traced (torch.fx) into a short program of steps. Each step runs four ways:

- ``float``: the fused float op (used for calibration),
- ``integer``: the reference integer arithmetic (int32/int64 tensors, no float in the inner loop),
- ``emulate``: float emulation of the same quantized op (dequantize, float op, round to the grid),
- ``fast``: PyTorch's int8 kernels (fbgemm/x86/onednn) on the same integer weights and scales.

Activations are asymmetric uint8 per tensor; with ``reduce_range`` (default) they use [0, 127] so
that AVX2 kernels without VNNI (u8·s8 pairs summed in int16) cannot saturate — the integer
reference then matches the fast kernels. Weights are symmetric int8 in [−127, 127], per channel.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.config import Config, check_choice, check_range
from efficientml.core.errors import ConfigError, UnsupportedError
from efficientml.quant.observers import OBSERVERS, make_observer


# ------------------------------------------------------------------------------------------------
# Fixed-point requantization
# ------------------------------------------------------------------------------------------------
def fixed_point(m: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Represent each multiplier m > 0 as M0·2^−shift with M0 ∈ [2^30, 2^31) (int64 tensors)."""
    m = torch.as_tensor(m, dtype=torch.float64).clamp(min=1e-30)
    mant, exp = torch.frexp(m)                                 # m = mant·2^exp, mant ∈ [0.5, 1)
    m0 = torch.round(mant * 2 ** 31).to(torch.int64)
    shift = (31 - exp).to(torch.int64)
    carry = m0 == 2 ** 31                                      # mant rounded up to 1.0
    m0 = torch.where(carry, m0 // 2, m0)
    shift = torch.where(carry, shift - 1, shift)
    return m0, shift


def rounding_shift(acc: torch.Tensor, m0: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """round(acc·M0 / 2^shift), half away from zero toward +inf, in int64 (acc·M0 < 2^62)."""
    prod = acc.to(torch.int64) * m0
    pos = shift > 0
    half = torch.where(pos, torch.ones_like(shift) << (shift - 1).clamp(min=0), torch.zeros_like(shift))
    right = (prod + half) >> shift.clamp(min=0)
    return torch.where(pos, right, prod << (-shift).clamp(min=0))


@dataclass
class QParams:
    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(x / self.scale) + self.zero_point, self.qmin, self.qmax).to(torch.int32)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return (q.float() - self.zero_point) * self.scale


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d | nn.BatchNorm1d
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """W' = W·γ/σ, b' = (b − μ)·γ/σ + β with σ = sqrt(var + eps) (eval-mode statistics)."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    b = bias if bias is not None else torch.zeros_like(std)
    f = (gamma / std).detach()
    w = weight.detach() * f.view(-1, *([1] * (weight.dim() - 1)))
    return w, ((b.detach() - bn.running_mean) * f + beta.detach())


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntegerConfig(Config):
    """Integer-only int8 conversion. ``observer``: minmax, ema, percentile, mse or kl."""

    kind = "integer_int8"
    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    observer: str = "minmax"
    reduce_range: bool = True
    calibration_batches: int = 8
    skip_unsupported: bool = False      # keep layers without an integer kernel in float (reported)

    def validate(self) -> None:
        if self.weight_bits not in range(2, 9):
            raise ConfigError(f"integer weights need 2 to 8 bits, got {self.weight_bits!r}")
        if self.activation_bits not in range(2, 9):
            raise ConfigError(f"integer activations need 2 to 8 bits, got {self.activation_bits!r}")
        check_choice("observer", self.observer, OBSERVERS.names())
        check_range("calibration_batches", self.calibration_batches, 1, 10 ** 6)

    def act_range(self) -> tuple[int, int]:
        top = 2 ** self.activation_bits - 1
        if self.reduce_range and self.activation_bits == 8:
            top = 127
        return 0, top


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------
class Step:
    """One op of the integer program. ``observe``: whether its output gets its own qparams."""

    observe = True
    kind = "step"

    def __init__(self, name: str):
        self.name = name
        self.in_qp: list[QParams] = []
        self.out_qp: QParams | None = None

    def float(self, *xs: Any) -> Any:
        raise NotImplementedError

    def finalize(self, cfg: IntegerConfig) -> None:
        """Called once input and output qparams are known: quantize weights, build multipliers."""

    def integer(self, *qs: Any) -> Any:
        raise NotImplementedError

    def emulate(self, *qs: Any, **kw: Any) -> Any:
        return self.integer(*qs, **kw)

    def fast(self, *qs: Any) -> Any:
        raise NotImplementedError


class InputStep(Step):
    kind = "quantize_input"

    def float(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def integer(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_qp.quantize(x)

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        qp = self.out_qp
        return torch.quantize_per_tensor(x, qp.scale, qp.zero_point, torch.quint8)


def _clamp_bounds(qp: QParams, act: str | None) -> tuple[int, int]:
    lo, hi = qp.qmin, qp.qmax
    if act in ("relu", "relu6"):
        lo = max(lo, qp.zero_point)
    if act == "relu6":
        hi = min(hi, qp.zero_point + int(round(6.0 / qp.scale)))
    return lo, hi


def _act(y: torch.Tensor, act: str | None) -> torch.Tensor:
    if act == "relu":
        return F.relu(y)
    if act == "relu6":
        return F.relu6(y)
    return y


class WeightedStep(Step):
    """Conv2d or Linear with BN folded in and an optional fused ReLU/ReLU6."""

    def __init__(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None):
        super().__init__(name)
        self.weight = weight.detach().float().clone()
        self.bias = (bias.detach().float().clone() if bias is not None
                     else torch.zeros(weight.shape[0]))
        self.act = act

    def float(self, x: torch.Tensor) -> torch.Tensor:
        return _act(self._op(x, self.weight, self.bias), self.act)

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def finalize(self, cfg: IntegerConfig) -> None:
        qmax = 2 ** (cfg.weight_bits - 1) - 1
        flat = self.weight.reshape(self.weight.shape[0], -1)
        amax = flat.abs().amax(1) if cfg.per_channel else flat.abs().max().expand(flat.shape[0])
        self.w_scale = torch.clamp(amax / qmax, min=1e-12)                           # (C_out,)
        self.w_q = torch.clamp(torch.round(self.weight / self.w_scale.view(-1, *[1] * (self.weight.dim() - 1))),
                               -qmax, qmax).to(torch.int32)
        s_in = self.in_qp[0].scale
        self.b_scale = (s_in * self.w_scale.double()).float()                        # S_bias = S_in·S_w
        self.b_q = torch.round(self.bias.double() / self.b_scale.double()).to(torch.int32)
        z_in = self.in_qp[0].zero_point
        # Σ_k q_w (per output channel): the cross term Z_in·Σ q_w folds into the bias
        self.w_sum = self.w_q.reshape(self.w_q.shape[0], -1).sum(1).to(torch.int64)
        self.b_eff = self.b_q.to(torch.int64) - z_in * self.w_sum
        m = s_in * self.w_scale.double() / self.out_qp.scale                          # per channel
        self.m0, self.shift = fixed_point(m)
        self.lo, self.hi = _clamp_bounds(self.out_qp, self.act)
        self._packed = None

    def _requant(self, acc: torch.Tensor, channel_dim: int) -> torch.Tensor:
        shape = [1] * acc.dim()
        shape[channel_dim] = -1
        out = rounding_shift(acc, self.m0.view(shape), self.shift.view(shape)) + self.out_qp.zero_point
        return torch.clamp(out, self.lo, self.hi).to(torch.int32)

    def emulate(self, q: torch.Tensor) -> torch.Tensor:
        x = self.in_qp[0].dequantize(q)
        w = self.w_q.float() * self.w_scale.view(-1, *[1] * (self.weight.dim() - 1))
        y = self._op(x, w, self.b_q.double().mul(self.b_scale.double()).float())
        out = torch.round(y / self.out_qp.scale) + self.out_qp.zero_point
        return torch.clamp(out, self.lo, self.hi).to(torch.int32)

    def _qweight(self) -> torch.Tensor:
        return torch._make_per_channel_quantized_tensor(
            self.w_q.to(torch.int8), self.w_scale.double(), torch.zeros_like(self.w_scale, dtype=torch.int64), 0)

    def _fbias(self) -> torch.Tensor:
        return (self.b_q.double() * self.b_scale.double()).float()


class ConvStep(WeightedStep):
    kind = "conv2d"

    def __init__(self, name: str, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None,
                 act: str | None):
        super().__init__(name, weight, bias, act)
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise UnsupportedError(f"conv {name!r} uses padding {conv.padding!r}/{conv.padding_mode!r}; "
                                   "integer conv supports numeric zero padding only")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def integer(self, q: torch.Tensor) -> torch.Tensor:
        z_in = self.in_qp[0].zero_point
        B, C, H, W = q.shape
        ph, pw = self.padding
        x = F.pad(q, (pw, pw, ph, ph), value=z_in) if (ph or pw) else q    # pad with the real zero
        kh, kw = self.w_q.shape[2:]
        # im2col moves integers only (exact in float32 for |q| ≤ 2^24); the products sum in int32
        cols = F.unfold(x.float(), (kh, kw), dilation=self.dilation, stride=self.stride).to(torch.int32)
        G, O = self.groups, self.w_q.shape[0]
        L = cols.shape[-1]
        cols = cols.view(B, G, -1, L)                                     # (B, G, C/G·kh·kw, L)
        w = self.w_q.view(G, O // G, -1)                                  # (G, O/G, C/G·kh·kw)
        acc = torch.matmul(w, cols).view(B, O, L)                         # int32 accumulation
        acc = acc.to(torch.int64) + self.b_eff.view(1, -1, 1)
        Ho = (H + 2 * ph - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        Wo = (W + 2 * pw - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return self._requant(acc, 1).view(B, O, Ho, Wo)

    def fast(self, q: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self._packed = torch.ops.quantized.conv2d_prepack(
                self._qweight(), self._fbias(), list(self.stride), list(self.padding),
                list(self.dilation), self.groups)
        op = torch.ops.quantized.conv2d_relu if self.act == "relu" else torch.ops.quantized.conv2d
        y = op(q, self._packed, self.out_qp.scale, self.out_qp.zero_point)
        return torch.clamp(y, 0.0, 6.0) if self.act == "relu6" else y


class LinearStep(WeightedStep):
    kind = "linear"

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    def integer(self, q: torch.Tensor) -> torch.Tensor:
        acc = torch.matmul(q.to(torch.int32), self.w_q.t())              # (…, C_out) int32
        return self._requant(acc.to(torch.int64) + self.b_eff, -1)

    def fast(self, q: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self._packed = torch.ops.quantized.linear_prepack(self._qweight(), self._fbias())
        op = torch.ops.quantized.linear_relu if self.act == "relu" else torch.ops.quantized.linear
        y = op(q, self._packed, self.out_qp.scale, self.out_qp.zero_point)
        return torch.clamp(y, 0.0, 6.0) if self.act == "relu6" else y


class AddStep(Step):
    kind = "add"

    def __init__(self, name: str, act: str | None):
        super().__init__(name)
        self.act = act

    def float(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _act(a + b, self.act)

    def finalize(self, cfg: IntegerConfig) -> None:
        ma = self.in_qp[0].scale / self.out_qp.scale
        mb = self.in_qp[1].scale / self.out_qp.scale
        e = math.frexp(max(ma, mb))[1]
        self.shift = torch.tensor(31 - e, dtype=torch.int64)               # common shift for both terms
        self.ma = torch.tensor(round(ma * 2.0 ** (31 - e)), dtype=torch.int64)
        self.mb = torch.tensor(round(mb * 2.0 ** (31 - e)), dtype=torch.int64)
        self.lo, self.hi = _clamp_bounds(self.out_qp, self.act)

    def integer(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        acc = (qa.to(torch.int64) - self.in_qp[0].zero_point) * self.ma + \
              (qb.to(torch.int64) - self.in_qp[1].zero_point) * self.mb
        out = rounding_shift(acc, torch.ones((), dtype=torch.int64), self.shift) + self.out_qp.zero_point
        return torch.clamp(out, self.lo, self.hi).to(torch.int32)

    def emulate(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        y = self.in_qp[0].dequantize(qa) + self.in_qp[1].dequantize(qb)
        return torch.clamp(torch.round(y / self.out_qp.scale) + self.out_qp.zero_point, self.lo, self.hi).to(torch.int32)

    def fast(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        op = torch.ops.quantized.add_relu if self.act == "relu" else torch.ops.quantized.add
        y = op(a, b, self.out_qp.scale, self.out_qp.zero_point)
        return torch.clamp(y, 0.0, 6.0) if self.act == "relu6" else y


class PassStep(Step):
    """Ops that keep the input's qparams: max-pool (commutes with the affine map), ReLU/ReLU6 as
    clamps, and data movement (flatten, view, slicing, zero padding) applied to q − Z."""

    observe = False

    def __init__(self, name: str, fn: Callable[..., Any], mode: str, kind: str):
        super().__init__(name)
        self.fn, self.mode, self.kind = fn, mode, kind    # mode: "max", "relu", "relu6", "move"

    def float(self, *xs: Any, **kw: Any) -> Any:
        return self.fn(*xs, **kw)

    def integer(self, q: Any, *rest: Any, **kw: Any) -> Any:
        qp = self.in_qp[0]
        if self.mode == "max":                         # data movement only: exact on float-held ints
            return self.fn(q.float(), *rest, **kw).to(torch.int32)
        if self.mode in ("relu", "relu6"):
            lo, hi = _clamp_bounds(qp, self.mode)
            return torch.clamp(q, lo, hi)
        out = self.fn(q - qp.zero_point, *rest, **kw)  # zeros stay zeros in the centred domain
        return out + qp.zero_point if isinstance(out, torch.Tensor) else out

    def fast(self, q: Any, *rest: Any, **kw: Any) -> Any:
        if self.mode == "relu":
            return torch.relu(q)
        if self.mode == "relu6":
            return torch.clamp(q, 0.0, 6.0)
        return self.fn(q, *rest, **kw)


class MeanStep(Step):
    """Global average pooling: Σ(q − Z) in int64, times 1/n as a fixed-point multiplier; the output
    keeps the input's qparams (a mean never leaves the input's range)."""

    observe = False
    kind = "mean"

    def __init__(self, name: str, dims: tuple[int, ...], keepdim: bool):
        super().__init__(name)
        self.dims, self.keepdim = dims, keepdim

    def float(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=self.dims, keepdim=self.keepdim)

    def integer(self, q: torch.Tensor) -> torch.Tensor:
        qp = self.in_qp[0]
        n = math.prod(q.shape[d] for d in self.dims)
        m0, shift = fixed_point(1.0 / n)
        s = (q.to(torch.int64) - qp.zero_point).sum(dim=self.dims, keepdim=self.keepdim)
        return torch.clamp(rounding_shift(s, m0, shift) + qp.zero_point, qp.qmin, qp.qmax).to(torch.int32)

    def emulate(self, q: torch.Tensor) -> torch.Tensor:
        qp = self.in_qp[0]
        y = qp.dequantize(q).mean(dim=self.dims, keepdim=self.keepdim)
        return qp.quantize(y)

    def fast(self, q: torch.Tensor) -> torch.Tensor:
        y = q.mean(dim=self.dims, keepdim=True)          # quantized mean keeps the input's qparams
        if not self.keepdim:
            y = y.reshape([n for d, n in enumerate(y.shape) if d not in {k % y.dim() for k in self.dims}])
        return y


class FloatStep(Step):
    """A layer without an integer kernel, kept in float on explicit request (listed in the report)."""

    kind = "float_fallback"

    def __init__(self, name: str, fn: Callable[..., Any]):
        super().__init__(name)
        self.fn = fn

    def float(self, *xs: Any) -> Any:
        return self.fn(*xs)

    def integer(self, *qs: Any) -> Any:
        xs = [qp.dequantize(q) for qp, q in zip(self.in_qp, qs)]
        return self.out_qp.quantize(self.fn(*xs))

    def fast(self, *qs: Any) -> Any:
        y = self.fn(*[q.dequantize() for q in qs])
        return torch.quantize_per_tensor(y, self.out_qp.scale, self.out_qp.zero_point, torch.quint8)


# ------------------------------------------------------------------------------------------------
# Tracing into a program
# ------------------------------------------------------------------------------------------------
_RELU_FUNCS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
_MOVE_FUNCS = {torch.flatten, operator.getitem, F.pad, torch.reshape, torch.squeeze, torch.unsqueeze}
_MOVE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "size", "permute",
                 "transpose"}


def _act_of(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.ReLU):
            return "relu"
        if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0)):
            return "relu6"
    if node.op == "call_function" and node.target in _RELU_FUNCS:
        return _RELU_FUNCS[node.target]
    if node.op == "call_method" and node.target == "relu":
        return "relu"
    return None


@dataclass
class Instr:
    out: str
    step: Step
    args: tuple          # fx-style args with Node replaced by value names
    kwargs: dict


@dataclass
class Program:
    inputs: list[str]
    instrs: list[Instr]
    output: Any                      # value name(s) of the outputs
    float_layers: list[str] = field(default_factory=list)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def trace_program(model: nn.Module, cfg: IntegerConfig) -> Program:
    """Trace ``model`` (eval mode) into integer steps, folding BN and fusing activations."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means the same thing to the user
        raise UnsupportedError(f"{type(model).__name__} cannot be traced by torch.fx for integer "
                               f"conversion ({type(e).__name__}: {e})") from e
    modules = dict(gm.named_modules())
    alias: dict[str, str] = {}
    instrs: list[Instr] = []
    inputs: list[str] = []
    float_layers: list[str] = []
    output: Any = None

    def ref(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: alias.get(n.name, n.name))

    def absorb_act(node: fx.Node) -> tuple[fx.Node, str | None]:
        nxt = _only_user(node)
        if nxt is not None and _act_of(nxt, modules):
            return nxt, _act_of(nxt, modules)
        return node, None

    for node in gm.graph.nodes:
        if node.name in alias:
            continue
        if node.op == "placeholder":
            step = InputStep(node.name)
            inputs.append(node.name)
            instrs.append(Instr(node.name + "_q", step, (node.name,), {}))
            alias[node.name] = node.name + "_q"
            continue
        if node.op == "output":
            output = ref(node.args[0])
            continue
        if node.op == "get_attr":
            raise UnsupportedError(f"model {type(model).__name__} reads tensor attribute {node.target!r} "
                                   "in forward; integer conversion needs it expressed as a layer")
        mod = modules.get(node.target) if node.op == "call_module" else None
        name = str(node.target) if node.op == "call_module" else node.name
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            w, b, last = mod.weight, mod.bias, node
            nxt = _only_user(node)
            if nxt is not None and nxt.op == "call_module" and isinstance(modules[nxt.target], (nn.BatchNorm2d, nn.BatchNorm1d)):
                w, b = fold_bn(w, b, modules[nxt.target])
                last = nxt
            last2, act = absorb_act(last)
            step: Step = (ConvStep(name, mod, w, b, act) if isinstance(mod, nn.Conv2d)
                          else LinearStep(name, w, b, act))
            instrs.append(Instr(last2.name, step, ref(node.args), {}))
            for n in {last, last2}:
                alias[n.name] = last2.name
            continue
        is_add = (node.op == "call_function" and node.target in (operator.add, torch.add)) or \
                 (node.op == "call_method" and node.target == "add")
        if is_add and all(isinstance(a, fx.Node) for a in node.args[:2]) and not node.kwargs:
            last, act = absorb_act(node)
            instrs.append(Instr(last.name, AddStep(name, act), ref(node.args[:2]), {}))
            alias[last.name] = last.name
            continue
        act = _act_of(node, modules)
        if act is not None:
            fn = F.relu if act == "relu" else F.relu6
            instrs.append(Instr(node.name, PassStep(name, fn, act, act), ref(node.args[:1]), {}))
            continue
        if isinstance(mod, (nn.MaxPool2d, nn.MaxPool1d)) or (node.op == "call_function" and node.target is F.max_pool2d):
            fn = mod if mod is not None else F.max_pool2d
            instrs.append(Instr(node.name, PassStep(name, fn, "max", "maxpool"), ref(node.args), ref(node.kwargs)))
            continue
        if isinstance(mod, (nn.Flatten, nn.Identity, nn.Dropout)) or \
                (node.op == "call_function" and node.target in _MOVE_FUNCS) or \
                (node.op == "call_method" and node.target in _MOVE_METHODS):
            if mod is not None:
                fn = mod
            elif node.op == "call_method":
                meth = node.target
                fn = (lambda meth: lambda x, *a, **k: getattr(x, meth)(*a, **k))(meth)
            else:
                fn = node.target
            instrs.append(Instr(node.name, PassStep(name, fn, "move", "move"), ref(node.args), ref(node.kwargs)))
            continue
        mean_dims = None
        if node.op == "call_method" and node.target == "mean":
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            if dims is not None:
                mean_dims = (tuple(dims) if isinstance(dims, (tuple, list)) else (dims,), keep)
        if isinstance(mod, nn.AdaptiveAvgPool2d) and mod.output_size in (1, (1, 1)):
            mean_dims = ((2, 3), True)
        if mean_dims is not None:
            instrs.append(Instr(node.name, MeanStep(name, *mean_dims), ref(node.args[:1]), {}))
            continue
        what = type(mod).__name__ if mod is not None else getattr(node.target, "__name__", str(node.target))
        if not cfg.skip_unsupported:
            raise UnsupportedError(f"layer {name!r} ({what}) has no integer implementation; pass "
                                   "skip_unsupported=True to keep it in float and list it in the report")
        fn = mod if mod is not None else (
            (lambda meth, a, k: lambda x: getattr(x, meth)(*a, **k))(node.target, node.args[1:], node.kwargs)
            if node.op == "call_method" else node.target)
        tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
        if node.op != "call_module" and len(tensor_args) != len(node.args):
            raise UnsupportedError(f"layer {name!r} ({what}) has no integer implementation and takes "
                                   "non-tensor arguments, so it cannot be kept in float either")
        instrs.append(Instr(node.name, FloatStep(name, fn), ref(tuple(tensor_args)), {}))
        float_layers.append(f"{name} ({what})")
    return Program(inputs, instrs, output, float_layers)


# ------------------------------------------------------------------------------------------------
# The integer model
# ------------------------------------------------------------------------------------------------
def _run(program: Program, mode: str, inputs: tuple[torch.Tensor, ...],
         hook: Callable[[Instr, Any, list[Any]], None] | None = None) -> Any:
    env: dict[str, Any] = dict(zip(program.inputs, inputs))
    for ins in program.instrs:
        args = fx.node.map_aggregate(ins.args, lambda a: env[a] if isinstance(a, str) and a in env else a)
        kwargs = fx.node.map_aggregate(ins.kwargs, lambda a: env[a] if isinstance(a, str) and a in env else a)
        out = getattr(ins.step, mode)(*args, **kwargs)
        if hook is not None:
            hook(ins, out, list(args))
        env[ins.out] = out
    return fx.node.map_aggregate(program.output, lambda a: env[a] if isinstance(a, str) else a)


def _tensor_inputs(ins: Instr) -> list[str]:
    names: list[str] = []
    fx.node.map_aggregate(ins.args, lambda a: names.append(a) if isinstance(a, str) else None)
    return names


class IntegerModel(nn.Module):
    """The converted model. ``mode``: "integer" (reference), "emulate", "fast" (int8 kernels), "float"."""

    def __init__(self, program: Program, cfg: IntegerConfig, mode: str = "integer"):
        super().__init__()
        self.program, self.config = program, cfg
        self.mode = mode

    def forward(self, x: torch.Tensor) -> Any:
        if self.mode == "float":
            return _run(self.program, "float", (x,))
        out = _run(self.program, self.mode, (x,))
        return self._dequant_outputs(out)

    def _dequant_outputs(self, out: Any) -> Any:
        qp = {ins.out: ins.step.out_qp for ins in self.program.instrs}
        outs = self.program.output
        if isinstance(outs, str):
            return out.dequantize() if self.mode == "fast" else qp[outs].dequantize(out)
        raise UnsupportedError("integer models with several outputs are not supported")

    def integer_output(self, x: torch.Tensor, mode: str = "integer") -> torch.Tensor:
        """The raw output codes (int32) of ``mode`` (integer, emulate or fast)."""
        out = _run(self.program, mode, (x,))
        return out.int_repr().to(torch.int32) if mode == "fast" else out

    def with_mode(self, mode: str) -> "IntegerModel":
        check_choice("mode", mode, ("integer", "emulate", "fast", "float"))
        m = IntegerModel(self.program, self.config, mode)
        return m

    @property
    def output_qparams(self) -> QParams:
        return {ins.out: ins.step.out_qp for ins in self.program.instrs}[self.program.output]

    def layer_lsb_differences(self, x: torch.Tensor) -> dict[str, int]:
        """Per step, max |integer − emulate| in LSBs when both see the integer path's inputs."""
        diffs: dict[str, int] = {}

        def hook(ins: Instr, out: Any, args: list[Any]) -> None:
            if isinstance(out, torch.Tensor) and ins.step.kind in ("conv2d", "linear", "add", "mean"):
                emu = ins.step.emulate(*args)
                diffs[ins.step.name] = int((emu.to(torch.int64) - out.to(torch.int64)).abs().max())

        _run(self.program, "integer", (x,), hook)
        return diffs

    def size_bytes(self) -> int:
        """Bytes of the int8 weights, int32 biases and fp32 scales (the real deployed payload)."""
        total = 0
        for ins in self.program.instrs:
            s = ins.step
            if isinstance(s, WeightedStep):
                total += s.w_q.numel() + 4 * s.b_q.numel() + 4 * s.w_scale.numel() + 8  # + requant M0/shift per layer
        return total

    def report(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for ins in self.program.instrs:
            kinds[ins.step.kind] = kinds.get(ins.step.kind, 0) + 1
        return {"config": self.config.to_dict(), "steps": kinds, "float_layers": self.program.float_layers,
                "weight_bytes": self.size_bytes()}


def calibrate_program(program: Program, batches: Iterable[torch.Tensor], cfg: IntegerConfig) -> int:
    """Run float batches through the fused program, observing each quantization point; returns the
    number of batches seen. Then assigns qparams to every step and finalizes it."""
    observers: dict[str, Any] = {}
    lo, hi = cfg.act_range()

    def hook(ins: Instr, out: Any, args: list[Any]) -> None:
        if ins.step.observe and isinstance(out, torch.Tensor):
            if ins.out not in observers:
                observers[ins.out] = make_observer(cfg.observer, bits=cfg.activation_bits)
            observers[ins.out].update(out)

    n = 0
    with torch.no_grad():
        for xb in batches:
            if isinstance(xb, (tuple, list)):
                xb = xb[0]
            _run(program, "float", (xb,), hook)
            n += 1
            if n >= cfg.calibration_batches:
                break
    if n == 0:
        raise ConfigError("calibration got no data: the calibration loader yielded no batches")
    qps: dict[str, QParams] = {}
    from efficientml.quant.grid import scale_zero_point

    for ins in program.instrs:
        names = _tensor_inputs(ins) if not isinstance(ins.step, InputStep) else []
        ins.step.in_qp = [qps[a] for a in names if a in qps]
        if ins.step.observe:
            obs = observers[ins.out]
            # the network's output keeps its full range: clipping logits changes predictions
            rlo, rhi = (obs.min_val, obs.max_val) if ins.out == program.output else obs.range()
            s, z = scale_zero_point(torch.tensor(rlo), torch.tensor(rhi), lo, hi, symmetric=False)
            qps[ins.out] = QParams(float(s), int(z), lo, hi)
        else:
            qps[ins.out] = ins.step.in_qp[0]
        ins.step.out_qp = qps[ins.out]
        ins.step.finalize(cfg)
    return n


def convert_integer(model: nn.Module, calibration: Iterable[Any], config: IntegerConfig | None = None
                    ) -> IntegerModel:
    """Fold BN, fuse activations, calibrate on ``calibration`` batches (x or (x, y)), quantize."""
    cfg = config or IntegerConfig()
    model = copy.deepcopy(model).eval()
    program = trace_program(model, cfg)
    calibrate_program(program, calibration, cfg)
    return IntegerModel(program, cfg)
