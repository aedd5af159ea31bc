"""Kernel choice for decoding, as module swaps (the model's forward reads no kernel flags):

    use_cpu_gemv(model)        plain nn.Linear → GemvLinear("cpu"), packed groups → kernel "cpu"
    use_gpu_gemv(model)        the same with the Triton kernel ("gpu")
    use_cpu_qgemv(model)       QuantLinear / W8A8Linear → QGemvLinear (the int8-dot-product kernel), packed
    prepare_cpu_decode(model)  both CPU kernels when they build, else decode_layout for MKL's

Each is in place, returns what it did, and ``enable=False`` swaps back. Called by the caller that
decides how a loaded model runs (the CLI's generate/chat, benchmarks), after compression.
"""

from __future__ import annotations

from torch import nn

from efficientml.core.modules import set_module
from efficientml.core.errors import ConfigError
from efficientml.llm.kernels import cpu_gemv, cpu_qgemv, triton_gemv
from efficientml.llm.kernels.gemv_linear import GemvLinear, check_kernel
from efficientml.llm.kernels.packed import PackedProjections, decode_layout, packed_groups
from efficientml.llm.kernels.qgemv_linear import PackedQGemv, QGemvLinear, convertible
from efficientml.llm.kernels.qlinear import QuantLinear, W8A8Linear


def _swapped(mod: nn.Module, kernel: str, enable: bool) -> nn.Module:
    """What ``mod`` becomes when ``kernel`` is turned on (off): itself when it is not concerned."""
    if enable:
        if type(mod) is nn.Linear or (isinstance(mod, GemvLinear) and mod.kernel != kernel):
            return GemvLinear.wrap(mod, kernel)
        if isinstance(mod, PackedProjections) and mod.kernel != kernel:
            return mod.with_kernel(kernel)
    elif isinstance(mod, GemvLinear) and mod.kernel == kernel:
        return mod.unwrap()
    elif isinstance(mod, PackedProjections) and mod.kernel == kernel:
        return mod.with_kernel(None)
    return mod


def swap_kernel(model: nn.Module, kernel: str, enable: bool = True) -> int:
    """Swap every plain ``nn.Linear`` and packed group of ``model`` onto ``kernel`` ("cpu" / "gpu"),
    or back (``enable=False``), by dotted name; other modules (quantized linears, other
    replacements) are left alone. Returns the number of modules swapped. Does not check that the
    kernel can run here: :func:`use_cpu_gemv` / :func:`use_gpu_gemv` do."""
    check_kernel(kernel)
    todo = [(name, new) for name, mod in model.named_modules() if name
            and (new := _swapped(mod, kernel, enable)) is not mod]
    for name, new in todo:
        set_module(model, name, new)
    return len(todo)


def use_cpu_gemv(model: nn.Module, enable: bool = True) -> bool:
    """Run every plain ``nn.Linear`` of ``model`` (and the packed q/k/v, gate/up) on the CPU
    matrix-vector kernel (:mod:`efficientml.llm.kernels.cpu_gemv`) whenever its input is 1 to
    ``cpu_gemv.MAX_ROWS`` fp32 rows — decoding at batch 1 or a small batch — and through
    ``F.linear`` otherwise: the linears become :class:`GemvLinear` s holding the same parameters.
    Builds the kernel on first use; returns False (and changes nothing) when it is off,
    ``cpu_gemv.status()`` says why. Weights keep nn.Linear's (out, in) layout; a weight that is not
    contiguous (see :func:`decode_layout`) or not fp32, and a module with hooks, runs as before.
    ``enable=False`` undoes it."""
    if enable and not cpu_gemv.available():
        return False
    swap_kernel(model, "cpu", enable)
    return True


def use_gpu_gemv(model: nn.Module, enable: bool = True) -> bool:
    """Like :func:`use_cpu_gemv`, for CUDA: one-row inputs of plain ``nn.Linear`` s (and the packed
    q/k/v, gate/up) run on the Triton matrix-vector kernel (:mod:`efficientml.llm.kernels.triton_gemv`,
    block sizes tuned per shape on first use) instead of cuBLAS. False (nothing changed) without
    Triton or a GPU (or the CPU interpreter, ``TRITON_INTERPRET=1``)."""
    dev = next(model.parameters()).device
    if enable and not triton_gemv.available(dev):
        return False
    swap_kernel(model, "gpu", enable)
    return True


def use_cpu_qgemv(model: nn.Module, lm_head_bits: int | None = None) -> dict:
    """Run every quantized linear of ``model`` (QuantLinear W4/W8 in groups of 32·k, dynamic W8A8Linear)
    on the quantized CPU kernel (:mod:`.cpu_qgemv`): each becomes a :class:`QGemvLinear` holding its codes
    in the kernel's layout (re-laid, not dequantized; the old buffers are dropped), and q/k/v, gate/up
    of a block run as one call (:class:`PackedQGemv`). ``lm_head_bits`` (8 or 4): also quantize a float
    ``lm_head`` to Q8_0 / Q4_0-style blocks (what llama.cpp's quantizer writes; the tied embedding
    table itself stays as it is). Returns ``{"kernel": status, "converted": n, "refused": {name: why}}``
    (nothing changed when the kernel is off). In place; not undone (save before)."""
    if lm_head_bits not in (None, 4, 8):
        raise ConfigError(f"lm_head_bits must be 4, 8 or None, got {lm_head_bits!r}")
    report = {"kernel": cpu_qgemv.status(), "converted": 0, "refused": {}}
    if not cpu_qgemv.available():
        return report
    todo = []
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, W8A8Linear)):
            why = convertible(mod)
            if why is None:
                todo.append((name, QGemvLinear.from_module(mod)))
            else:
                report["refused"][name] = why
    head = getattr(model, "lm_head", None)
    if lm_head_bits is not None and type(head) in (nn.Linear, GemvLinear):
        todo.append(("lm_head", QGemvLinear.from_linear(head, lm_head_bits)))
    for name, new in todo:
        set_module(model, name, new)
    for block, mods in list(packed_groups(model)):
        if PackedQGemv.packable(mods):
            block.packed = PackedQGemv(mods)
    report["converted"] = len(todo)
    return report


def slow_linears(model: nn.Module) -> dict[str, str]:
    """The quantized linears of ``model`` left without a fast CPU kernel after :func:`prepare_cpu_decode`
    (they dequantize their weight on every call: ~20× slower than a kernel), each with one line why."""
    from efficientml.llm.kernels.qlinear_kernels import QuantLinearDequant

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and not isinstance(mod, QuantLinearDequant):
            on_torch = mod._cpu_int4_ok() or mod._cpu_int8_ok()  # torch's int4 / int8 CPU kernels
            if not on_torch:
                why = convertible(mod) or cpu_qgemv.status()
                out[name] = why
    return out


def _install_native(model: nn.Module) -> str:
    """Let ``generate`` run batch-1 decode steps in C (:mod:`.native_step`) where the model allows it."""
    from efficientml.llm.kernels import native_step

    if native_step.status().startswith("off"):
        return f"; native step {native_step.status()}"
    why = native_step.model_why_not(model)
    if why is not None:
        return f"; native step off ({why})"
    model.cpu_decode_step = native_step.native_step
    return "; native C decode step"


def prepare_cpu_decode(model: nn.Module, lm_head_bits: int | None = None) -> str:
    """Make batch-1 CPU decoding fast, in place, and say how: quantized linears on the quantized kernel
    (:func:`use_cpu_qgemv`; ``lm_head_bits`` as there), float ones on the matrix-vector kernel when it
    builds (:func:`use_cpu_gemv`), else :func:`decode_layout` for MKL's kernel; then, where every linear
    is on those kernels, the whole batch-1 step in C (:mod:`.native_step`, used by ``generate``)."""
    q = use_cpu_qgemv(model, lm_head_bits)
    quant = ""
    if q["converted"] or q["refused"]:
        quant = f"; {q['converted']} quantized linears on cpu_qgemv ({q['kernel'].split(';')[0].removeprefix('on (')})"
        if q["refused"]:
            name, why = next(iter(q["refused"].items()))
            quant += f", {len(q['refused'])} not (e.g. {name}: {why})"
    if use_cpu_gemv(model):
        return "cpu_gemv kernel, (out, in) weights" + quant + _install_native(model)
    decode_layout(model)
    return f"decode_layout (in, out) weights for MKL; the kernel is {cpu_gemv.status()}" + quant
