"""Integer-only inference (Jacob et al. 2018): int8 weights and activations, int32 accumulation,
int32 bias with S_bias = S_in·S_w, zero-point cross terms precomputed, requantization by a
fixed-point multiplier and a rounding right shift, BatchNorm folded, ReLU/ReLU6 fused as clamps.

The float model is traced (torch.fx) into a short program of steps. Each step runs four ways:

- ``float``: the fused float op (used for calibration),
- ``integer``: the reference integer arithmetic (int32/int64 tensors, no float in the inner loop),
- ``emulate``: float emulation of the same quantized op (dequantize, float op, round to the grid),
- ``fast``: PyTorch's int8 kernels (fbgemm/x86/onednn) on the same integer weights and scales.

Activations are asymmetric uint8 per tensor, weights symmetric int8 per channel. ``reduce_range``
(default) gives up one weight bit (|w| ≤ 63) so that AVX2 kernels without VNNI (u8·s8 pairs summed
in int16) cannot saturate and the exported ONNX graph needs no Clip nodes; the integer reference
then matches the fast kernels (see :class:`IntegerConfig` for the choices). Padding ops (TF "SAME"
padding as ``nn.ZeroPad2d`` or ``F.pad``) are integer steps; ``padding="same"`` convs are supported.
Unary activations (hard-swish, SiLU, sigmoid, GELU …) are 256-entry tables on the input codes,
squeeze-excite products and concatenations requantize by fixed-point multipliers, and channel
split/shuffle are moves on the codes (:mod:`efficientml.quant.integer_elementwise`); which node
becomes which step is decided in :mod:`efficientml.quant.integer_patterns`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from efficientml.core.config import check_choice
from efficientml.core.errors import ConfigError, UnsupportedError
# the steps and their arithmetic live in integer_ops.py; re-exported here, where users import them
from efficientml.quant.integer_ops import (AddStep, FloatStep, InputStep, IntegerConfig,  # noqa: F401
                                           MeanStep, PadStep, PassStep, QParams, Step, fixed_point,
                                           fold_bn, rounding_shift)
from efficientml.quant.integer_elementwise import CatStep, LutStep, MulStep, ShapeStep  # noqa: F401
from efficientml.quant.integer_patterns import (act_of, arith_op, cat_of, is_move, is_shape, is_tensor_product,
                                                lut_of, mean_dims, move_fn, op_name, pad_of, shape_fn)
from efficientml.quant.integer_weighted import ConvStep, LinearStep, WeightedStep
from efficientml.quant.int8_speed import run_with_speed_check
from efficientml.quant.observers import make_observer


# ------------------------------------------------------------------------------------------------
# Tracing into a program
# ------------------------------------------------------------------------------------------------
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
    speed_checked: bool = False      # the one-time int8-vs-fp32 check of depthwise layers has run


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
    return _ProgramBuilder(model, gm, cfg).run()


class _ProgramBuilder:
    """One pass over the fx graph: each node becomes an :class:`Instr`, or is absorbed into the
    instruction before it (a BN folded into its conv, a ReLU fused as a clamp). ``alias`` maps an
    absorbed node's name to the value name of the instruction that computes it."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, cfg: IntegerConfig):
        self.model, self.gm, self.cfg = model, gm, cfg
        self.modules = dict(gm.named_modules())
        self.alias: dict[str, str] = {}
        self.instrs: list[Instr] = []
        self.inputs: list[str] = []
        self.float_layers: list[str] = []
        self.shape_values: set[str] = set()          # nodes holding shapes or ints computed from them

    def run(self) -> Program:
        output: Any = None
        for node in self.gm.graph.nodes:
            if node.name in self.alias:
                continue
            if node.op == "placeholder":
                self.inputs.append(node.name)
                self.instrs.append(Instr(node.name + "_q", InputStep(node.name), (node.name,), {}))
                self.alias[node.name] = node.name + "_q"
            elif node.op == "output":
                output = self.ref(node.args[0])
            elif node.op == "get_attr":
                raise UnsupportedError(f"model {type(self.model).__name__} reads tensor attribute "
                                       f"{node.target!r} in forward; integer conversion needs it "
                                       "expressed as a layer")
            else:
                self.visit(node)
        return Program(self.inputs, self.instrs, output, self.float_layers)

    def ref(self, a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: self.alias.get(n.name, n.name))

    def absorb_act(self, node: fx.Node) -> tuple[fx.Node, str | None]:
        nxt = _only_user(node)
        if nxt is not None and act_of(nxt, self.modules):
            return nxt, act_of(nxt, self.modules)
        return node, None

    def emit(self, node: fx.Node, step: Step, args: Any, kwargs: Any = None) -> None:
        self.instrs.append(Instr(node.name, step, args, kwargs if kwargs is not None else {}))

    def visit(self, node: fx.Node) -> None:
        mod = self.modules.get(node.target) if node.op == "call_module" else None
        name = str(node.target) if node.op == "call_module" else node.name
        if is_shape(node, self.shape_values):
            self.shape_values.add(node.name)
            return self.emit(node, ShapeStep(name, shape_fn(node)), self.ref(node.args), self.ref(node.kwargs))
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            return self.weighted(node, mod, name)
        if self.elementwise(node, mod, name):
            return None
        pad = pad_of(node, mod, name)
        if pad is not None:
            return self.emit(node, pad, self.ref(node.args[:1]))
        act = act_of(node, self.modules)
        if act is not None:
            fn = F.relu if act == "relu" else F.relu6
            return self.emit(node, PassStep(name, fn, act, act), self.ref(node.args[:1]))
        if isinstance(mod, (nn.MaxPool2d, nn.MaxPool1d)) or (node.op == "call_function" and node.target is F.max_pool2d):
            fn = mod if mod is not None else F.max_pool2d
            return self.emit(node, PassStep(name, fn, "max", "maxpool"), self.ref(node.args), self.ref(node.kwargs))
        if is_move(node, mod):
            step = PassStep(name, move_fn(node, mod), "move", "move", op_name(node, mod))
            return self.emit(node, step, self.ref(node.args), self.ref(node.kwargs))
        dims_keep = mean_dims(node, mod)
        if dims_keep is not None:
            return self.emit(node, MeanStep(name, *dims_keep), self.ref(node.args[:1]))
        return self.keep_float(node, mod, name)

    def elementwise(self, node: fx.Node, mod: nn.Module | None, name: str) -> bool:
        """Sums (with a fused ReLU), products, concatenation and table activations; False when the
        node is none of them."""
        two_tensors = len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args) and not node.kwargs
        if arith_op(node) == "add" and two_tensors:
            last, act = self.absorb_act(node)
            self.emit(last, AddStep(name, act), self.ref(node.args))
            self.alias[last.name] = last.name
            return True
        if is_tensor_product(node):
            self.emit(node, MulStep(name), self.ref(node.args))
            return True
        cat = cat_of(node)
        if cat is not None:
            self.emit(node, CatStep(name, cat[1]), (self.ref(cat[0]),))
            return True
        lut = lut_of(node, mod, name)
        if lut is not None:
            x = next(a for a in node.args if isinstance(a, fx.Node))
            self.emit(node, lut, (self.ref(x),))
            return True
        return False

    def weighted(self, node: fx.Node, mod: nn.Conv2d | nn.Linear, name: str) -> None:
        """Conv/Linear, with the BatchNorm right after it folded in and the activation after that fused."""
        w, b, last = mod.weight, mod.bias, node
        nxt = _only_user(node)
        if nxt is not None and nxt.op == "call_module" and \
                isinstance(self.modules[nxt.target], (nn.BatchNorm2d, nn.BatchNorm1d)):
            w, b = fold_bn(w, b, self.modules[nxt.target])
            last = nxt
        last2, act = self.absorb_act(last)
        step: Step = (ConvStep(name, mod, w, b, act) if isinstance(mod, nn.Conv2d)
                      else LinearStep(name, w, b, act))
        self.emit(last2, step, self.ref(node.args))
        for n in {last, last2}:
            self.alias[n.name] = last2.name

    def keep_float(self, node: fx.Node, mod: nn.Module | None, name: str) -> None:
        """An op without an integer kernel: an error, or (skip_unsupported) a float step, reported."""
        what = type(mod).__name__ if mod is not None else getattr(node.target, "__name__", str(node.target))
        if not self.cfg.skip_unsupported:
            raise UnsupportedError(f"layer {name!r} ({what}) has no integer implementation; pass "
                                   "skip_unsupported=True to keep it in float and list it in the report")
        fn = mod if mod is not None else (
            (lambda meth, a, k: lambda x: getattr(x, meth)(*a, **k))(node.target, node.args[1:], node.kwargs)
            if node.op == "call_method" else node.target)
        tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
        if node.op != "call_module" and len(tensor_args) != len(node.args):
            raise UnsupportedError(f"layer {name!r} ({what}) has no integer implementation and takes "
                                   "non-tensor arguments, so it cannot be kept in float either")
        self.emit(node, FloatStep(name, fn), self.ref(tuple(tensor_args)))
        self.float_layers.append(f"{name} ({what})")


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
        if self.mode == "fast" and not self.program.speed_checked and self.config.warn_slow_layers:
            self.program.speed_checked = True           # once per program, shared by with_mode copies
            return self._dequant_outputs(run_with_speed_check(self.program, x, _run))
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
            if isinstance(out, torch.Tensor) and ins.step.kind in ("conv2d", "linear", "add", "mean", "mul",
                                                                   "cat", "lut"):
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
        ins.step.in_qp = [qps[a] for a in names if qps.get(a) is not None]
        if ins.step.observe:
            obs = observers[ins.out]
            # the network's output keeps its full range: clipping logits changes predictions
            rlo, rhi = (obs.min_val, obs.max_val) if ins.out == program.output else obs.range()
            s, z = scale_zero_point(torch.tensor(rlo), torch.tensor(rhi), lo, hi, symmetric=False)
            qps[ins.out] = QParams(float(s), int(z), lo, hi)
        else:
            qps[ins.out] = ins.step.in_qp[0] if ins.step.in_qp else None
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
