"""Kernel choice for decoding, as module swaps (the model's forward reads no kernel flags):

    use_cpu_gemv(model)        plain nn.Linear → GemvLinear("cpu"), packed groups → kernel "cpu"
    use_gpu_gemv(model)        the same with the Triton kernel ("gpu")
    prepare_cpu_decode(model)  the CPU kernel when it builds, else decode_layout for MKL's

Each is in place, returns what it did, and ``enable=False`` swaps back. Called by the caller that
decides how a loaded model runs (the CLI's generate/chat, benchmarks), after compression.
"""

from __future__ import annotations

from torch import nn

from efficientml.core.modules import set_module
from efficientml.llm.kernels import cpu_gemv, triton_gemv
from efficientml.llm.kernels.gemv_linear import GemvLinear, check_kernel
from efficientml.llm.kernels.packed import PackedProjections, decode_layout


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


def prepare_cpu_decode(model: nn.Module) -> str:
    """Make batch-1 CPU decoding fast, in place, and say how: the matrix-vector kernel when it
    builds (:func:`use_cpu_gemv`), else :func:`decode_layout` for MKL's kernel."""
    if use_cpu_gemv(model):
        return "cpu_gemv kernel, (out, in) weights"
    decode_layout(model)
    return f"decode_layout (in, out) weights for MKL; the kernel is {cpu_gemv.status()}"
