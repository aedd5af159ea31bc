"""Kernels the LLM runs on, swapped in as modules at load time (the model itself has no kernel
dispatch): the fp32 CPU matrix-vector kernel (``cpu_gemv``, C source in ``csrc/``, compiled on first
use), the Triton matrix-vector kernel for CUDA (``triton_gemv``), what they share (``gemv_op``), the
packed weight-only and W8A8 linears (``qlinear``) and their fused Triton kernel (``triton_wq``).

The swaps: ``packed`` (q/k/v and gate/up as one matmul: :func:`pack_projections`, run by the
loaders; :func:`decode_layout`), ``gemv_linear`` (:class:`GemvLinear`, an ``nn.Linear`` on a
matrix-vector kernel) and ``decode`` (:func:`use_cpu_gemv`, :func:`use_gpu_gemv`,
:func:`prepare_cpu_decode`). Submodules are imported on use; those names are also reachable here.
"""

import importlib

_PUBLIC = {"pack_projections": "packed", "decode_layout": "packed", "PackedProjections": "packed",
           "GemvLinear": "gemv_linear", "use_cpu_gemv": "decode", "use_gpu_gemv": "decode",
           "prepare_cpu_decode": "decode", "swap_kernel": "decode"}


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
