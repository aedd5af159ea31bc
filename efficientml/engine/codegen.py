"""C code generation: one self-contained ``.c`` and ``.h`` per model.

The ``.c`` holds the portable kernels (``csrc/eml_kernels.c``, pasted in), every constant as a
``const`` array (Flash on a microcontroller: int8 weights, int32 biases, fixed-point multipliers,
int8 shifts, gather tables), one static arena of the planner's size (SRAM) and the entry point::

    int <prefix>_run(const uint8_t *in, uint8_t *out);   /* uint8 codes, NCHW, batch 1; returns 0 */

which copies ``in`` into the arena, calls one kernel per op at the planner's offsets and copies the
output codes to ``out``. No malloc, no floats, no libc beyond ``memcpy``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from efficientml.engine.lower import Op
from efficientml.engine.planner import MemoryPlan

CSRC = Path(__file__).with_name("csrc")
KERNELS = CSRC / "eml_kernels.c"
# pasted in this order; all but the first compile to nothing unless EML_HOST is defined (the host build)
SOURCES = (KERNELS, CSRC / "eml_x86.c", CSRC / "eml_host.c", CSRC / "eml_host_ops.c", CSRC / "eml_winograd.c")
CONV_ALGOS = ("auto", "im2col", "winograd")
CONV_FIELDS = ("c", "h", "w", "o", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "groups", "ho", "wo",
               "zin", "zout", "lo", "hi")
POOL_FIELDS = ("c", "h", "w", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "ho", "wo")


def _array(ctype: str, name: str, values: Iterable[int], per_line: int = 24) -> str:
    vals = [str(int(v)) for v in values]
    suffix = "LL" if ctype == "int64_t" else ""
    rows = [", ".join(v + suffix for v in vals[i:i + per_line]) for i in range(0, len(vals), per_line)]
    body = ",\n    ".join(rows) if rows else "0"
    return f"static const {ctype} {name}[{max(len(vals), 1)}] = {{\n    {body}\n}};"


def _flat(t: torch.Tensor) -> list[int]:
    return t.reshape(-1).tolist()


class _Emitter:
    """Declarations and calls for the ops of one plan; ``a(view)`` is the view's arena pointer."""

    def __init__(self, plan: MemoryPlan, conv_algo: str | dict[str, str] = "auto"):
        self.plan, self.conv_algo = plan, conv_algo
        self.decls: list[str] = []
        self.calls: list[str] = []
        self.scratch = 0                  # bytes of the host build's scratch (im2col, padded planes, Winograd)

    def algo(self, op: Op) -> str:
        """The conv algorithm asked for ``op`` (a name → algorithm dict falls back to "auto")."""
        a = self.conv_algo.get(op.name, "auto") if isinstance(self.conv_algo, dict) else self.conv_algo
        if a not in CONV_ALGOS:
            from efficientml.core.errors import ConfigError

            raise ConfigError(f"conv algorithm {a!r} for {op.name!r} is not one of {', '.join(CONV_ALGOS)}")
        return a

    def host_call(self, decls: list[str], call: str, scratch: int, x: str, y: str) -> None:
        """Host-build declarations and call; the call above it becomes the microcontroller's branch."""
        self.decls.append("\n".join(["#if defined(EML_HOST)", *decls, "#endif"]))
        mcu = self.calls.pop()
        self.calls += ["#if defined(EML_HOST)", call.format(x=x, y=y, s="((uint8_t *)eml_scratch)"), "#else", mcu,
                       "#endif"]
        self.scratch = max(self.scratch, scratch)

    def a(self, v: Any) -> str:
        return f"(A + {self.plan.address(v)})"

    def op(self, i: int, op: Op) -> None:
        fn = _EMIT.get(op.kind)
        if fn is None:                                   # lower.py only makes the kinds below
            raise KeyError(op.kind)
        self.calls.append(f"    /* {i}: {op.kind} {op.name} -> {list(op.out.shape)} */")
        fn(self, f"L{i}", op)

    def weights(self, tag: str, op: Op) -> str:
        p = op.params
        self.decls += [_array("int8_t", f"{tag}_w", _flat(p["w"])), _array("int8_t", f"{tag}_s", _flat(p["shift"])),
                       _array("int32_t", f"{tag}_m", _flat(p["m0"]))]
        return f"{tag}_w, {{bias}}, {tag}_m, {tag}_s"


def _conv(e: _Emitter, tag: str, op: Op) -> None:
    p = op.params
    fields = ", ".join(str(int(p["conv"][k])) for k in CONV_FIELDS)
    e.decls.append(f"static const eml_conv_t {tag}_p = {{{fields}}};")
    e.decls.append(_mcu_only(_array("int32_t", f"{tag}_b", _flat(p["bias"]))))
    consts = e.weights(tag, op).format(bias=f"{tag}_b")
    x, y = e.a(op.ins[0]), e.a(op.out)
    if op.kind == "depthwise":
        scratch = e.a(p["scratch"]) if "scratch" in p else "0"
        e.calls.append(f"    eml_depthwise(&{tag}_p, {x}, {consts}, {y}, {scratch});")
    else:
        e.calls.append(f"    eml_{op.kind}(&{tag}_p, {x}, {consts}, {y});")
    decls, call, scratch = host_conv(tag, op, e.algo(op))
    if f"{tag}_w," not in call:                      # the host kernel takes another weight layout
        e.decls[-3] = _mcu_only(e.decls[-3])
    e.host_call(decls, call, scratch, x, y)


def _mcu_only(decl: str) -> str:
    return f"#if !defined(EML_HOST)\n{decl}\n#endif"


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


NR = 32    # EML_NR of eml_host.c: GEMM columns are padded to a multiple of it
G2 = torch.tensor([[2, 0, 0], [1, 1, 1], [1, -1, 1], [0, 0, 2]], dtype=torch.int64)   # 2 G of F(2x2, 3x3)


def winograd_ok(c: dict[str, int]) -> bool:
    """Whether a conv's shape is one the Winograd kernel takes (3x3, stride 1, undilated, groups 1)."""
    return (c["kh"], c["kw"], c["sh"], c["sw"], c["dh"], c["dw"], c["groups"]) == (3, 3, 1, 1, 1, 1, 1)


def pick_algo(c: dict[str, int], algo: str) -> str:
    """im2col or winograd for a conv2d: forced, else ("auto") im2col: measured on the VGG's 3x3 layers
    (28x28, 16-128 channels), the int16 Winograd GEMM plus its scalar transforms is slower than the
    uint8 im2col GEMM on the AVX2 and VNNI paths alike, so it is only taken when asked for."""
    if not winograd_ok(c) or algo != "winograd":
        return "im2col"
    return "winograd"


def winograd_weights(w: torch.Tensor) -> torch.Tensor:
    """U = G' g G'^T per (o, c) as (16, o, cp) int16, cp = c rounded up to even (zeros)."""
    u = torch.einsum("ak,ockl,bl->aboc", G2, w.to(torch.int64), G2)   # (4, 4, o, c)
    o, c = w.shape[:2]
    out = torch.zeros(16, o, _round_up(c, 2), dtype=torch.int64)
    out[:, :, :c] = u.reshape(16, o, c)
    return out


def depthwise_scratch(c: dict[str, int]) -> int:
    """Scratch bytes of the host depthwise kernel: zin-padded planes of every channel; for 3x3, stride
    1 or 2, undilated, s x s phase planes of (ho + 2 // s) rows of wo + 2 // s and 64 spare bytes each
    (eml_dw3_dims of eml_host_ops.c)."""
    s = c["sh"]
    if (c["kh"], c["kw"], c["dh"], c["dw"]) == (3, 3, 1, 1) and c["sw"] == s and s in (1, 2):
        return c["c"] * (s * s * (c["ho"] + 2 // s) * (c["wo"] + 2 // s) + 64)
    hp = (c["ho"] - 1) * c["sh"] + (c["kh"] - 1) * c["dh"] + 1
    wp = (c["wo"] - 1) * c["sw"] + (c["kw"] - 1) * c["dw"] + 1
    return c["c"] * hp * wp


def host_conv(tag: str, op: Op, algo: str) -> tuple[list[str], str, int]:
    """Declarations, call (``{x}``, ``{y}``, ``{s}``: input, output, scratch) and scratch bytes of a conv's
    host kernel; beff folds the input zero point into the bias (raw codes times weights)."""
    p, c = op.params, op.params["conv"]
    w = p["w"].to(torch.int64)
    o, kk = w.shape[0], w[0].numel()
    beff = p["bias"].to(torch.int64) - c["zin"] * w.reshape(o, -1).sum(1)
    decls = [_array("int64_t", f"{tag}_be", _flat(beff))]
    rq = f"{tag}_be, {tag}_m, {tag}_s"
    if op.kind == "depthwise":
        return decls, f"    eml_depthwise_host(&{tag}_p, {{x}}, {tag}_w, {rq}, {{y}}, {{s}});", depthwise_scratch(c)
    if op.kind == "conv2d" and pick_algo(c, algo) == "winograd":
        tp = _round_up(((c["ho"] + 1) // 2) * ((c["wo"] + 1) // 2), NR)
        u = winograd_weights(w)
        decls.append(_array("int16_t", f"{tag}_u", _flat(u)))
        scratch = _round_up(32 * u.shape[2] * tp, 64) + 64 * o * tp
        return decls, f"    eml_winograd_host(&{tag}_p, {{x}}, {tag}_u, {rq}, {{y}}, {{s}});", scratch
    hp = (c["ho"] - 1) * c["sh"] + (c["kh"] - 1) * c["dh"] + 1
    wp = (c["wo"] - 1) * c["sw"] + (c["kw"] - 1) * c["dw"] + 1
    safe = int(w.abs().max().item() <= 64) if w.numel() else 1
    cols = _round_up(c["ho"] * c["wo"], NR)
    if op.kind == "pointwise":
        kp = _round_up(kk, 4)
        wname = f"{tag}_w"
        if kp != kk:                                 # rows padded with zero weights to whole groups of 4
            wname = f"{tag}_wp"
            decls.append(_array("int8_t", wname, _flat(torch.nn.functional.pad(w.reshape(o, kk), (0, kp - kk)))))
        return decls, f"    eml_pointwise_host(&{tag}_p, {{x}}, {wname}, {rq}, {safe}, {{y}}, {{s}});", (kp + 1) * cols
    cg4 = _round_up(w.shape[1], 4)                   # k = ((ky, kx), ci): a group of 4 is one pixel's channels
    wk = torch.nn.functional.pad(w.permute(0, 2, 3, 1), (0, cg4 - w.shape[1])).reshape(o, -1)
    decls.append(_array("int8_t", f"{tag}_wk", _flat(wk)))
    scratch = cg4 * hp * wp + wk.shape[1] * cols + c["w"]
    return decls, f"    eml_conv2d_host(&{tag}_p, {{x}}, {tag}_wk, {rq}, {safe}, {{y}}, {{s}});", scratch


def host_globals(prefix: str, scratch: int) -> list[str]:
    """The host build's scratch and its run-time controls: ``<prefix>_set_isa(isa)`` (0 portable,
    1 AVX2, 2 AVX-512 VNNI, -1 the best the CPU has; returns the path in use) and
    ``<prefix>_set_threads(n)``."""
    return ["#if defined(EML_HOST)",
            f"static int64_t eml_scratch[{max((scratch + 7) // 8, 1)}] __attribute__((aligned(64)));",
            f"int {prefix}_set_isa(int isa) {{ return eml_set_isa(isa); }}",
            f"int {prefix}_set_threads(int n) {{ eml_threads = n < 1 ? 1 : n; return eml_threads; }}",
            "#endif"]


def _linear(e: _Emitter, tag: str, op: Op) -> None:
    p = op.params
    e.decls.append(_array("int64_t", f"{tag}_b", _flat(p["beff"])))
    consts = e.weights(tag, op).format(bias=f"{tag}_b")
    call = (f"({p['rows']}, {p['f']}, {p['o']}, {e.a(op.ins[0])}, {consts}, {p['zout']}, {p['lo']}, {p['hi']}, "
            f"{e.a(op.out)});")
    e.calls.append(f"    eml_linear{call}")
    e.host_call([], f"    eml_linear_host{call}", 0, "", "")


def _maxpool(e: _Emitter, tag: str, op: Op) -> None:
    fields = ", ".join(str(int(op.params["pool"][k])) for k in POOL_FIELDS)
    e.decls.append(f"static const eml_pool_t {tag}_p = {{{fields}}};")
    e.calls.append(f"    eml_maxpool(&{tag}_p, {e.a(op.ins[0])}, {e.a(op.out)});")
    e.host_call([], f"    eml_maxpool_host(&{tag}_p, {{x}}, {{y}});", 0, e.a(op.ins[0]), e.a(op.out))


def _mean(e: _Emitter, tag: str, op: Op) -> None:
    p = op.params
    e.calls.append(f"    eml_mean({p['outer']}, {p['n']}, {p['inner']}, {e.a(op.ins[0])}, {p['zin']}, {p['m0']}, "
                   f"{p['shift']}, {p['zout']}, {p['lo']}, {p['hi']}, {e.a(op.out)});")


def _add(e: _Emitter, tag: str, op: Op) -> None:
    p = op.params
    a, b = op.ins
    e.calls.append(f"    eml_add({op.out.numel}, {e.a(a)}, {e.a(b)}, {p['za']}, {p['zb']}, {p['ma']}LL, {p['mb']}LL, "
                   f"{p['shift']}, {p['zout']}, {p['lo']}, {p['hi']}, {e.a(op.out)});")


def _mul(e: _Emitter, tag: str, op: Op) -> None:
    p = op.params
    e.decls += [_array("int32_t", f"{tag}_sh", p["shape4"]), _array("int32_t", f"{tag}_bs", p["bstride"])]
    a, b = op.ins
    e.calls.append(f"    eml_mul({op.out.numel}, {tag}_sh, {tag}_bs, {e.a(a)}, {e.a(b)}, {p['za']}, {p['zb']}, "
                   f"{p['m0']}, {p['shift']}, {p['zout']}, {p['lo']}, {p['hi']}, {e.a(op.out)});")


def _clamp(e: _Emitter, tag: str, op: Op) -> None:
    p = op.params
    e.calls.append(f"    eml_clamp({op.out.numel}, {e.a(op.ins[0])}, {p['lo']}, {p['hi']}, {e.a(op.out)});")


def _lut(e: _Emitter, tag: str, op: Op) -> None:
    e.decls.append(_array("uint8_t", f"{tag}_t", _flat(op.params["table"])))
    e.calls.append(f"    eml_lut({op.out.numel}, {e.a(op.ins[0])}, {tag}_t, {e.a(op.out)});")


def _gather(e: _Emitter, tag: str, op: Op) -> None:
    e.decls.append(_array("int32_t", f"{tag}_i", _flat(op.params["idx"])))
    e.calls.append(f"    eml_gather({op.out.numel}, {e.a(op.ins[0])}, {tag}_i, {op.params['fill']}, {e.a(op.out)});")


def _cat(e: _Emitter, tag: str, op: Op) -> None:
    p = op.params
    y = e.plan.address(op.out)
    for x, part in zip(op.ins, p["parts"]):
        e.calls.append(f"    eml_cat_part({p['outer']}, {part['block']}, {p['ystride']}, {e.a(x)}, {part['zin']}, "
                       f"{part['m0']}, {part['shift']}, {p['zout']}, {p['lo']}, {p['hi']}, (A + {y + part['start']}));")


_EMIT: dict[str, Callable[[_Emitter, str, Op], None]] = {
    "conv2d": _conv, "depthwise": _conv, "pointwise": _conv, "linear": _linear, "maxpool": _maxpool,
    "mean": _mean, "add": _add, "mul": _mul, "clamp": _clamp, "lut": _lut, "gather": _gather, "cat": _cat}


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is a C identifier (the entry point is ``<prefix>_run``)."""
    from efficientml.core.errors import ConfigError

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
        raise ConfigError(f"C prefix {prefix!r} is not a C identifier (letters, digits, _)")
    return prefix


def generate_header(plan: MemoryPlan, prefix: str = "model") -> str:
    """The model's ``.h``: sizes, shapes and the entry point's prototype."""
    g, up = plan.graph, check_prefix(prefix).upper()
    return "\n".join([
        f"/* {prefix}.h: generated by efficientml.engine; uint8 activation codes, NCHW, batch 1 */",
        f"#ifndef {up}_H", f"#define {up}_H", "#include <stdint.h>", "",
        f"#define {up}_INPUT_SIZE {g.input.numel}    /* input shape {list(g.input.shape)} */",
        f"#define {up}_OUTPUT_SIZE {g.output.numel}  /* output shape {list(g.output.shape)} */",
        f"#define {up}_ARENA_SIZE {plan.arena_bytes}", "",
        "/* run the model on input codes `in`, write the output codes to `out`; returns 0 */",
        f"int {prefix}_run(const uint8_t *in, uint8_t *out);", "", f"#endif /* {up}_H */", ""])


def generate_c(plan: MemoryPlan, prefix: str = "model", conv_algo: str | dict[str, str] = "auto") -> str:
    """The model's ``.c`` (see the module docstring); it includes ``<prefix>.h``. ``conv_algo``
    ("auto", "im2col", "winograd", or a dict by op name) picks the host build's 3x3 conv algorithm."""
    check_prefix(prefix)
    e = _Emitter(plan, conv_algo)
    for i, op in enumerate(plan.graph.ops):
        e.op(i, op)
    g, words = plan.graph, (plan.arena_bytes + 3) // 4
    run = [f"int {prefix}_run(const uint8_t *in, uint8_t *out) {{",
           "    uint8_t *A = (uint8_t *)arena;",
           f"    memcpy(A + {plan.address(g.input)}, in, {g.input.numel});", *e.calls,
           f"    memcpy(out, A + {plan.address(g.output)}, {g.output.numel});", "    return 0;", "}", ""]
    return "\n".join([f"/* {prefix}.c: generated by efficientml.engine ({len(g.ops)} ops, arena "
                      f"{plan.arena_bytes} bytes) */", f'#include "{prefix}.h"', *(f.read_text() for f in SOURCES),
                      f"static uint32_t arena[{max(words, 1)}];   /* the planner's arena, 4-byte aligned */",
                      *host_globals(prefix, e.scratch), *e.decls, "", *run])
