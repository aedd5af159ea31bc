"""ONNX export of an :class:`~efficientml.quant.integer.IntegerModel` as a QDQ graph:
QuantizeLinear/DequantizeLinear around float ops, int8 weights with per-channel scales, int32 biases
with S_bias = S_in·S_w. onnxruntime fuses the QDQ pairs into its integer kernels (QLinearConv…).
A Clip before a QuantizeLinear is written only where the integer range is narrower than uint8's
(a fused ReLU6 whose 6.0 falls inside the grid, reduce_range_of="activations"): ORT fuses DQ→Conv→Q
only without one. Padding and max-pooling run on the uint8 codes (Pad with the code of the constant);
table activations, products, concatenation and reshapes/splits are in
:mod:`efficientml.quant.export_steps`.
With the default 7-bit weights ORT's results match the integer reference (MobileNetV2: 1 LSB); with
``reduce_range=False`` ORT's own AVX2 kernels (no VNNI) saturate like fbgemm's (14 LSB measured).

    export_onnx(int_model, "vgg_int8.onnx", example)          # needs the ``export`` extra
    run_onnx("vgg_int8.onnx", x)
    ort_kernel_counts("vgg_int8.onnx")["qlinearconv_fraction"]   # 1.0: every conv is integer in ORT
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from efficientml.core.errors import UnsupportedError
from efficientml.core.lazy import optional_import
from efficientml.core.serialization import atomic_path
from efficientml.quant.export_steps import elementwise, move
from efficientml.quant.integer import (AddStep, CatStep, ConvStep, InputStep, Instr, IntegerModel, LinearStep, LutStep,
                                       MeanStep, MulStep, PadStep, PassStep, QParams, ShapeStep, _run,
                                       _tensor_inputs)

_ONNX_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


class _Graph:
    def __init__(self, onnx: Any):
        self.onnx, self.h = onnx, onnx.helper
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.n = 0

    def const(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(self.onnx.numpy_helper.from_array(arr, name))
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        self.n += 1
        out = out or f"{op.lower()}_{self.n}"
        self.nodes.append(self.h.make_node(op, inputs, [out], name=f"{op}_{self.n}", **attrs))
        return out

    def multi(self, op: str, inputs: list[str], n_out: int, **attrs: Any) -> list[str]:
        """A node with ``n_out`` outputs (Split); returns their names."""
        self.n += 1
        outs = [f"{op.lower()}_{self.n}_{i}" for i in range(n_out)]
        self.nodes.append(self.h.make_node(op, inputs, outs, name=f"{op}_{self.n}", **attrs))
        return outs

    def qparams(self, tag: str, qp: QParams) -> tuple[str, str]:
        return (self.const(f"{tag}_scale", np.array(qp.scale, dtype=np.float32)),
                self.const(f"{tag}_zp", np.array(qp.zero_point, dtype=np.uint8)))

    def dq(self, q: str, qp: QParams, tag: str) -> str:
        s, z = self.qparams(tag + "_dq", qp)
        return self.node("DequantizeLinear", [q, s, z])

    def q(self, x: str, qp: QParams, tag: str, lo: int, hi: int, out: str | None = None) -> str:
        s, z = self.qparams(tag + "_q", qp)
        if lo <= 0 and hi >= 255:            # QuantizeLinear saturates to [0, 255] by itself
            return self.node("QuantizeLinear", [x, s, z], out)
        # clamp to the narrower integer range the reference uses (fused ReLU6, 7-bit activations)
        cmin = self.const(f"{tag}_cmin", np.array((lo - qp.zero_point) * qp.scale, dtype=np.float32))
        cmax = self.const(f"{tag}_cmax", np.array((hi - qp.zero_point) * qp.scale, dtype=np.float32))
        x = self.node("Clip", [x, cmin, cmax])
        return self.node("QuantizeLinear", [x, s, z], out)


def _weighted(g: _Graph, st: ConvStep | LinearStep, x_q: str, tag: str) -> str:
    x = g.dq(x_q, st.in_qp[0], tag + "_in")
    wq = g.const(f"{tag}_w", st.w_q.numpy().astype(np.int8))
    ws = g.const(f"{tag}_w_scale", st.w_scale.numpy().astype(np.float32))
    wz = g.const(f"{tag}_w_zp", np.zeros(st.w_q.shape[0], dtype=np.int8))
    w = g.node("DequantizeLinear", [wq, ws, wz], axis=0)
    bq = g.const(f"{tag}_b", st.b_q.numpy().astype(np.int32))
    bs = g.const(f"{tag}_b_scale", st.b_scale.numpy().astype(np.float32))
    bz = g.const(f"{tag}_b_zp", np.zeros(st.b_q.shape[0], dtype=np.int32))
    b = g.node("DequantizeLinear", [bq, bs, bz], axis=0)
    if isinstance(st, ConvStep):
        kh, kw = st.w_q.shape[2:]
        ph, pw = st.padding
        y = g.node("Conv", [x, w, b], kernel_shape=[kh, kw], strides=list(st.stride), pads=[ph, pw, ph, pw],
                   dilations=list(st.dilation), group=st.groups)
    else:
        y = g.node("Gemm", [x, w, b], transB=1)
    return g.q(y, st.out_qp, tag, st.lo, st.hi)


def _pad(g: _Graph, st: PadStep, x_q: str, rank: int, tag: str) -> str:
    """ONNX Pad on the uint8 codes: torch's (left, right, top, bottom …) from the last dim backwards
    becomes ONNX's [begin per dim …, end per dim …]."""
    begin, end = [0] * rank, [0] * rank
    for i in range(len(st.pad) // 2):
        begin[rank - 1 - i], end[rank - 1 - i] = st.pad[2 * i], st.pad[2 * i + 1]
    pads = g.const(f"{tag}_pads", np.array(begin + end, dtype=np.int64))
    inputs = [x_q, pads]
    if st.mode == "constant":
        inputs.append(g.const(f"{tag}_value", np.array(st.code(), dtype=np.uint8)))
    return g.node("Pad", inputs, mode=_ONNX_PAD_MODES[st.mode])


def _step(g: _Graph, ins: Instr, args: list[Any], shapes: dict[str, Any], tag: str, vals: list[Any]) -> Any:
    """Write one program step; returns the name of its (uint8) output (a list for a split, None
    for shape arithmetic). ``vals``: the step's positional arguments in the example run."""
    st = ins.step
    if isinstance(st, InputStep):
        return g.q("input", st.out_qp, tag, st.out_qp.qmin, st.out_qp.qmax)
    if isinstance(st, (ConvStep, LinearStep)):
        return _weighted(g, st, args[0], tag)
    if isinstance(st, AddStep):
        y = g.node("Add", [g.dq(args[0], st.in_qp[0], tag + "_a"), g.dq(args[1], st.in_qp[1], tag + "_b")])
        return g.q(y, st.out_qp, tag, st.lo, st.hi)
    if isinstance(st, MeanStep):
        if {d % len(shapes[ins.args[0]]) for d in st.dims} != {2, 3}:
            raise UnsupportedError(f"ONNX export handles means over H and W only, not dims {st.dims}")
        y = g.node("GlobalAveragePool", [g.dq(args[0], st.in_qp[0], tag)])
        y = g.q(y, st.out_qp, tag, st.out_qp.qmin, st.out_qp.qmax)     # DQ→pool→Q: QLinearGlobalAveragePool
        return y if st.keepdim else g.node("Flatten", [y], axis=1)      # dropping H, W moves codes only
    if isinstance(st, PassStep) and st.mode == "max":
        mp = st.fn
        k = getattr(mp, "kernel_size", 2)
        s = getattr(mp, "stride", k) or k
        p = getattr(mp, "padding", 0)
        k, s, p = [(v, v) if isinstance(v, int) else tuple(v) for v in (k, s, p)]
        return g.node("MaxPool", [args[0]], kernel_shape=list(k), strides=list(s),
                      pads=[p[0], p[1], p[0], p[1]])
    if isinstance(st, PadStep):
        return _pad(g, st, args[0], len(shapes[ins.args[0]]), tag)
    if isinstance(st, PassStep) and st.mode in ("relu", "relu6"):
        qp = st.in_qp[0]
        y = g.node("Relu", [g.dq(args[0], qp, tag)])
        lo, hi = (qp.zero_point, qp.qmax) if st.mode == "relu" else (qp.zero_point, min(qp.qmax, qp.zero_point + round(6 / qp.scale)))
        return g.q(y, qp, tag, lo, hi)
    if isinstance(st, PassStep) and st.mode == "move":
        return move(g, ins, args, shapes, tag, vals)
    if isinstance(st, (LutStep, MulStep, CatStep)):
        return elementwise(g, st, args, tag)
    if isinstance(st, ShapeStep):
        return None                                        # shape arithmetic: static in the graph
    raise UnsupportedError(f"step {st.name!r} ({st.kind}) has no ONNX QDQ export")


def export_onnx(model: IntegerModel, path: str | os.PathLike, example: torch.Tensor, opset: int = 17) -> Path:
    """Write the integer model as ONNX QDQ; ``example`` fixes the input shape (batch is dynamic)."""
    onnx = optional_import("onnx", "export", "ONNX export")
    g = _Graph(onnx)
    shapes: dict[str, tuple[int, ...]] = {}

    values: dict[str, list[Any]] = {}

    def hook(ins: Instr, out: Any, args: list[Any]) -> None:
        values[ins.out] = args                                       # shape arithmetic resolved
        if isinstance(out, torch.Tensor):
            shapes[ins.out] = tuple(out.shape)
        elif isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
            shapes[ins.out] = [tuple(o.shape) for o in out]          # chunk / split

    _run(model.program, "integer", (example,), hook)
    names: dict[str, str] = {}
    for i, ins in enumerate(model.program.instrs):
        st, tag = ins.step, f"s{i}"
        args = [names[a] for a in _tensor_inputs(ins) if a in names]
        names[ins.out] = _step(g, ins, args, shapes, tag, values[ins.out])
    out_name = model.program.output
    final = g.node("DequantizeLinear", [names[out_name], *g.qparams("out", model.output_qparams)], "output")
    inp = g.h.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", *example.shape[1:]])
    out = g.h.make_tensor_value_info(final, onnx.TensorProto.FLOAT, ["batch", *shapes[out_name][1:]])
    graph = g.h.make_graph(g.nodes, "efficientml_int8", [inp], [out], g.inits)
    m = g.h.make_model(graph, opset_imports=[g.h.make_opsetid("", opset)], producer_name="efficientml")
    onnx.checker.check_model(m)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(m.SerializeToString())
    return path


def run_onnx(path: str | os.PathLike, x: torch.Tensor, optimize: bool = True, threads: int = 1) -> torch.Tensor:
    """Run the exported model in onnxruntime on CPU; returns the float output."""
    ort = optional_import("onnxruntime", "export", "running ONNX models")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])


def ort_kernel_counts(path: str | os.PathLike) -> dict[str, Any]:
    """Which kernels onnxruntime runs the exported model with after its graph optimizations (QDQ
    fusion): op counts of the optimized graph, and ``qlinearconv_fraction`` = QLinearConv nodes ÷
    Conv nodes in the exported graph (1.0: every conv runs as an integer kernel)."""
    import tempfile

    onnx = optional_import("onnx", "export", "ONNX export")
    ort = optional_import("onnxruntime", "export", "running ONNX models")
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.log_severity_level = 3                       # the NCHWc-serialization notice is expected
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        ops: dict[str, int] = {}
        for n in onnx.load(opts.optimized_model_filepath).graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"ops": ops, "convs": convs, "qlinearconv": ops.get("QLinearConv", 0),
            "qlinearconv_fraction": ops.get("QLinearConv", 0) / convs if convs else 1.0}
