"""PyTorch's own int8 flow (torch.ao FX graph mode) on the same model and calibration data, the
reference our integer model is measured against."""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn

from efficientml.core.errors import ConfigError, UnsupportedError


def _pool_means(model: nn.Module) -> nn.Module:
    """Rewrite ``x.mean(dim=(2, 3))`` as ``adaptive_avg_pool2d(x, 1).flatten(1)`` (the same math):
    torch's quantized ``mean`` without keepdim fails on its own channels-last outputs ("required
    rank 4 tensor"), while the pooling form is supported by torch.ao."""
    import torch.fx as fx
    import torch.nn.functional as F

    gm = fx.symbolic_trace(model)
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target == "mean":
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            if tuple(dims or ()) in ((2, 3), (-2, -1)) and not keep:
                with gm.graph.inserting_after(node):
                    pool = gm.graph.call_function(F.adaptive_avg_pool2d, (node.args[0], 1))
                with gm.graph.inserting_after(pool):
                    flat = gm.graph.call_method("flatten", (pool, 1))
                node.replace_all_uses_with(flat)
                gm.graph.erase_node(node)
    gm.recompile()
    return gm


def torch_ao_int8(model: nn.Module, calibration: Iterable, example: torch.Tensor, backend: str = "x86",
                  batches: int = 8) -> nn.Module:
    """``prepare_fx`` with the backend's default qconfig, calibrate, ``convert_fx``."""
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError as e:
        raise UnsupportedError("this PyTorch build has no torch.ao.quantization FX flow") from e
    if backend not in torch.backends.quantized.supported_engines:
        raise UnsupportedError(f"quantized engine {backend!r} is not available here; this build has "
                               f"{torch.backends.quantized.supported_engines}")
    torch.backends.quantized.engine = backend
    m = copy.deepcopy(model).eval()
    prepared = prepare_fx(_pool_means(m), get_default_qconfig_mapping(backend), (example,))
    n = 0
    with torch.no_grad():
        for xb in calibration:
            prepared(xb[0] if isinstance(xb, (tuple, list)) else xb)
            n += 1
            if n >= batches:
                break
    if n == 0:
        raise ConfigError("torch.ao calibration got no data: the loader yielded no batches")
    return convert_fx(prepared)
